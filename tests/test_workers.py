"""Jobs side by side in worker processes: the same numbers as inline, failures raised as they were raised."""

from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import SMOKE
from vitprune.errors import ParamsError
from vitprune.params import load_params
from vitprune.study.workers import default_workers, run_jobs, start_method


def train_a_little(seed: int) -> list[float]:
    """A few SGD steps of a small layer: floats that would show any difference in threads or random state."""
    torch.manual_seed(seed)
    layer = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(5):
        loss = layer(torch.randn(32, 64)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return layer.weight.detach().flatten().tolist()


def refuse(seed: int) -> int:
    """Odd seeds fail, even ones succeed."""
    if seed % 2:
        raise ParamsError(f"seed {seed} refused")
    return seed


def test_pooled_jobs_give_exactly_the_inline_numbers_in_job_order():
    jobs = [(0,), (1,), (2,)]
    inline = run_jobs(train_a_little, jobs, workers=1, threads=1)
    pooled = run_jobs(train_a_little, jobs, workers=2, threads=1)
    assert pooled == inline and inline[0] != inline[1]


def test_workers_forked_from_a_busy_parent_still_give_the_inline_numbers():
    """On Linux the workers are forked (they start with the parent's imports); a parent that has run two-thread
    operations and drawn random numbers passes neither its threads nor its random state on to their jobs."""
    import sys

    assert start_method() == ("fork" if sys.platform == "linux" else "spawn")
    jobs = [(0,), (1,), (2,)]
    inline = run_jobs(train_a_little, jobs, workers=1, threads=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        torch.rand(512, 512) @ torch.rand(512, 512)
        assert run_jobs(train_a_little, jobs, workers=2, threads=1) == inline
    finally:
        torch.set_num_threads(threads)


def test_a_failing_job_raises_its_own_error():
    with pytest.raises(ParamsError, match="seed 1 refused"):
        run_jobs(refuse, [(2,), (1,)], workers=2, threads=1)
    with pytest.raises(ParamsError, match="seed [13] refused"):  # the first to fail, whichever finishes first
        run_jobs(refuse, [(1,), (3,)], workers=2, threads=1)


def test_workers_follow_the_parameter_set_or_the_cores():
    p = load_params(None, {"train.device": "cpu", "train.threads": 1})
    assert default_workers(load_params(None, {"workers": 2, "train.threads": 1})) == 2
    assert 1 <= default_workers(p) <= 1024
    assert default_workers(load_params(None, {"train.device": "cpu", "train.threads": 1024})) == 1


def test_more_workers_than_the_machine_holds_are_capped_with_a_message():
    p = load_params(SMOKE, {"workers": 1000})
    with pytest.warns(UserWarning, match=r"workers=1000 capped at \d+"):
        n = default_workers(p)
    assert 1 <= n <= 2 * (os.cpu_count() or 1)


ORPHAN = """
import os, sys, time
from vitprune.study.workers import die_with_parent
if sys.argv[1] == "parent":
    import subprocess
    child = subprocess.Popen([sys.executable, "-c", sys.argv[2], "child", sys.argv[3]])
    time.sleep(60)
else:
    die_with_parent(interval=0.1)
    open(sys.argv[2], "w").write(str(os.getpid()))
    time.sleep(60)
"""


def test_a_worker_dies_with_the_process_that_started_it(tmp_path):
    """kill -9 of a run must not leave workers writing into its folder: they end within a second."""
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", ORPHAN, "parent", ORPHAN, str(pid_file)])
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for _ in range(50):
        time.sleep(0.1)
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
    os.kill(child, signal.SIGKILL)
    pytest.fail("the child outlived its killed parent by 5 s")

"""Pinned numerics: the same seeds give the same floats on CPUs with and without AVX-512, and the record says so."""

import json
import os
import subprocess
import sys
import warnings

import pytest

from vitprune.study.provenance import PINNED_NUMERICS, environment, numerics, pin_numerics

# A few training steps of the default architecture (patch-embedding convolution, attention, MLP, AdamW) on
# fixed random data; prints the ATen kernels in use and a hash of the trained weights.
TRAIN_STEPS = """
import hashlib, json, sys
from vitprune.study.provenance import pin_numerics
pin_numerics()
import torch
from vitprune import build_model, load_params
torch.set_num_threads(1)
torch.manual_seed(0)
model = build_model(load_params("params/default.yaml").model, 10, 1, 28)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
for _ in range(5):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
digest = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in model.state_dict().values())).hexdigest()
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "weights": digest}))
"""


def _train_in_subprocess(env_overrides: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PINNED_NUMERICS and k != "MKL_ENABLE_INSTRUCTIONS"}
    env.update(env_overrides)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", TRAIN_STEPS], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_pin_numerics_sets_what_is_unset_and_keeps_what_the_user_chose():
    env = {"ATEN_CPU_CAPABILITY": "avx512"}
    in_force = pin_numerics(env)
    assert in_force["ATEN_CPU_CAPABILITY"] == "avx512"  # the user's choice wins
    assert in_force["MKL_CBWR"] == PINNED_NUMERICS["MKL_CBWR"] == env["MKL_CBWR"]
    assert set(in_force) == set(PINNED_NUMERICS) and env["ONEDNN_MAX_CPU_ISA"] == "AVX2"


def test_the_environment_record_names_the_kernels_and_the_pins(tmp_path, monkeypatch):
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)  # nothing asked: nothing to warn about
    params = tmp_path / "p.yaml"
    params.write_text("name: x\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        env = environment(params)
    assert env["cpu_capability"] == numerics()["cpu_capability"] and env["ATEN_CPU_CAPABILITY"] == "unset"
    assert set(PINNED_NUMERICS) <= set(env) and len(env["params_sha256"]) == 64


def test_a_pin_that_came_too_late_is_reported(monkeypatch):
    """This pytest process ran tensor operations long ago: asking for AVX2 now cannot change ATen's kernels."""
    import torch

    torch.ones(2).sum()
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    if torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512"):
        with pytest.warns(RuntimeWarning, match="ran before vitprune pinned the numerics"):
            numerics()
    else:  # a CPU without AVX-512 runs AVX2 (or narrower) kernels anyway
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            numerics()


def test_pinned_training_computes_what_an_avx2_only_machine_computes():
    """This machine with the pins against this machine limited to AVX2 the way an AVX2-only CPU is (ATen's dispatch,
    MKL's instruction set, oneDNN's ISA) and MKL left to choose its own code path: the same weights, bit for bit.
    On a CPU with AVX-512 this fails if the ATen or the oneDNN pin is dropped (measured on an AMD EPYC with AVX-512:
    either changes the weights; MKL takes its AVX2 path on AMD CPUs anyway, its pin is for Intel's AVX-512 GEMM)."""
    pinned = _train_in_subprocess({})
    avx2_machine = _train_in_subprocess({"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                                         "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AUTO"})
    assert pinned["capability"] in ("AVX2", "DEFAULT")
    assert pinned["weights"] == avx2_machine["weights"]

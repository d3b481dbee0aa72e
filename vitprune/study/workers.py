"""Independent jobs (one seed's training, one variant's fine-tuning) side by side in worker processes.

A tiny ViT cannot keep two cores busy from one process (two threads on 64-wide matrices run an
epoch 1.3x faster than one, two processes run two epochs in the time of one); so the pipeline runs
its per-seed and per-variant jobs in separate processes with a fixed number of torch threads each.
The thread count is fixed by the parameter set, never by how many jobs happen to run, so a job's
numbers are the same whether it ran alone, in a pool, or inline.

On Linux the workers are forked from the notebook's kernel, which has imported torch, timm and the stage's
modules already; spawned workers import them again (4–5 s a process, in every stage).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Any

from tqdm.auto import tqdm

from vitprune.params import Params
from vitprune.registry import import_plugins

WORKER_BYTES = 1_500_000_000  # what one worker may take: torch, timm and the data imported, a small model training


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def worker_limit(threads: int | None) -> tuple[int, str]:
    """The most workers this machine can run: twice its cores over the threads per job (more only queue for the
    cores), and what its free memory holds at WORKER_BYTES each; with the reason, for the message."""
    import psutil

    by_cores = max(1, 2 * _cores() // (threads or _cores()))
    by_memory = max(1, psutil.virtual_memory().available // WORKER_BYTES)
    if by_memory < by_cores:
        return by_memory, f"{psutil.virtual_memory().available / 1e9:.1f} GB free at {WORKER_BYTES / 1e9:g} GB each"
    return by_cores, f"2 x {_cores()} cores / {threads or _cores()} threads per job"


def default_workers(p: Params) -> int:
    """Processes for this parameter set: `workers` if given (capped by `worker_limit`, with a message), else CPU
    cores / threads per job (1 on GPU)."""
    if p.workers is not None:
        limit, why = worker_limit(p.train.threads)
        if p.workers > limit:
            warnings.warn(f"workers={p.workers} capped at {limit} ({why})", stacklevel=2)
        return min(p.workers, limit)
    if p.train.device.startswith("cuda") or (p.train.device == "auto" and _cuda_available()):
        return 1
    return max(1, _cores() // (p.train.threads or _cores()))


def die_with_parent(interval: float = 0.5) -> None:
    """End this process soon after the one that started it ends, however it ends (kill -9 included): a worker or
    kernel left behind would go on writing into a run folder whose lock is already released."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)  # orphaned: nothing of ours is half-written (every file is written atomically)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def start_method() -> str:
    """How pool workers start: forked where that is safe (Linux, and CUDA not initialised in this process), so
    they begin with this process's imports; spawned elsewhere."""
    import torch

    return "fork" if sys.platform == "linux" and not torch.cuda.is_initialized() else "spawn"


def _start_worker(threads: int | None, plugins: Sequence[str] = (), pool: bool = False) -> None:
    import torch

    if pool:
        die_with_parent()
        # a worker forked from a Jupyter kernel writes where a spawned one does: to the process's own streams,
        # not through the kernel's sockets into the notebook
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__

    if threads:
        torch.set_num_threads(threads)
    import_plugins(list(plugins))  # a plugin's methods are registered in every process that runs a job


def run_jobs(fn: Callable[..., Any], jobs: Sequence[tuple], workers: int, threads: int | None,
             label: str = "jobs", on_done: Callable[[int, int], None] | None = None,
             plugins: Sequence[str] = ()) -> list[Any]:
    """fn(*job) for every job, in `workers` processes (`start_method`) with `threads` torch threads each (inline
    when one worker or one job; fewer than two rounds of jobs all start at once); results in job order. The first job to
    fail (in time) has its error raised as it was raised in the job; jobs not started yet are cancelled. Each
    process imports `plugins` first."""
    if workers <= 1 or len(jobs) <= 1:
        _start_worker(threads, plugins)
        results = []
        for i, job in enumerate(jobs):
            results.append(fn(*job))
            if on_done:
                on_done(i + 1, len(jobs))
        return results
    if len(jobs) < 2 * workers:  # one round, cores shared, rather than a second round on one core while others idle
        workers = min(len(jobs), worker_limit(threads)[0])
    context = get_context(start_method())
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context, initializer=_start_worker,
                             initargs=(threads, tuple(plugins), True)) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        pending, finished = set(futures), 0
        with tqdm(total=len(jobs), desc=label, leave=False) as bar:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    if future.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise future.exception()
                finished += len(done)
                bar.update(len(done))
                if on_done:
                    on_done(finished, len(jobs))
        return [f.result() for f in futures]

"""Speed measured the careful way: fixed threads, warm-up, models interleaved, minimum and median over rounds.

One routine (`interleaved_times`) serves the notebooks' latency columns, `vitprune bench` and
`make bench`, in PyTorch eager and in onnxruntime. Speed-up is reported against the MAC reduction
(1.0 = latency falls exactly as MACs do). `break_even_rank` measures, for one layer shape on this
machine, the largest rank at which a factorized layer (two matmuls) still beats the dense one.
"""

from __future__ import annotations

import functools
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitprune.metrics import count_macs

Runner = Callable[[], Any]
RUNTIMES = ("torch", "onnxruntime")


@contextmanager
def torch_threads(n: int | None):
    """Temporarily fix torch's intra-op thread count."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def torch_runner(model: nn.Module, x: torch.Tensor) -> Runner:
    """A call of the model's eval-mode forward on `x` (synchronised on CUDA)."""
    model.eval()

    @torch.no_grad()
    def run():
        out = model(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        return out

    return run


def onnx_runner(model: nn.Module, x: torch.Tensor, folder: Path, name: str, threads: int | None) -> Runner:
    """A call of onnxruntime on the model exported to `folder`/`name`.onnx."""
    from vitprune.export import export_onnx, onnx_session

    session = onnx_session(export_onnx(model, folder / f"{name}.onnx"), threads)
    feed = {"images": x.cpu().numpy()}
    return lambda: session.run(["logits"], feed)


def runtime_runner(model: nn.Module, x: torch.Tensor, runtime: str, folder: Path, name: str,
                   threads: int | None) -> Runner:
    """A call of `model` on `x` in PyTorch eager or in onnxruntime (exported to `folder`/`name`.onnx)."""
    return torch_runner(model, x) if runtime == "torch" else onnx_runner(model, x, folder, name, threads)


def round_plan(repeats: int) -> tuple[int, int]:
    """(rounds, calls per round) for a budget of about `repeats` timed calls: 3 to 7 rounds."""
    rounds = max(3, min(7, repeats))
    return rounds, max(1, repeats // rounds)


def interleaved_times(runners: dict[str, Runner], rounds: int = 7, repeats: int = 5, warmup: int = 2,
                      threads: int | None = 2) -> dict[str, dict[str, float]]:
    """Per runner, the minimum and median over rounds of the mean time of one call, in milliseconds.

    Every round times each runner in turn (the order reversed every other round), so load that drifts
    on a shared machine falls on all of them alike; the minimum is the least disturbed measurement.
    """
    names = list(runners)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with torch_threads(threads):
        for run in runners.values():
            for _ in range(warmup):
                run()
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                for _ in range(repeats):
                    runners[name]()
                samples[name].append((time.perf_counter() - start) / repeats)
    return {name: {"min_ms": 1000 * min(s), "median_ms": 1000 * statistics.median(s)} for name, s in samples.items()}


def measure_latency(model: nn.Module, input_shape: tuple[int, ...], batch_sizes: Iterable[int] = (1, 64),
                    repeats: int = 20, warmup: int = 5, threads: int | None = 2) -> dict[int, float]:
    """Forward latency in milliseconds per batch size: the minimum over rounds (eval mode, fixed threads)."""
    param = next(model.parameters())
    was_training = model.training
    result = {}
    for bs in batch_sizes:
        x = torch.randn((bs, *input_shape[1:]), dtype=param.dtype, device=param.device)
        times = interleaved_times({"m": torch_runner(model, x)}, *round_plan(repeats), warmup, threads)
        result[bs] = times["m"]["min_ms"]
    model.train(was_training)
    return result


def speed_rows(dense: nn.Module, variants: dict[str, nn.Module], input_shape: tuple[int, ...],
               batch_sizes: Iterable[int] = (1, 8), runtimes: Iterable[str] = RUNTIMES, threads: int = 2,
               rounds: int = 7, repeats: int = 3) -> list[dict[str, Any]]:
    """Speed-up of each variant over `dense` divided by its MAC reduction, per batch size and runtime."""
    base_macs = count_macs(dense, (1, *input_shape[1:]))
    reduction = {name: base_macs / count_macs(m, (1, *input_shape[1:])) for name, m in variants.items()}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for bs in batch_sizes:
            x = torch.randn((bs, *input_shape[1:]), generator=torch.Generator().manual_seed(bs))
            for runtime in runtimes:
                runners = {name: runtime_runner(m, x, runtime, Path(folder), f"{name}_{bs}", threads)
                           for name, m in {"dense": dense, **variants}.items()}
                times = interleaved_times(runners, rounds, repeats, warmup=2, threads=threads)
                for name in variants:
                    speedup = times["dense"]["min_ms"] / times[name]["min_ms"]
                    rows.append({"variant": name, "runtime": runtime, "batch": bs,
                                 "macs_reduction_x": reduction[name], "latency_ms": times[name]["min_ms"],
                                 "dense_latency_ms": times["dense"]["min_ms"], "speedup_x": speedup,
                                 "speedup_over_macs": speedup / reduction[name],
                                 "speedup_median_x": times["dense"]["median_ms"] / times[name]["median_ms"]})
    return rows


@functools.lru_cache(maxsize=256)
def break_even_rank(in_features: int, out_features: int, tokens: int, threads: int = 2, rounds: int = 5) -> int:
    """Largest rank at which two matmuls (in -> r -> out) beat one (in -> out) here; 0 if none does.

    Measured on this machine for `tokens` rows of input, at eight ranks up to the parameter
    break-even in*out/(in+out) (above it a factorized layer has more MACs than the dense one).
    """
    limit = in_features * out_features // (in_features + out_features)
    ranks = sorted({max(1, round(limit * f / 8)) for f in range(1, 9)})
    x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(0))
    dense = nn.Linear(in_features, out_features)
    runners = {"dense": torch_runner(dense, x)}
    for r in ranks:
        runners[r] = torch_runner(nn.Sequential(nn.Linear(in_features, r, bias=False), nn.Linear(r, out_features)), x)
    times = interleaved_times(runners, rounds=rounds, repeats=3, warmup=1, threads=threads)
    faster = [r for r in ranks if times[r]["min_ms"] < times["dense"]["min_ms"]]
    return max(faster, default=0)


def tokens_per_image(model: nn.Module) -> int:
    """Sequence length a ViT's blocks see for one image (patches plus class/register/distillation tokens)."""
    return model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 0)

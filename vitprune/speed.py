"""Speed measured the careful way: fixed threads, warm-up, models interleaved, and a quiet machine detected.

One routine (`interleaved_rounds`) serves the study's latency columns and speed claims, `vitprune bench`
and `make bench`, in PyTorch eager and in onnxruntime. Every round times each runner in turn (the order
reversed every other round), so load that drifts falls on all of them alike, and times a fixed
calibration workload too; the machine's CPU time spent outside this process during the timing is read
from /proc/stat. A timing during which other work ran (foreign load above `BUSY_LOAD`) or whose
calibration rounds were disturbed is marked busy and must not be reported as a result.

`break_even_rank` measures, for one layer shape on one runtime, the largest rank at which a factorized
layer (two matmuls) still beats the dense one; results are kept in a per-machine cache so the same
machine makes the same decisions run after run.
"""

from __future__ import annotations

import hashlib
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitprune.checkpoint import read_json_mapping, write_json
from vitprune.metrics import count_macs

Runner = Callable[[], Any]
RUNTIMES = ("torch", "onnxruntime")
BUSY_LOAD = 0.10  # foreign CPU time, as a fraction of the machine, above which a timing is not a result
DISTURBED = 1.5  # a round whose calibration workload took this many times its fastest round was disturbed
ROUND_MS = 10.0  # each runner's share of a round lasts at least this long: one call of a fast model is mostly noise


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
    """A call of the model's eval-mode forward on `x` under inference mode, as deployed (synchronised on CUDA)."""
    model.eval()

    @torch.inference_mode()
    def run():
        out = model(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        return out

    return run


def onnx_runner(model: nn.Module, x: torch.Tensor, folder: Path, name: str, threads: int | None) -> Runner:
    """A call of onnxruntime on the model exported (and optimised, see `export`) to `folder`/`name`.onnx."""
    from vitprune.export import export_onnx, onnx_session

    session = onnx_session(export_onnx(model, folder / f"{name}.onnx"), threads)
    feed = {"images": x.cpu().numpy()}
    return lambda: session.run(["logits"], feed)


def runtime_runner(model: nn.Module, x: torch.Tensor, runtime: str, folder: Path, name: str,
                   threads: int | None) -> Runner:
    """A call of `model` on `x` in PyTorch eager or in onnxruntime (exported to `folder`/`name`.onnx)."""
    return torch_runner(model, x) if runtime == "torch" else onnx_runner(model, x, folder, name, threads)


def round_plan(repeats: int) -> tuple[int, int]:
    """(rounds, calls per round) for a budget of about `repeats` timed calls: an even number of rounds, 6 to 16 (so
    every runner leads as often as it trails), of at least one call."""
    rounds = 2 * max(3, min(8, repeats // 2))
    return rounds, max(1, repeats // rounds)


def _calibration() -> Runner:
    """A fixed workload (256x256 matmuls): its time per round tells a disturbed round from a quiet one."""
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    return lambda: [a @ a for _ in range(4)]


def _machine_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (steal included) since boot; None off Linux."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def interleaved_rounds(runners: dict[str, Runner], rounds: int = 10, repeats: int = 2, warmup: int = 2,
                       threads: int | None = 2) -> dict[str, Any]:
    """Per runner, the mean time of one call in each round (ms), with what says whether the machine was quiet:
    the calibration workload's rounds, which rounds it found disturbed, the foreign load, and `busy`."""
    names = list(runners)
    runners = {**runners, "__calibration__": _calibration()}
    samples: dict[str, list[float]] = {name: [] for name in runners}
    with torch_threads(threads):
        calls = {name: max(repeats, _calls_per_round(run, warmup)) for name, run in runners.items()}
        machine0, own0, wall0 = _machine_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
        for r in range(rounds):
            for name in list(runners) if r % 2 == 0 else list(runners)[::-1]:
                start = time.perf_counter()
                for _ in range(calls[name]):
                    runners[name]()
                samples[name].append(1000 * (time.perf_counter() - start) / calls[name])
        machine1, own1, wall1 = _machine_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
    calibration = samples.pop("__calibration__")
    disturbed = [c > DISTURBED * min(calibration) for c in calibration]
    load = None if machine0 is None else max(0.0, (machine1 - machine0) - (own1 - own0)) / (
        (wall1 - wall0) * (os.cpu_count() or 1))
    return {"ms": {name: samples[name] for name in names}, "calibration_ms": calibration, "disturbed": disturbed,
            "foreign_load": load, "busy": (load is not None and load > BUSY_LOAD) or sum(disturbed) > rounds / 2}


def _calls_per_round(run: Runner, warmup: int) -> int:
    """Warm `run` up, and say how many calls make up ROUND_MS (at most 200)."""
    start = time.perf_counter()
    for _ in range(max(1, warmup)):
        run()
    per_call = 1000 * (time.perf_counter() - start) / max(1, warmup)
    return max(1, min(200, int(ROUND_MS / max(per_call, 1e-3))))


def quiet_min(rounds: dict[str, Any], name: str) -> float:
    """The least disturbed time of one call of `name` (ms): the minimum over the rounds that were not disturbed."""
    kept = [ms for ms, bad in zip(rounds["ms"][name], rounds["disturbed"]) if not bad]
    return min(kept or rounds["ms"][name])


def interleaved_times(runners: dict[str, Runner], rounds: int = 7, repeats: int = 5, warmup: int = 2,
                      threads: int | None = 2) -> dict[str, dict[str, float]]:
    """Per runner, the minimum and median over rounds of the mean time of one call (ms), and whether the machine
    was busy while they were taken."""
    r = interleaved_rounds(runners, rounds, repeats, warmup, threads)
    return {name: {"min_ms": quiet_min(r, name), "median_ms": statistics.median(r["ms"][name]), "busy": r["busy"]}
            for name in runners}


def measure_latency(model: nn.Module, input_shape: tuple[int, ...], batch_sizes: Iterable[int] = (1, 64),
                    repeats: int = 20, warmup: int = 5, threads: int | None = 2) -> dict[int, float]:
    """Forward latency in milliseconds per batch size: the minimum over quiet rounds (eval mode, fixed threads)."""
    param = next(model.parameters())
    was_training = model.training
    result = {}
    for bs in batch_sizes:
        x = torch.randn((bs, *input_shape[1:]), dtype=param.dtype, device=param.device)
        times = interleaved_times({"m": torch_runner(model, x)}, *round_plan(repeats), warmup, threads)
        result[bs] = times["m"]["min_ms"]
    model.train(was_training)
    return result


def _callers(models: dict[str, nn.Module], runtime: str, folder: Path, threads: int | None) -> dict[str, Callable]:
    """Per model, a call on an input tensor in `runtime` (onnxruntime: exported once, batch dynamic)."""
    if runtime == "torch":
        return {name: (lambda x, m=m: torch_runner(m, x)()) for name, m in models.items()}
    from vitprune.export import export_onnx, onnx_session

    sessions = {name: onnx_session(export_onnx(m, folder / f"{name}.onnx"), threads) for name, m in models.items()}
    return {name: (lambda x, s=s: s.run(["logits"], {"images": x})) for name, s in sessions.items()}


def speed_rows(dense: nn.Module, variants: dict[str, nn.Module], input_shape: tuple[int, ...],
               batch_sizes: Iterable[int] = (1, 8), runtimes: Iterable[str] = RUNTIMES, threads: int = 2,
               rounds: int = 8, repeats: int = 2) -> list[dict[str, Any]]:
    """Speed-up of each variant over `dense` divided by its MAC reduction, per batch size and runtime (all models
    interleaved in one session per batch size and runtime), with the per-round times (for paired claims) and
    whether the machine was busy."""
    base_macs = count_macs(dense, (1, *input_shape[1:]))
    reduction = {name: base_macs / count_macs(m, (1, *input_shape[1:])) for name, m in variants.items()}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for runtime in runtimes:
            callers = _callers({"dense": dense, **variants}, runtime, Path(folder), threads)
            for bs in batch_sizes:
                x = torch.randn((bs, *input_shape[1:]), generator=torch.Generator().manual_seed(bs))
                feed = x if runtime == "torch" else x.numpy()
                r = interleaved_rounds({name: (lambda c=c, f=feed: c(f)) for name, c in callers.items()}, rounds,
                                       repeats, warmup=2, threads=threads)
                dense_ms = quiet_min(r, "dense")
                for name in variants:
                    speedup = dense_ms / quiet_min(r, name)
                    rows.append({"variant": name, "runtime": runtime, "batch": bs,
                                 "macs_reduction_x": reduction[name], "latency_ms": quiet_min(r, name),
                                 "dense_latency_ms": dense_ms, "speedup_x": speedup,
                                 "speedup_over_macs": speedup / reduction[name], "busy": r["busy"],
                                 "rounds_dense_ms": r["ms"]["dense"], "rounds_ms": r["ms"][name]})
    return rows


# ---------------------------------------------------------------- where factorizing pays

def _cache_path() -> Path:
    root = Path(os.environ.get("VITPRUNE_CACHE", Path.home() / ".cache" / "vitprune"))
    cpu = cpu_field("model name") or platform.processor()
    machine = f"{platform.machine()}|{cpu}|{torch.__version__}|{torch.backends.cpu.get_cpu_capability()}"
    return root / f"break_even_{hashlib.sha1(machine.encode()).hexdigest()[:12]}.json"


def cpu_field(name: str) -> str:
    """A field of the first CPU in /proc/cpuinfo ("model name", "vendor_id", ...); '' where there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.lower().startswith(name)), "")


def break_even_rank(in_features: int, out_features: int, tokens: int, threads: int = 2, rounds: int = 5,
                    runtime: str = "torch") -> int:
    """Largest rank at which two matmuls (in -> r -> out) beat one (in -> out) on `runtime` here; 0 if none does.

    Measured for `tokens` rows of input at eight ranks up to the parameter break-even in*out/(in+out) (above it a
    factorized layer has more MACs than the dense one); kept in a per-machine cache (VITPRUNE_CACHE, default
    ~/.cache/vitprune), so decisions built on it repeat exactly on the same machine.
    """
    return _measured_once(f"{runtime}|{in_features}x{out_features}|{tokens}|{threads}", runtime, lambda: (
        _measure_break_even(in_features, out_features, tokens, threads, rounds, runtime)))


def _measured_once(key: str, runtime: str, measure: Callable[[], int]) -> int:
    """The per-machine cache's value for `key` (VITPRUNE_CACHE), measured by `measure` and written the first time."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r} is not accepted; accepted: {', '.join(RUNTIMES)}")
    cache = _cache_path()
    known = read_json_mapping(cache, int)
    if key not in known:
        known[key] = measure()
        _write_cache(cache, {**read_json_mapping(cache, int), key: known[key]})
    return known[key]


def _measure_break_even(in_features: int, out_features: int, tokens: int, threads: int, rounds: int,
                        runtime: str) -> int:
    limit = in_features * out_features // (in_features + out_features)
    ranks = sorted({max(1, round(limit * f / 8)) for f in range(1, 9)})
    x = torch.randn(1, tokens, in_features, generator=torch.Generator().manual_seed(0))
    layers = {"dense": _Linear(nn.Linear(in_features, out_features))}
    for r in ranks:
        layers[r] = _Linear(nn.Sequential(nn.Linear(in_features, r, bias=False), nn.Linear(r, out_features)))
    with tempfile.TemporaryDirectory() as folder:
        runners = {name: _layer_runner(layer, x, runtime, Path(folder), str(name), threads)
                   for name, layer in layers.items()}
        r = interleaved_rounds(runners, rounds=rounds, repeats=3, warmup=1, threads=threads)
    dense = quiet_min(r, "dense")
    return max((rank for rank in ranks if quiet_min(r, rank) < dense), default=0)


WIDTH_MULTIPLES = (1, 2, 4, 8, 16)
WIDTH_TOLERANCE = 0.03  # a multiple whose widths cost at most this much more per column than the best's is as good


def fast_width_multiple(in_features: int, around: int, tokens: int, threads: int = 2, rounds: int = 5,
                        runtime: str = "torch") -> int:
    """The multiple that pruned output widths should be rounded to, measured on `runtime` here (latency-aware widths,
    as HALP and NetAdapt choose them): one linear layer (in_features -> w) timed for `tokens` rows at each of the 32
    widths w from `around` - 16, and the smallest of WIDTH_MULTIPLES whose widths cost as little per output column
    as the best multiple's (`choose_width_multiple`). Cached per machine like `break_even_rank`; pass it to
    `plan_pruning(round_to=...)`. (Measured here: output widths off a multiple of 8 cost up to 1.6x more per column
    in PyTorch's GEMM on AVX2; the input width hardly matters.)"""
    return _measured_once(f"width|{runtime}|{in_features}x{around}|{tokens}|{threads}", runtime, lambda: (
        choose_width_multiple(width_costs(in_features, width_window(around), tokens, threads, rounds, runtime))))


def width_window(around: int) -> range:
    """The 32 output widths `fast_width_multiple` times: from `around` - 16 (at least 1)."""
    start = max(1, around - 16)
    return range(start, start + 32)


def width_costs(in_features: int, widths: Iterable[int], tokens: int, threads: int = 2, rounds: int = 5,
                runtime: str = "torch") -> dict[int, float]:
    """Output width -> time of one linear layer (in_features -> width) per output column (ms), interleaved."""
    widths = list(widths)
    x = torch.randn(1, tokens, in_features, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        runners = {w: _layer_runner(_Linear(nn.Linear(in_features, w)), x, runtime, Path(folder), str(w), threads)
                   for w in widths}
        r = interleaved_rounds(runners, rounds=rounds, repeats=3, warmup=1, threads=threads)
    return {w: quiet_min(r, w) / w for w in widths}


def choose_width_multiple(costs: dict[int, float], multiples: Iterable[int] = WIDTH_MULTIPLES,
                          tolerance: float = WIDTH_TOLERANCE) -> int:
    """The smallest multiple m whose widths (those divisible by m) cost on average at most `tolerance` more per
    column than those of the best multiple; 1 when no multiple has a width among `costs`."""
    means = {}
    for m in multiples:
        aligned = aligned_costs(costs, m)
        if aligned:
            means[m] = sum(aligned) / len(aligned)
    if not means:
        return 1
    best = min(means.values())
    return min(m for m, cost in means.items() if cost <= best * (1 + tolerance))


def aligned_costs(costs: dict[int, float], multiple: int) -> list[float]:
    """The per-column costs of the widths in `costs` divisible by `multiple`."""
    return [cost for width, cost in costs.items() if width % multiple == 0]


class _Linear(nn.Module):
    """One (possibly factorized) layer as a model of its own, for timing."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _layer_runner(layer: nn.Module, x: torch.Tensor, runtime: str, folder: Path, name: str,
                  threads: int | None) -> Runner:
    if runtime == "torch":
        return torch_runner(layer, x)
    from vitprune.export import onnx_session

    path = folder / f"layer_{name}.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(layer.eval(), (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"])
    session = onnx_session(path, threads)
    feed = {"x": x.numpy()}
    return lambda: session.run(["y"], feed)


def _write_cache(path: Path, values: dict[str, int]) -> None:
    try:
        write_json(path, values)
    except (OSError, ValueError):  # ValueError includes ModelError: the path is a folder
        pass  # a cache that cannot be written costs a re-measurement, nothing else


def tokens_per_image(model: nn.Module) -> int:
    """Sequence length a ViT's blocks see for one image (patches plus class/register/distillation tokens)."""
    return model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 0)

"""`make bench`: speed figures, written to benchmarks/results.json (and .md) and quoted by the README.

Measured on whatever machine runs it, with the one careful routine (`speed.interleaved_rounds`: fixed
threads, warm-up, models interleaved with the order reversed every other round, a calibration workload
and the machine's load watched):

- DeiT-S (random weights; speed does not depend on training): pruned by vitprune (magnitude scores, VTP's
  sites with the query/key dims pruned with the values) and by Torch-Pruning, each brought to the same MACs
  (within 1 %, `vp.count_macs`) at 20/40/60 % fewer MACs than dense; speed-up over dense ÷ MAC reduction in
  PyTorch eager and onnxruntime at batch 1 and 8; at equal MACs a paired verdict, vitprune against
  Torch-Pruning; factorization of the 40 % model only where it pays, decided per runtime;
- the ONNX graph as exported, with onnxruntime's graph optimisations, and with its ViT transformer optimizer;
- the break-even rank of DeiT layer shapes in both runtimes; where the pruned model's time goes;
- the default model's training throughput and the gates' overhead; each QR/LU algorithm on DeiT-B's shapes
  against LAPACK; what MKL's vendor-independent branch (MKL_CBWR=COMPATIBLE) costs a training step against
  the study's pins; the pipeline's per-stage time when `make reproduce` has run.
`bench_report` turns the results into the goals' verdicts, the Markdown file and the README block.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import timm
import torch

import vitprune as vp
from vitprune.checkpoint import write_json, write_text
from vitprune.export import OPTIMIZERS, export_onnx, onnx_session
from vitprune.layers import make_prunable
from vitprune.registry import DECOMPOSITIONS
from vitprune.speed import (
    RUNTIMES,
    WIDTH_MULTIPLES,
    aligned_costs,
    break_even_rank,
    choose_width_multiple,
    interleaved_rounds,
    interleaved_times,
    quiet_min,
    speed_rows,
    tokens_per_image,
    torch_threads,
    width_costs,
    width_window,
)
from vitprune.study.bench_report import goal_rows, readme_summary, summary_markdown
from vitprune.study.peers import at_macs, peer_info, relative_output_change, torch_pruning_vit
from vitprune.study.provenance import PINNED_NUMERICS, cpu_model, cpu_vendor
from vitprune.study.reporting import replace_block

ROOT = Path(__file__).resolve().parents[2]
DEIT_S_SHAPES = [(384, 1152), (384, 384), (384, 1536), (1536, 384)]
DEIT_B_SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
MAC_CUTS = (0.2, 0.4, 0.6)
SHAPE = (1, 3, 224, 224)


def _seconds(fn, repeats: int = 5) -> float:
    """Fastest of `repeats` timed calls after one warm-up (the one timing routine, one runner)."""
    return interleaved_times({"f": fn}, rounds=repeats, repeats=1, warmup=1, threads=2)["f"]["min_ms"] / 1000


def default_model(p: vp.Params) -> torch.nn.Module:
    torch.manual_seed(0)
    return vp.build_model(p.model, 10, 1, p.data.image_size)


def training_step(p: vp.Params, gates: bool):
    """One full training step (forward, backward, AdamW) of the default model, as a callable."""
    model = default_model(p)
    if gates:
        vp.attach_gates(model, p.sparse.sites)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(p.data.batch_size, 1, p.data.image_size, p.data.image_size)
    y = torch.randint(10, (p.data.batch_size,))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if gates:
            loss = loss + vp.l1_penalty(model, p.sparse.l1)
        loss.backward()
        opt.step()
        opt.zero_grad()

    return step


def random_gated(model: torch.nn.Module, sites) -> torch.nn.Module:
    """Gates with random values: the pruned shapes, and so the speed, do not depend on training."""
    vp.attach_gates(model, sites)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in vp.gate_parameters(model).values():
            gate.copy_(torch.rand(gate.shape, generator=g))
    return model


def deit_small_variants() -> dict[str, Any]:
    """Dense DeiT-S, vitprune's and Torch-Pruning's models at each MAC cut (equal MACs within 1 %), and vitprune's
    40 % model factorized where it pays in each runtime."""
    dense = timm.create_model("deit_small_patch16_224").eval()
    gated = random_gated(copy.deepcopy(dense), vp.SITES.names())  # every site: the widest cut
    scores = vp.importance_scores(gated, "magnitude")
    base = vp.count_macs(dense, SHAPE)
    width_multiple = deit_small_width_multiple(dense)
    models, info = {}, []
    for cut in MAC_CUTS:
        pct = round(100 * cut)
        peer, peer_ratio = at_macs(lambda r: torch_pruning_vit(dense, r, SHAPE), (1 - cut) * base, SHAPE)
        plans = {}

        def ours(ratio: float, plans=plans) -> torch.nn.Module:
            plans[ratio] = vp.plan_pruning(gated, scores, ratio, round_to=width_multiple)
            return vp.prune(gated, plans[ratio])

        mine, ratio = at_macs(ours, vp.count_macs(peer, SHAPE), SHAPE)
        models[f"vitprune_{pct}"], models[f"torch_pruning_{pct}"] = mine, peer
        info.append({"macs_cut_target": cut, "vitprune_round_to": width_multiple, "vitprune_ratio": ratio,
                     "torch_pruning_ratio": peer_ratio,
                     "vitprune_macs_G": vp.count_macs(mine, SHAPE) / 1e9, "torch_pruning_macs_G":
                     vp.count_macs(peer, SHAPE) / 1e9, "vitprune_exactness": relative_output_change(
                         vp.zero_dropped(gated, plans[ratio]), mine, (2, *SHAPE[1:]))})
    source = models["vitprune_40"]
    factorized = {f"svd_0.5_pays_{runtime}": vp.decompose_model(source, "svd", rank_ratio=0.5, only_if_faster=True,
                                                                runtime=runtime, batches=(1, 8))
                  for runtime in RUNTIMES}
    return {"dense": vp.fold_gates(gated), "pruned": models, "factorized": factorized, "equal_macs": info,
            "source": source}


def deit_small_width_multiple(dense: torch.nn.Module) -> int:
    """The multiple vitprune rounds DeiT-S's kept widths to: measured in PyTorch for its MLP's first layer (384 in,
    around 60 % of its 1536 hidden widths out) at batch 8 (`vp.fast_width_multiple`); the head dims, rounded per
    head to the same multiple, give query/key/value widths (18 head widths) that are multiples of it too."""
    return vp.fast_width_multiple(dense.embed_dim, _width_centre(dense), 8 * tokens_per_image(dense))


def _width_centre(dense: torch.nn.Module) -> int:
    return round(0.6 * dense.blocks[0].mlp.fc1.out_features)


def width_rows(dense: torch.nn.Module) -> list[dict[str, Any]]:
    """Per-column cost of DeiT-S's MLP input layer against its output width in both runtimes, at batch 8: the
    curve behind the width multiple, and the multiple each runtime's curve chooses."""
    centre = _width_centre(dense)
    rows = []
    for runtime in RUNTIMES:
        costs = width_costs(dense.embed_dim, width_window(centre), 8 * tokens_per_image(dense), runtime=runtime)
        chosen = choose_width_multiple(costs)
        for m in WIDTH_MULTIPLES:
            aligned = aligned_costs(costs, m)
            rows.append({"runtime": runtime, "widths_divisible_by": m, "widths": len(aligned),
                         "us_per_output_column": 1000 * sum(aligned) / len(aligned), "chosen": m == chosen})
    return rows


def export_rows(models: dict[str, torch.nn.Module], batch: int = 8) -> list[dict[str, Any]]:
    """Latency in onnxruntime of each model's graph as exported, optimised by onnxruntime, and by its ViT
    transformer optimizer, timed interleaved."""
    x = torch.randn(batch, *SHAPE[1:]).numpy()
    with tempfile.TemporaryDirectory() as folder:
        runners = {}
        for name, model in models.items():
            for how in OPTIMIZERS:
                session = onnx_session(export_onnx(model, Path(folder) / f"{name}_{how}.onnx", optimize=how), 2)
                runners[(name, how)] = lambda s=session: s.run(["logits"], {"images": x})
        r = interleaved_rounds(runners, rounds=6, repeats=1, warmup=1, threads=2)
    return [{"model": name, "optimize": how, "batch": batch, "latency_ms": quiet_min(r, (name, how)),
             "busy": r["busy"]} for name, how in runners]


def break_even_rows(tokens: int) -> list[dict[str, Any]]:
    """The measured break-even rank of DeiT-S and DeiT-B layer shapes, in both runtimes, against the parameter
    break-even mn/(m+n)."""
    rows = []
    for model, shapes in (("deit_small", DEIT_S_SHAPES), ("deit_base", DEIT_B_SHAPES)):
        for in_f, out_f in shapes:
            limit = in_f * out_f // (in_f + out_f)
            for runtime in RUNTIMES:
                measured = break_even_rank(in_f, out_f, tokens, threads=2, runtime=runtime)
                rows.append({"model": model, "shape": f"{in_f}x{out_f}", "runtime": runtime, "tokens": tokens,
                             "param_break_even": limit, "measured_break_even": measured, "fraction": measured / limit})
    return rows


def profile_rows(dense: torch.nn.Module, pruned: torch.nn.Module, shape: tuple[int, ...],
                 top: int = 8) -> list[dict[str, Any]]:
    """Self CPU time per operator of one forward pass, dense against pruned (where the time goes)."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(shape)
    totals: dict[str, dict[str, float]] = {}
    with torch_threads(2), torch.inference_mode():  # as `speed.torch_runner` times them
        for label, model in (("dense", dense), ("pruned", pruned)):
            model(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    model(x)
            for event in prof.key_averages():
                totals.setdefault(event.key, {})[label] = event.self_cpu_time_total / 3 / 1000
    ranked = sorted(totals.items(), key=lambda kv: -max(kv[1].values()))[:top]
    return [{"operator": op, "dense_ms": t.get("dense", 0.0), "pruned_ms": t.get("pruned", 0.0)} for op, t in ranked]


def default_model_profile(p: vp.Params) -> list[dict[str, Any]]:
    """Where the default model's time goes at the largest bench batch: dense against pruned at the set's largest
    ratio (random gates: the shapes, not the weights, set the speed), both through vitprune's attention, as notebook
    09 times them."""
    dense = make_prunable(default_model(p)).eval()
    gated = random_gated(copy.deepcopy(dense), p.sparse.sites)
    plan = vp.plan_pruning(gated, vp.importance_scores(gated), max(p.prune.ratios), scope=p.prune.scope)
    size = p.data.image_size
    return profile_rows(dense, vp.prune(gated, plan).eval(), (max(p.bench.batch_sizes), 1, size, size), top=10)


def algorithm_rows(repeats: int = 3) -> list[dict[str, Any]]:
    """Each registered QR and LU algorithm (a full factorization) on DeiT-B's layer shapes, as a ratio to LAPACK's QR
    (and SVD for reference); an algorithm slower than a second is timed once."""
    rows = []
    methods = [m for m in DECOMPOSITIONS if m.family in ("QR", "LU")]
    for shape in DEIT_B_SHAPES:
        w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        lapack_qr = _seconds(lambda w=w: torch.linalg.qr(w), repeats)
        lapack_svd = _seconds(lambda w=w: torch.linalg.svd(w, full_matrices=False), repeats)
        for method in methods:
            run = lambda w=w, m=method: m.factorize(w, min(w.shape))  # noqa: E731 - the full factorization
            first = _seconds(run, repeats=1)
            t = first if first > 1.0 else min(first, _seconds(run, repeats))
            rows.append({"shape": f"{shape[0]}x{shape[1]}", "algorithm": method.name, "seconds": t,
                         "lapack_qr_s": lapack_qr, "ratio_to_lapack": t / lapack_qr})
        rows.append({"shape": f"{shape[0]}x{shape[1]}", "algorithm": "lapack_svd", "seconds": lapack_svd,
                     "lapack_qr_s": lapack_qr, "ratio_to_lapack": lapack_svd / lapack_qr})
    return rows


def deit_b_svd_seconds() -> float:
    """Time to factorize all 48 projections of DeiT-B with truncated SVD at half rank."""
    model = timm.create_model("deit_base_patch16_224")
    t0 = time.perf_counter()
    vp.decompose_model(model, "svd", rank_ratio=0.5)
    return time.perf_counter() - t0


def default_model_rows(p: vp.Params) -> dict[str, Any]:
    """Training throughput of the default model, the gates' overhead and its eval latency."""
    dense = default_model(p)
    shape = (1, 1, p.data.image_size, p.data.image_size)
    steps = {"dense": training_step(p, gates=False), "gated": training_step(p, gates=True)}
    train = interleaved_times(steps, rounds=8, repeats=5, warmup=3)
    return {"params": vp.count_params(dense), "macs": vp.count_macs(dense, shape),
            "train_img_per_s": 1000 * p.data.batch_size / train["dense"]["min_ms"],
            "gate_overhead_pct": 100 * (train["gated"]["min_ms"] / train["dense"]["min_ms"] - 1),
            "eval_latency_ms": vp.measure_latency(dense, shape, (1, 64), repeats=50, warmup=10, threads=2)}


# Training steps of the default model on fixed random data, in a fresh process (MKL reads MKL_CBWR once, at start);
# prints the seconds of the timed steps after a warm-up.
MKL_STEPS = """
import json, sys, time
import torch
from vitprune import build_model, load_params
torch.set_num_threads(1)
torch.manual_seed(0)
p = load_params(sys.argv[1])
model = build_model(p.model, 10, 1, p.data.image_size)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
size, batch = p.data.image_size, p.data.batch_size
x, y = torch.randn(batch, 1, size, size), torch.randint(0, 10, (batch,))
def step():
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
for _ in range(5):
    step()
t0 = time.perf_counter()
for _ in range(int(sys.argv[2])):
    step()
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def mkl_compatible_cost(params_file: Path, rounds: int = 3, steps: int = 60) -> dict[str, Any]:
    """What MKL's vendor-independent branch (MKL_CBWR=COMPATIBLE, the same floats on Intel and AMD) costs against the
    study's pins: training steps of the default model (one thread, as the pipeline's workers), each setting in its
    own process, the two interleaved over `rounds`; the ratio of the fastest of each."""
    settings = {"pinned": PINNED_NUMERICS, "compatible": {**PINNED_NUMERICS, "MKL_CBWR": "COMPATIBLE"}}
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    base = {k: v for k, v in os.environ.items() if k not in PINNED_NUMERICS}
    for i in range(rounds):
        for name in (list(settings) if i % 2 == 0 else list(settings)[::-1]):
            out = subprocess.run([sys.executable, "-c", MKL_STEPS, str(params_file), str(steps)],
                                 env={**base, **settings[name]}, capture_output=True, text=True, timeout=600,
                                 check=True)
            seconds[name].append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
    return {"cpu_vendor": cpu_vendor(), "steps": steps, "rounds": rounds, "pinned_s": min(seconds["pinned"]),
            "compatible_s": min(seconds["compatible"]),
            "compatible_over_pinned": min(seconds["compatible"]) / min(seconds["pinned"])}


def run(out: Path, params_file: Path = ROOT / "params" / "default.yaml", quick: bool = False) -> dict[str, Any]:
    p = vp.load_params(params_file)
    results: dict[str, Any] = {"machine": f"{platform.machine()}, {cpu_model()}, 2 torch threads, "
                                          f"{torch.backends.cpu.get_cpu_capability()} kernels",
                               "torch": torch.__version__, "quick": quick, **peer_info()}
    with torch_threads(2):
        results["default_model"] = default_model_rows(p)
        deit = deit_small_variants()
        results["equal_macs_deit_small"] = deit["equal_macs"]
        rounds, repeats = (4, 1) if quick else (8, 2)
        results["pruning_deit_small"] = speed_rows(deit["dense"], deit["pruned"], SHAPE, (1, 8), RUNTIMES, 2,
                                                   rounds, repeats)
        results["factorized_deit_small"] = speed_rows(deit["source"], deit["factorized"], SHAPE, (1, 8), RUNTIMES, 2,
                                                      rounds, repeats)
        results["export_deit_small"] = export_rows({"dense": deit["dense"], "vitprune_40": deit["source"]})
        results["profile_deit_small_pruned_40"] = profile_rows(deit["dense"], deit["source"], (8, *SHAPE[1:]))
        results["profile_default_pruned"] = {"ratio": max(p.prune.ratios), "batch": max(p.bench.batch_sizes),
                                             "rows": default_model_profile(p)}
        results["break_even"] = break_even_rows(8 * tokens_per_image(deit["dense"]))
        results["width_costs_deit_small"] = width_rows(deit["dense"])
        results["algorithms_deit_b"] = algorithm_rows(repeats=1 if quick else 3)
        results["deit_b_svd_all_48_s"] = deit_b_svd_seconds()
    results["mkl_compatible"] = mkl_compatible_cost(params_file, rounds=2 if quick else 3)
    findings = ROOT / "figures" / p.name / "findings.json"
    results["default_speed_claims"] = [f for f in json.loads(findings.read_text()) if f.get("kind") == "speed"] \
        if findings.is_file() else []
    timing = ROOT / "runs" / p.name / "pipeline_timing.json"
    if timing.is_file():
        results["pipeline"] = json.loads(timing.read_text())
    elif "pipeline" in (earlier := _earlier_results(out)):  # no from-scratch run here since: say whose number it is
        results["pipeline"] = {**earlier["pipeline"], "carried_over": True}
    results["goals"] = goal_rows(results)
    write_json(out, results)
    write_text(out.with_suffix(".md"), summary_markdown(results))
    readme = ROOT / "README.md"
    text = replace_block(readme.read_text(), "bench", readme_summary(results)) if readme.is_file() else None
    if text is not None and out.resolve().parent == (ROOT / "benchmarks").resolve():
        write_text(readme, text)
    return results


def _earlier_results(out: Path) -> dict[str, Any]:
    try:
        earlier = json.loads(out.read_text())
    except (OSError, ValueError):
        return {}
    return earlier if isinstance(earlier, dict) else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.json")
    parser.add_argument("--quick", action="store_true", help="fewer timing rounds and algorithm repeats")
    args = parser.parse_args()
    results = run(args.out, quick=args.quick)
    print(summary_markdown(results))


if __name__ == "__main__":
    main()

"""`make bench`: speed and memory figures, written to a results file the README quotes.

Measures, on whatever machine runs it, with one careful routine (`speed.interleaved_times`: fixed
threads, warm-up, dense and variants interleaved, minimum and median over rounds): latency speed-up
of pruned and factorized models divided by their MAC reduction for the default model and the DeiT-S
and DeiT-B shapes at batch 1 and 8, in PyTorch eager and onnxruntime; the measured break-even rank
of each layer shape; where the pruned model's time goes (torch.profiler); training throughput and
the gates' overhead; each decomposition algorithm on DeiT-B's shapes against LAPACK; and the
pipeline's own timing record when `make reproduce` has run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import pandas as pd
import timm
import torch

import vitprune as vp
from vitprune.checkpoint import write_json
from vitprune.registry import DECOMPOSITIONS
from vitprune.speed import break_even_rank, interleaved_times, speed_rows, tokens_per_image, torch_threads
from vitprune.study.provenance import cpu_model
from vitprune.study.reporting import markdown_table, replace_block

ROOT = Path(__file__).resolve().parents[2]
DEIT_B_SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
DEIT_S_SHAPES = [(384, 1152), (384, 384), (384, 1536), (1536, 384)]
GOALS = {"pruned": 0.9, "factorized": 0.85}  # speed-up / MAC reduction on DeiT-S, both runtimes (issue 11)


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


def variants(model: torch.nn.Module, sites) -> tuple[torch.nn.Module, dict, dict]:
    """(dense, pruned 20/40/60 % and 40 % with widths rounded to 16, factorized 40 %-pruned) of one model."""
    gated = random_gated(model.eval(), sites)
    scores = vp.importance_scores(gated)
    pruned = {f"pruned_{round(100 * r)}": vp.prune(gated, vp.plan_pruning(gated, scores, r)) for r in (0.2, 0.4, 0.6)}
    pruned["pruned_40_round16"] = vp.prune(gated, vp.plan_pruning(gated, scores, 0.4, round_to=16))
    base = pruned["pruned_40"]
    factorized = {f"svd_rank_{r}": vp.decompose_model(base, "svd", rank_ratio=r) for r in (0.25, 0.5)}
    factorized["svd_rank_0.5_only_if_faster"] = vp.decompose_model(base, "svd", rank_ratio=0.5, only_if_faster=True)
    return vp.fold_gates(gated), pruned, factorized


def speed_cases(p: vp.Params, quick: bool) -> dict[str, list[dict[str, Any]]]:
    """Speed-up / MAC reduction of every variant of the default model, DeiT-S and DeiT-B (DeiT-B skipped if quick)."""
    cases = [("default", default_model(p), (1, 1, p.data.image_size, p.data.image_size), 9, 20)]
    cases.append(("deit_small_224", timm.create_model("deit_small_patch16_224"), (1, 3, 224, 224), 7, 2))
    if not quick:
        cases.append(("deit_base_224", timm.create_model("deit_base_patch16_224"), (1, 3, 224, 224), 5, 1))
    out = {}
    for label, model, shape, rounds, repeats in cases:
        dense, pruned, factorized = variants(model, p.sparse.sites)
        out[f"pruning_{label}"] = speed_rows(dense, pruned, shape, (1, 8), threads=2, rounds=rounds, repeats=repeats)
        out[f"factorized_{label}"] = speed_rows(pruned["pruned_40"], factorized, shape, (1, 8), threads=2,
                                                rounds=rounds, repeats=repeats)
    return out


def break_even_rows(tokens: int) -> list[dict[str, Any]]:
    """The measured break-even rank of DeiT-S and DeiT-B layer shapes against the parameter break-even."""
    rows = []
    for model, shapes in (("deit_small", DEIT_S_SHAPES), ("deit_base", DEIT_B_SHAPES)):
        for in_f, out_f in shapes:
            limit = in_f * out_f // (in_f + out_f)
            measured = break_even_rank(in_f, out_f, tokens, threads=2)
            rows.append({"model": model, "shape": f"{in_f}x{out_f}", "tokens": tokens, "param_break_even": limit,
                         "measured_break_even": measured, "fraction": measured / limit})
    return rows


def profile_rows(dense: torch.nn.Module, pruned: torch.nn.Module, shape: tuple[int, ...],
                 top: int = 8) -> list[dict[str, Any]]:
    """Self CPU time per operator of one forward pass, dense against pruned (where the time goes)."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(shape)
    totals: dict[str, dict[str, float]] = {}
    with torch_threads(2), torch.no_grad():
        for label, model in (("dense", dense), ("pruned", pruned)):
            model(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    model(x)
            for event in prof.key_averages():
                totals.setdefault(event.key, {})[label] = event.self_cpu_time_total / 3 / 1000
    ranked = sorted(totals.items(), key=lambda kv: -max(kv[1].values()))[:top]
    return [{"operator": op, "dense_ms": t.get("dense", 0.0), "pruned_ms": t.get("pruned", 0.0)} for op, t in ranked]


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


def run(out: Path, params_file: Path = ROOT / "params" / "default.yaml", quick: bool = False) -> dict[str, Any]:
    p = vp.load_params(params_file)
    results: dict[str, Any] = {"machine": f"{platform.machine()}, {cpu_model()}, 2 torch threads, "
                                          f"{torch.backends.cpu.get_cpu_capability()} kernels",
                               "torch": torch.__version__, "quick": quick}
    with torch_threads(2):
        dense = default_model(p)
        shape = (1, 1, p.data.image_size, p.data.image_size)
        steps = {"dense": training_step(p, gates=False), "gated": training_step(p, gates=True)}
        train_times = interleaved_times(steps, rounds=7, repeats=5, warmup=3)
        results["default_model"] = {
            "params": vp.count_params(dense), "macs": vp.count_macs(dense, shape),
            "train_img_per_s": 1000 * p.data.batch_size / train_times["dense"]["min_ms"],
            "eval_latency_ms": vp.measure_latency(dense, shape, (1, 64), repeats=50, warmup=10, threads=2)}
        results["gate_overhead_pct"] = 100 * (train_times["gated"]["min_ms"] / train_times["dense"]["min_ms"] - 1)
        results.update(speed_cases(p, quick))
        deit_s = timm.create_model("deit_small_patch16_224")
        d, pruned, _ = variants(deit_s, p.sparse.sites)
        results["profile_deit_small_pruned_40"] = profile_rows(d, pruned["pruned_40"], (8, 3, 224, 224))
        results["break_even"] = break_even_rows(8 * tokens_per_image(deit_s))
        results["algorithms_deit_b"] = algorithm_rows(repeats=1 if quick else 3)
        results["deit_b_svd_all_48_s"] = deit_b_svd_seconds()
    timing = ROOT / "runs" / p.name / "pipeline_timing.json"
    if timing.is_file():
        results["pipeline"] = json.loads(timing.read_text())
    results["goals"] = goal_rows(results)
    write_json(out, results)
    out.with_suffix(".md").write_text(summary_markdown(results))
    readme = ROOT / "README.md"
    text = replace_block(readme.read_text(), "bench", readme_summary(results)) if readme.is_file() else None
    if text is not None and out.resolve().parent == (ROOT / "benchmarks").resolve():
        readme.write_text(text)
    return results


def readme_summary(r: dict[str, Any]) -> str:
    """The README's bench block: the goals, hit or missed, and where the pruned model's time goes."""
    d = r["default_model"]
    goals = pd.DataFrame(r["goals"]).round(3)
    prof = pd.DataFrame(r["profile_deit_small_pruned_40"]).round(2)
    be = pd.DataFrame(r["break_even"])
    lines = [f"*Generated by `make bench` on {r['machine']} (torch {r['torch']}); full tables in "
             "`benchmarks/results.md`. Do not edit by hand.*", "",
             f"- Default model: training {d['train_img_per_s']:.0f} img/s; eval {d['eval_latency_ms'][1]:.2f} ms "
             f"(batch 1), {d['eval_latency_ms'][64]:.2f} ms (batch 64); VTP gates cost "
             f"{r['gate_overhead_pct']:.1f} % of a training step.",
             f"- SVD of all 48 DeiT-B projections: {r['deit_b_svd_all_48_s']:.1f} s.",
             f"- Measured break-even rank (two matmuls faster than one) at {int(be.tokens.iloc[0])} tokens: "
             f"{be.fraction.min():.2f}-{be.fraction.max():.2f} of the parameter break-even mn/(m+n).", "",
             "Goals on DeiT-S (speed-up / MAC reduction, worst of batch 1 and 8):", "", markdown_table(goals),
             "Where the time goes in the 40 %-pruned DeiT-S (torch.profiler, self CPU ms per batch-8 forward):", "",
             markdown_table(prof)]
    return "\n".join(lines)


def goal_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each DeiT-S goal (speed-up / MAC reduction, both runtimes): the worst case measured, hit or missed."""
    rows = []
    for kind, key in (("pruned", "pruning_deit_small_224"), ("factorized", "factorized_deit_small_224")):
        frame = pd.DataFrame(r[key])
        for (variant, runtime), group in frame.groupby(["variant", "runtime"], sort=False):
            worst = float(group["speedup_over_macs"].min())
            rows.append({"kind": kind, "variant": variant, "runtime": runtime, "worst_over_batch_1_8": worst,
                         "goal": GOALS[kind], "verdict": "hit" if worst >= GOALS[kind] else "missed"})
    return rows


def summary_markdown(r: dict[str, Any]) -> str:
    d = r["default_model"]
    lines = [f"# Benchmark results ({r['machine']}, torch {r['torch']})", "",
             "Method: `vitprune.speed.interleaved_times` - 2 threads, warm-up, dense and variants interleaved "
             "(order reversed every other round), minimum over rounds; speed-up / MAC reduction = 1.0 when latency "
             "falls exactly as MACs do.", "",
             f"- default model: {d['params']:,} params, {d['macs'] / 1e6:.2f} M MACs; training "
             f"{d['train_img_per_s']:.0f} img/s; eval latency {d['eval_latency_ms'][1]:.2f} ms (batch 1), "
             f"{d['eval_latency_ms'][64]:.2f} ms (batch 64)",
             f"- VTP gates: training-step overhead {r['gate_overhead_pct']:.1f} %",
             f"- SVD of all 48 DeiT-B projections: {r['deit_b_svd_all_48_s']:.1f} s"]
    if "pipeline" in r:
        stages = ", ".join(f"{name} {entry['seconds']:.0f} s" for name, entry in r["pipeline"]["stages"].items()
                           if "seconds" in entry)
        total = r["pipeline"]["total_seconds"]
        lines.append(f"- `make reproduce` pipeline (after install, from scratch): {total:.0f} s ({stages})")
    lines += ["", "## Goals on DeiT-S (worst of batch 1 and 8)", "", markdown_table(pd.DataFrame(r["goals"]).round(3))]
    cols = ["variant", "runtime", "batch", "macs_reduction_x", "latency_ms", "speedup_x", "speedup_over_macs"]
    for key in (k for k in r if k.startswith(("pruning_", "factorized_"))):
        title = key.replace("_", " ", 1)
        lines += ["", f"## {title}: speed-up / MAC reduction", "", markdown_table(pd.DataFrame(r[key])[cols].round(3))]
    lines += ["", "## Break-even rank per layer shape (two matmuls faster than one below it)", "",
              markdown_table(pd.DataFrame(r["break_even"]).round(3)),
              "", "## Where the time goes: pruned 40 % DeiT-S, batch 8 (torch.profiler, self CPU ms per forward)", "",
              markdown_table(pd.DataFrame(r["profile_deit_small_pruned_40"]).round(2))]
    algo = pd.DataFrame(r["algorithms_deit_b"]).pivot(index="algorithm", columns="shape", values="ratio_to_lapack")
    lines += ["", "## Algorithms on DeiT-B layer shapes: time / LAPACK QR", "",
              markdown_table(algo.round(1).reset_index())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.json")
    parser.add_argument("--quick", action="store_true", help="skip DeiT-B speed cases, fewer algorithm repeats")
    args = parser.parse_args()
    results = run(args.out, quick=args.quick)
    print(summary_markdown(results))


if __name__ == "__main__":
    main()

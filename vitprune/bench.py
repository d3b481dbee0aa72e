"""`make bench`: speed and memory figures, written to a results file the README quotes.

Measures (on whatever machine runs it; the README's numbers come from the 2-core CI machine):
training throughput and eval latency of the default model; latency speed-up of pruned and
factorized models divided by their MAC reduction (batch 1 and 64); the overhead of VTP gates in a
training step; each decomposition algorithm on DeiT-B's layer shapes against LAPACK; SVD of all
48 projections of DeiT-B; and the pipeline's own timing record when `make reproduce` has run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import timm
import torch

import vitprune as vp
from vitprune.metrics import torch_threads
from vitprune.reporting import markdown_table, write_json

ROOT = Path(__file__).resolve().parent.parent
DEIT_B_SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]


def _time(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def default_model(p: vp.Params) -> torch.nn.Module:
    torch.manual_seed(0)
    return vp.build_model(p.model, 10, 1, p.data.image_size)


def training_throughput(p: vp.Params, gates: bool, steps: int = 20) -> float:
    """Images per second of full training steps (forward, backward, AdamW) of the default model."""
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

    return p.data.batch_size / _time(step, repeats=steps, warmup=3)


def random_gated(model: torch.nn.Module, sites) -> torch.nn.Module:
    """Gates with random values: the pruned shapes, and so the speed, do not depend on training."""
    vp.attach_gates(model, sites)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in vp.gate_parameters(model).values():
            gate.copy_(torch.rand(gate.shape, generator=g))
    return model


def speedup_rows(shape: tuple[int, ...], variants: dict[str, torch.nn.Module], dense: torch.nn.Module,
                 batch_sizes=(1, 64), repeats: int = 50, warmup: int = 10, rounds: int = 3) -> list[dict[str, Any]]:
    """Latency speed-up divided by MAC reduction for each variant (1.0 = latency falls as MACs do).

    Dense and variant are timed alternately for several rounds and the median of the per-round
    speed-ups is reported, so drifting load on a shared machine affects both sides alike.
    """
    base_macs = vp.count_macs(dense, shape)
    rows = []
    for name, model in variants.items():
        mac_ratio = base_macs / vp.count_macs(model, shape)
        for bs in batch_sizes:
            pairs = [(vp.measure_latency(dense, shape, [bs], repeats, warmup, threads=2)[bs],
                      vp.measure_latency(model, shape, [bs], repeats, warmup, threads=2)[bs]) for _ in range(rounds)]
            speedup = statistics.median(d / m for d, m in pairs)
            rows.append({"variant": name, "batch": bs, "macs_reduction_x": mac_ratio,
                         "latency_ms": statistics.median(m for _, m in pairs),
                         "dense_latency_ms": statistics.median(d for d, _ in pairs), "speedup_x": speedup,
                         "speedup_over_macs": speedup / mac_ratio})
    return rows


def algorithm_rows(repeats: int = 3) -> list[dict[str, Any]]:
    """Each QR/LU algorithm on DeiT-B's layer shapes, as a ratio to LAPACK's QR (and SVD for reference)."""
    rows = []
    for shape in DEIT_B_SHAPES:
        w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        lapack_qr = _time(lambda w=w: torch.linalg.qr(w), repeats)
        lapack_svd = _time(lambda w=w: torch.linalg.svd(w, full_matrices=False), repeats)
        for method in ("qr_householder", "qr_cgs", "qr_mgs", "qr_givens", "qr_pivoted"):
            n = 1 if method in ("qr_givens", "qr_pivoted") else repeats
            t = _time(lambda w=w, m=method: vp.qr(w, m), repeats=n)
            rows.append({"shape": f"{shape[0]}x{shape[1]}", "algorithm": method, "seconds": t,
                         "lapack_qr_s": lapack_qr, "ratio_to_lapack": t / lapack_qr})
        for method, complete in (("lu", False), ("lu_complete", True)):
            t = _time(lambda w=w, c=complete: vp.lu(w, complete=c), repeats=1)
            rows.append({"shape": f"{shape[0]}x{shape[1]}", "algorithm": method, "seconds": t,
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


def run(out: Path, params_file: Path = ROOT / "params" / "default.yaml") -> dict[str, Any]:
    p = vp.load_params(params_file)
    results: dict[str, Any] = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
                               "torch": torch.__version__}
    with torch_threads(2):
        dense = default_model(p)
        shape = (1, 1, p.data.image_size, p.data.image_size)
        results["default_model"] = {
            "params": vp.count_params(dense), "macs": vp.count_macs(dense, shape),
            "train_img_per_s": training_throughput(p, gates=False),
            "eval_latency_ms": vp.measure_latency(dense, shape, (1, 64), repeats=50, warmup=10, threads=2)}
        # alternate dense and gated measurements: the median ratio is robust to drifting machine load
        ratios = [training_throughput(p, gates=False) / training_throughput(p, gates=True) for _ in range(5)]
        results["gate_overhead_pct"] = 100 * (statistics.median(ratios) - 1)
        cases = (("default", default_model(p), shape, 30, (1, 64)),
                 ("deit_small_224", timm.create_model("deit_small_patch16_224"), (1, 3, 224, 224), 3, (1, 16)))
        for label, model, input_shape, reps, batches in cases:
            gated = random_gated(model.eval(), p.sparse.sites)
            scores = vp.importance_scores(gated)
            pruned = {f"pruned_{round(100 * r)}": vp.prune(gated, vp.plan_pruning(gated, scores, r))
                      for r in (0.2, 0.4, 0.6)}
            base = vp.fold_gates(gated)
            results[f"pruning_speedup_{label}"] = speedup_rows(input_shape, pruned, base, batches, repeats=reps,
                                                               warmup=min(reps, 10))
            factorized = {f"svd_rank_{r}": vp.decompose_model(pruned["pruned_40"], "svd", rank_ratio=r)
                          for r in (0.25, 0.5)}
            results[f"factorized_speedup_{label}"] = speedup_rows(input_shape, factorized, pruned["pruned_40"],
                                                                  batches, repeats=reps, warmup=min(reps, 10))
        results["algorithms_deit_b"] = algorithm_rows()
        results["deit_b_svd_all_48_s"] = deit_b_svd_seconds()
    timing = ROOT / "runs" / p.name / "pipeline_timing.json"
    if timing.is_file():
        results["pipeline"] = json.loads(timing.read_text())
    write_json(out, results)
    out.with_suffix(".md").write_text(summary_markdown(results))
    return results


def summary_markdown(r: dict[str, Any]) -> str:
    import pandas as pd

    d = r["default_model"]
    lines = [f"# Benchmark results ({r['machine']}, torch {r['torch']})", "",
             f"- default model: {d['params']:,} params, {d['macs'] / 1e6:.2f} M MACs; training "
             f"{d['train_img_per_s']:.0f} img/s; eval latency {d['eval_latency_ms'][1]:.2f} ms (batch 1), "
             f"{d['eval_latency_ms'][64]:.2f} ms (batch 64)",
             f"- VTP gates: training-step overhead {r['gate_overhead_pct']:.1f} %",
             f"- SVD of all 48 DeiT-B projections: {r['deit_b_svd_all_48_s']:.1f} s"]
    if "pipeline" in r:
        lines.append(f"- `make reproduce` pipeline (after install): {r['pipeline']['total_seconds']:.0f} s")
    for key, title in (("pruning_speedup_default", "Pruned default models (0.14 M params, 28 px)"),
                       ("factorized_speedup_default", "Factorized 40 %-pruned default model"),
                       ("pruning_speedup_deit_small_224", "Pruned DeiT-S (224 px, random gates, batch 1 and 16)"),
                       ("factorized_speedup_deit_small_224", "Factorized 40 %-pruned DeiT-S")):
        lines += ["", f"## {title}: latency speed-up / MAC reduction", "",
                  markdown_table(pd.DataFrame(r[key]).round(3))]
    algo = pd.DataFrame(r["algorithms_deit_b"]).pivot(index="algorithm", columns="shape", values="ratio_to_lapack")
    lines += ["", "## Algorithms on DeiT-B layer shapes: time / LAPACK QR", "",
              markdown_table(algo.round(1).reset_index())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.json")
    args = parser.parse_args()
    results = run(args.out)
    print(summary_markdown(results))


if __name__ == "__main__":
    main()

"""The per-stage glue the notebooks call: variants, their files, the comparison tables, the QR study.

Each function here does one notebook step that writes or assembles results (the library modules
it calls do no I/O of their own), so the notebooks stay thin and every step is reachable by tests.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from vitprune import linalg
from vitprune.checkpoint import save_model
from vitprune.decompose import decompose_model, decomposition_report
from vitprune.metrics import count_macs, count_params, evaluate
from vitprune.names import CALIBRATED_METHODS, QR_STUDY_METHODS
from vitprune.pruning import PrunePlan, plan_pruning, prune
from vitprune.scoring import Scores
from vitprune.speed import measure_latency

# ---------------------------------------------------------------- variants (notebooks 03-06)

def profile_model(model: nn.Module, batches: Iterable, input_shape: tuple[int, ...], batch_sizes=(1, 64),
                  repeats: int = 20, warmup: int = 5, threads: int | None = 2) -> dict[str, float]:
    """Accuracy, params, MACs and measured latency of a model in one record (the tables' columns)."""
    acc = evaluate(model, batches)
    lat = measure_latency(model, input_shape, batch_sizes, repeats, warmup, threads)
    return {"top1": acc["top1"], "top5": acc["top5"], "params_M": count_params(model) / 1e6,
            "macs_M": count_macs(model, (1, *input_shape[1:])) / 1e6,
            **{f"latency_bs{bs}_ms": ms for bs, ms in lat.items()}}


def variant_name(criterion: str, ratio: float) -> str:
    """File stem of a pruned variant: pruned_<criterion>_<percent>."""
    return f"pruned_{criterion}_{round(ratio * 100):02d}"


def prune_variant(model: nn.Module, scores: Scores, criterion: str, ratio: float, options: Any,
                  run_dir: str | Path) -> tuple[str, nn.Module, PrunePlan]:
    """Plan with `options` (a PruneParams), prune, and save model and plan as runs/<set>/pruned_<crit>_<NN>.*"""
    plan = plan_pruning(model, scores, ratio, scope=options.scope, min_keep=options.min_keep,
                        round_to=options.round_to, head_mode=options.head_mode)
    plan.meta["criterion"] = criterion
    small = prune(model, plan)
    name = variant_name(criterion, ratio)
    save_model(small, Path(run_dir) / f"{name}.safetensors")
    plan.save(Path(run_dir) / f"{name}.plan.json")
    return name, small, plan


def decompose_variants(model: nn.Module, methods: Iterable[str], rank_ratios: Iterable[float],
                       layers: Iterable[str], keep_ratio: float, run_dir, profile,
                       calibration: Iterable | None = None, speedup=None) -> list[dict[str, Any]]:
    """Decompose `model` with every method at every rank ratio; one row each (profile(model) adds accuracy,
    params, MACs, latency; speedup(model, new) whether it is faster than its source). The models at
    `keep_ratio` are saved as decomp_<method>.safetensors for fine-tuning."""
    rows = []
    for method in methods:
        for ratio in rank_ratios:
            t0 = time.perf_counter()
            new = decompose_model(model, method, rank_ratio=ratio, layers=layers,
                                  calibration=calibration if method in CALIBRATED_METHODS else None)
            seconds = time.perf_counter() - t0
            report = decomposition_report(model, new)
            row = {"method": method, "rank_ratio": ratio, "layers_factorized": len(report),
                   "rel_error": sum(r["rel_error"] for r in report) / max(1, len(report)),
                   "decompose_time_s": seconds, **profile(new), **(speedup(model, new) if speedup else {})}
            if math.isclose(ratio, keep_ratio):
                row["model"] = f"decomp_{method}.safetensors"
                save_model(new, Path(run_dir) / row["model"])
            rows.append(row)
    return rows


# ---------------------------------------------------------------- comparison tables (notebook 08)

def with_finetuned(tuned: pd.DataFrame, df: pd.DataFrame, key: str = "variant") -> pd.DataFrame:
    """`df` plus top1_ft/top5_ft looked up by `key` in the fine-tuning results (indexed by variant)."""
    df = df.copy()
    df["top1_ft"] = df[key].map(tuned["top1"])
    df["top5_ft"] = df[key].map(tuned["top5"])
    return df


def latency_columns(record: dict[str, Any]) -> list[str]:
    """The measured-latency columns of a profile record, in batch-size order."""
    return [c for c in record if c.startswith("latency")]


def vtp_rows(dense: dict[str, Any], pruned: pd.DataFrame, tuned: pd.DataFrame) -> pd.DataFrame:
    """Dense and every gate-pruned variant with accuracy before/after fine-tuning and MAC reduction."""
    vtp = with_finetuned(tuned, pruned[pruned.criterion == "gates"], "variant")
    head = pd.DataFrame([{"variant": "dense", "ratio": 0.0, "realised_ratio": 0.0, **dense,
                          "top1_ft": dense["top1"], "top5_ft": dense["top5"]}])
    vtp = pd.concat([head, vtp], ignore_index=True)
    vtp["macs_reduction_%"] = 100 * (1 - vtp["macs_M"] / dense["macs_M"])
    vtp["top1_drop_ft"] = dense["top1"] - vtp["top1_ft"]
    return vtp


def vtp_table(vtp: pd.DataFrame, latency: list[str]) -> pd.DataFrame:
    """Table VTP: the columns of `vtp_rows` the paper compares."""
    return vtp[["variant", "realised_ratio", "params_M", "macs_M", "macs_reduction_%", *latency, "top1", "top5",
                "top1_ft", "top5_ft", "top1_drop_ft"]]


def ablation_table(pruned: pd.DataFrame, tuned: pd.DataFrame, ratio: float, latency: list[str]) -> pd.DataFrame:
    """Every importance criterion at the ablation ratio, best after fine-tuning first."""
    ablation = with_finetuned(tuned, pruned[pruned.ratio == ratio], "variant")
    return ablation[["criterion", "realised_ratio", "params_M", "macs_M", *latency, "top1", "top1_ft",
                     "top5_ft"]].sort_values("top1_ft", ascending=False)


def sun_rows(decomposed: pd.DataFrame, pruned: pd.DataFrame, tuned: pd.DataFrame, finetune_ratio: float,
             source_ratio: float) -> pd.DataFrame:
    """Every method at the fine-tuning rank, with accuracy after fine-tuning and the drop against its source."""
    sun = decomposed[decomposed.rank_ratio == finetune_ratio].copy()
    sun = with_finetuned(tuned, sun, "variant")
    source = pruned[pruned.variant == variant_name("gates", source_ratio)].iloc[0]
    sun["top1_drop_ft_vs_pruned"] = tuned.loc[source["variant"], "top1"] - sun["top1_ft"]
    return sun


def sun_table(sun: pd.DataFrame, latency: list[str]) -> pd.DataFrame:
    """Table Sun: the columns of `sun_rows` the paper compares, best after fine-tuning first."""
    speed = [c for c in ("speedup_vs_source_x", "faster_than_source") if c in sun]
    return sun[["method", "rank_ratio", "params_M", "macs_M", *latency, *speed, "rel_error", "decompose_time_s",
                "top1", "top1_ft", "top1_drop_ft_vs_pruned"]].sort_values("top1_ft", ascending=False)


def rank_sweep_table(decomposed: pd.DataFrame) -> pd.DataFrame:
    """Every method at every rank ratio, before fine-tuning."""
    return decomposed[["method", "rank_ratio", "params_M", "macs_M", "rel_error", "top1"]]


def decomposed_rows(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """The rows of notebooks 04-06 as one frame, each named by its fine-tuning variant."""
    decomposed = pd.DataFrame(list(records))
    decomposed["variant"] = "decomp_" + decomposed["method"]
    return decomposed


def comparison_points(vtp: pd.DataFrame, pruned: pd.DataFrame, tuned: pd.DataFrame,
                      sun: pd.DataFrame) -> pd.DataFrame:
    """Every fine-tuned variant with its family, for the accuracy-vs-cost figures."""
    return pd.concat([
        vtp.assign(family=["dense"] + ["VTP pruned"] * (len(vtp) - 1)),
        with_finetuned(tuned, pruned[pruned.criterion != "gates"], "variant").assign(family="other criteria"),
        sun.assign(family="decomposed (fine-tuned)"),
    ], ignore_index=True)


# ---------------------------------------------------------------- the QR study (notebook 05)

def graded_matrix(n: int, cond: float, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """A random n x n matrix with singular values log-spaced from 1 to 1/cond."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(cond), n, dtype=torch.float64)
    return ((u * s) @ v.T).to(dtype)


def lauchli(n: int, eps: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Läuchli matrix [1 ... 1; eps I]: Gram-Schmidt's classic loss-of-orthogonality example."""
    return torch.cat([torch.ones(1, n, dtype=dtype), eps * torch.eye(n, dtype=dtype)])


def orthogonality_sweep(conds: Iterable[float] = (1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7), n: int = 64,
                        dtype: torch.dtype = torch.float32) -> list[dict[str, Any]]:
    """||Q^T Q - I|| of each QR algorithm on matrices of growing condition number."""
    rows = []
    for cond in conds:
        a = graded_matrix(n, cond, dtype)
        for method in QR_STUDY_METHODS:
            q, _ = linalg.qr(a, method)
            rows.append({"method": method, "cond": cond, "orth_loss": linalg.orthogonality_loss(q)})
    return rows

"""The per-stage glue the notebooks call: variants, their files, the comparison tables, the QR study.

Each function here does one notebook step that writes or assembles results (the library modules
it calls do no I/O of their own), so the notebooks stay thin and every step is reachable by tests.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from vitprune import linalg
from vitprune.checkpoint import save_model
from vitprune.names import BUDGET_STRATEGIES, QR_STUDY_METHODS
from vitprune.pruning import PrunePlan, plan_pruning, prune
from vitprune.scoring import Scores
from vitprune.stats import seed_summary, spread_columns

# ---------------------------------------------------------------- variants (notebooks 03-06)

def variant_name(criterion: str, ratio: float) -> str:
    """File stem of a pruned variant: pruned_<criterion>_<percent>."""
    return f"pruned_{criterion}_{round(ratio * 100):02d}"


def plan_with(model: nn.Module, scores: Scores, ratio: float, options: Any) -> PrunePlan:
    """The pruning plan at `ratio` under a parameter set's pruning options (`options`: its PruneParams)."""
    return plan_pruning(model, scores, ratio, scope=options.scope, min_keep=options.min_keep,
                        round_to=options.round_to, head_mode=options.head_mode)


def prune_variant(model: nn.Module, scores: Scores, criterion: str, ratio: float, options: Any,
                  run_dir: str | Path) -> tuple[str, nn.Module, PrunePlan]:
    """Plan with `options` (a PruneParams), prune, and save model and plan as runs/<set>/pruned_<crit>_<NN>.*"""
    plan = plan_with(model, scores, ratio, options)
    plan.meta["criterion"] = criterion
    small = prune(model, plan)
    name = variant_name(criterion, ratio)
    save_model(small, Path(run_dir) / f"{name}.safetensors")
    plan.save(Path(run_dir) / f"{name}.plan.json")
    return name, small, plan


# ---------------------------------------------------------------- per-seed frames and tables (notebooks 02-08)

ACCURACY_COLUMNS = ("top1", "top5")  # columns shown as mean ± std; the others as means


def seed_frame(rows_by_seed: dict[int, list[dict[str, Any]]]) -> pd.DataFrame:
    """One row per (seed, row) with a `seed` column first; per-image answers and histories left out."""
    rows = [{"seed": int(seed), **{k: v for k, v in row.items() if k not in ("answers", "history")}}
            for seed, rows in rows_by_seed.items() for row in rows]
    return pd.DataFrame(rows)


def stage_frame(record: dict[str, Any], key: str) -> pd.DataFrame:
    """The per-seed frame of the rows a stage record keeps under `key` for every seed."""
    return seed_frame({int(seed): r[key] for seed, r in record["seeds"].items()})


def dense_frame(record: dict[str, Any], timed: dict[str, Any], first_seed: int) -> pd.DataFrame:
    """Every seed's dense model (record of notebook 01), with the latency columns of `timed` (the first seed's
    dense model, timed alone) on the first seed's row."""
    dense = seed_frame({int(seed): [r["dense"]] for seed, r in record["seeds"].items()})
    for column in latency_columns(timed):
        dense[column] = [timed[column] if seed == first_seed else np.nan for seed in dense["seed"]]
    return dense


def before_after(frame: pd.DataFrame, key: str) -> pd.DataFrame:
    """top1 and top1_ft of a per-seed frame as one `top1` column with `when` = before / after fine-tuning."""
    named = frame[["seed", key, "top1", "top1_ft"]].rename(columns={"top1": "before fine-tuning",
                                                                   "top1_ft": "after fine-tuning"})
    return named.melt(id_vars=["seed", key], var_name="when", value_name="top1")


def summary_table(long: pd.DataFrame, keys: list[str], sort_by: str | None = None) -> pd.DataFrame:
    """The per-seed frame as one row per `keys`: accuracy columns as 'mean ± std', other numbers as means,
    and n (seeds); sorted by the mean of `sort_by`, highest first, where given."""
    summary = seed_summary(long, keys)
    if sort_by:
        summary = summary.sort_values(sort_by, ascending=False, kind="stable")
    return spread_columns(summary, [c for c in summary.columns
                                    if c.startswith(ACCURACY_COLUMNS) and not c.endswith("_std")])


def with_finetuned(tuned: pd.DataFrame, df: pd.DataFrame, key: str = "variant") -> pd.DataFrame:
    """`df` plus top1_ft/top5_ft of the same seed and variant from the fine-tuning results."""
    ft = tuned[["seed", "variant", "top1", "top5"]].rename(columns={"variant": key, "top1": "top1_ft",
                                                                     "top5": "top5_ft"})
    return df.merge(ft, on=["seed", key], how="left")


def latency_columns(frame: pd.DataFrame | dict[str, Any]) -> list[str]:
    """The measured-latency columns of a profile record or frame, in batch-size order."""
    return [c for c in frame if str(c).startswith("latency")]


def vtp_rows(dense: pd.DataFrame, pruned: pd.DataFrame, tuned: pd.DataFrame) -> pd.DataFrame:
    """Per seed: dense and every gate-pruned variant with accuracy before/after fine-tuning and MAC reduction."""
    head = dense.assign(variant="dense", ratio=0.0, realised_ratio=0.0, top1_ft=dense["top1"], top5_ft=dense["top5"])
    vtp = pd.concat([head, with_finetuned(tuned, pruned[pruned.criterion == "gates"])], ignore_index=True)
    by_seed = dense.set_index("seed")
    vtp["macs_reduction_%"] = 100 * (1 - vtp["macs_M"] / vtp["seed"].map(by_seed["macs_M"]))
    vtp["top1_drop_ft"] = vtp["seed"].map(by_seed["top1"]) - vtp["top1_ft"]
    return vtp


def vtp_table(vtp: pd.DataFrame, latency: list[str]) -> pd.DataFrame:
    """Table VTP (per seed): the columns of `vtp_rows` the paper compares."""
    return vtp[["seed", "variant", "realised_ratio", "params_M", "macs_M", "macs_reduction_%", *latency, "top1",
                "top5", "top1_ft", "top5_ft", "top1_drop_ft"]]


def ablation_table(pruned: pd.DataFrame, tuned: pd.DataFrame, ratio: float, latency: list[str]) -> pd.DataFrame:
    """Every importance criterion at the ablation ratio (per seed)."""
    ablation = with_finetuned(tuned, pruned[pruned.ratio == ratio])
    return ablation[["seed", "criterion", "realised_ratio", "params_M", "macs_M", *latency, "top1", "top1_ft",
                     "top5_ft"]]


def sun_rows(decomposed: pd.DataFrame, pruned: pd.DataFrame, tuned: pd.DataFrame, finetune_ratio: float,
             source_ratio: float) -> pd.DataFrame:
    """Per seed, every method at the fine-tuning rank, with accuracy after fine-tuning and the drop against its
    fine-tuned source."""
    sun = with_finetuned(tuned, decomposed[np.isclose(decomposed.rank_ratio, finetune_ratio)])
    source = tuned[tuned.variant == variant_name("gates", source_ratio)].set_index("seed")["top1"]
    sun["top1_drop_ft_vs_pruned"] = sun["seed"].map(source) - sun["top1_ft"]
    return sun


def sun_table(sun: pd.DataFrame, latency: list[str]) -> pd.DataFrame:
    """Table Sun (per seed): the columns of `sun_rows` the paper compares."""
    speed = [c for c in ("speedup_vs_source_x", "faster_than_source") if c in sun]
    return sun[["seed", "method", "rank_ratio", "params_M", "macs_M", *latency, *speed, "rel_error",
                "decompose_time_s", "top1", "top1_ft", "top1_drop_ft_vs_pruned"]]


def rank_sweep_table(decomposed: pd.DataFrame) -> pd.DataFrame:
    """Every method at every rank ratio, before fine-tuning (per seed)."""
    return decomposed[["seed", "method", "rank_ratio", "params_M", "macs_M", "rel_error", "top1"]]


def strategy_names(keys: pd.Series, method: str) -> pd.Series:
    """The equal-budget strategies' keys as the tables name them."""
    return keys.map(lambda key: BUDGET_STRATEGIES[key].format(method=method))


def budget_rows(record: dict[str, Any], tuned: pd.DataFrame, budget: Any) -> pd.DataFrame:
    """Per seed, every strategy of notebook 07 at the fine-tuned budget point, with top1_ft/top5_ft."""
    curves = stage_frame(record, "curves")
    at = curves[np.isclose(curves.budget_ratio, budget.finetune_ratio) & (curves.matched == "params")].copy()
    at["variant"] = at["model"].str.removesuffix(".safetensors")
    at = with_finetuned(tuned, at)
    at["strategy"] = strategy_names(at["strategy"], budget.method)
    return at


def comparison_points(vtp: pd.DataFrame, pruned: pd.DataFrame, tuned: pd.DataFrame,
                      sun: pd.DataFrame) -> pd.DataFrame:
    """Every fine-tuned variant with its family, as means over seeds (and _std), for the accuracy-vs-cost
    figures."""
    long = pd.concat([
        vtp.assign(family=np.where(vtp.variant == "dense", "dense", "VTP pruned")),
        with_finetuned(tuned, pruned[pruned.criterion != "gates"]).assign(family="other criteria"),
        sun.assign(family="decomposed (fine-tuned)"),
    ], ignore_index=True)
    columns = ["seed", "family", "variant", "params_M", "macs_M", *latency_columns(long), "top1_ft"]
    return seed_summary(long[columns], ["family", "variant"])


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

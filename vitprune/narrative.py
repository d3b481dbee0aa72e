"""The prose of the notebooks and REPORT.md, generated from a run's own numbers.

Each function turns one stage's results into a short "What this shows" paragraph, so the text is
true for whatever parameter set ran; nothing here is typed from a particular run.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from vitprune.stats import standard_error


def _pct(x: float) -> str:
    return f"{x:.1f} %"


def sparse_training(dense: dict[str, Any], sparse: dict[str, Any], history: list[dict[str, Any]]) -> str:
    """Dense accuracy, and how far the L1 penalty drove the gates towards zero."""
    first, last = (history[0], history[-1]) if history else ({}, {})
    se = standard_error(dense["top1"], dense["samples"])
    below = last.get("gate_below_0.1/all", 0.0)
    return (f"The dense model reaches {_pct(dense['top1'])} top-1 on {dense['samples']:,} test images "
            f"(binomial standard error ±{se:.1f} points). Sparse training moved the mean gate |g| from "
            f"{first.get('gate_mean/all', 1.0):.2f} to {last.get('gate_mean/all', 1.0):.2f} and left "
            f"{_pct(100 * below)} of the gates below 0.1, while top-1 went to {_pct(sparse['top1'])}. "
            "The more gates sit near zero, the less pruning them will cost.")


def scoring(kept: pd.DataFrame, ratio: float) -> str:
    """Where each criterion removes dimensions at the ablation ratio."""
    totals = kept.groupby("site").sum(numeric_only=True).drop(columns="block", errors="ignore")
    parts = []
    for criterion in totals.columns:
        site = totals[criterion].idxmin()
        parts.append(f"{criterion} keeps fewest in {site} ({int(totals.loc[site, criterion])} dims)")
    return (f"At {round(100 * ratio)} % of the gated dimensions removed, the criteria disagree on where to cut: "
            + "; ".join(parts) + ". Notebook 03 measures what each choice costs in accuracy.")


def pruning(before: pd.DataFrame, sparse: dict[str, Any], ablation_ratio: float) -> str:
    """Accuracy before fine-tuning of every pruned variant, against the sparse model."""
    gates = before[before.criterion == "gates"].sort_values("ratio")
    steps = ", ".join(f"{round(100 * r.ratio)} % → {_pct(r.top1)} ({r.macs_M:.3g} M MACs)"
                      for r in gates.itertuples())
    ablation = before[before.ratio == ablation_ratio].sort_values("top1", ascending=False)
    order = " > ".join(f"{r.criterion} {_pct(r.top1)}" for r in ablation.itertuples())
    return (f"Before fine-tuning, the gate-pruned models keep {steps}, from {_pct(sparse['top1'])} for the sparse "
            f"model. At the ablation ratio the criteria rank {order} (one run; differences under about two "
            "standard errors are not findings).")


def decompositions(table: pd.DataFrame, rank_ratio: float) -> str:
    """Which method keeps the weights and the accuracy best at the fine-tuning rank."""
    at = table[table.rank_ratio == rank_ratio].sort_values("rel_error")
    if at.empty:
        return "No method was run at the fine-tuning rank."
    best, acc = at.iloc[0], at.sort_values("top1", ascending=False).iloc[0]
    faster = ""
    if "faster_than_source" in at:
        n = int(at["faster_than_source"].sum())
        faster = f" {n} of {len(at)} factorized models measured faster than the pruned model they came from."
    return (f"At rank ratio {rank_ratio:g}, {best.method} reconstructs the weights best (relative error "
            f"{best.rel_error:.3f}) and {acc.method} keeps the most accuracy before fine-tuning "
            f"({_pct(acc.top1)}); " + ", ".join(f"{r.method} {_pct(r.top1)}" for r in at.itertuples()) + "."
            + faster)


def orthogonality(orth: pd.DataFrame) -> str:
    """How far each QR algorithm's Q is from orthogonal on the worst-conditioned matrix."""
    worst = orth[orth.cond == orth.cond.max()].sort_values("orth_loss")
    order = " < ".join(f"{r.method} ({r.orth_loss:.1e})" for r in worst.itertuples())
    loss = worst.set_index("method")["orth_loss"]
    classic = all(m in loss for m in ("qr_householder", "qr_mgs", "qr_cgs")) and (
        loss["qr_householder"] <= loss["qr_mgs"] <= loss["qr_cgs"])
    verdict = ("the classic ordering Householder ≤ MGS ≤ CGS holds (theory: Householder and Givens stay "
               "orthogonal to working precision, MGS loses orthogonality like κ, CGS like κ²)" if classic else
               "this run does not show the classic ordering Householder ≤ MGS ≤ CGS")
    return (f"On a matrix of condition number {orth.cond.max():.0e}, ||QᵀQ − I|| orders the algorithms {order}: "
            f"{verdict}.")


def finetuning(after: pd.DataFrame) -> str:
    """Accuracy after fine-tuning of every variant."""
    ranked = after.sort_values("top1", ascending=False)
    top, bottom = ranked.iloc[0], ranked.iloc[-1]
    return (f"After fine-tuning, {len(after)} variants range from {_pct(bottom.top1)} ({bottom.variant}) to "
            f"{_pct(top.top1)} ({top.variant}); notebook 08 sets them against their accuracy before fine-tuning, "
            "parameters, MACs and latency.")


def comparison(vtp: pd.DataFrame, ablation: pd.DataFrame, sun: pd.DataFrame, n_test: int) -> str:
    """The headline numbers of the paper tables, with the test set's standard error."""
    pruned = vtp[vtp.variant != "dense"]
    vtp_text = "; ".join(f"{r['variant']}: MACs −{r['macs_reduction_%']:.0f} %, top-1 after fine-tuning "
                         f"{_pct(r['top1_ft'])} ({(-r['top1_drop_ft'] or 0.0):+.1f} points)"
                         for r in pruned.to_dict("records"))
    order = " > ".join(f"{r.criterion} {_pct(r.top1_ft)}" for r in ablation.itertuples())
    best = sun.iloc[0]
    se = standard_error(float(vtp.top1.iloc[0]), n_test)
    return (f"Table VTP — {vtp_text}. Ablation after fine-tuning: {order}. Table Sun: {best.method} keeps the "
            f"most accuracy after fine-tuning ({_pct(best.top1_ft)}). With {n_test:,} test images one accuracy "
            f"carries a standard error of about ±{se:.1f} points, so gaps smaller than about {2 * se:.1f} points "
            "are not findings on this run.")

"""The prose of the notebooks and REPORT.md, generated from a run's own numbers.

Each function turns one stage's results into a short "What this shows" paragraph, so the text is
true for whatever parameter set ran; nothing here is typed from a particular run.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from vitprune.names import LU_METHODS, QR_STUDY_METHODS
from vitprune.stats import standard_error, with_spread

SUN_METHODS = ("svd", *QR_STUDY_METHODS, *LU_METHODS)


def _pct(x: float) -> str:
    return f"{x:.1f} %"


def sparse_training(results: dict[int, dict[str, Any]], n_test: int) -> str:
    """Dense accuracy over seeds, and how far the L1 penalty drove the gates towards zero."""
    dense = [r["dense"]["top1"] for r in results.values()]
    sparse = [r["sparse"]["top1"] for r in results.values()]
    lasts = [r["sparse_history"][-1] if r["sparse_history"] else {} for r in results.values()]
    firsts = [r["sparse_history"][0] if r["sparse_history"] else {} for r in results.values()]
    se = standard_error(sum(dense) / len(dense), n_test)
    below = [100 * last.get("gate_below_0.1/all", 0.0) for last in lasts]
    return (f"Over {len(dense)} seeds the dense model reaches {with_spread(dense)} % top-1 on {n_test:,} test images "
            f"(mean ± std across seeds; one run's binomial standard error is ±{se:.1f} points). Sparse training "
            f"moved the mean gate |g| from {_mean(f.get('gate_mean/all', 1.0) for f in firsts):.2f} to "
            f"{_mean(last.get('gate_mean/all', 1.0) for last in lasts):.2f} and left {with_spread(below)} % of the "
            f"gates below 0.1, while top-1 went to {with_spread(sparse)} %. The more gates sit near zero, the less "
            "pruning them will cost.")


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(1, len(values))


def _means(long: pd.DataFrame, key: str) -> pd.DataFrame:
    """Mean over seeds of every numeric column, one row per `key` (first-seen order)."""
    return long.groupby(key, sort=False).mean(numeric_only=True).reset_index()


def scoring(kept: pd.DataFrame, ratio: float) -> str:
    """Where each criterion removes dimensions at the ablation ratio."""
    totals = kept.groupby("site").sum(numeric_only=True).drop(columns="block", errors="ignore")
    parts = []
    for criterion in totals.columns:
        site = totals[criterion].idxmin()
        parts.append(f"{criterion} keeps fewest in {site} ({int(totals.loc[site, criterion])} dims)")
    return (f"At {round(100 * ratio)} % of the gated dimensions removed, the criteria disagree on where to cut: "
            + "; ".join(parts) + ". Notebook 03 measures what each choice costs in accuracy.")


def pruning(before: pd.DataFrame, sparse: pd.DataFrame, ablation_ratio: float) -> str:
    """Accuracy before fine-tuning of every pruned variant (means over seeds), against the sparse model."""
    gates = _means(before[before.criterion == "gates"], "variant").sort_values("ratio")
    steps = ", ".join(f"{round(100 * r.ratio)} % → {_pct(r.top1)} ({r.macs_M:.3g} M MACs)"
                      for r in gates.itertuples())
    ablation = before[before.ratio == ablation_ratio].groupby("criterion")["top1"].mean().sort_values(ascending=False)
    order = " > ".join(f"{criterion} {_pct(top1)}" for criterion, top1 in ablation.items())
    return (f"Before fine-tuning, the gate-pruned models keep {steps} (means over {before.seed.nunique()} seeds), "
            f"from {_pct(sparse.top1.mean())} for the sparse model. At the ablation ratio the criteria rank {order}; "
            "notebook 09 checks which of these gaps are findings.")


def decompositions(table: pd.DataFrame, rank_ratio: float) -> str:
    """Which method keeps the weights and the accuracy best at the fine-tuning rank (means over seeds)."""
    at = _means(table[table.rank_ratio == rank_ratio], "method").sort_values("rel_error")
    if at.empty:
        return "No method was run at the fine-tuning rank."
    best, acc = at.iloc[0], at.sort_values("top1", ascending=False).iloc[0]
    faster = ""
    if "faster_than_source" in table:
        timed = table[(table.rank_ratio == rank_ratio) & table.faster_than_source.notna()]
        n = int(timed["faster_than_source"].astype(bool).sum())
        faster = f" {n} of {len(timed)} factorized models of the first seed measured faster than their source."
    return (f"At rank ratio {rank_ratio:g} (means over {table.seed.nunique()} seeds), {best.method} reconstructs the "
            f"weights best (relative error {best.rel_error:.3f}) and {acc.method} keeps the most accuracy before "
            f"fine-tuning ({_pct(acc.top1)}); " + ", ".join(f"{r.method} {_pct(r.top1)}" for r in at.itertuples())
            + "." + faster)


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
    """Accuracy after fine-tuning of every variant (means over seeds)."""
    ranked = _means(after, "variant").sort_values("top1", ascending=False)
    top, bottom = ranked.iloc[0], ranked.iloc[-1]
    return (f"After fine-tuning, {len(ranked)} variants range from {_pct(bottom.top1)} ({bottom.variant}) to "
            f"{_pct(top.top1)} ({top.variant}), means over {after.seed.nunique()} seeds; notebook 09 sets them "
            "against their accuracy before fine-tuning, parameters, MACs and latency, and checks the claims.")


def comparison(vtp: pd.DataFrame, ablation: pd.DataFrame, sun: pd.DataFrame, findings: list[dict[str, Any]]) -> str:
    """The headline numbers of the paper tables (means over seeds), the verdicts of the rankings they suggest
    (the ablation and Sun's comparison after fine-tuning) and the tally of the checked claims."""
    means = _means(vtp, "variant")
    pruned = means[means.variant != "dense"]
    vtp_text = "; ".join(f"{r['variant']}: MACs −{r['macs_reduction_%']:.0f} %, top-1 after fine-tuning "
                         f"{_pct(r['top1_ft'])} ({-r['top1_drop_ft']:+.1f} points)" for r in pruned.to_dict("records"))
    order = ", ".join(f"{c} {_pct(v)}" for c, v in
                      ablation.groupby("criterion")["top1_ft"].mean().sort_values(ascending=False).items())
    sun_order = ", ".join(f"{m} {_pct(v)}" for m, v in
                          sun.groupby("method")["top1_ft"].mean().dropna().sort_values(ascending=False).items())
    verdicts = pd.Series([f["verdict"] for f in findings], dtype=object).value_counts()
    tally = ", ".join(f"{n} {v}" for v, n in verdicts.items())
    budget = [f for f in findings if f["group"] == "equal parameters" and f["statement"].endswith("after fine-tuning")]
    budget_text = " ".join(f"{f['statement']}: {f['verdict']} ({f['difference']:+.1f} points, 95 % interval "
                           f"[{f['low']:+.1f}, {f['high']:+.1f}])." for f in budget[:2])
    return (f"Means over {vtp.seed.nunique()} seeds. Table VTP — {vtp_text}. Ablation after fine-tuning (mean "
            f"top-1): {order}; the gates against each other criterion: {_verdicts(findings, 'VTP ablation')}. "
            f"Table Sun after fine-tuning (mean top-1): {sun_order}; SVD against each QR and LU variant: "
            f"{_verdicts(findings, 'Sun')}. {budget_text} Of {len(findings)} checked claims: {tally} (see Findings: "
            "a ranking is a finding only where its paired interval excludes zero).")


def _verdicts(findings: list[dict[str, Any]], group: str) -> str:
    """The after-fine-tuning claims of a group, gathered by verdict: 'holds against a, b; not distinguishable
    at this scale against c' (the other model of each claim named as the run labels it)."""
    chosen = [f for f in findings if f["group"] == group and f["statement"].endswith("after fine-tuning")]
    by_verdict: dict[str, list[str]] = {}
    for f in chosen:
        other = f["b"].removesuffix("_ft").removeprefix("decomp_").removeprefix("pruned_")
        by_verdict.setdefault(f["verdict"], []).append(other)
    return "; ".join(f"{verdict} against {', '.join(names)}" for verdict, names in by_verdict.items()) or "not run"


def equal_budget(share: pd.DataFrame, curves: pd.DataFrame, fraction: float) -> str:
    """Which factorization keeps most at the same parameters, whether refit reorders Sun's methods, and how
    the strategies compare at equal parameters (means over seeds, before fine-tuning)."""
    plain = share[~share.refit].groupby("method")["top1"].mean().sort_values(ascending=False)
    refit = share[share.refit].groupby("method")["top1"].mean().sort_values(ascending=False)
    sun = [m for m in plain.index if m in SUN_METHODS]
    order_plain = [m for m in plain.index if m in sun]
    order_refit = [m for m in refit.index if m in sun]
    changed = "keeps" if order_plain[:1] == order_refit[:1] else "changes"
    gain = (refit - plain).dropna().sort_values(ascending=False)
    curve = curves[curves.matched == "params"].groupby(["budget_ratio", "strategy"])["top1"].mean().unstack()
    best = ", ".join(f"{round(100 * r)} % → {curve.loc[r].idxmax()} ({_pct(curve.loc[r].max())})" for r in curve.index)
    return (f"At {round(100 * fraction)} % of the pruned model's parameters, before fine-tuning and averaged over "
            f"{share.seed.nunique()} seeds, {plain.index[0]} keeps the most accuracy ({_pct(plain.iloc[0])}; then "
            + ", ".join(f"{m} {_pct(v)}" for m, v in plain.iloc[1:4].items()) + "). Refitting the second factor "
            f"{changed} the head of Sun's ranking: without refit {' > '.join(order_plain[:3])}, with refit "
            f"{' > '.join(order_refit[:3])}; refit gains most for {gain.index[0]} ({gain.iloc[0]:+.1f} points) and "
            f"{gain.get('svd', 0.0):+.1f} for SVD. At the parameters of pruning alone, the best strategy per pruning "
            f"ratio: {best}. "
            "Notebook 09 checks these gaps as paired claims, before and after fine-tuning.")

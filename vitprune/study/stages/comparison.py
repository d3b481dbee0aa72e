"""Stage 09 · comparison: the papers' tables and figures from every earlier stage's record, and every claim the
stage modules declare, checked."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd

from vitprune.study.findings import Claim, margin_for, verdict_words
from vitprune.study.narrative import means, pct
from vitprune.study.records import Measured, StageRecord
from vitprune.study.stages import STAGES
from vitprune.study.tables import latency_columns, with_finetuned


def all_claims(p: Any) -> list[Claim]:
    """The claims of every stage module that declares some (`claims(p)`), in pipeline order, each module once, with
    the equivalence margin the parameter set declares for their group."""
    modules = list(dict.fromkeys(entry.module for entry in STAGES))
    found = []
    for module in modules:
        loaded = next(e for e in STAGES if e.module == module).load()
        if hasattr(loaded, "claims"):
            found += loaded.claims(p)
    return [c if c.margin is not None else dataclasses.replace(c, margin=margin_for(p, c.group)) for c in found]


def dense_frame(record: StageRecord, timed: Measured, first_seed: int) -> pd.DataFrame:
    """Every seed's dense model, with the latency of `timed` (the first seed's dense model, timed alone) on the
    first seed's row."""
    dense = record.models_frame(["dense"])
    columns = timed.columns()
    for column in latency_columns(columns):
        dense[column] = [columns[column] if seed == first_seed else np.nan for seed in dense["seed"]]
    return dense


def decomposition_frame(records: dict[str, StageRecord]) -> pd.DataFrame:
    """The rank sweeps of every decomposition stage (those registered for a family), one frame."""
    frames = [records[e.name].frame("rows") for e in STAGES if "family" in e.options and e.name in records]
    return pd.concat(frames, ignore_index=True)


def comparison_points(vtp: pd.DataFrame, variants: pd.DataFrame, finetuned: pd.DataFrame,
                      sun: pd.DataFrame) -> pd.DataFrame:
    """Every fine-tuned variant with its family, as means over seeds (and _std), for the accuracy-vs-cost
    figures."""
    from vitprune.study.stats import seed_summary

    long = pd.concat([
        vtp.assign(family=np.where(vtp.variant == "dense", "dense", "VTP pruned")),
        with_finetuned(finetuned, variants[variants.criterion != "gates"]).assign(family="other criteria"),
        sun.assign(family="decomposed (fine-tuned)"),
    ], ignore_index=True)
    columns = ["seed", "family", "variant", "params_M", "macs_M", *latency_columns(long), "top1_ft"]
    return seed_summary(long[columns], ["family", "variant"])


def conclusion(vtp: pd.DataFrame, ablation: pd.DataFrame, sun: pd.DataFrame, findings: list[dict[str, Any]]) -> str:
    """The headline numbers of the paper tables (means over seeds), the verdicts of the rankings they suggest
    (the ablation and Sun's comparison after fine-tuning) and the tally of the checked claims."""
    table = means(vtp, "variant")
    pruned = table[table.variant != "dense"]
    vtp_text = "; ".join(f"{r['variant']}: MACs −{r['macs_reduction_%']:.0f} %, top-1 after fine-tuning "
                         f"{pct(r['top1_ft'])} ({-r['top1_drop_ft']:+.1f} points)" for r in pruned.to_dict("records"))
    order = ", ".join(f"{c} {pct(v)}" for c, v in
                      ablation.groupby("criterion")["top1_ft"].mean().sort_values(ascending=False).items())
    sun_order = ", ".join(f"{m} {pct(v)}" for m, v in
                          sun.groupby("method")["top1_ft"].mean().dropna().sort_values(ascending=False).items())
    verdicts = pd.Series([verdict_words(f) for f in findings], dtype=object).value_counts()
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
        other = f["b"].split(":", 1)[-1].removeprefix("decomp_").removeprefix("pruned_")
        by_verdict.setdefault(verdict_words(f), []).append(other)
    return "; ".join(f"{verdict} against {', '.join(names)}" for verdict, names in by_verdict.items()) or "not run"

"""Stage 09 · comparison: the papers' tables and figures from every earlier stage's record, and every claim the
stage modules declare, checked — accuracy claims from the records, speed claims from one timing session.

The timing session is the study's only timing: the first seed's models that the speed claims name (each
distinct model file once), interleaved in this process with nothing else running, at every bench batch
size (`speed.interleaved_rounds`: calibration workload and machine load watched). The tables' latency
columns, the accuracy-vs-latency figure and the speed claims all come from it, so they cannot disagree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd
import torch

from vitprune.checkpoint import load_model
from vitprune.layers import make_prunable
from vitprune.speed import interleaved_rounds, quiet_min, round_plan, torch_runner
from vitprune.study.findings import Claim, SpeedClaim, is_speed, margin_for, tally, verdict_words
from vitprune.study.jobs import input_shape
from vitprune.study.narrative import means, pct
from vitprune.study.records import StageRecord
from vitprune.study.stage import file_digest
from vitprune.study.stages import STAGES
from vitprune.study.tables import latency_columns, with_finetuned


def all_claims(p: Any, kind: str = "claims") -> list[Claim | SpeedClaim]:
    """The claims of every stage module that declares some (`claims(p)`, or `speed_claims(p)` for kind
    "speed_claims"), in pipeline order, each module once, with the equivalence margin the parameter set declares
    for their group."""
    modules = list(dict.fromkeys(entry.module for entry in STAGES))
    found = []
    for module in modules:
        loaded = next(e for e in STAGES if e.module == module).load()
        if hasattr(loaded, kind):
            found += getattr(loaded, kind)(p)
    return [c if c.margin is not None else
            dataclasses.replace(c, margin=margin_for(p, c.group, speed=isinstance(c, SpeedClaim))) for c in found]


def timing_session(stage: Any, records: dict[str, StageRecord], claims: list[SpeedClaim]) -> dict[int, dict[str, Any]]:
    """Per bench batch size, the interleaved rounds of the first seed's models that `claims` name (keyed by label;
    models in byte-identical files are timed once and share their rounds)."""
    first, b = stage.seeds[0], stage.p.bench
    files = {}
    for ref in dict.fromkeys(ref for c in claims for ref in (c.b, c.a)):
        if records[ref.stage].skipped(ref.label) is None:  # a model its stage did not build: the claim is unchecked
            files[ref.label] = stage.seed_dir(first) / records[ref.stage].model_file(ref.label, first)
    distinct = {}
    for name, path in files.items():
        distinct.setdefault(file_digest(path), []).append(name)
    # every model through vitprune's attention (the dense one too: the same function, the same kernel choice)
    models = {names[0]: make_prunable(load_model(files[names[0]])) for names in distinct.values()}
    rounds, repeats = round_plan(b.repeats)
    session = {}
    for bs in b.batch_sizes:
        x = torch.randn((bs, *input_shape(stage.bundle)[1:]), generator=torch.Generator().manual_seed(bs))
        timed = interleaved_rounds({name: torch_runner(m, x) for name, m in models.items()}, rounds, repeats,
                                   b.warmup, b.threads)
        timed["ms"] = {name: timed["ms"][names[0]] for names in distinct.values() for name in names}
        session[bs] = timed
    return session


def timing_note(session: dict[int, dict[str, Any]]) -> str:
    """What the timing session did and whether the machine was quiet, in two sentences."""
    if not session:
        return "No speed claim names a model, so nothing was timed."
    any_rounds = next(iter(session.values()))
    parts = [f"batch {bs}: foreign load {100 * (r['foreign_load'] or 0):.1f} %, {sum(r['disturbed'])} of "
             f"{len(r['disturbed'])} rounds disturbed" + (" — **busy: not recorded**" if r["busy"] else "")
             for bs, r in session.items()]
    return (f"Timed {len(set(map(tuple, any_rounds['ms'].values())))} distinct models of the first seed, interleaved "
            f"over {len(any_rounds['disturbed'])} rounds per batch size; " + "; ".join(parts) + ".")


def latency_frame(session: dict[int, dict[str, Any]], seed: int) -> pd.DataFrame:
    """One row per timed model (of `seed`): its latency at every batch size, the quiet minimum over rounds; NaN
    where the machine was busy (never recorded as a result)."""
    labels = next(iter(session.values()))["ms"] if session else {}
    return pd.DataFrame([{"seed": seed, "label": label,
                          **{f"latency_bs{bs}_ms": np.nan if r["busy"] else quiet_min(r, label)
                             for bs, r in session.items()}} for label in labels])


def with_latency(frame: pd.DataFrame, latency: pd.DataFrame) -> pd.DataFrame:
    """`frame` with the latency columns of its models (by seed and label; the timed seed's rows only)."""
    return frame.merge(latency, on=["seed", "label"], how="left") if not latency.empty else frame


def speed_columns(frame: pd.DataFrame, speed: list[dict[str, Any]], batch: int) -> pd.DataFrame:
    """`frame` with each model's measured speed-up over its source at `batch` and the claim's verdict."""
    at = {f["a"].split(":", 1)[1]: f for f in speed if f["batch"] == batch}
    return frame.assign(speedup_vs_source_x=frame["label"].map(lambda x: at[x]["speedup"] if x in at else np.nan),
                        faster_than_source=frame["label"].map(lambda x: verdict_words(at[x]) if x in at else "–"))


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
    uniform = sun[sun.factorized == "uniform"] if "factorized" in sun else sun  # "where it pays": the same accuracy
    sun_order = ", ".join(f"{m} {pct(v)}" for m, v in
                          uniform.groupby("method")["top1_ft"].mean().dropna().sort_values(ascending=False).items())
    accuracy, speed = [f for f in findings if not is_speed(f)], [f for f in findings if is_speed(f)]
    budget = [f for f in findings if f["group"] == "equal parameters" and f["statement"].endswith("after fine-tuning")]
    budget_text = " ".join(f"{f['statement']}: {f['verdict']} ({f['difference']:+.1f} points, 95 % interval "
                           f"[{f['low']:+.1f}, {f['high']:+.1f}])." for f in budget[:2])
    return (f"Means over {vtp.seed.nunique()} seeds. Table VTP — {vtp_text}. Ablation after fine-tuning (mean "
            f"top-1): {order}; the gates against each other criterion: {_verdicts(findings, 'VTP ablation')}. "
            f"Table Sun after fine-tuning (mean top-1): {sun_order}; SVD against each QR and LU variant: "
            f"{_verdicts(findings, 'Sun')}. {budget_text} Accuracy: {tally(accuracy)}"
            + (f" Speed: {tally(speed, 'speed claims')}" if speed else "")
            + " (See Findings: a ranking is a finding only where its paired interval excludes zero.)")


def _verdicts(findings: list[dict[str, Any]], group: str) -> str:
    """The after-fine-tuning claims of a group, gathered by verdict: 'holds against a, b; not distinguishable
    at this scale against c' (the other model of each claim named as the run labels it)."""
    chosen = [f for f in findings if f["group"] == group and f["statement"].endswith("after fine-tuning")]
    by_verdict: dict[str, list[str]] = {}
    for f in chosen:
        other = f["b"].split(":", 1)[-1].removeprefix("decomp_").removeprefix("pruned_")
        by_verdict.setdefault(verdict_words(f), []).append(other)
    return "; ".join(f"{verdict} against {', '.join(names)}" for verdict, names in by_verdict.items()) or "not run"

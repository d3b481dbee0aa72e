"""The claims the companion makes, checked on every run, and whether a re-run elsewhere confirms them.

A `Claim` compares two models of the same chain (same seed) on the same test images, naming each by
its typed handle (`records.ModelRef`); the stage modules declare their claims (`claims(p)` in
`vitprune.study.stages.<module>`), each with a stable id that `compare_runs` keys on. `check` turns
them into findings (statement, verdict, difference, 95 % interval, seeds, test images) with the paired
bootstrap of `stats`, reading the per-image answers from the stage records; a model a stage did not
build is reported as not checked, with the stage's reason, and a model no stage recorded is an error
naming it. Notebook 09 writes the findings to figures/<set>/findings.json and findings.md, and the
README quotes that text. A claim that does not hold is reported as such, never dropped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from vitprune.errors import DataError, MissingStageError
from vitprune.study.records import ModelRef, StageRecord
from vitprune.study.reporting import reproducible_columns
from vitprune.study.stats import EQUIVALENT, HOLDS, REVERSED, UNCLEAR, claim, decode_answers
from vitprune.study.tables import ACCURACY_COLUMNS

WHEN = {"before": "before fine-tuning", "after": "after fine-tuning"}


@dataclass(frozen=True)
class Claim:
    """"a beats b by more than `threshold` points of top-1" (a negative threshold: "a costs at most -threshold")."""

    id: str  # stable across rewordings: `vitprune compare` keys on it
    group: str
    statement: str
    a: ModelRef
    b: ModelRef
    threshold: float = 0.0
    margin: float | None = None  # ± points within which a and b count as equivalent (`margin_for`)


def margin_for(p: Any, group: str) -> float:
    """The equivalence margin a parameter set declares for a claim group (findings.margins, else findings.margin)."""
    return float(p.findings.margins.get(group, p.findings.margin))


def check(claims: Iterable[Claim], records: dict[str, StageRecord]) -> tuple[list[dict[str, Any]], list[str]]:
    """(findings, not checked): each claim checked with the paired bootstrap over the seeds both models have; a
    claim whose model a stage did not build is not checked, with the stage's reason."""
    findings, unchecked = [], []
    for c in claims:
        reason = _not_built(c.a, records) or _not_built(c.b, records)
        if reason:
            unchecked.append(f"{c.statement}: {reason}")
            continue
        ra, rb = _record(c.a, records), _record(c.b, records)
        seeds = sorted(set(ra.seeds) & set(rb.seeds))
        matrix_a = np.stack([decode_answers(ra.model(c.a.label, s).answers) for s in seeds])
        matrix_b = np.stack([decode_answers(rb.model(c.b.label, s).answers) for s in seeds])
        result = claim(c.statement, matrix_a, matrix_b, threshold=c.threshold, margin=c.margin)
        findings.append({"id": c.id, "group": c.group, **result, "a": str(c.a), "b": str(c.b), "seeds": seeds,
                         "accuracy_a": float(100 * matrix_a.mean()), "accuracy_b": float(100 * matrix_b.mean())})
    return findings, unchecked


def _record(ref: ModelRef, records: dict[str, StageRecord]) -> StageRecord:
    if ref.stage not in records:
        raise MissingStageError(f"a claim names model {ref}, but stage {ref.stage} has no record here; accepted: "
                                f"models of {', '.join(records)}")
    return records[ref.stage]


def _not_built(ref: ModelRef, records: dict[str, StageRecord]) -> str | None:
    why = _record(ref, records).skipped(ref.label)
    return f"{ref} was not built ({why})" if why else None


def verdict_words(f: dict[str, Any]) -> str:
    """A finding's verdict as the text says it ("equivalent within ±1 point")."""
    if f["verdict"] == EQUIVALENT:
        return f"equivalent within ±{f['margin']:g} point{'s' if f['margin'] != 1 else ''}"
    return f["verdict"]


def finding_line(f: dict[str, Any]) -> str:
    """One finding as a Markdown bullet: verdict, statement, and its evidence (and, where nothing was found, the
    smallest difference the comparison could have seen)."""
    mark = {HOLDS: "✅", REVERSED: "❌", EQUIVALENT: "🟰"}.get(f["verdict"], "➖")
    against = f" (threshold {f['threshold']:+g})" if f["threshold"] else ""
    blind = f"; it could have seen a difference of ±{f['detectable']:.1f} points" if f["verdict"] == UNCLEAR else ""
    return (f"- **{mark} {verdict_words(f)}** — {f['statement']}: {f['accuracy_a']:.1f} % vs {f['accuracy_b']:.1f} %, "
            f"difference {f['difference']:+.2f} points{against}, 95 % interval [{f['low']:+.2f}, {f['high']:+.2f}] "
            f"({f['n_seeds']} seeds × {f['test_images']:,} test images, paired{blind}).")


def tally(findings: list[dict[str, Any]]) -> str:
    """'48 claims checked: 20 hold, 0 reversed, 14 equivalent within their margin, 14 not distinguishable at this
    scale; 12 verdicts sit within one interval width of their threshold.'"""
    n = {v: sum(f["verdict"] == v for f in findings) for v in (HOLDS, REVERSED, EQUIVALENT, UNCLEAR)}
    movable = sum(bool(f.get("can_move")) for f in findings)
    return (f"{len(findings)} claims checked: {n[HOLDS]} hold, {n[REVERSED]} reversed, {n[EQUIVALENT]} equivalent "
            f"within their margin, {n[UNCLEAR]} not distinguishable at this scale; {movable} verdicts sit within one "
            "interval width of their threshold (those are the ones other seeds or another CPU can move).")


def findings_markdown(findings: list[dict[str, Any]], unchecked: list[str] = ()) -> str:
    """Every finding, grouped, after the tally and how to read the verdicts (and the claims that could not be
    checked last)."""
    lines = [tally(findings) + " Each compares two models of the same seed on the same test images; the 95 % "
             "interval is a paired two-stage bootstrap (seeds, then test images, with replacement), so it counts the "
             "spread between training runs as well as the test set's size. *Holds* (or *reversed*): the interval "
             "excludes the threshold. *Equivalent within ±m*: the interval lies inside the claim family's declared "
             "margin, a positive finding that the two are the same for practical purposes. *Not distinguishable*: "
             "neither; the line says how large a difference the run could have seen.", ""]
    for group in dict.fromkeys(f["group"] for f in findings):
        lines += [f"**{group}**", "", *(finding_line(f) for f in findings if f["group"] == group), ""]
    if unchecked:
        lines += ["**Not checked** (a model the claim needs was not built on this parameter set)", "",
                  *(f"- {u}" for u in unchecked), ""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- a re-run against the committed figures

def compare_runs(committed: Path, rerun: Path) -> dict[str, Any]:
    """Does `rerun` (a figures/<set> folder from another clone or machine) confirm `committed`? Per claim: the two
    verdicts and whether the committed difference lies inside the re-run's interval; per accuracy mean of every
    per-seed table: whether the committed mean lies inside the re-run's 95 % t-interval over seeds; and which
    tables are identical (measured-time columns aside)."""
    for folder in (committed, rerun):
        if not folder.is_dir():
            raise DataError(f"{folder} is not a folder: give two figures/<set> folders (e.g. figures/default and "
                            "the figures/default of another clone)")
    old_found, new_found = _read_findings(committed), _read_findings(rerun)
    by = "id" if all("id" in f for f in old_found + new_found) else "statement"  # older findings have no ids
    old = {f[by]: f for f in old_found}
    new = {f[by]: f for f in new_found}
    claims = [{"id": s, "statement": old[s]["statement"], "committed": old[s]["verdict"], "rerun": new[s]["verdict"],
               "difference": old[s]["difference"], "rerun_low": new[s]["low"], "rerun_high": new[s]["high"],
               "same_verdict": old[s]["verdict"] == new[s]["verdict"],
               "reversed": {old[s]["verdict"], new[s]["verdict"]} == {HOLDS, REVERSED},
               "inside": new[s]["low"] <= old[s]["difference"] <= new[s]["high"]} for s in old if s in new]
    means, identical = [], []
    for csv in sorted(committed.glob("*.csv")):
        if not (rerun / csv.name).is_file():
            continue
        a, b = _read_table(csv), _read_table(rerun / csv.name)
        if a.equals(b):
            identical.append(csv.stem)
        if "seed" in a.columns and "seed" in b.columns:
            means += _means_inside(csv.stem, a, b)
    return {"claims": claims, "means": means, "identical_tables": identical,
            "missing_claims": sorted(old[s]["statement"] for s in set(old) - set(new))}


def _read_findings(folder: Path) -> list[dict[str, Any]]:
    path = folder / "findings.json"
    if not path.is_file():
        raise MissingStageError(f"{path} does not exist: compare two figures/<set> folders that notebook 09 wrote "
                                "(vitprune reproduce params/<set>.yaml)")
    try:
        found = json.loads(path.read_text(errors="replace"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not JSON ({err.msg}, line {err.lineno}); accepted: the findings.json notebook 09 "
                        "writes") from None
    fields = {"statement", "verdict", "difference", "low", "high"}
    if not isinstance(found, list) or not all(isinstance(f, dict) and fields <= set(f) for f in found):
        raise DataError(f"{path} is not a list of claims (each with {', '.join(sorted(fields))}); accepted: the "
                        "findings.json notebook 09 writes")
    return found


def _read_table(path: Path) -> pd.DataFrame:
    """A table's CSV without its measured-time columns; a clear refusal if it is not a readable CSV."""
    try:
        return reproducible_columns(pd.read_csv(path))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not a readable CSV table ({type(err).__name__}); accepted: the tables the "
                        "notebooks write") from None


def _table_keys(df: pd.DataFrame) -> list[str]:
    """The columns naming a row of a per-seed table: its text/bool columns, and a numeric setting (rank_ratio,
    budget_ratio) when every seed has the same values of it."""
    keys = [c for c in df.columns
            if c != "seed" and (not pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c]))]
    for col in ("rank_ratio", "budget_ratio"):
        if col in df.columns and df.groupby("seed")[col].apply(tuple).nunique() == 1:
            keys.append(col)
    return keys


def _means_inside(table: str, committed: pd.DataFrame, rerun: pd.DataFrame) -> list[dict[str, Any]]:
    """Each accuracy column's committed mean per row against the re-run's 95 % t-interval over its seeds."""
    keys = _table_keys(committed)
    columns = [c for c in committed.columns if c.startswith(ACCURACY_COLUMNS) and "drop" not in c and c in rerun]
    if not keys or not columns or not set(keys) <= set(rerun.columns):
        return []
    old, new = committed.groupby(keys)[columns], rerun.groupby(keys)[columns]
    old_mean, new_mean, new_std, n = old.mean(), new.mean(), new.std(ddof=1), new.count()
    rows = []
    for key in old_mean.index.intersection(new_mean.index):
        for col in columns:
            m, count = old_mean.loc[key, col], n.loc[key, col]
            if pd.isna(m) or count == 0:
                continue
            half = float(scipy_stats.t.ppf(0.975, count - 1) * new_std.loc[key, col] / math.sqrt(count)) \
                if count > 1 else 0.0
            row = tuple(k.item() if isinstance(k, np.generic) else k for k in (key if isinstance(key, tuple) else
                                                                                 (key,)))
            rows.append({"table": table, "row": row if len(row) > 1 else row[0], "column": col, "committed": float(m),
                         "rerun": float(new_mean.loc[key, col]), "half_width": half, "n_seeds": int(count),
                         "inside": bool(abs(m - new_mean.loc[key, col]) <= half + 1e-9)})
    return rows


def comparison_markdown(result: dict[str, Any]) -> str:
    """The comparison in a few lines, then every claim whose verdict moved and every mean outside the interval."""
    claims, means = result["claims"], result["means"]
    same = sum(c["same_verdict"] for c in claims)
    lines = [f"- verdicts: {same}/{len(claims)} the same, {sum(c['reversed'] for c in claims)} reversed"
             + (f", {len(result['missing_claims'])} committed claims missing from the re-run"
                if result["missing_claims"] else ""),
             f"- committed differences inside the re-run's 95 % interval: {sum(c['inside'] for c in claims)}/"
             f"{len(claims)}",
             f"- committed accuracy means inside the re-run's 95 % t-interval over seeds: "
             f"{sum(m['inside'] for m in means)}/{len(means)}",
             f"- tables identical (measured-time columns aside): {len(result['identical_tables'])}: "
             f"{', '.join(result['identical_tables']) or 'none'}"]
    for c in claims:
        if not c["same_verdict"]:
            lines.append(f"  - moved: {c['statement']}: {c['committed']} → {c['rerun']} (committed "
                         f"{c['difference']:+.2f}, re-run interval [{c['rerun_low']:+.2f}, {c['rerun_high']:+.2f}])")
    for m in means:
        if not m["inside"]:
            lines.append(f"  - outside: {m['table']} {m['row']} {m['column']}: committed {m['committed']:.2f}, "
                         f"re-run {m['rerun']:.2f} ± {m['half_width']:.2f} (n={m['n_seeds']})")
    return "\n".join(lines) + "\n"

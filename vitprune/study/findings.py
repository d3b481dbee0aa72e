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
from vitprune.study.stats import EQUIVALENT, HOLDS, REVERSED, UNCLEAR, claim, decode_answers, speed_claim
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


@dataclass(frozen=True)
class SpeedClaim:
    """"a (a compressed model) is faster than b (its source) at batch `batch`", paired over interleaved rounds."""

    id: str
    group: str
    statement: str
    a: ModelRef
    b: ModelRef
    batch: int
    margin: float | None = None  # speed-ups within 1 ± margin count as the same speed


def margin_for(p: Any, group: str, speed: bool = False) -> float:
    """The equivalence margin a parameter set declares for a claim group (findings.margins, else findings.margin,
    or findings.speed_margin for speed claims)."""
    return float(p.findings.margins.get(group, p.findings.speed_margin if speed else p.findings.margin))


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


def check_speed(claims: Iterable[SpeedClaim], session: dict[int, dict[str, Any]],
                records: dict[str, StageRecord]) -> tuple[list[dict[str, Any]], list[str]]:
    """(findings, not checked): each speed claim checked on the interleaved rounds `session` timed at its batch (the
    models by label); a claim naming a model its stage did not build, or whose timing found the machine busy, is
    not checked, with the reason."""
    findings, unchecked = [], []
    for c in claims:
        missing = [why for ref in (c.a, c.b) if (why := _not_built(ref, records))]
        if missing:
            unchecked.append(f"{c.statement}: {missing[0]}")
            continue
        rounds = session[c.batch]
        if rounds["busy"]:
            load = rounds["foreign_load"]
            unchecked.append(f"{c.statement}: the machine was busy while timing (other work used "
                             f"{100 * (load or 0):.0f} % of it); not recorded as a result")
            continue
        result = speed_claim(c.statement, rounds["ms"][c.b.label], rounds["ms"][c.a.label], c.margin,
                             rounds["disturbed"])
        findings.append({"id": c.id, "group": c.group, "kind": "speed", **result, "batch": c.batch, "a": str(c.a),
                         "b": str(c.b)})
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
    if f["verdict"] == EQUIVALENT and is_speed(f):
        return f"the same speed within ±{100 * f['margin']:g} %"
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


def tally(findings: list[dict[str, Any]], what: str = "claims") -> str:
    """'48 claims checked: 20 hold, 0 reversed, 14 equivalent within their margin, 14 not distinguishable at this
    scale; 12 verdicts sit within one interval width of their threshold (...).'"""
    n = {v: sum(f["verdict"] == v for f in findings) for v in (HOLDS, REVERSED, EQUIVALENT, UNCLEAR)}
    movable = sum(bool(f.get("can_move")) for f in findings)
    return (f"{len(findings)} {what} checked: {n[HOLDS]} hold, {n[REVERSED]} reversed, {n[EQUIVALENT]} equivalent "
            f"within their margin, {n[UNCLEAR]} not distinguishable at this scale; {movable} verdicts sit within one "
            "interval width of their threshold (those are the ones other seeds or another CPU can move).")


def is_speed(f: dict[str, Any]) -> bool:
    return f.get("kind") == "speed"


def speed_table(findings: list[dict[str, Any]]) -> list[str]:
    """The speed findings as one Markdown table: per compressed model and its source, a column per batch size."""
    batches = sorted({f["batch"] for f in findings})
    rows: dict[tuple[str, str], dict[int, str]] = {}
    for f in findings:
        mark = {HOLDS: "✅", REVERSED: "❌", EQUIVALENT: "🟰"}.get(f["verdict"], "➖")
        cell = f"{f['speedup']:.2f}× [{f['low']:.2f}, {f['high']:.2f}] {mark} {verdict_words(f)}"
        rows.setdefault((f["a"].split(":", 1)[1], f["b"].split(":", 1)[1]), {})[f["batch"]] = cell
    lines = ["| model | against | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|:---|:---|" + "---|" * len(batches)]
    lines += [f"| {a} | {b} | " + " | ".join(cells.get(batch, "–") for batch in batches) + " |"
              for (a, b), cells in rows.items()]
    return lines


def findings_markdown(findings: list[dict[str, Any]], unchecked: list[str] = ()) -> str:
    """Every accuracy finding, grouped, after the tally and how to read the verdicts; the speed findings as one
    table; the claims that could not be checked last."""
    accuracy, speed = [f for f in findings if not is_speed(f)], [f for f in findings if is_speed(f)]
    lines = [tally(accuracy) + " Each compares two models of the same seed on the same test images; the 95 % "
             "interval is a paired two-stage bootstrap (seeds, then test images, with replacement), so it counts the "
             "spread between training runs as well as the test set's size. *Holds* (or *reversed*): the interval "
             "excludes the threshold. *Equivalent within ±m*: the interval lies inside the claim family's declared "
             "margin, a positive finding that the two are the same for practical purposes. *Not distinguishable*: "
             "neither; the line says how large a difference the run could have seen.", ""]
    for group in dict.fromkeys(f["group"] for f in accuracy):
        lines += [f"**{group}**", "", *(finding_line(f) for f in accuracy if f["group"] == group), ""]
    if speed:
        margin = speed[0]["margin"]
        lines += ["**Speed: is each compressed model faster than its source?**", "",
                  tally(speed, "speed claims") + f" The first seed's models, timed interleaved in one session "
                  f"({speed[0]['rounds']} rounds per batch size, a calibration workload and the machine's load "
                  "watched): speed-up = the geometric mean over rounds of source time ÷ model time, with a 95 % "
                  f"bootstrap interval over rounds; equivalent within ±{100 * margin:g} %.", "",
                  *speed_table(speed), ""]
    if unchecked:
        lines += ["**Not checked**", "", *(f"- {u}" for u in unchecked), ""]
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
    speed = {"committed": [f for f in old_found if is_speed(f)], "rerun": [f for f in new_found if is_speed(f)]}
    old_found, new_found = [f for f in old_found if not is_speed(f)], [f for f in new_found if not is_speed(f)]
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
        if not (rerun / csv.name).exists():
            continue
        a, b = _read_table(csv), _read_table(rerun / csv.name)
        if a.equals(b):
            identical.append(csv.stem)
        if "seed" in a.columns and "seed" in b.columns:
            means += _means_inside(csv.stem, a, b)
    return {"claims": claims, "means": means, "identical_tables": identical, "speed": _speed_agreement(**speed),
            "missing_claims": sorted(old[s]["statement"] for s in set(old) - set(new))}


def _speed_agreement(committed: list[dict[str, Any]], rerun: list[dict[str, Any]]) -> dict[str, int]:
    """How many speed verdicts a re-run shares (timings are the machine's: they are compared, not required equal)."""
    new = {f["id"]: f["verdict"] for f in rerun}
    shared = [f for f in committed if f["id"] in new]
    return {"compared": len(shared), "same": sum(new[f["id"]] == f["verdict"] for f in shared)}


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
    if not isinstance(found, list):
        raise DataError(f"{path} is not a list of claims; accepted: the findings.json notebook 09 writes")
    for i, f in enumerate(found):
        problem = _claim_problem(f)
        if problem:
            raise DataError(f"{path}: claim {i} {problem}; accepted: the findings.json notebook 09 writes")
    return found


def _claim_problem(f: Any) -> str | None:
    """What makes a findings.json entry unusable, or None: text statement and verdict, finite numbers."""
    if not isinstance(f, dict):
        return f"is a {type(f).__name__}, not a mapping"
    for key in ("statement", "verdict", *(("id",) if "id" in f else ())):
        if not isinstance(f.get(key), str):
            return f"has {key} {f.get(key)!r} (a text is needed)"
    for key in ("speedup", "low", "high") if is_speed(f) else ("difference", "low", "high"):
        value = f.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"has {key} {value!r} (a finite number is needed)"
    return None


def _read_table(path: Path) -> pd.DataFrame:
    """A table's CSV without its measured-time columns; a clear refusal if it is not a readable CSV."""
    if not path.is_file():
        raise DataError(f"{path} is not a file but a {'folder' if path.is_dir() else 'special file'}; accepted: the "
                        "CSV tables the notebooks write")
    try:
        table = reproducible_columns(pd.read_csv(path))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
        raise DataError(f"{path} is not a readable CSV table ({type(err).__name__}); accepted: the tables the "
                        "notebooks write") from None
    for column in table.columns:
        if column.startswith(ACCURACY_COLUMNS) and not pd.api.types.is_numeric_dtype(table[column]):
            text = table[column][pd.to_numeric(table[column], errors="coerce").isna() & table[column].notna()]
            raise DataError(f"{path}: column '{column}' holds text ({text.iloc[0]!r} in row {text.index[0] + 1}); "
                            "accepted: numbers (top-1/top-5 in %)")
    return table


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
             f"{', '.join(result['identical_tables']) or 'none'}",
             f"- speed verdicts (this machine's timings against the committed machine's): "
             f"{result['speed']['same']}/{result['speed']['compared']} the same"]
    for c in claims:
        if not c["same_verdict"]:
            lines.append(f"  - moved: {c['statement']}: {c['committed']} → {c['rerun']} (committed "
                         f"{c['difference']:+.2f}, re-run interval [{c['rerun_low']:+.2f}, {c['rerun_high']:+.2f}])")
    for m in means:
        if not m["inside"]:
            lines.append(f"  - outside: {m['table']} {m['row']} {m['column']}: committed {m['committed']:.2f}, "
                         f"re-run {m['rerun']:.2f} ± {m['half_width']:.2f} (n={m['n_seeds']})")
    return "\n".join(lines) + "\n"

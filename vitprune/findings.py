"""The claims the companion makes, checked on every run: which models each compares, the verdicts, and whether
a re-run elsewhere confirms them (`compare_runs`, `vitprune compare`).

Each claim compares two models of the same chain (same seed) on the same test images; its answers
come from the per-image correctness every stage records (`chain.measured`). `check` turns the list
into findings (statement, verdict, difference, 95 % interval, seeds, test images) with the paired
bootstrap of `stats`; notebook 08 writes them to figures/<set>/findings.json and findings.md, and the
README quotes that text. A claim that does not hold is reported as such, never dropped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from vitprune.errors import DataError, MissingStageError
from vitprune.experiments import ACCURACY_COLUMNS, variant_name
from vitprune.names import CALIBRATED_METHODS, CRITERIA, DECOMPOSE_METHODS, LU_METHODS, QR_STUDY_METHODS
from vitprune.params import Params
from vitprune.reporting import reproducible_columns
from vitprune.stats import HOLDS, REVERSED, claim, decode_answers

WHEN = {"": "before fine-tuning", "_ft": "after fine-tuning"}
METHOD_WORDS = {"svd": "SVD", "svd_activation": "activation-aware SVD", "svd_fisher": "Fisher-weighted SVD",
                "svd_scaled": "ASVD-style scaled SVD", "qr_householder": "Householder QR",
                "qr_cgs": "classical Gram–Schmidt QR", "qr_mgs": "modified Gram–Schmidt QR", "qr_givens": "Givens QR",
                "qr_pivoted": "column-pivoted QR", "lu": "LU (partial pivoting)",
                "lu_complete": "LU (complete pivoting)"}


def answers_by_model(records: dict[str, dict[str, Any]]) -> dict[str, dict[int, str]]:
    """Per model label and seed, the encoded per-image answers of every stage record that has them.

    Labels: dense, sparse, pruned_<criterion>_<NN>, decomp_<method>@<rank ratio>, the equal-budget study's
    share_<method>[_refit] and budget_<strategy>_<NN>, and <label>_ft after fine-tuning (fine-tuned at one
    rank or budget: decomp_<method>_ft, budget_<strategy>_ft).
    """
    out: dict[str, dict[int, str]] = {}

    def put(label: str, seed: str, answers: str | None) -> None:
        if answers:
            out.setdefault(label, {})[int(seed)] = answers

    for seed, r in records.get("01_sparse_training", {}).get("seeds", {}).items():
        put("dense", seed, r["dense"].get("answers"))
        put("sparse", seed, r["sparse"].get("answers"))
    for seed, r in records.get("03_pruning", {}).get("seeds", {}).items():
        for row in r["variants"]:
            put(row["variant"], seed, row.get("answers"))
    for stage in ("04_svd", "05_qr", "06_lu"):
        for seed, r in records.get(stage, {}).get("seeds", {}).items():
            for row in r["rows"]:
                put(f"{row['variant']}@{row['rank_ratio']:g}", seed, row.get("answers"))
                if "model" in row:
                    put(row["variant"], seed, row.get("answers"))
    for seed, r in records.get("07_equal_budget", {}).get("seeds", {}).items():
        for row in r["share"] + r["curves"]:
            put(row["label"], seed, row.get("answers"))
    for seed, r in records.get("08_finetuning", {}).get("seeds", {}).items():
        for row in r["rows"]:
            put(f"{row['variant']}_ft", seed, row.get("answers"))
    return out


def claim_specs(p: Params) -> list[dict[str, Any]]:
    """Every claim the project states, as (statement, model a, model b, margin): a beats b by more than margin."""
    source, ablation = p.decompose.source_ratio, p.prune.ablation_ratio
    specs = [{"group": "VTP", "a": f"{variant_name('gates', source)}_ft", "b": "dense", "margin": -p.prune.max_drop,
              "statement": f"Pruning {round(100 * source)} % of the gated dimensions with the VTP gates costs at most "
                           f"{p.prune.max_drop:g} points of top-1 against the dense model, after fine-tuning"}]
    gates = variant_name("gates", ablation)
    for criterion in (c for c in CRITERIA if c != "gates"):
        for suffix, when in WHEN.items():
            specs.append({"group": "VTP ablation", "a": gates + suffix, "b": variant_name(criterion, ablation) + suffix,
                          "margin": 0.0, "statement": f"At {round(100 * ablation)} % pruned, the VTP gates keep more "
                                                      f"accuracy than {criterion} scores, {when}"})
    methods = [m for m in DECOMPOSE_METHODS if m in p.decompose.methods]
    rank = f"rank ratio {p.decompose.finetune_ratio:g}"
    pairs = [("Sun", "svd", m) for m in QR_STUDY_METHODS + LU_METHODS]
    pairs += [("QR/LU pivoting", "qr_pivoted", "qr_householder"), ("QR/LU pivoting", "lu_complete", "lu")]
    pairs += [("beyond Sun", m, "svd") for m in CALIBRATED_METHODS]
    for group, a, b in pairs:
        if a in methods and b in methods:
            for suffix, when in WHEN.items():
                specs.append({"group": group, "a": f"decomp_{a}{suffix}", "b": f"decomp_{b}{suffix}", "margin": 0.0,
                              "statement": f"{METHOD_WORDS[a]} keeps more accuracy than {METHOD_WORDS[b]} at {rank}, "
                                           f"{when}"})
    return specs + budget_specs(p, methods)


def budget_specs(p: Params, methods: list[str]) -> list[dict[str, Any]]:
    """The equal-budget study's claims: Sun's ranking after refit, data-aware against plain SVD at the same
    parameters, and factorization against pruning alone at equal parameters."""
    share = f"at {round(100 * p.budget.share)} % of the pruned model's parameters, before fine-tuning"
    specs = [{"group": "refit", "a": "share_svd_refit", "b": f"share_{m}_refit", "margin": 0.0,
              "statement": f"Refit after truncation, SVD still keeps more accuracy than {METHOD_WORDS[m]} {share}"}
             for m in QR_STUDY_METHODS + LU_METHODS if m in methods and "svd" in methods]
    specs += [{"group": "data-aware at equal parameters", "a": f"share_{m}", "b": "share_svd", "margin": 0.0,
               "statement": f"{METHOD_WORDS[m]} keeps more accuracy than SVD {share}"}
              for m in CALIBRATED_METHODS if m in methods and "svd" in methods]
    pct = round(100 * p.budget.finetune_ratio)
    method = METHOD_WORDS[p.budget.method]
    against = [("vtp_alloc", "prune", f"VTP + {method} with allocated ranks keeps more accuracy than pruning alone"),
               ("vtp_svd", "prune", "VTP + SVD at a uniform rank keeps more accuracy than pruning alone"),
               ("vtp_alloc", "dense_alloc", f"VTP + {method} keeps more accuracy than factorizing the dense model "
                                            f"with {method} alone")]
    for a, b, text in against:
        for suffix, when in {f"_{pct}": "before fine-tuning", "_ft": "after fine-tuning"}.items():
            specs.append({"group": "equal parameters", "a": f"budget_{a}{suffix}", "b": f"budget_{b}{suffix}",
                          "margin": 0.0, "statement": f"At the parameters of pruning {pct} % alone, {text}, {when}"})
        specs.append({"group": "equal MACs", "a": f"budget_macs_{a}_{pct}", "b": f"budget_macs_{b}_{pct}",
                      "margin": 0.0, "statement": f"At the MACs of pruning {pct} % alone, {text}, before fine-tuning"})
    return specs


def check(specs: Iterable[dict[str, Any]], answers: dict[str, dict[int, str]]) -> list[dict[str, Any]]:
    """Each claim whose two models have answers for the same seeds, checked with the paired bootstrap."""
    findings = []
    for spec in specs:
        a, b = answers.get(spec["a"], {}), answers.get(spec["b"], {})
        seeds = sorted(set(a) & set(b))
        if not seeds:
            continue
        matrix_a = np.stack([decode_answers(a[s]) for s in seeds])
        matrix_b = np.stack([decode_answers(b[s]) for s in seeds])
        result = claim(spec["statement"], matrix_a, matrix_b, margin=spec["margin"])
        findings.append({"group": spec["group"], **result, "a": spec["a"], "b": spec["b"], "seeds": seeds,
                         "accuracy_a": float(100 * matrix_a.mean()), "accuracy_b": float(100 * matrix_b.mean())})
    return findings


def finding_line(f: dict[str, Any]) -> str:
    """One finding as a Markdown bullet: verdict, statement, and its evidence."""
    mark = {HOLDS: "✅ holds", REVERSED: "❌ reversed"}.get(f["verdict"], "➖ not distinguishable at this scale")
    against = f" (threshold {f['margin']:+g})" if f["margin"] else ""
    return (f"- **{mark}** — {f['statement']}: {f['accuracy_a']:.1f} % vs {f['accuracy_b']:.1f} %, difference "
            f"{f['difference']:+.2f} points{against}, 95 % interval [{f['low']:+.2f}, {f['high']:+.2f}] "
            f"({f['n_seeds']} seeds × {f['test_images']:,} test images, paired).")


def findings_markdown(findings: list[dict[str, Any]]) -> str:
    """Every finding, grouped, with a one-line tally first."""
    counts = {v: sum(f["verdict"] == v for f in findings) for v in (HOLDS, REVERSED)}
    unclear = len(findings) - sum(counts.values())
    lines = [f"{len(findings)} claims checked: {counts[HOLDS]} hold, {counts[REVERSED]} reversed, {unclear} not "
             "distinguishable at this scale. Each compares two models of the same seed on the same test images; "
             "the 95 % interval is a paired two-stage bootstrap (seeds, then test images, with replacement), so "
             "it counts the spread between training runs as well as the test set's size.", ""]
    for group in dict.fromkeys(f["group"] for f in findings):
        lines += [f"**{group}**", "", *(finding_line(f) for f in findings if f["group"] == group), ""]
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
    old = {f["statement"]: f for f in _read_findings(committed)}
    new = {f["statement"]: f for f in _read_findings(rerun)}
    claims = [{"statement": s, "committed": old[s]["verdict"], "rerun": new[s]["verdict"],
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
            "missing_claims": sorted(set(old) - set(new))}


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

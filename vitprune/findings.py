"""The claims the companion makes, checked on every run: which models each compares, and the verdicts.

Each claim compares two models of the same chain (same seed) on the same test images; its answers
come from the per-image correctness every stage records (`chain.measured`). `check` turns the list
into findings (statement, verdict, difference, 95 % interval, seeds, test images) with the paired
bootstrap of `stats`; notebook 08 writes them to figures/<set>/findings.json and findings.md, and the
README quotes that text. A claim that does not hold is reported as such, never dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from vitprune.experiments import variant_name
from vitprune.names import CALIBRATED_METHODS, CRITERIA, DECOMPOSE_METHODS, LU_METHODS, QR_STUDY_METHODS
from vitprune.params import Params
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

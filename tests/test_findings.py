"""The claims the project makes, checked from per-image answers: which models each compares, the verdicts, the text."""

from __future__ import annotations

import numpy as np

from tests.conftest import ROOT
from vitprune.findings import answers_by_model, check, claim_specs, findings_markdown
from vitprune.params import load_params
from vitprune.stats import HOLDS, REVERSED, UNCLEAR, encode_answers


def bits(p: float, seed: int, images: int = 1000) -> str:
    return encode_answers(np.random.default_rng(seed).random(images) < p)


def test_every_claim_of_the_default_set_is_specified():
    specs = claim_specs(load_params(ROOT / "params" / "default.yaml"))
    statements = " | ".join(s["statement"] for s in specs)
    for method in ("Householder QR", "classical Gram–Schmidt QR", "modified Gram–Schmidt QR", "Givens QR",
                   "column-pivoted QR", "LU (partial pivoting)", "LU (complete pivoting)"):
        for when in ("before fine-tuning", "after fine-tuning"):
            assert f"SVD keeps more accuracy than {method} at rank ratio 0.3, {when}" in statements
    for criterion in ("magnitude", "taylor", "random"):
        assert f"the VTP gates keep more accuracy than {criterion} scores, after fine-tuning" in statements
    assert "column-pivoted QR keeps more accuracy than Householder QR" in statements
    assert "costs at most 0.5 points" in statements
    cost = next(s for s in specs if s["group"] == "VTP")
    assert (cost["a"], cost["b"], cost["margin"]) == ("pruned_gates_40_ft", "dense", -0.5)


def test_claims_are_checked_per_seed_pair_with_the_right_verdicts():
    answers = {"dense": {s: bits(0.97, s) for s in range(3)},
               "pruned_gates_40_ft": {s: bits(0.968, 10 + s) for s in range(3)},  # costs ~0.2 points
               "decomp_svd": {s: bits(0.9, 20 + s) for s in range(3)},
               "decomp_lu": {s: bits(0.6, 30 + s) for s in range(3)},
               "decomp_qr_householder": {s: bits(0.9, 40 + s) for s in range(3)},
               "decomp_qr_pivoted": {0: bits(0.5, 50)}}  # one seed only: compared on that seed
    specs = [{"group": "g", "statement": "svd > lu", "a": "decomp_svd", "b": "decomp_lu", "margin": 0.0},
             {"group": "g", "statement": "lu > svd", "a": "decomp_lu", "b": "decomp_svd", "margin": 0.0},
             {"group": "g", "statement": "svd > qr", "a": "decomp_svd", "b": "decomp_qr_householder", "margin": 0.0},
             {"group": "g", "statement": "pivoted > householder", "a": "decomp_qr_pivoted",
              "b": "decomp_qr_householder", "margin": 0.0},
             {"group": "h", "statement": "costs at most 5", "a": "pruned_gates_40_ft", "b": "dense", "margin": -5.0},
             {"group": "h", "statement": "never run", "a": "decomp_svd_ft", "b": "dense", "margin": 0.0}]
    found = {f["statement"]: f for f in check(specs, answers)}
    assert "never run" not in found  # a model that was not run is not a claim on this set
    assert found["svd > lu"]["verdict"] == HOLDS and 25 < found["svd > lu"]["difference"] < 35
    assert found["lu > svd"]["verdict"] == REVERSED
    assert found["svd > qr"]["verdict"] == UNCLEAR
    assert found["pivoted > householder"]["seeds"] == [0] and found["pivoted > householder"]["n_seeds"] == 1
    cost = found["costs at most 5"]
    assert cost["verdict"] == HOLDS and cost["difference"] < 0 and cost["margin"] == -5.0
    text = findings_markdown(list(found.values()))
    assert found["pivoted > householder"]["verdict"] == REVERSED
    assert text.startswith("5 claims checked: 2 hold, 2 reversed, 1 not distinguishable at this scale.")
    assert "**❌ reversed** — lu > svd" in text and "(3 seeds × 1,000 test images, paired)" in text


def test_answers_are_gathered_from_every_stage_record_by_model_and_seed():
    a, b = bits(0.9, 1, 10), bits(0.8, 2, 10)
    records = {
        "01_sparse_training": {"seeds": {"0": {"dense": {"answers": a}, "sparse": {"answers": b}}}},
        "03_pruning": {"seeds": {"0": {"variants": [{"variant": "pruned_gates_40", "answers": a}]}}},
        "04_svd": {"seeds": {"0": {"rows": [{"variant": "decomp_svd", "rank_ratio": 0.3, "answers": a,
                                             "model": "decomp_svd.safetensors"},
                                            {"variant": "decomp_svd", "rank_ratio": 0.5, "answers": b}]}}},
        "08_finetuning": {"seeds": {"0": {"rows": [{"variant": "decomp_svd", "answers": b}]}}},
    }
    got = answers_by_model(records)
    assert got["dense"] == {0: a} and got["sparse"] == {0: b} and got["pruned_gates_40"] == {0: a}
    assert got["decomp_svd"] == {0: a} and got["decomp_svd@0.3"] == {0: a} and got["decomp_svd@0.5"] == {0: b}
    assert got["decomp_svd_ft"] == {0: b}


def _figures(folder, findings: list[tuple[str, str, float, float, float]], table: dict[str, list]) -> None:
    """A figures/<set> folder with findings (statement, verdict, difference, low, high) and one per-seed table."""
    import json

    import pandas as pd

    folder.mkdir()
    (folder / "findings.json").write_text(json.dumps([{"statement": s, "verdict": v, "difference": d, "low": lo,
                                                       "high": hi} for s, v, d, lo, hi in findings]))
    pd.DataFrame(table).to_csv(folder / "table_sun.csv", index=False)


def test_a_rerun_is_compared_claim_by_claim_and_mean_by_mean(tmp_path):
    from vitprune.findings import compare_runs, comparison_markdown

    table = {"seed": [0, 1, 2, 0, 1, 2], "method": ["svd"] * 3 + ["lu"] * 3, "rank_ratio": [0.3] * 6,
             "latency_bs1_ms": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "top1": [95.0, 95.2, 95.4, 20.0, 25.0, 30.0]}
    committed = [("svd > lu", HOLDS, 70.0, 60.0, 80.0), ("svd > qr", UNCLEAR, 0.4, -0.2, 1.0),
                 ("qr > lu", HOLDS, 5.0, 1.0, 9.0), ("dropped", HOLDS, 1.0, 0.5, 1.5)]
    _figures(tmp_path / "a", committed, table)
    rerun_table = {**table, "latency_bs1_ms": [9.0] * 6, "top1": [95.1, 95.3, 95.5, 30.0, 31.0, 32.0]}
    _figures(tmp_path / "b", [("svd > lu", HOLDS, 65.0, 62.0, 68.0), ("svd > qr", HOLDS, 0.6, 0.1, 1.1),
                              ("qr > lu", REVERSED, -3.0, -5.0, -1.0)], rerun_table)
    result = compare_runs(tmp_path / "a", tmp_path / "b")
    by = {c["statement"]: c for c in result["claims"]}
    assert by["svd > lu"]["same_verdict"] and not by["svd > lu"]["inside"]  # 70 is outside [62, 68]
    assert not by["svd > qr"]["same_verdict"] and by["svd > qr"]["inside"] and not by["svd > qr"]["reversed"]
    assert by["qr > lu"]["reversed"] and result["missing_claims"] == ["dropped"]
    means = {m["row"][0]: m for m in result["means"]}
    assert means["svd"]["inside"] and means["svd"]["n_seeds"] == 3  # 95.2 inside 95.3 ± 0.25
    assert not means["lu"]["inside"] and abs(means["lu"]["half_width"] - 4.303 * 1 / 3 ** 0.5) < 1e-3
    assert result["identical_tables"] == []
    text = comparison_markdown(result)
    assert "verdicts: 1/3 the same, 1 reversed, 1 committed claims missing" in text
    assert "moved: qr > lu: holds → reversed" in text and "outside: table_sun ('lu', 0.3) top1" in text
    # the same folder against itself: identical tables (latency aside), every verdict and mean confirmed
    (tmp_path / "c").mkdir()
    for f in (tmp_path / "a").iterdir():
        (tmp_path / "c" / f.name).write_text(f.read_text().replace("4.0,", "8.0,"))
    same = compare_runs(tmp_path / "a", tmp_path / "c")
    assert same["identical_tables"] == ["table_sun"] and all(c["same_verdict"] and c["inside"] for c in same["claims"])
    assert all(m["inside"] for m in same["means"])


def test_the_generated_summary_quotes_the_verdicts_of_the_rankings_it_shows():
    import pandas as pd

    from vitprune import narrative

    vtp = pd.DataFrame({"seed": [0, 1, 0, 1], "variant": ["dense", "dense", "pruned_gates_40", "pruned_gates_40"],
                        "macs_reduction_%": [0.0, 0.0, 43.0, 43.0], "top1_ft": [97.0, 97.2, 96.9, 97.1],
                        "top1_drop_ft": [0.0, 0.0, 0.1, 0.1]})
    ablation = pd.DataFrame({"seed": [0, 1, 0, 1], "criterion": ["gates", "gates", "random", "random"],
                             "top1_ft": [97.0, 97.0, 94.0, 95.0]})
    sun = pd.DataFrame({"seed": [0, 1, 0, 1, 0], "method": ["svd", "svd", "lu", "lu", "svd_fisher"],
                        "top1_ft": [96.0, 96.2, 93.0, 94.0, float("nan")]})
    found = [{"group": "VTP ablation", "statement": "gates > random, after fine-tuning", "verdict": HOLDS,
              "a": "pruned_gates_40_ft", "b": "pruned_random_40_ft"},
             {"group": "Sun", "statement": "svd > lu, before fine-tuning", "verdict": HOLDS, "a": "decomp_svd",
              "b": "decomp_lu"},
             {"group": "Sun", "statement": "svd > lu, after fine-tuning", "verdict": UNCLEAR, "a": "decomp_svd_ft",
              "b": "decomp_lu_ft"}]
    text = narrative.comparison(vtp, ablation, sun, found)
    assert "Ablation after fine-tuning (mean top-1): gates 97.0 %, random 94.5 %" in text
    assert "the gates against each other criterion: holds against random_40" in text
    assert "Table Sun after fine-tuning (mean top-1): svd 96.1 %, lu 93.5 %; SVD against each QR and LU variant: " \
           "not distinguishable at this scale against lu." in text
    assert "svd_fisher" not in text and "Of 3 checked claims: 2 holds, 1 not distinguishable" in text

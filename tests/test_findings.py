"""The claims the project makes: declared by the stage modules with typed model handles and stable ids, checked
from the per-image answers in the stage records, and compared with a re-run claim by claim."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.conftest import ROOT
from vitprune.errors import UnknownModel
from vitprune.params import load_params
from vitprune.study.findings import Claim, check, compare_runs, comparison_markdown, findings_markdown
from vitprune.study.records import Measured, ModelRef, SeedRecord, StageRecord, read_record, write_record
from vitprune.study.stages import comparison
from vitprune.study.stats import HOLDS, REVERSED, UNCLEAR, encode_answers


def bits(p: float, seed: int, images: int = 1000) -> str:
    return encode_answers(np.random.default_rng(seed).random(images) < p)


def model(answers: str) -> Measured:
    return Measured(top1=100 * answers.count("1") / len(answers), top5=100.0, params_M=1.0, macs_M=1.0,
                    answers=answers)


def record(stage: str, models: dict[str, dict[int, str]], skipped: dict[str, str] | None = None) -> StageRecord:
    seeds = sorted({s for by_seed in models.values() for s in by_seed})
    return StageRecord(stage, "test", {s: SeedRecord(models={label: model(a[s]) for label, a in models.items()
                                                            if s in a}, skipped=skipped or {}) for s in seeds})


def test_every_claim_of_the_default_set_is_declared_with_a_unique_id():
    claims = comparison.all_claims(load_params(ROOT / "params" / "default.yaml"))
    statements = " | ".join(c.statement for c in claims)
    for method in ("Householder QR", "classical Gram–Schmidt QR", "modified Gram–Schmidt QR", "Givens QR",
                   "column-pivoted QR", "LU (partial pivoting)", "LU (complete pivoting)"):
        for when in ("before fine-tuning", "after fine-tuning"):
            assert f"SVD keeps more accuracy than {method} at rank ratio 0.3, {when}" in statements
    for criterion in ("magnitude", "taylor", "random"):
        assert f"the VTP gates keep more accuracy than {criterion} scores, after fine-tuning" in statements
    assert "column-pivoted QR keeps more accuracy than Householder QR" in statements
    cost = next(c for c in claims if c.group == "VTP")
    assert (cost.a, cost.b, cost.threshold) == (ModelRef("08_finetuning", "pruned_gates_40"),
                                                ModelRef("01_sparse_training", "dense"), -0.5)
    assert len({c.id for c in claims}) == len(claims) == 48
    # methods the registry does not fine-tune enter only the claims before fine-tuning
    fisher = [c for c in claims if "svd_fisher" in c.id]
    assert fisher and all(c.id.endswith(("before", "@0.5")) for c in fisher)


def test_claims_are_checked_per_seed_pair_with_the_right_verdicts():
    dense, pruned = ModelRef("01", "dense"), ModelRef("08", "pruned_gates_40")
    svd, lu, qr, pivoted = (ModelRef("04", f"decomp_{m}") for m in ("svd", "lu", "qr_householder", "qr_pivoted"))
    records = {"01": record("01", {"dense": {s: bits(0.97, s) for s in range(3)}}),
               "08": record("08", {"pruned_gates_40": {s: bits(0.968, 10 + s) for s in range(3)}}),
               "04": record("04", {"decomp_svd": {s: bits(0.9, 20 + s) for s in range(3)},
                                   "decomp_lu": {s: bits(0.6, 30 + s) for s in range(3)},
                                   "decomp_qr_householder": {s: bits(0.9, 40 + s) for s in range(3)},
                                   "decomp_qr_pivoted": {s: bits(0.5, 50 + s) for s in range(3)}},
                            skipped={"budget_vtp_svd_60": "factorizing proj cannot reach this budget"})}
    claims = [Claim("a", "g", "svd > lu", svd, lu), Claim("b", "g", "lu > svd", lu, svd),
              Claim("c", "g", "svd > qr", svd, qr), Claim("d", "g", "pivoted > householder", pivoted, qr),
              Claim("e", "h", "costs at most 5", pruned, dense, threshold=-5.0),
              Claim("f", "h", "uniform SVD > pruning", ModelRef("04", "budget_vtp_svd_60"), svd)]
    found, unchecked = check(claims, records)
    found = {f["statement"]: f for f in found}
    assert unchecked == ["uniform SVD > pruning: 04:budget_vtp_svd_60 was not built (factorizing proj cannot "
                         "reach this budget)"]
    assert found["svd > lu"]["verdict"] == HOLDS and 25 < found["svd > lu"]["difference"] < 35
    assert found["lu > svd"]["verdict"] == REVERSED and found["svd > lu"]["id"] == "a"
    assert found["svd > qr"]["verdict"] == UNCLEAR
    assert found["pivoted > householder"]["verdict"] == REVERSED and found["pivoted > householder"]["n_seeds"] == 3
    cost = found["costs at most 5"]
    assert cost["verdict"] == HOLDS and cost["difference"] < 0 and cost["threshold"] == -5.0
    assert cost["a"] == "08:pruned_gates_40" and cost["seeds"] == [0, 1, 2]
    text = findings_markdown(list(found.values()), unchecked)
    assert text.startswith("5 claims checked: 2 hold, 2 reversed, 0 equivalent within their margin, 1 not "
                           "distinguishable at this scale;")
    assert "it could have seen a difference of ±" in text
    assert "**❌ reversed** — lu > svd" in text and "(3 seeds × 1,000 test images, paired)" in text
    assert "**Not checked**" in text and "budget_vtp_svd_60 was not built" in text


def test_a_claim_naming_a_model_no_stage_recorded_is_an_error_naming_it():
    records = {"04": record("04", {"decomp_svd": {0: bits(0.9, 1)}})}
    with pytest.raises(UnknownModel, match="04 recorded no model 'decomp_svdd' for seed 0; it recorded: decomp_svd"):
        check([Claim("x", "g", "typo", ModelRef("04", "decomp_svdd"), ModelRef("04", "decomp_svd"))], records)


def test_a_record_round_trips_and_joins_each_row_with_its_model(tmp_path):
    first = SeedRecord(tables={"variants": [{"label": "pruned_gates_40", "ratio": 0.4}]}, files=["seed0/x"],
                       finetune={"pruned_gates_40": {"file": "pruned_gates_40.safetensors"}})
    first.measure("pruned_gates_40", Measured(96.0, 99.0, 0.08, 1.4, "101", {1: 0.5, 64: 3.0}))
    written = StageRecord("03_pruning", "default", {0: first}, summary="s", figures={"a.png": "d"})
    write_record(tmp_path / "03_pruning.json", written)
    back = read_record(tmp_path / "03_pruning.json")
    assert back == written
    frame = back.frame("variants")
    assert list(frame.columns) == ["seed", "label", "ratio", "top1", "top5", "params_M", "macs_M", "latency_bs1_ms",
                                   "latency_bs64_ms"]
    assert frame.iloc[0].top1 == 96.0 and back.model("pruned_gates_40", 0).answers == "101"


def _figures(folder, findings: list[tuple[str, str, str, float, float, float]], table: dict[str, list]) -> None:
    """A figures/<set> folder with findings (id, statement, verdict, difference, low, high) and one per-seed table."""
    folder.mkdir()
    (folder / "findings.json").write_text(json.dumps([{"id": i, "statement": s, "verdict": v, "difference": d,
                                                       "low": lo, "high": hi} for i, s, v, d, lo, hi in findings]))
    pd.DataFrame(table).to_csv(folder / "table_sun.csv", index=False)


def test_a_rerun_is_compared_claim_by_claim_and_mean_by_mean(tmp_path):
    table = {"seed": [0, 1, 2, 0, 1, 2], "method": ["svd"] * 3 + ["lu"] * 3, "rank_ratio": [0.3] * 6,
             "latency_bs1_ms": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "top1": [95.0, 95.2, 95.4, 20.0, 25.0, 30.0]}
    committed = [("1", "svd > lu", HOLDS, 70.0, 60.0, 80.0), ("2", "svd > qr", UNCLEAR, 0.4, -0.2, 1.0),
                 ("3", "qr > lu", HOLDS, 5.0, 1.0, 9.0), ("4", "dropped", HOLDS, 1.0, 0.5, 1.5)]
    _figures(tmp_path / "a", committed, table)
    rerun_table = {**table, "latency_bs1_ms": [9.0] * 6, "top1": [95.1, 95.3, 95.5, 30.0, 31.0, 32.0]}
    _figures(tmp_path / "b", [("1", "SVD beats LU (reworded)", HOLDS, 65.0, 62.0, 68.0),
                              ("2", "svd > qr", HOLDS, 0.6, 0.1, 1.1), ("3", "qr > lu", REVERSED, -3.0, -5.0, -1.0)],
             rerun_table)
    result = compare_runs(tmp_path / "a", tmp_path / "b")
    by = {c["statement"]: c for c in result["claims"]}
    assert by["svd > lu"]["same_verdict"] and not by["svd > lu"]["inside"]  # matched by id, though reworded
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
    vtp = pd.DataFrame({"seed": [0, 1, 0, 1], "variant": ["dense", "dense", "pruned_gates_40", "pruned_gates_40"],
                        "macs_reduction_%": [0.0, 0.0, 43.0, 43.0], "top1_ft": [97.0, 97.2, 96.9, 97.1],
                        "top1_drop_ft": [0.0, 0.0, 0.1, 0.1]})
    ablation = pd.DataFrame({"seed": [0, 1, 0, 1], "criterion": ["gates", "gates", "random", "random"],
                             "top1_ft": [97.0, 97.0, 94.0, 95.0]})
    sun = pd.DataFrame({"seed": [0, 1, 0, 1, 0], "method": ["svd", "svd", "lu", "lu", "svd_fisher"],
                        "top1_ft": [96.0, 96.2, 93.0, 94.0, float("nan")]})
    found = [{"group": "VTP ablation", "statement": "gates > random, after fine-tuning", "verdict": HOLDS,
              "a": "08_finetuning:pruned_gates_40", "b": "08_finetuning:pruned_random_40"},
             {"group": "Sun", "statement": "svd > lu, before fine-tuning", "verdict": HOLDS, "a": "04_svd:decomp_svd",
              "b": "06_lu:decomp_lu"},
             {"group": "Sun", "statement": "svd > lu, after fine-tuning", "verdict": UNCLEAR,
              "a": "08_finetuning:decomp_svd", "b": "08_finetuning:decomp_lu"},
             {"group": "speed", "kind": "speed", "statement": "decomp_svd is faster than pruned_gates_40 at batch 1",
              "verdict": REVERSED, "a": "04_svd:decomp_svd", "b": "03_pruning:pruned_gates_40"}]
    text = comparison.conclusion(vtp, ablation, sun, found)
    assert "Ablation after fine-tuning (mean top-1): gates 97.0 %, random 94.5 %" in text
    assert "the gates against each other criterion: holds against random_40" in text
    assert "Table Sun after fine-tuning (mean top-1): svd 96.1 %, lu 93.5 %; SVD against each QR and LU variant: " \
           "not distinguishable at this scale against lu." in text
    assert "svd_fisher" not in text  # the accuracy claims and the speed claims are counted apart
    assert "Accuracy: 3 claims checked: 2 hold, 0 reversed, 0 equivalent within their margin, 1 not distinguishable" \
           in text and "Speed: 1 speed claims checked: 0 hold, 1 reversed" in text

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

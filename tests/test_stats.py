"""Paired comparisons on constructed data: a known difference is found, no difference is not, a reversal is."""

from __future__ import annotations

import numpy as np
import pytest

from vitprune.study.stats import (
    EQUIVALENT,
    HOLDS,
    POWER_80,
    REVERSED,
    UNCLEAR,
    can_move,
    claim,
    mean_std,
    paired_bootstrap,
    with_spread,
)


def answers(p: float, images: int = 4000, seeds: int = 3, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((seeds, images)) < p).astype(float)


def test_a_known_difference_is_found_with_an_interval_around_it():
    a, b = answers(0.9, seed=1), answers(0.8, seed=2)
    c = claim("a beats b", a, b)
    assert c["verdict"] == HOLDS and c["low"] < 10 < c["high"] and abs(c["difference"] - 10) < 1.5
    assert (c["n_seeds"], c["test_images"]) == (3, 4000)
    assert claim("b beats a", b, a)["verdict"] == REVERSED


def test_no_difference_is_not_distinguishable():
    a = answers(0.9, seed=3)
    c = claim("a beats b", a, answers(0.9, seed=6))  # same accuracy, independent errors
    assert c["verdict"] == UNCLEAR and c["low"] < 0 < c["high"]
    same = paired_bootstrap(a, a)
    assert same["difference"] == same["low"] == same["high"] == 0.0


def test_equivalence_holds_and_blindness_on_constructed_data():
    """Equal models: equivalent within the margin; a 2-point gap: holds; few images: not distinguishable, with the
    smallest difference the run could have seen."""
    rng = np.random.default_rng(12)
    base = (rng.random((3, 4000)) < 0.9).astype(float)
    near = base.copy()
    for seed in range(3):  # the same accuracy, 40 answers turned wrong and 40 turned right on every seed
        right, wrong = np.flatnonzero(base[seed] == 1), np.flatnonzero(base[seed] == 0)
        near[seed, rng.choice(right, 40, replace=False)] = 0
        near[seed, rng.choice(wrong, 40, replace=False)] = 1
    equal = claim("a beats b", near, base, margin=1.0)
    assert equal["verdict"] == EQUIVALENT and -1.0 <= equal["low"] and equal["high"] <= 1.0
    worse = base.copy()
    worse[:, :80] = 0  # 2 points worse on every seed
    gap = claim("a beats b", base, worse, margin=1.0)
    assert gap["verdict"] == HOLDS and 1.5 < gap["difference"] < 2.5
    few = claim("a beats b", base[:1, :60], near[:1, :60], margin=1.0)
    assert few["verdict"] == UNCLEAR and few["detectable"] == pytest.approx(POWER_80 * (few["high"] - few["low"]) / 2)
    assert few["detectable"] > 1.0 and few["can_move"]


def test_a_verdict_can_move_when_its_threshold_is_within_one_interval_width():
    assert can_move(0.1, 1.1) and can_move(-2.0, -0.5) and not can_move(5.0, 6.0)
    assert can_move(1.0, 3.0, threshold=0.5) and not can_move(4.0, 5.0, threshold=0.5)


def test_pairing_finds_a_small_difference_on_the_same_images():
    a = answers(0.9, seed=7)
    b = a.copy()
    b[:, :200] = 0  # b is also wrong on the first 200 of 4000 images: at most 5 points worse, all paired
    c = claim("a beats b", a, b)
    assert c["verdict"] == HOLDS and c["high"] - c["low"] < 2.0
    unpaired = claim("a beats b", a, answers(float(b.mean()), seed=11))
    assert unpaired["high"] - unpaired["low"] > c["high"] - c["low"]


def test_a_threshold_turns_the_claim_into_at_most_x_points():
    a, b = answers(0.9, seed=8), answers(0.89, seed=9)
    c = claim("a costs at most 3 points against b", b, a, threshold=-3.0)  # b - a + 3 > 0
    assert c["verdict"] == HOLDS


def test_mean_and_spread():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    assert with_spread([97.0, 97.2, 97.4]) == "97.2 ± 0.2 (n=3)"
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap(np.ones(3), np.ones(4))


def test_per_image_answers_agree_with_top1(smoke_params, digits_bundle):
    import torch

    import vitprune as vp

    torch.manual_seed(0)
    model = vp.build_model(smoke_params.model, 10, 1, smoke_params.data.image_size)
    right = vp.evaluate(model, vp.test_batches(digits_bundle, 100), answers=True)["answers"]
    assert right.shape == (digits_bundle.num_test(),) and right.dtype == torch.bool
    top1 = vp.evaluate(model, vp.test_batches(digits_bundle, 100))["top1"]
    assert int(right.sum()) == round(top1 * digits_bundle.num_test() / 100)


def test_standard_error_of_an_accuracy():
    from vitprune.study.stats import standard_error

    assert abs(standard_error(97.0, 1000) - 0.5394) < 1e-3 and standard_error(100.0, 10) == 0.0


def test_answers_round_trip_and_seed_tables_show_mean_and_spread():
    import pandas as pd

    from vitprune.study.stats import decode_answers, encode_answers, seed_summary, spread_columns

    bits = [True, False, False, True, True]
    assert encode_answers(bits) == "10011" and decode_answers("10011").tolist() == [1, 0, 0, 1, 1]
    long = pd.DataFrame({"seed": [0, 1, 2, 0, 1, 2], "variant": ["b", "b", "b", "a", "a", "a"],
                         "top1": [90.0, 92.0, 94.0, 80.0, 80.0, 80.0], "params_M": [1.0, 1.0, 1.0, 2.0, 2.0, 3.0]})
    summary = seed_summary(long, ["variant"])
    assert list(summary.variant) == ["b", "a"] and list(summary.n) == [3, 3]  # first-seen order, seeds counted
    assert summary.top1.tolist() == [92.0, 80.0] and summary.top1_std.tolist() == [2.0, 0.0]
    shown = spread_columns(summary, ["top1"])
    assert shown.top1.tolist() == ["92.0 ± 2.0", "80.0 ± 0.0"] and "top1_std" not in shown
    assert shown.params_M.tolist() == [1.0, pytest.approx(7 / 3)]


def test_the_spread_between_seeds_widens_the_interval():
    steady = answers(0.9, seed=11)
    b = answers(0.9, seed=12)
    shaky = steady.copy()
    shaky[0] = answers(0.6, seeds=1, seed=13)[0]  # one training run went badly: the seeds disagree
    assert paired_bootstrap(shaky, b)["high"] - paired_bootstrap(shaky, b)["low"] > 3 * (
        paired_bootstrap(steady, b)["high"] - paired_bootstrap(steady, b)["low"])

"""Claims with evidence: paired comparisons on the same test images (and seeds), intervals and verdicts.

A claim such as "SVD keeps more accuracy than Householder QR" compares per-image correctness of two
models evaluated on the same test images, for the same seeds. `paired_bootstrap` resamples seeds and
test images (keeping every pair of answers together), so the interval reflects both the spread between
training runs and the test set's size; `verdict` turns the interval into holds / reversed / equivalent
within a declared margin (two one-sided tests read off the same interval) / not distinguishable at this
scale, and `detectable` says how large a difference a comparison that saw none could have seen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

HOLDS, REVERSED, EQUIVALENT, UNCLEAR = "holds", "reversed", "equivalent", "not distinguishable at this scale"
# a true difference of (z_0.975 + z_0.8) standard errors is detected with 80 % power by a 95 % interval whose
# half-width is z_0.975 standard errors: the smallest effect a comparison could see is its half-width times this
POWER_80 = (1.959964 + 0.841621) / 1.959964


def _as_matrix(correct: Any) -> np.ndarray:
    """(seeds, images) array of 0/1 from one run's (images,) or several seeds' (seeds, images) answers."""
    arr = np.asarray(correct, dtype=np.float64)
    return arr[None, :] if arr.ndim == 1 else arr


def paired_bootstrap(correct_a: Any, correct_b: Any, resamples: int = 10_000, level: float = 0.95,
                     seed: int = 0) -> dict[str, Any]:
    """Accuracy difference a − b (points), over the same images and seeds, with a two-stage bootstrap interval.

    Each resample draws the seeds with replacement (so the spread between training runs counts, not only the
    test set's size) and the test images with replacement, one image draw shared by both models and every
    seed (paired).
    """
    a, b = _as_matrix(correct_a), _as_matrix(correct_b)
    if a.shape != b.shape:
        raise ValueError(f"paired answers must have the same shape, got {a.shape} and {b.shape}")
    seeds, images = a.shape
    diff = a - b  # (seeds, images)
    rng = np.random.default_rng(seed)
    boot = np.empty(resamples)
    for start in range(0, resamples, 1000):
        n = min(1000, resamples - start)
        per_seed = diff[:, rng.integers(0, images, size=(n, images))].mean(axis=2).T  # (n, seeds)
        chosen = rng.integers(0, seeds, size=(n, seeds)) if seeds > 1 else np.zeros((n, 1), dtype=int)
        boot[start:start + n] = 100 * np.take_along_axis(per_seed, chosen, axis=1).mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(boot, [tail, 1 - tail])
    return {"difference": float(100 * diff.mean()), "low": float(low), "high": float(high),
            "level": level, "n_seeds": seeds, "test_images": images}


def verdict(low: float, high: float, threshold: float = 0.0, margin: float | None = None) -> str:
    """holds if the interval lies above the threshold, reversed if below; equivalent if it lies inside ±margin
    (Schuirmann's two one-sided tests, each at the interval's own tail level: a positive finding that a and b are
    the same for practical purposes); else not distinguishable at this scale."""
    if low > threshold:
        return HOLDS
    if high < threshold:
        return REVERSED
    if margin is not None and -margin <= low and high <= margin:
        return EQUIVALENT
    return UNCLEAR


def detectable(low: float, high: float) -> float:
    """The smallest true difference this comparison would have detected with 80 % power (its half-width × 1.43)."""
    return POWER_80 * (high - low) / 2


def can_move(low: float, high: float, threshold: float = 0.0) -> bool:
    """Whether the threshold lies within one interval width of either end of the interval: a verdict another
    machine's floats or other seeds can move."""
    width = high - low
    return abs(threshold - low) <= width or abs(threshold - high) <= width


def claim(statement: str, correct_a: Any, correct_b: Any, threshold: float = 0.0, margin: float | None = None,
          **kwargs: Any) -> dict[str, Any]:
    """A checked claim "a beats b by more than `threshold` points" (a negative threshold: "a costs at most
    −threshold points against b"), read as equivalence where its interval lies inside ±`margin`: the statement,
    the difference a − b with its interval, threshold, margin, verdict, the smallest difference the comparison
    could have seen, and whether the verdict sits within one interval width of its threshold."""
    result = paired_bootstrap(correct_a, correct_b, **kwargs)
    low, high = result["low"], result["high"]
    return {"statement": statement, "verdict": verdict(low, high, threshold, margin), "threshold": threshold,
            "margin": margin, **result, "detectable": detectable(low, high), "can_move": can_move(low, high, threshold)}


def paired_speedup(source_ms: Sequence[float], variant_ms: Sequence[float], resamples: int = 10_000,
                   level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Speed-up of a variant over its source (source time / variant time) from interleaved timing rounds: the
    geometric mean of the per-round ratios, with a bootstrap interval that resamples rounds, each round's two
    timings together (paired: they shared the machine's state)."""
    logs = np.log(np.asarray(source_ms, dtype=np.float64) / np.asarray(variant_ms, dtype=np.float64))
    if logs.ndim != 1 or len(logs) < 2:
        raise ValueError(f"paired speed-up needs at least two rounds of both models, got {len(logs)}")
    rng = np.random.default_rng(seed)
    boot = logs[rng.integers(0, len(logs), size=(resamples, len(logs)))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(boot, [tail, 1 - tail])
    return {"speedup": float(np.exp(logs.mean())), "low": float(np.exp(low)), "high": float(np.exp(high)),
            "level": level, "rounds": len(logs)}


def speed_claim(statement: str, source_ms: Sequence[float], variant_ms: Sequence[float], margin: float | None = None,
                disturbed: Sequence[bool] | None = None, **kwargs: Any) -> dict[str, Any]:
    """A checked claim "the variant is faster than its source": the speed-up with its interval over the quiet
    rounds, and the verdict — equivalent (the same speed) where the interval lies inside 1 ± margin, read first:
    even two identical models differ by a few per cent in interleaved timing on a shared machine, so a difference
    that small is not resolved; else holds above 1, reversed below (on a log scale, so 5 % faster and 5 % slower
    are equally far from the same speed)."""
    keep = [not bad for bad in (disturbed or [False] * len(source_ms))]
    if sum(keep) < 2:
        keep = [True] * len(source_ms)
    result = paired_speedup([s for s, k in zip(source_ms, keep) if k], [v for v, k in zip(variant_ms, keep) if k],
                            **kwargs)
    low, high = math.log(result["low"]), math.log(result["high"])
    inside = margin is not None and -math.log1p(margin) <= low and high <= math.log1p(margin)
    return {"statement": statement, "verdict": EQUIVALENT if inside else verdict(low, high),
            "threshold": 1.0, "margin": margin, **result, "can_move": can_move(low, high, 0.0),
            "detectable": math.expm1(detectable(low, high))}


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, len(arr)


def with_spread(values: Sequence[float], digits: int = 1) -> str:
    """'97.1 ± 0.3 (n=3)'."""
    mean, std, n = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f} (n={n})"


def standard_error(top1: float, n: int) -> float:
    """Binomial standard error, in points, of a top-1 accuracy (%) measured on n test images."""
    p = min(max(top1 / 100, 0.0), 1.0)
    return 100 * math.sqrt(p * (1 - p) / max(n, 1))


# ---------------------------------------------------------------- per-image answers and per-seed tables

def encode_answers(correct: Sequence[bool]) -> str:
    """Per-image correctness as a compact '0'/'1' string (stored in the stage records)."""
    return "".join("1" if c else "0" for c in correct)


def decode_answers(text: str) -> np.ndarray:
    """The 0/1 array an `encode_answers` string holds."""
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8) - ord("0")


def seed_summary(long: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """One row per `keys` group of a per-seed frame: every numeric column's mean, `<col>_std` (0 for one seed)
    and `n` (seeds); groups keep their first-seen order."""
    keys = list(keys)
    numeric = [c for c in long.columns if c not in keys and c != "seed" and pd.api.types.is_numeric_dtype(long[c])]
    grouped = long.groupby(keys, sort=False, dropna=False)
    means = grouped[numeric].mean()
    stds = grouped[numeric].std(ddof=1).fillna(0.0).add_suffix("_std")
    n = grouped.size().rename("n")
    return pd.concat([means, stds, n], axis=1).reset_index()


def spread_columns(summary: pd.DataFrame, columns: Sequence[str], digits: int = 1) -> pd.DataFrame:
    """`summary` (from `seed_summary`) with each of `columns` shown as 'mean ± std' ('–' where nothing was
    measured, e.g. a model not fine-tuned), the _std columns dropped."""
    out = summary.copy()
    for col in columns:
        out[col] = [f"{m:.{digits}f} ± {s:.{digits}f}" if pd.notna(m) else "–" for m, s in zip(out[col],
                                                                                             out[f"{col}_std"])]
    return out.drop(columns=[c for c in out.columns if c.endswith("_std")])

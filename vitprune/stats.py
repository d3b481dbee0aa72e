"""Claims with evidence: paired comparisons on the same test images (and seeds), intervals and verdicts.

A claim such as "SVD keeps more accuracy than Householder QR" compares per-image correctness of two
models evaluated on the same test images, for the same seeds. `paired_bootstrap` resamples test
images (keeping every seed's pair of answers together), so the interval reflects the test set's
size; `verdict` turns the interval into holds / reversed / not distinguishable at this scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

HOLDS, REVERSED, UNCLEAR = "holds", "reversed", "not distinguishable at this scale"


def _as_matrix(correct: Any) -> np.ndarray:
    """(seeds, images) array of 0/1 from one run's (images,) or several seeds' (seeds, images) answers."""
    arr = np.asarray(correct, dtype=np.float64)
    return arr[None, :] if arr.ndim == 1 else arr


def paired_bootstrap(correct_a: Any, correct_b: Any, resamples: int = 10_000, level: float = 0.95,
                     seed: int = 0, margin: float = 0.0) -> dict[str, Any]:
    """Accuracy difference a − b (points) − margin, over the same images and seeds, with a bootstrap interval.

    Images are resampled with replacement, the same draw for every seed and for both models (paired).
    """
    a, b = _as_matrix(correct_a), _as_matrix(correct_b)
    if a.shape != b.shape:
        raise ValueError(f"paired answers must have the same shape, got {a.shape} and {b.shape}")
    seeds, images = a.shape
    per_image = (a - b).mean(axis=0)  # (images,): each image's difference, averaged over seeds
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, images, size=(resamples, images))
    boot = 100 * per_image[draws].mean(axis=1) - margin
    tail = (1 - level) / 2
    low, high = np.quantile(boot, [tail, 1 - tail])
    return {"difference": float(100 * per_image.mean() - margin), "low": float(low), "high": float(high),
            "level": level, "n_seeds": seeds, "test_images": images}


def verdict(low: float, high: float) -> str:
    """holds if the interval lies above zero, reversed if below, else not distinguishable at this scale."""
    if low > 0:
        return HOLDS
    if high < 0:
        return REVERSED
    return UNCLEAR


def claim(statement: str, correct_a: Any, correct_b: Any, margin: float = 0.0, **kwargs: Any) -> dict[str, Any]:
    """A checked claim "a beats b (by more than `margin` points)": the statement, effect, interval and verdict."""
    result = paired_bootstrap(correct_a, correct_b, margin=margin, **kwargs)
    return {"statement": statement, "verdict": verdict(result["low"], result["high"]), **result}


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

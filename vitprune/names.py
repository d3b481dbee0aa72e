"""The fixed vocabularies that are not registries: the projections a block has and the datasets vitprune reads.

Decomposition methods, importance criteria and gate sites are registries (`vitprune.registry`), the
study's stages are registered in `vitprune.study.stages`. Nothing here imports torch.
"""

from __future__ import annotations

# the linear projections of a transformer block that can be factorized
LAYERS = ("qkv", "proj", "fc1", "fc2")

DATASETS = ("mnist5k", "digits", "cifar10", "cifar100", "imagefolder", "synthetic")


def ratio_label(ratio: float) -> str:
    """A ratio as its file names spell it: the percentage to 0.01, two digits at least, 'p' for the point
    (0.4 -> "40", 0.05 -> "05", 0.401 -> "40p1"), so two ratios share a name only if they agree to 0.0001."""
    percent = round(ratio * 100, 2)
    whole, frac = f"{percent:05.2f}".split(".")
    return whole if frac == "00" else f"{whole}p{frac.rstrip('0')}"

"""The fixed vocabularies that are not registries: the projections a block has and the datasets vitprune reads.

Decomposition methods, importance criteria and gate sites are registries (`vitprune.registry`), the
study's stages are registered in `vitprune.study.stages`. Nothing here imports torch.
"""

from __future__ import annotations

# the linear projections of a transformer block that can be factorized
LAYERS = ("qkv", "proj", "fc1", "fc2")

DATASETS = ("mnist5k", "digits", "cifar10", "cifar100", "imagefolder", "synthetic")

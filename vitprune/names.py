"""The one definition of each list of names: gate sites, criteria, methods, layers, datasets, stages.

Everything else imports these; nothing here imports torch, so `params` can check names cheaply.
"""

from __future__ import annotations

# VTP gate sites (DESIGN.md, "Gates"); `qk` is the optional extra of the public CIFAR code
DEFAULT_SITES = ("attn_in", "attn_out", "mlp_in", "mlp_hidden")
GATE_SITES = DEFAULT_SITES + ("qk",)
HEAD_SITES = ("attn_out", "qk")  # sites whose dims are grouped by attention head

# importance criteria (VTP's gates and the three baselines)
CRITERIA = ("gates", "magnitude", "taylor", "random")

# decompositions (Sun 2023 and beyond), grouped by the notebook that studies them
SVD_METHODS = ("svd", "svd_activation", "svd_fisher", "svd_scaled")
QR_METHODS = ("qr_householder", "qr_cgs", "qr_mgs", "qr_givens")
QR_STUDY_METHODS = QR_METHODS + ("qr_pivoted",)
LU_METHODS = ("lu", "lu_complete")
DECOMPOSE_METHODS = SVD_METHODS + QR_STUDY_METHODS + LU_METHODS
CALIBRATED_METHODS = ("svd_activation", "svd_fisher", "svd_scaled")  # methods that need calibration data

# the linear projections of a transformer block that can be factorized
LAYERS = ("qkv", "proj", "fc1", "fc2")

DATASETS = ("mnist5k", "digits", "cifar10", "cifar100", "imagefolder", "synthetic")

# the equal-budget study's strategies (notebook 07): key -> what the tables call it
BUDGET_STRATEGIES = {"prune": "pruning alone", "vtp_svd": "VTP + SVD (uniform rank)",
                     "vtp_alloc": "VTP + {method} (allocated ranks)",
                     "dense_alloc": "dense + {method} (allocated ranks)"}

# the notebook sequence, in order
STAGES = ("01_sparse_training", "02_scoring", "03_pruning", "04_svd", "05_qr", "06_lu", "07_equal_budget",
          "08_finetuning", "09_comparison")

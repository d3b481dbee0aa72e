"""Stage 01 · sparse training (VTP step 1): the dense model, then a gated copy trained with λ·Σ|g|.

`train_dense` and `sparse_train` are also what `vitprune train` and `vitprune sparse-train` run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitprune.checkpoint import load_model
from vitprune.gates import attach_gates
from vitprune.models import build_model
from vitprune.params import Params
from vitprune.study.jobs import bundle_of, measured, trained_files
from vitprune.study.narrative import mean, with_spread
from vitprune.study.records import ModelRef, SeedRecord
from vitprune.study.stats import standard_error
from vitprune.training import fit

STAGE = "01_sparse_training"
DENSE = ModelRef(STAGE, "dense")
SPARSE = ModelRef(STAGE, "sparse")


def train_dense(p: Params, run_dir: str | Path) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Train the dense model from scratch (or from a local pretrained file) into run_dir/dense.safetensors."""
    bundle = bundle_of(p)
    torch.manual_seed(p.train.seed)
    dense = build_model(p.model, bundle.num_classes, bundle.in_chans, bundle.image_size)
    return dense, fit(p, "dense", dense, bundle, run_dir, "dense")


def sparse_train(p: Params, run_dir: str | Path, dense: nn.Module) -> tuple[nn.Module, list[dict[str, Any]]]:
    """A gated copy of `dense` (gates at sparse.sites) trained with the L1 penalty into run_dir/sparse.safetensors."""
    attach_gates(dense, p.sparse.sites)
    return dense, fit(p, "sparse", dense, bundle_of(p), run_dir, "sparse")


def train_seed(p: Params, seed_dir: Path) -> SeedRecord:
    """One seed's dense and sparse model."""
    dense, dense_history = train_dense(p, seed_dir)
    sparse, sparse_history = sparse_train(p, seed_dir, load_model(Path(seed_dir) / "dense.safetensors"))
    record = SeedRecord(files=trained_files(seed_dir, "dense") + trained_files(seed_dir, "sparse"),
                        saved={"dense": "dense.safetensors", "sparse": "sparse.safetensors"},
                        extra={"dense_history": dense_history, "sparse_history": sparse_history})
    record.measure(DENSE.label, measured(dense, p))
    record.measure(SPARSE.label, measured(sparse, p))
    return record


def conclusion(results: dict[int, SeedRecord], n_test: int) -> str:
    """Dense accuracy over seeds, and how far the L1 penalty drove the gates towards zero."""
    dense = [r.models["dense"].top1 for r in results.values()]
    sparse = [r.models["sparse"].top1 for r in results.values()]
    histories = [r.extra["sparse_history"] for r in results.values()]
    lasts = [h[-1] if h else {} for h in histories]
    firsts = [h[0] if h else {} for h in histories]
    se = standard_error(sum(dense) / len(dense), n_test)
    below = [100 * last.get("gate_below_0.1/all", 0.0) for last in lasts]
    return (f"Over {len(dense)} seeds the dense model reaches {with_spread(dense)} % top-1 on {n_test:,} test images "
            f"(mean ± std across seeds; one run's binomial standard error is ±{se:.1f} points). Sparse training "
            f"moved the mean gate |g| from {mean(f.get('gate_mean/all', 1.0) for f in firsts):.2f} to "
            f"{mean(last.get('gate_mean/all', 1.0) for last in lasts):.2f} and left {with_spread(below)} % of the "
            f"gates below 0.1, while top-1 went to {with_spread(sparse)} %. The more gates sit near zero, the less "
            "pruning them will cost.")

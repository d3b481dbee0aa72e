"""What data-aware factorizations learn from calibration batches, per linear layer.

- the inputs' Gram matrix G = XᵀX (activation-aware SVD, refit), accumulated batch by batch in float64,
  so memory is in × in at any calibration size;
- the mean |x| of each input feature (ASVD-style column scaling);
- the Fisher information of each output row, Σ (∂L/∂W)² over its weights (Fisher-weighted SVD), from
  the cross-entropy on labelled calibration batches.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitprune.errors import DecomposeError


def _inputs(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def input_statistics(model: nn.Module, names: Iterable[str], batches: Iterable) -> dict[str, dict[str, torch.Tensor]]:
    """Per named Linear: {"gram": XᵀX (float64), "abs_mean": mean |x| per input feature} over the batches."""
    stats: dict[str, dict[str, Any]] = {}
    hooks = []
    for name in names:
        def hook(_mod, inputs, _out, name=name):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            entry = stats.setdefault(name, {"gram": 0, "abs_sum": 0, "rows": 0})
            entry["gram"] = entry["gram"] + x.T @ x
            entry["abs_sum"] = entry["abs_sum"] + x.abs().sum(0)
            entry["rows"] += len(x)
        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        seen = 0
        for batch in batches:
            model(_inputs(batch).to(next(model.parameters()).device))
            seen += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not seen:
        raise DecomposeError("calibration data is empty; data-aware methods and refit need at least one batch")
    return {n: {"gram": e["gram"], "abs_mean": e["abs_sum"] / max(e["rows"], 1)} for n, e in stats.items()}


def input_grams(model: nn.Module, names: Iterable[str], batches: Iterable) -> dict[str, torch.Tensor]:
    """XᵀX of the inputs each named Linear sees over calibration batches (float64)."""
    return {n: s["gram"] for n, s in input_statistics(model, names, batches).items()}


def row_fisher(model: nn.Module, names: Iterable[str], batches: Iterable) -> dict[str, torch.Tensor]:
    """Per named Linear, the Fisher information of each output row: Σ over batches and the row's weights of
    (∂L/∂W)², L the cross-entropy on labelled batches (x, y). Gradients are cleared afterwards."""
    names = list(names)
    layers = {n: model.get_submodule(n) for n in names}
    fisher = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in layers.items()}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seen = 0
    try:
        with torch.enable_grad():
            for batch in batches:
                if not isinstance(batch, (tuple, list)) or len(batch) < 2 or batch[1] is None:
                    raise DecomposeError("svd_fisher needs labelled calibration batches (images, labels)")
                x, y = batch[0].to(device), batch[1].to(device)
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                for n, m in layers.items():
                    fisher[n] += m.weight.grad.detach().double().square().sum(1).cpu()
                seen += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if not seen:
        raise DecomposeError("calibration data is empty; svd_fisher needs at least one labelled batch")
    return fisher


def calibration_statistics(model: nn.Module, names: Iterable[str], batches: Iterable,
                           fisher: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Everything the data-aware methods need, per named Linear: gram, abs_mean, and (with fisher) row_fisher."""
    names = list(names)
    batches = list(batches)
    stats = input_statistics(model, names, batches)
    if fisher:
        for name, rows in row_fisher(model, names, batches).items():
            stats[name]["row_fisher"] = rows
    return stats

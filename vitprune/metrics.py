"""Accuracy, and parameter and MAC counts (attention matmuls included)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

from vitprune.gates import fold_gates, gate_parameters, is_gate


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, device: torch.device | str | None = None,
             answers: bool = False) -> dict[str, Any]:
    """Top-1, top-5 (%) and mean cross-entropy over `batches`; summed across ranks under torchrun. With
    answers=True also "answers": per image of this rank, whether the top-1 prediction is right (bool, batch order)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss_sum, count
    right = []
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        right.append((top[:, 0] == y).cpu())
        totals[0] += right[-1].sum()
        totals[1] += (top == y[:, None]).any(1).sum()
        totals[2] += F.cross_entropy(logits, y, reduction="sum")
        totals[3] += len(y)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    model.train(was_training)
    n = max(float(totals[3]), 1.0)
    result = {"top1": 100 * float(totals[0]) / n, "top5": 100 * float(totals[1]) / n,
              "loss": float(totals[2]) / n, "samples": int(totals[3])}
    if answers:
        result["answers"] = torch.cat(right) if right else torch.zeros(0, dtype=torch.bool)
    return result


def count_params(model: nn.Module, include_gates: bool = False) -> int:
    """Number of parameters (VTP gates excluded unless asked: they fold away)."""
    return sum(p.numel() for n, p in model.named_parameters() if include_gates or not is_gate(n))


def _head_dims(attn: nn.Module) -> tuple[int, int]:
    return getattr(attn, "qk_head_dim", attn.head_dim), getattr(attn, "v_head_dim", attn.head_dim)


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 224, 224)) -> int:
    """Multiply-accumulates of one forward pass: every Linear and Conv, plus attention's QK^T and AV matmuls.

    Counted by forward hooks on the modules themselves, so pruned and factorized layers count as
    what they really are; norms, activations and softmax are not counted (as in the DeiT/VTP tables).
    """
    if gate_parameters(model):  # gated layers call F.linear on scaled weights; count the folded twin
        model = fold_gates(copy.deepcopy(model))
    total = 0

    def linear(mod, inputs, out):
        nonlocal total
        total += out.numel() // mod.out_features * mod.in_features * mod.out_features

    def conv(mod, inputs, out):
        nonlocal total
        kernel = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        total += out.numel() * kernel

    def attention(mod, inputs, out):
        nonlocal total
        b, n = inputs[0].shape[:2]
        dqk, dv = _head_dims(mod)
        total += b * mod.num_heads * n * n * (dqk + dv)

    hooks = []
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_hook(linear))
        elif isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(conv))
        elif isinstance(mod, Attention):
            hooks.append(mod.register_forward_hook(attention))
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        model(torch.zeros(input_shape, dtype=param.dtype, device=param.device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total


def model_summary(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]:
    """Params and MACs (millions) of a model for one image of `input_shape`."""
    shape = (1, *input_shape[1:])
    return {"params_M": count_params(model) / 1e6, "macs_M": count_macs(model, shape) / 1e6}

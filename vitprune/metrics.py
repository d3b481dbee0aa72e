"""Accuracy, parameter and MAC counts (attention matmuls included) and measured latency."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Iterable
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

from vitprune.gates import fold_gates, gate_parameters, is_gate


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, device: torch.device | str | None = None) -> dict[str, float]:
    """Top-1, top-5 (%) and mean cross-entropy over `batches`; summed across ranks under torchrun."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss_sum, count
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        totals[0] += (top[:, 0] == y).sum()
        totals[1] += (top == y[:, None]).any(1).sum()
        totals[2] += F.cross_entropy(logits, y, reduction="sum")
        totals[3] += len(y)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    model.train(was_training)
    n = max(float(totals[3]), 1.0)
    return {"top1": 100 * float(totals[0]) / n, "top5": 100 * float(totals[1]) / n,
            "loss": float(totals[2]) / n, "samples": int(totals[3])}


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


@contextmanager
def torch_threads(n: int | None):
    """Temporarily fix torch's intra-op thread count."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.no_grad()
def measure_latency(model: nn.Module, input_shape: tuple[int, ...], batch_sizes: Iterable[int] = (1, 64),
                    repeats: int = 20, warmup: int = 5, threads: int | None = 2) -> dict[int, float]:
    """Median forward latency in milliseconds per batch size (warm-up, fixed threads, eval mode)."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    result = {}
    with torch_threads(threads):
        for bs in batch_sizes:
            x = torch.randn((bs, *input_shape[1:]), dtype=param.dtype, device=param.device)
            times = []
            for i in range(warmup + repeats):
                if param.is_cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(x)
                if param.is_cuda:
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append(time.perf_counter() - start)
            result[bs] = 1000 * statistics.median(times)
    model.train(was_training)
    return result


def model_summary(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]:
    """Params and MACs (millions) of a model for one image of `input_shape`."""
    shape = (1, *input_shape[1:])
    return {"params_M": count_params(model) / 1e6, "macs_M": count_macs(model, shape) / 1e6}


def profile_model(model: nn.Module, batches: Iterable, input_shape: tuple[int, ...], batch_sizes=(1, 64),
                  repeats: int = 20, warmup: int = 5, threads: int | None = 2) -> dict[str, float]:
    """Accuracy, params, MACs and measured latency of a model in one record (the tables' columns)."""
    acc = evaluate(model, batches)
    lat = measure_latency(model, input_shape, batch_sizes, repeats, warmup, threads)
    return {"top1": acc["top1"], "top5": acc["top5"], "params_M": count_params(model) / 1e6,
            "macs_M": count_macs(model, (1, *input_shape[1:])) / 1e6,
            **{f"latency_bs{bs}_ms": ms for bs, ms in lat.items()}}

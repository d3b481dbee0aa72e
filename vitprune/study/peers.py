"""The peer users would pick instead, on the same work: Torch-Pruning (Fang et al., CVPR 2023), pruning a timm ViT
to a given number of MACs, for `make bench` to time beside vitprune at equal MACs.

Torch-Pruning is a benchmark-only extra (`pip install -e ".[bench]"`, which `make bench` runs). Its recipe for
timm ViTs: group-norm (magnitude) importance, per-head query/key/value dims pruned together, the classifier
left alone, and an attention forward that accepts the new head width. It also prunes the residual width
through every LayerNorm, so its model is not the masked model's function, where vitprune's is exact.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

import vitprune as vp
from vitprune.errors import ParamsError


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        raise ParamsError("the benchmark against Torch-Pruning needs the bench extra: pip install -e '.[bench]' "
                          "(make bench installs it)") from None
    return torch_pruning


def _attention_any_width(self: Attention, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False) -> torch.Tensor:
    """timm's attention without its assumption that the attention width equals the residual width."""
    b, n, _ = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale)
    return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, -1)))


def torch_pruning_vit(model: nn.Module, ratio: float, input_shape: tuple[int, ...]) -> nn.Module:
    """A copy of `model` pruned by Torch-Pruning at channel ratio `ratio` (magnitude, per-head dims, uniform)."""
    tp = _torch_pruning()
    work = copy.deepcopy(model).eval()
    heads = {}
    for module in work.modules():
        if isinstance(module, Attention):
            module.forward = _attention_any_width.__get__(module, Attention)
            heads[module.qkv] = module.num_heads
    pruner = tp.pruner.MetaPruner(work, torch.randn(input_shape),
                                  importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
                                  ignored_layers=[work.head], num_heads=heads, prune_head_dims=True,
                                  prune_num_heads=False, round_to=2)
    pruner.step()
    for module in work.modules():
        if isinstance(module, Attention):
            module.num_heads = pruner.num_heads[module.qkv]
            module.head_dim = module.qkv.out_features // (3 * module.num_heads)
    return work


def at_macs(build: Callable[[float], nn.Module], target: float, input_shape: tuple[int, ...],
            tolerance: float = 0.01) -> tuple[nn.Module, float]:
    """(model, ratio): `build(ratio)` at the ratio whose MACs (`vp.count_macs`) come within `tolerance` of `target`
    (bisection over the ratio; MACs fall as the ratio grows)."""
    low, high = 0.0, 0.95
    best: tuple[float, nn.Module, float] | None = None
    for _ in range(24):
        ratio = (low + high) / 2
        model = build(ratio)
        macs = vp.count_macs(model, input_shape)
        gap = abs(macs - target) / target
        if best is None or gap < best[0]:
            best = (gap, model, ratio)
        if gap <= tolerance:
            break
        low, high = (ratio, high) if macs > target else (low, ratio)
    return best[1], best[2]


def relative_output_change(reference: nn.Module, model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """||model(x) − reference(x)|| / ||reference(x)|| on random images: 0 for a model computing the same function."""
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = reference.eval()(x), model.eval()(x)
    return float((got - want).norm() / want.norm())


def peer_info() -> dict[str, Any]:
    """Which Torch-Pruning version was measured (the installed distribution's: the module's own string lags)."""
    from importlib.metadata import version

    _torch_pruning()
    return {"torch_pruning": version("torch-pruning")}

"""VTP gates: learnable per-dimension importance vectors in every transformer block (Zhu et al. 2021).

| site         | multiplies                                   | folded into            |
|--------------|----------------------------------------------|------------------------|
| `attn_in`    | input features of qkv (after norm1)          | columns of qkv         |
| `attn_out`   | attention output before proj (per head)      | columns of proj        |
| `mlp_in`     | input features of fc1 (after norm2)          | columns of fc1         |
| `mlp_hidden` | hidden activation before fc2                 | columns of fc2         |
| `qk`         | shared query/key head dims (optional)        | rows of q and k in qkv |
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vitprune.errors import ModelError
from vitprune.layers import PrunableAttention, PrunableMlp, make_prunable, new_gate, vit_blocks
from vitprune.registry import SITES, Site

# VTP's four sites and the optional `qk` site of the public CIFAR code, declared once (order: how gates are listed)
for _site in (
    Site("attn_in", "attention input", "attn", "gate_in", "column j of qkv", lambda a, m: a.qkv.in_features,
         default=True),
    Site("attn_out", "attention output (values)", "attn", "gate_out", "row j of v (and its bias), column j of proj",
         lambda a, m: a.num_heads * a.v_head_dim, head_grouped=True, default=True),
    Site("qk", "query/key head dims", "attn", "gate_qk", "row j of q and of k (and their biases)",
         lambda a, m: a.num_heads * a.qk_head_dim, head_grouped=True),
    Site("mlp_in", "MLP input", "mlp", "gate_in", "column j of fc1", lambda a, m: m.fc1.in_features, default=True),
    Site("mlp_hidden", "MLP hidden", "mlp", "gate_hidden", "row j of fc1 (and its bias), column j of fc2",
         lambda a, m: m.fc1.out_features, default=True),
):
    SITES.add(_site)
DEFAULT_SITES = SITES.names(default=True)


def site_width(attn: PrunableAttention, mlp: PrunableMlp, site: str) -> int:
    """How many dims a gate site has in one block (its gate's length)."""
    return SITES[site].width(attn, mlp)


def _check_exact(i: int, attn: PrunableAttention, mlp: PrunableMlp, site: str) -> None:
    """Refuse sites whose gate could not be folded or pruned exactly in this block."""
    if site == "qk" and not isinstance(attn.q_norm, nn.Identity):
        raise ModelError(f"gate site 'qk' cannot be exact in block {i}: the model uses qk-norm, which "
                         "renormalises the query/key dims; use the other sites")
    if site == "attn_out" and not isinstance(attn.norm, nn.Identity):
        raise ModelError(f"gate site 'attn_out' cannot be exact in block {i}: attention scale_norm mixes the dims")
    if site == "mlp_hidden" and not isinstance(mlp.norm, nn.Identity):
        raise ModelError(f"gate site 'mlp_hidden' cannot be exact in block {i}: scale_mlp_norm mixes the dims")


def attach_gates(model: nn.Module, sites: Iterable[str] = DEFAULT_SITES) -> nn.Module:
    """Add ones-initialised gates at `sites` in every block (in place); timm's own weight keys are unchanged."""
    sites = tuple(sites)
    unknown = [s for s in sites if s not in SITES]
    if unknown or not sites:
        raise ModelError(f"unknown gate sites {unknown or sites}; accepted: {', '.join(SITES.names())}")
    blocks = vit_blocks(model)
    make_prunable(model)
    for i, block in enumerate(blocks):
        for site in sites:
            _check_exact(i, block.attn, block.mlp, site)
        for site in sites:
            module = getattr(block, SITES[site].owner)
            if getattr(module, SITES[site].gate) is None:
                size = site_width(block.attn, block.mlp, site)
                setattr(module, SITES[site].gate, new_gate(size).to(module_device(module)))
    return model


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def gate_parameters(model: nn.Module) -> dict[tuple[int, str], nn.Parameter]:
    """{(block_index, site): gate parameter} for every attached gate."""
    gates = {}
    for i, block in enumerate(getattr(model, "blocks", ())):
        for site in SITES:
            g = getattr(getattr(block, site.owner, None), site.gate, None)
            if g is not None:
                gates[(i, site.name)] = g
    return gates


def is_gate(name: str) -> bool:
    """Whether a parameter name (from named_parameters) is a VTP gate."""
    return name.rsplit(".", 1)[-1] in {site.gate for site in SITES}


def l1_penalty(model: nn.Module, weight: float = 1e-4) -> torch.Tensor:
    """lambda * sum |g| over every gate (zero when no gates are attached)."""
    gates = list(gate_parameters(model).values())
    if not gates:
        return torch.zeros((), device=module_device(model))
    return weight * torch.cat([g.view(-1) for g in gates]).abs().sum()


@torch.no_grad()
def fold_gates(model: nn.Module) -> nn.Module:
    """Multiply every gate into the adjacent weights and remove it (in place); the function is unchanged."""
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        if isinstance(attn, PrunableAttention):
            if attn.gate_in is not None:
                attn.qkv.weight.mul_(attn.gate_in)
            scale = attn.qkv_row_scale()
            if scale is not None:
                attn.qkv.weight.mul_(scale[:, None])
                if attn.qkv.bias is not None:
                    attn.qkv.bias.mul_(scale)
            if attn.gate_out is not None:
                attn.proj.weight.mul_(attn.gate_out)
            attn.gate_in = attn.gate_qk = attn.gate_out = None
        if isinstance(mlp, PrunableMlp):
            if mlp.gate_in is not None:
                mlp.fc1.weight.mul_(mlp.gate_in)
            if mlp.gate_hidden is not None:
                mlp.fc2.weight.mul_(mlp.gate_hidden)
            mlp.gate_in = mlp.gate_hidden = None
    return model


@torch.no_grad()
def gate_statistics(model: nn.Module, thresholds: Iterable[float] = (1e-2, 1e-1, 0.5)) -> dict[str, float]:
    """Mean |g| and the fraction of gates below each threshold, overall and per site."""
    gates = gate_parameters(model)
    if not gates:
        return {}
    stats: dict[str, float] = {}
    groups: dict[str, list[torch.Tensor]] = {"all": []}
    for (_, site), g in gates.items():
        groups["all"].append(g.abs().flatten())
        groups.setdefault(site, []).append(g.abs().flatten())
    for group, values in groups.items():
        v = torch.cat(values)
        stats[f"gate_mean/{group}"] = float(v.mean())
        for t in thresholds:
            stats[f"gate_below_{t:g}/{group}"] = float((v < t).float().mean())
    return stats

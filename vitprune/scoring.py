"""Importance scores per (block, site): VTP gates and three baselines with the same structure.

Each criterion is registered here (`registry.CRITERIA`) with what it needs; scoring is separate from
pruning: `plan_pruning` accepts the scores of any of them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from vitprune.checkpoint import atomic_write
from vitprune.errors import ParamsError, ScoringError
from vitprune.gates import DEFAULT_SITES, attach_gates, fold_gates, gate_parameters, site_width
from vitprune.layers import make_prunable
from vitprune.registry import CRITERIA, SITES, register_criterion

Scores = dict[tuple[int, str], torch.Tensor]


def _sites(model: nn.Module, sites: Iterable[str] | None) -> tuple[str, ...]:
    if sites is not None:
        return tuple(sites)
    present = {site for _, site in gate_parameters(model)}
    return tuple(s for s in SITES.names() if s in present) or DEFAULT_SITES


@register_criterion("gates", label="VTP gates", needs=("gates",))
def _gates(model: nn.Module, batches: Iterable | None, sites: Iterable[str] | None, seed: int) -> Scores:
    return gate_scores(model)


@torch.no_grad()
def gate_scores(model: nn.Module) -> Scores:
    """|g| of every gate (VTP's criterion)."""
    gates = gate_parameters(model)
    if not gates:
        raise ScoringError("the model has no gates; attach_gates and sparse-train it, or use a baseline criterion "
                           "(magnitude, taylor, random)")
    return {k: g.detach().abs().clone() for k, g in gates.items()}


@register_criterion("magnitude", label="weight magnitude")
def _magnitude(model: nn.Module, batches: Iterable | None, sites: Iterable[str] | None, seed: int) -> Scores:
    return magnitude_scores(model, sites)


@torch.no_grad()
def magnitude_scores(model: nn.Module, sites: Iterable[str] | None = None) -> Scores:
    """L2 norm of all the weights a dim's removal deletes (gates folded in first)."""
    sites = _sites(model, sites)
    folded = fold_gates(make_prunable(copy.deepcopy(model)))
    scores: Scores = {}
    for b, block in enumerate(folded.blocks):
        a, m = block.attn, block.mlp
        h, dqk = a.num_heads, a.qk_head_dim
        w_qkv = a.qkv.weight
        for site in sites:
            if site == "attn_in":
                sq = w_qkv.square().sum(0)
            elif site == "attn_out":
                sq = w_qkv[2 * h * dqk:].square().sum(1) + a.proj.weight.square().sum(0)
            elif site == "qk":
                sq = w_qkv[: h * dqk].square().sum(1) + w_qkv[h * dqk: 2 * h * dqk].square().sum(1)
            elif site == "mlp_in":
                sq = m.fc1.weight.square().sum(0)
            else:
                sq = m.fc1.weight.square().sum(1) + m.fc2.weight.square().sum(0)
            scores[(b, site)] = sq.sqrt()
    return scores


@register_criterion("taylor", label="Taylor", needs=("batches",))
def _taylor(model: nn.Module, batches: Iterable | None, sites: Iterable[str] | None, seed: int) -> Scores:
    if batches is None:
        raise ScoringError("criterion 'taylor' needs calibration batches (batches=...)")
    return taylor_scores(model, batches, sites)


def taylor_scores(model: nn.Module, batches: Iterable, sites: Iterable[str] | None = None) -> Scores:
    """First-order Taylor |g * dL/dg| over calibration batches (ones-gates are attached to a copy if absent)."""
    sites = _sites(model, sites)
    work = copy.deepcopy(model)
    attach_gates(work, sites)
    work.eval()
    gates = {k: g for k, g in gate_parameters(work).items() if k[1] in sites}
    for p in work.parameters():
        p.requires_grad_(False)
    for g in gates.values():
        g.requires_grad_(True)
        g.grad = None
    device = next(work.parameters()).device
    seen = 0
    for x, y in batches:
        loss = F.cross_entropy(work(x.to(device)), y.to(device))
        loss.backward()
        seen += 1
    if not seen:
        raise ScoringError("taylor scores need at least one calibration batch")
    return {k: (g.detach() * g.grad / seen).abs() for k, g in gates.items()}


@register_criterion("random", label="random")
def _random(model: nn.Module, batches: Iterable | None, sites: Iterable[str] | None, seed: int) -> Scores:
    return random_scores(model, sites, seed)


def random_scores(model: nn.Module, sites: Iterable[str] | None = None, seed: int = 0) -> Scores:
    """Uniform random scores (the floor every criterion must beat)."""
    sites = _sites(model, sites)
    make_prunable(model)
    gen = torch.Generator().manual_seed(seed)
    return {(b, s): torch.rand(site_width(blk.attn, blk.mlp, s), generator=gen)
            for b, blk in enumerate(model.blocks) for s in sites}


def importance_scores(model: nn.Module, criterion: str = "gates", batches: Iterable | None = None,
                      sites: Iterable[str] | None = None, seed: int = 0) -> Scores:
    """{(block_index, site): scores} by a registered criterion: gates (|g|), magnitude, taylor (needs batches),
    random."""
    try:
        entry = CRITERIA[criterion]
    except ParamsError as err:
        raise ScoringError(str(err)) from None
    return entry.score(model, batches, sites, seed)


def save_scores(scores: dict[str, Scores], path: str | Path) -> None:
    """Scores of several criteria as one safetensors file (keys criterion/block/site)."""
    flat = {f"{c}/{b}/{s}": v.detach().float().cpu().contiguous()
            for c, sc in scores.items() for (b, s), v in sc.items()}
    atomic_write(Path(path), lambda tmp: save_file(flat, tmp))


def load_scores(path: str | Path) -> dict[str, Scores]:
    """Inverse of `save_scores`."""
    out: dict[str, Scores] = {}
    for key, value in load_file(str(path)).items():
        c, b, s = key.split("/")
        out.setdefault(c, {})[(int(b), s)] = value
    return out

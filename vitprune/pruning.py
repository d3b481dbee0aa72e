"""Head-aware pruning plans and physical pruning of timm ViTs (VTP step 2).

`plan_pruning` turns importance scores into a `PrunePlan` (kept indices per block and site, plain
data); `prune` applies a plan: gates folded, dims removed, a smaller ordinary timm model.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from vitprune.checkpoint import apply_block_structure, write_text
from vitprune.errors import PruneError
from vitprune.gates import fold_gates, gate_parameters, site_width
from vitprune.layers import PrunableAttention, make_prunable, vit_blocks
from vitprune.registry import SITES
from vitprune.scoring import Scores

RATIO_TOLERANCE = 0.1  # how far a plan's realised ratio may fall from the requested one (per-head rounding)


@dataclass
class PrunePlan:
    """Kept indices per (block, site), with the sizes and head layout the plan was made for."""

    kept: dict[tuple[int, str], list[int]]
    sizes: dict[tuple[int, str], int]
    num_heads: list[int]
    ratio: float  # requested
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def realised_ratio(self) -> float:
        """Fraction of gated dimensions removed."""
        return 1.0 - sum(map(len, self.kept.values())) / sum(self.sizes.values())

    def kept_counts(self) -> dict[tuple[int, str], int]:
        return {k: len(v) for k, v in self.kept.items()}

    def to_json(self) -> str:
        return json.dumps({
            "ratio": self.ratio, "realised_ratio": self.realised_ratio, "num_heads": self.num_heads,
            "sizes": {f"{b}.{s}": n for (b, s), n in self.sizes.items()},
            "kept": {f"{b}.{s}": idx for (b, s), idx in self.kept.items()}, "meta": self.meta,
        }, indent=1)

    @classmethod
    def from_json(cls, text: str) -> PrunePlan:
        raw = json.loads(text)

        def key(k: str) -> tuple[int, str]:
            b, s = k.split(".", 1)
            return int(b), s
        return cls(kept={key(k): list(v) for k, v in raw["kept"].items()},
                   sizes={key(k): int(v) for k, v in raw["sizes"].items()},
                   num_heads=list(raw["num_heads"]), ratio=float(raw["ratio"]), meta=raw.get("meta", {}))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        return write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> PrunePlan:
        path = Path(path)
        if not path.is_file():
            raise PruneError(f"prune plan '{path}' does not exist")
        try:
            return cls.from_json(path.read_text())
        except (json.JSONDecodeError, KeyError, ValueError) as err:
            raise PruneError(f"prune plan '{path}' is malformed: {err}") from err


# ---------------------------------------------------------------- planning

def _pool_counts(scores: Scores, keys: list[tuple[int, str]], keep_fraction: float) -> dict[tuple[int, str], int]:
    """How many dims of each key survive one shared threshold keeping `keep_fraction` of the pool."""
    values = torch.cat([scores[k].detach().float().flatten().cpu() for k in keys])
    owner = torch.cat([torch.full((scores[k].numel(),), i) for i, k in enumerate(keys)])
    n_keep = round(keep_fraction * len(values))
    order = torch.argsort(values, descending=True, stable=True)[:n_keep]
    counts = torch.bincount(owner[order], minlength=len(keys))
    return {k: int(c) for k, c in zip(keys, counts)}


def _round_count(count: int, size: int, min_keep: int, round_to: int) -> int:
    count = round(count / round_to) * round_to
    return max(min(min_keep, size), min(size, count))


def _top(score: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.topk(score.detach().float().cpu(), k).indices.tolist())


def plan_pruning(model: nn.Module, scores: Scores, ratio: float,
                 scope: Literal["global", "per_site", "per_block"] = "global", min_keep: int = 1,
                 round_to: int = 1, head_mode: Literal["topk", "whole"] = "topk") -> PrunePlan:
    """Keep what one threshold on the scores keeps at `ratio`, made head-aware for attn_out/qk."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise PruneError(f"ratio {ratio!r} is invalid; accepted: a fraction in [0, 1)")
    if scope not in ("global", "per_site", "per_block"):
        raise PruneError(f"scope {scope!r} is invalid; accepted: global, per_site, per_block")
    if head_mode not in ("topk", "whole"):
        raise PruneError(f"head_mode {head_mode!r} is invalid; accepted: topk, whole")
    blocks = vit_blocks(model)
    make_prunable(model)
    sizes = _site_sizes(model, scores)
    keys = sorted(scores)
    pools: dict[Any, list] = {}
    for k in keys:
        pools.setdefault({"global": 0, "per_site": k[1], "per_block": k[0]}[scope], []).append(k)
    counts: dict[tuple[int, str], int] = {}
    for pool in pools.values():
        counts.update(_pool_counts(scores, pool, 1.0 - ratio))
    kept: dict[tuple[int, str], list[int]] = {}
    for b, block in enumerate(blocks):
        attn = block.attn
        heads = attn.num_heads
        site_dims = {s: site_width(attn, block.mlp, s) // heads for s in SITES.names(head_grouped=True)}
        head_keys = [(b, s) for s in SITES.names(head_grouped=True) if (b, s) in scores]
        if head_mode == "whole" and head_keys:
            per_head = sum(scores[k].detach().float().cpu().view(heads, -1).sum(1) for k in head_keys)
            frac = sum(counts[k] for k in head_keys) / sum(sizes[k] for k in head_keys)
            n_heads = max(1, min(heads, round(frac * heads)))
            keep_heads = sorted(torch.topk(per_head, n_heads).indices.tolist())
            for k in head_keys:
                d = site_dims[k[1]]
                kept[k] = [h * d + j for h in keep_heads for j in range(d)]
        else:
            widths = _head_widths(head_keys, counts, site_dims, heads, min_keep, round_to)
            for k in head_keys:
                d = site_dims[k[1]]
                grid = scores[k].detach().float().cpu().view(heads, d)
                kept[k] = [h * d + j for h in range(heads) for j in _top(grid[h], widths[k])]
        for site in SITES.names(head_grouped=False):
            k = (b, site)
            if k in scores:
                kept[k] = _top(scores[k], _round_count(counts[k], sizes[k], min_keep, round_to))
    meta = dict(scope=scope, min_keep=min_keep, round_to=round_to, head_mode=head_mode)
    plan = PrunePlan(kept, sizes, [blk.attn.num_heads for blk in blocks], float(ratio), meta)
    if abs(plan.realised_ratio - ratio) > RATIO_TOLERANCE:  # a model named for one ratio must hold about that
        raise PruneError(f"pruning at ratio {ratio} would remove {plan.realised_ratio:.3f} of the gated dimensions "
                         f"(min_keep {min_keep}, round_to {round_to}, head_mode {head_mode}), more than "
                         f"{RATIO_TOLERANCE} away; accepted: prune.min_keep and prune.round_to well below the sites' "
                         f"widths (per head for qk and attn_out; the narrowest site is {min(sizes.values())} wide)")
    return plan


def _head_widths(head_keys: list[tuple[int, str]], counts: dict[tuple[int, str], int], site_dims: dict[str, int],
                 heads: int, min_keep: int, round_to: int) -> dict[tuple[int, str], int]:
    """Dims each head keeps per head-grouped site. When the plan prunes both `qk` and `attn_out`, every head keeps
    the same number of query/key and value dims (the mean of what the threshold keeps of each): fused attention
    then runs at the pruned width with nothing padded, and its MACs fall as `count_macs` counts them."""
    if len(head_keys) == 2:
        joint = round(sum(counts[k] for k in head_keys) / (2 * heads))
        width = _round_count(joint, min(site_dims[k[1]] for k in head_keys), min_keep, round_to)
        return dict.fromkeys(head_keys, width)
    return {k: _round_count(round(counts[k] / heads), site_dims[k[1]], min_keep, round_to) for k in head_keys}


def _site_sizes(model: nn.Module, scores: Scores) -> dict[tuple[int, str], int]:
    sizes = {}
    depth = len(model.blocks)
    for (b, site), s in scores.items():
        if site not in SITES or not 0 <= b < depth:
            raise PruneError(f"score key {(b, site)} does not name a block (0..{depth - 1}) and a gate site "
                             f"({', '.join(SITES.names())})")
        size = site_width(model.blocks[b].attn, model.blocks[b].mlp, site)
        if s.numel() != size:
            raise PruneError(f"scores for block {b} site {site} have {s.numel()} entries; the model has {size} dims")
        sizes[(b, site)] = size
    return sizes


# ---------------------------------------------------------------- applying

def check_plan(model: nn.Module, plan: PrunePlan) -> None:
    """Raise PruneError if `plan` was not made for `model`'s shape."""
    blocks = vit_blocks(model)
    if len(plan.num_heads) != len(blocks):
        raise PruneError(f"plan is for {len(plan.num_heads)} blocks; the model has {len(blocks)}")
    make_prunable(model)
    for b, block in enumerate(blocks):
        if plan.num_heads[b] != block.attn.num_heads:
            raise PruneError(f"plan expects {plan.num_heads[b]} heads in block {b}; "
                             f"the model has {block.attn.num_heads}")
    for (b, site), size in plan.sizes.items():
        if b >= len(blocks) or site not in SITES:
            raise PruneError(f"plan names block {b} site {site}, which the model does not have")
        actual = site_width(blocks[b].attn, blocks[b].mlp, site)
        if actual != size:
            raise PruneError(f"plan expects {size} dims at block {b} site {site}; the model has {actual}")
        idx = plan.kept[(b, site)]
        if not idx or min(idx) < 0 or max(idx) >= size or len(set(idx)) != len(idx):
            raise PruneError(f"plan's kept indices at block {b} site {site} must be distinct, in [0, {size}), "
                             "non-empty")


def _head_layout(kept: list[int] | None, heads: int, d: int, site: str, b: int) -> dict[int, list[int]]:
    """{head: kept dims inside the head}; every kept head must keep the same number of dims."""
    if kept is None:
        return {h: list(range(d)) for h in range(heads)}
    layout: dict[int, list[int]] = {}
    for i in kept:
        layout.setdefault(i // d, []).append(i % d)
    if len({len(v) for v in layout.values()}) != 1:
        raise PruneError(f"plan keeps unequal dims per head at block {b} site {site}; fused attention needs equal "
                         "head widths (make the plan with plan_pruning)")
    return dict(sorted(layout.items()))


def _attention_indices(attn: PrunableAttention, plan: PrunePlan, b: int) -> dict[str, Any]:
    h, dqk, dv = attn.num_heads, attn.qk_head_dim, attn.v_head_dim
    v_heads = _head_layout(plan.kept.get((b, "attn_out")), h, dv, "attn_out", b)
    qk_heads = _head_layout(plan.kept.get((b, "qk")), h, dqk, "qk", b)
    heads = sorted(set(v_heads) & set(qk_heads)) if (b, "qk") in plan.kept else sorted(v_heads)
    qk_heads = {hh: qk_heads.get(hh, list(range(dqk))) for hh in heads}
    q_rows = [hh * dqk + j for hh in heads for j in qk_heads[hh]]
    k_rows = [h * dqk + r for r in q_rows]
    v_cols = [hh * dv + j for hh in heads for j in v_heads[hh]]
    v_rows = [2 * h * dqk + c for c in v_cols]
    return dict(heads=len(heads), qk=len(qk_heads[heads[0]]), v=len(v_heads[heads[0]]),
                qkv_rows=q_rows + k_rows + v_rows, proj_cols=v_cols)


def zero_dropped(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """A copy of a gated model with the plan's dropped dims set to zero (the reference `prune` must equal)."""
    ref = copy.deepcopy(model)
    check_plan(ref, plan)
    gates = gate_parameters(ref)
    with torch.no_grad():
        for key, kept in plan.kept.items():
            if key not in gates:
                raise PruneError(f"model has no gate at block {key[0]} site {key[1]} to zero")
            mask = torch.zeros_like(gates[key])
            mask[kept] = 1
            gates[key].mul_(mask)
    return ref


@torch.no_grad()
def prune(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """A new, smaller timm VisionTransformer: gates folded, the plan's dropped dims physically removed."""
    new = copy.deepcopy(model)
    check_plan(new, plan)
    fold_gates(new)
    spec = []
    layout = []
    for b, block in enumerate(new.blocks):
        attn, mlp = block.attn, block.mlp
        ai = _attention_indices(attn, plan, b)
        attn_in = plan.kept.get((b, "attn_in"))
        mlp_in = plan.kept.get((b, "mlp_in"))
        hidden = plan.kept.get((b, "mlp_hidden"), list(range(mlp.fc1.out_features)))
        layout.append((ai, attn_in, mlp_in, hidden))
        spec.append({
            "attn": dict(num_heads=ai["heads"], qk_head_dim=ai["qk"], v_head_dim=ai["v"], scale=attn.scale, gates=[],
                         in_dim=None if attn_in is None and attn.in_index is None
                         else len(attn_in if attn_in is not None else attn.in_index)),
            "mlp": dict(hidden=len(hidden), gates=[], in_dim=None if mlp_in is None and mlp.in_index is None
                        else len(mlp_in if mlp_in is not None else mlp.in_index)),
        })
    old = [(blk.attn, blk.mlp) for blk in new.blocks]
    apply_block_structure(new, spec)
    for (ai, attn_in, mlp_in, hidden), (oa, om), block in zip(layout, old, new.blocks):
        _copy_attention(oa, block.attn, ai, attn_in)
        _copy_mlp(om, block.mlp, mlp_in, hidden)
    return new


def _select_in(old_index: torch.Tensor | None, kept: list[int] | None,
               dim: int) -> tuple[list[int], torch.Tensor | None]:
    """Columns to keep of the layer, and the new input index into the residual stream."""
    cols = list(range(dim)) if kept is None else list(kept)
    if old_index is None and cols == list(range(dim)):  # every feature kept, in order: nothing to select
        return cols, None
    base = old_index if old_index is not None else torch.arange(dim)
    return cols, base[cols].clone()


def _copy_attention(old: PrunableAttention, new: PrunableAttention, ai: dict, attn_in: list[int] | None) -> None:
    cols, index = _select_in(old.in_index, attn_in, old.qkv.in_features)
    rows = torch.tensor(ai["qkv_rows"])
    new.qkv.weight.copy_(old.qkv.weight[rows][:, cols])
    if old.qkv.bias is not None:
        new.qkv.bias.copy_(old.qkv.bias[rows])
    new.proj.weight.copy_(old.proj.weight[:, ai["proj_cols"]])
    if old.proj.bias is not None:
        new.proj.bias.copy_(old.proj.bias)
    new.in_index = None if index is None else index.to(old.qkv.weight.device)


def _copy_mlp(old: nn.Module, new: nn.Module, mlp_in: list[int] | None, hidden: list[int]) -> None:
    cols, index = _select_in(old.in_index, mlp_in, old.fc1.in_features)
    h = torch.tensor(hidden)
    new.fc1.weight.copy_(old.fc1.weight[h][:, cols])
    if old.fc1.bias is not None:
        new.fc1.bias.copy_(old.fc1.bias[h])
    new.fc2.weight.copy_(old.fc2.weight[:, h])
    if old.fc2.bias is not None:
        new.fc2.bias.copy_(old.fc2.bias)
    new.in_index = None if index is None else index.to(old.fc1.weight.device)


def pruned_architecture(model: nn.Module) -> list[dict[str, int]]:
    """Per-block widths of a (pruned) model: heads, head dims, qkv/fc1 inputs, MLP hidden."""
    rows = []
    for i, block in enumerate(model.blocks):
        a, m = block.attn, block.mlp
        rows.append({"block": i, "heads": a.num_heads, "qk_head_dim": getattr(a, "qk_head_dim", a.head_dim),
                     "v_head_dim": getattr(a, "v_head_dim", a.head_dim), "attn_in": a.qkv.in_features,
                     "mlp_in": m.fc1.in_features, "mlp_hidden": m.fc1.out_features})
    return rows

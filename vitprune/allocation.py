"""Per-layer ranks under a budget, from how much each layer's factorization costs on calibration data.

`layer_sensitivity` factorizes one projection at a time at a few candidate ranks (the others stay
dense) and measures the calibration loss increase; `allocate` then picks one option per layer —
a candidate rank or the dense layer — to lose least under a parameter budget (a greedy
multiple-choice knapsack: start from each layer's cheapest option, then take the upgrade that
buys the most loss per parameter while the budget allows). For the projections, MACs per token
equal weights, so a MAC budget is the same allocation with the budget divided by the tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitprune.calibration import calibration_statistics
from vitprune.decompose import factorized_layer, rank_for_ratio, replace_layer, saves_params, target_linears
from vitprune.errors import DecomposeError
from vitprune.names import LAYERS
from vitprune.registry import DECOMPOSITIONS


@torch.no_grad()
def calibration_loss(model: nn.Module, batches: list) -> float:
    """Mean cross-entropy of the model on labelled calibration batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        total += float(F.cross_entropy(model(x), y, reduction="sum"))
        count += len(y)
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def layer_sensitivity(model: nn.Module, method: str, batches: Iterable, rank_ratios: Iterable[float] = (
        0.125, 0.25, 0.375, 0.5, 0.75), layers: Iterable[str] = LAYERS,
        max_ranks: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Per layer and candidate rank (rank_ratio · min(in, out), lowered to `max_ranks[layer]` where given — e.g.
    `speed.break_even_rank`, so only ranks that run faster are offered — and kept where it saves parameters):
    the calibration loss increase when that layer alone is factorized with `method`."""
    batches = list(batches)
    linears = target_linears(model, layers)
    needs = DECOMPOSITIONS[method].needs
    stats = calibration_statistics(model, linears, batches, fisher="row_fisher" in needs) if needs else {}
    base = calibration_loss(model, batches)
    rows = []
    for name, layer in linears.items():
        cap = (max_ranks or {}).get(name, min(layer.in_features, layer.out_features))
        ranks = sorted({min(cap, rank_for_ratio(r, layer.in_features, layer.out_features)) for r in rank_ratios})
        for rank in ranks:
            if rank < 1 or not saves_params(layer.in_features, layer.out_features, rank):
                continue
            replace_layer(model, name, factorized_layer(layer, method, rank, stats.get(name)))
            loss = calibration_loss(model, batches)
            replace_layer(model, name, layer)
            rows.append({"layer": name, "rank": rank, "params": rank * (layer.in_features + layer.out_features),
                         "loss_increase": loss - base})
    return rows


def allocate(sensitivity: list[dict[str, Any]], dense_params: dict[str, int], budget: int) -> dict[str, int]:
    """One option per layer — a rank from `sensitivity` or dense (rank 0 in the result is never given: dense
    layers are left out) — with total weights <= `budget`, greedily losing least. DecomposeError if even the
    cheapest options do not fit."""
    options = {name: sorted([(dense, 0.0, None)] + [(r["params"], r["loss_increase"], r["rank"])
                                                   for r in sensitivity if r["layer"] == name])
               for name, dense in dense_params.items()}
    chosen = {name: opts[0] for name, opts in options.items()}
    used = sum(c[0] for c in chosen.values())
    if used > budget:
        raise DecomposeError(f"a budget of {budget:,} weights is below the cheapest allocation ({used:,}); "
                             "raise the budget or add smaller candidate ranks")
    while True:
        best = None
        for name, opts in options.items():
            params, loss, _ = chosen[name]
            for option in opts:
                extra, gain = option[0] - params, loss - option[1]
                if extra > 0 and gain > 0 and used + extra <= budget and (best is None or gain / extra > best[0]):
                    best = (gain / extra, name, option)
        if best is None:
            break
        _, name, option = best
        used += option[0] - chosen[name][0]
        chosen[name] = option
    return {name: option[2] for name, option in chosen.items() if option[2] is not None}

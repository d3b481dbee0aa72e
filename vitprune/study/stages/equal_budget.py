"""Stage 07 · equal budgets: every factorization at the same parameters (plain and refit), and pruning alone
against pruning + factorizing and dense + factorizing at the parameters (or MACs) of pruning alone."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from vitprune.allocation import allocate, layer_sensitivity
from vitprune.checkpoint import load_model, save_model
from vitprune.decompose import decompose_model, rank_for_ratio, saves_params, target_linears
from vitprune.errors import DecomposeError
from vitprune.metrics import count_macs, count_params
from vitprune.names import ratio_label
from vitprune.params import Params
from vitprune.pruning import prune
from vitprune.registry import DECOMPOSITIONS
from vitprune.scoring import load_scores
from vitprune.speed import tokens_per_image
from vitprune.study.findings import Claim, SpeedClaim
from vitprune.study.jobs import bundle_of, calibration_of, input_shape, measured
from vitprune.study.narrative import pct, summary_notebook
from vitprune.study.records import ModelRef, SeedRecord
from vitprune.study.stages.finetuning import tuned
from vitprune.study.stages.pruning import plan_with, pruned, variant_name
from vitprune.study.stages.sparse_training import DENSE
from vitprune.study.tables import with_finetuned

STAGE = "07_equal_budget"
# the strategies held to one budget: key -> what the tables call them
STRATEGIES = {"prune": "pruning alone", "vtp_svd": "VTP + SVD (uniform rank)",
              "vtp_alloc": "VTP + {method} (allocated ranks)", "dense_alloc": "dense + {method} (allocated ranks)"}


def strategy_model(key: str, ratio: float, cost: str = "params") -> ModelRef:
    """The handle of a strategy's model at the parameters (or MACs) of pruning `ratio` alone."""
    prefix = "budget" if cost == "params" else "budget_macs"
    return ModelRef(STAGE, f"{prefix}_{key}_{ratio_label(ratio)}")


def share_model(method: str, refit: bool = False) -> ModelRef:
    """The handle of a method's model at budget.share of the pruned model's parameters."""
    return ModelRef(STAGE, f"share_{method}{'_refit' if refit else ''}")


def projection_weights(model: nn.Module, layers: list[str]) -> dict[str, int]:
    """Weights (in x out) of each projection that `layers` selects for factorizing."""
    return {n: m.in_features * m.out_features for n, m in target_linears(model, layers).items()}


def uniform_ratio_for(model: nn.Module, layers: list[str], target: float) -> float:
    """The largest rank ratio (steps of 1/256) at which uniform factorization leaves at most `target` parameters."""
    linears = target_linears(model, layers)
    fixed = count_params(model) - sum(projection_weights(model, layers).values())
    for step in range(256, 0, -1):
        ratio = step / 256
        total = fixed
        for m in linears.values():
            rank = rank_for_ratio(ratio, m.in_features, m.out_features)
            total += rank * (m.in_features + m.out_features) if saves_params(m.in_features, m.out_features, rank) \
                else m.in_features * m.out_features
        if total <= target:
            return ratio
    raise DecomposeError(f"no uniform rank leaves at most {target:,.0f} parameters")


def allocated(model: nn.Module, p: Params, calibration: list, target: float,
              sensitivity: list[dict[str, Any]]) -> nn.Module:
    """`model` factorized with budget.method at the ranks `allocation.allocate` picks from its per-layer
    `sensitivity`, at most `target` parameters."""
    dense = projection_weights(model, p.decompose.layers)
    ranks = allocate(sensitivity, dense, int(target - (count_params(model) - sum(dense.values()))))
    return decompose_model(model, p.budget.method, ranks=ranks, layers=p.decompose.layers,
                           calibration=calibration if DECOMPOSITIONS[p.budget.method].calibrated else None)


def budget_seed(p: Params, seed_dir: Path) -> SeedRecord:
    """Every factorization at `budget.share` of the pruned model's parameters (plain and refit), and every
    strategy at the parameter count (and, separately, the MACs) of pruning alone at each of
    `budget.prune_ratios` (see `budget_point`)."""
    seed_dir = Path(seed_dir)
    calibration = calibration_of(p)
    source = load_model(seed_dir / f"{variant_name('gates', p.decompose.source_ratio)}.safetensors")
    share_target = p.budget.share * count_params(source)
    share_ratio = uniform_ratio_for(source, p.decompose.layers, share_target)
    record = SeedRecord(tables={"share": [], "curves": []}, extra={"share_target_params_M": share_target / 1e6})
    for method in p.decompose.methods:
        for refit in (False, True):
            calibrated = DECOMPOSITIONS[method].calibrated or refit
            new = decompose_model(source, method, rank_ratio=share_ratio, layers=p.decompose.layers,
                                  calibration=calibration if calibrated else None, refit=refit)
            name = record.measure(share_model(method, refit).label, measured(new, p))
            record.tables["share"].append({"label": name, "method": method, "refit": refit,
                                           "rank_ratio": share_ratio})
    sparse, dense = load_model(seed_dir / "sparse.safetensors"), load_model(seed_dir / "dense.safetensors")
    gates = load_scores(seed_dir / "scores.safetensors")["gates"]
    sensitivity = {name: layer_sensitivity(model, p.budget.method, calibration, p.budget.rank_ratios,
                                           p.decompose.layers) for name, model in (("vtp", source), ("dense", dense))}
    for ratio in p.budget.prune_ratios:
        pruned = prune(sparse, plan_with(sparse, gates, ratio, p.prune))
        for cost in ("params", "macs"):
            budget_point(record, p, pruned, source, dense, sensitivity, calibration, ratio, cost, seed_dir)
    return record


def params_for(model: nn.Module, layers: list[str], pruned: nn.Module, cost: str, shape: tuple) -> float:
    """The parameter count `model` may keep to match `pruned` in `cost`: its parameters, or its MACs (the
    projections' MACs per image are their weights times the tokens; everything else stays as it is)."""
    if cost == "params":
        return count_params(pruned)
    tokens = tokens_per_image(model)
    weights = sum(projection_weights(model, layers).values())
    fixed_macs = count_macs(model, shape) - tokens * weights
    return count_params(model) - weights + (count_macs(pruned, shape) - fixed_macs) / tokens


def budget_point(record: SeedRecord, p: Params, pruned: nn.Module, source: nn.Module, dense: nn.Module,
                 sensitivity: dict, calibration: list, ratio: float, cost: str, seed_dir: Path) -> None:
    """Every strategy held to the parameters (or MACs) of pruning alone at `ratio`, into `record` (a strategy that
    cannot get that small by factorizing decompose.layers is recorded as skipped, with the reason); the
    parameter-matched models at `budget.finetune_ratio` are saved as budget_<strategy>.safetensors and offered for
    fine-tuning."""
    layers, shape = p.decompose.layers, input_shape(bundle_of(p))
    builders = {"prune": lambda: pruned,
                "vtp_svd": lambda: decompose_model(source, "svd", layers=layers, rank_ratio=uniform_ratio_for(
                    source, layers, params_for(source, layers, pruned, cost, shape))),
                "vtp_alloc": lambda: allocated(source, p, calibration, params_for(source, layers, pruned, cost, shape),
                                               sensitivity["vtp"]),
                "dense_alloc": lambda: allocated(dense, p, calibration, params_for(dense, layers, pruned, cost, shape),
                                                 sensitivity["dense"])}
    for key, build in builders.items():
        name = strategy_model(key, ratio, cost).label
        try:
            model = build()
        except DecomposeError as err:
            record.skipped[name] = f"factorizing {', '.join(layers)} cannot reach this budget: {err}"
            continue
        row = {"label": record.measure(name, measured(model, p)), "strategy": key, "matched": cost,
               "budget_ratio": ratio, "target_params_M": count_params(pruned) / 1e6,
               "target_macs_M": count_macs(pruned, shape) / 1e6}
        if cost == "params" and math.isclose(ratio, p.budget.finetune_ratio):
            row["model"] = record.save(seed_dir, name, f"budget_{key}.safetensors")
            save_model(model, Path(seed_dir) / row["model"])
            record.finetune[name] = {"file": row["model"]}
        record.tables["curves"].append(row)


def strategy_names(keys: pd.Series, method: str) -> pd.Series:
    """The equal-budget strategies' keys as the tables name them (the method by its label)."""
    return keys.map(lambda key: STRATEGIES[key].format(method=DECOMPOSITIONS[method].label))


def budget_rows(curves: pd.DataFrame, finetuned: pd.DataFrame, budget: Any) -> pd.DataFrame:
    """Per seed, every strategy at the fine-tuned budget point, with top1_ft/top5_ft."""
    at = curves[np.isclose(curves.budget_ratio, budget.finetune_ratio) & (curves.matched == "params")].copy()
    at = with_finetuned(finetuned, at)
    at["strategy"] = strategy_names(at["strategy"], budget.method)
    return at


# ---------------------------------------------------------------- claims

def claims(p: Params) -> list[Claim]:
    """Sun's ranking after refit; the data-aware SVDs against plain SVD at the same parameters; factorizing
    against pruning alone (and VTP + factorizing against the dense model factorized) at equal parameters and MACs."""
    methods = list(p.decompose.methods)
    share = f"at {round(100 * p.budget.share)} % of the pruned model's parameters, before fine-tuning"
    found = []
    if "svd" in methods:
        found += [Claim(f"refit:svd_vs_{m}@{p.budget.share:g}", "refit", f"Refit after truncation, SVD still keeps "
                        f"more accuracy than {DECOMPOSITIONS[m].label} {share}", share_model("svd", True),
                        share_model(m, True)) for m in methods if "refit" in DECOMPOSITIONS[m].claims]
        found += [Claim(f"equal_share:{m}_vs_svd@{p.budget.share:g}", "data-aware at equal parameters",
                        f"{DECOMPOSITIONS[m].label} keeps more accuracy than SVD {share}", share_model(m),
                        share_model("svd")) for m in methods if "data_aware" in DECOMPOSITIONS[m].claims]
    ratio, method = p.budget.finetune_ratio, DECOMPOSITIONS[p.budget.method].label
    against = [("vtp_alloc", "prune", f"VTP + {method} with allocated ranks keeps more accuracy than pruning alone"),
               ("vtp_svd", "prune", "VTP + SVD at a uniform rank keeps more accuracy than pruning alone"),
               ("vtp_alloc", "dense_alloc", f"VTP + {method} keeps more accuracy than factorizing the dense model "
                                            f"with {method} alone")]
    where = f"At the parameters of pruning {round(100 * ratio)} % alone"
    for a, b, text in against:
        ra, rb = strategy_model(a, ratio), strategy_model(b, ratio)
        found += [Claim(f"equal_params:{a}_vs_{b}@{ratio:g}:before", "equal parameters",
                        f"{where}, {text}, before fine-tuning", ra, rb),
                  Claim(f"equal_params:{a}_vs_{b}@{ratio:g}:after", "equal parameters",
                        f"{where}, {text}, after fine-tuning", tuned(ra), tuned(rb)),
                  Claim(f"equal_macs:{a}_vs_{b}@{ratio:g}:before", "equal MACs", f"At the MACs of pruning "
                        f"{round(100 * ratio)} % alone, {text}, before fine-tuning", strategy_model(a, ratio, "macs"),
                        strategy_model(b, ratio, "macs"))]
    return found


def speed_claims(p: Params) -> list[SpeedClaim]:
    """Every strategy's model at the fine-tuned budget point is faster than the model it was made from (the dense
    model for pruning alone and for dense + factorizing, the pruned model for VTP + factorizing)."""
    source = pruned("gates", p.decompose.source_ratio)
    found = []
    for key in STRATEGIES:
        ref, against = strategy_model(key, p.budget.finetune_ratio), (source if key.startswith("vtp") else DENSE)
        found += [SpeedClaim(f"speed:{ref.label}_vs_{against.label}@bs{batch}", "speed", f"{ref.label} is faster "
                             f"than {against.label} at batch {batch}", ref, against, batch)
                  for batch in p.bench.batch_sizes]
    return found


def conclusion(share: pd.DataFrame, curves: pd.DataFrame, fraction: float) -> str:
    """Which factorization keeps most at the same parameters, whether refit reorders Sun's methods, and how
    the strategies compare at equal parameters (means over seeds, before fine-tuning)."""
    plain = share[~share.refit].groupby("method")["top1"].mean().sort_values(ascending=False)
    refit = share[share.refit].groupby("method")["top1"].mean().sort_values(ascending=False)
    sun = [m for m in plain.index if m == "svd" or "sun" in DECOMPOSITIONS[m].claims]
    order_plain = [m for m in plain.index if m in sun]
    order_refit = [m for m in refit.index if m in sun]
    changed = "keeps" if order_plain[:1] == order_refit[:1] else "changes"
    gain = (refit - plain).dropna().sort_values(ascending=False)
    curve = curves[curves.matched == "params"].groupby(["budget_ratio", "strategy"])["top1"].mean().unstack()
    best = ", ".join(f"{round(100 * r)} % → {curve.loc[r].idxmax()} ({pct(curve.loc[r].max())})" for r in curve.index)
    return (f"At {round(100 * fraction)} % of the pruned model's parameters, before fine-tuning and averaged over "
            f"{share.seed.nunique()} seeds, {plain.index[0]} keeps the most accuracy ({pct(plain.iloc[0])}; then "
            + ", ".join(f"{m} {pct(v)}" for m, v in plain.iloc[1:4].items()) + "). Refitting the second factor "
            f"{changed} the head of Sun's ranking: without refit {' > '.join(order_plain[:3])}, with refit "
            f"{' > '.join(order_refit[:3])}; refit gains most for {gain.index[0]} ({gain.iloc[0]:+.1f} points) and "
            f"{gain.get('svd', 0.0):+.1f} for SVD. At the parameters of pruning alone, the best strategy per pruning "
            f"ratio: {best}. Notebook {summary_notebook()} checks these gaps as paired claims, before and after "
            "fine-tuning.")

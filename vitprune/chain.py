"""One seed's share of each stage: the jobs the notebooks hand to `workers.run_jobs`, one seed each.

Every function takes the parameter set of one seed (`train.seed` set, see `Stage.seed_params`) and
that seed's folder runs/<set>/seed<k>/, reads what earlier stages wrote there and writes its own
files there, so no two seeds share a model, a score, a calibration batch or a random draw. Each
returns a plain record (JSON-serialisable) that the notebook gathers across seeds; every model
evaluated on the test set also leaves its per-image answers (`answers`), from which
`findings` computes paired comparisons. Latency is measured only where `timed` is set (the first
seed, while nothing runs beside it), never inside a pool.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitprune.allocation import allocate, layer_sensitivity
from vitprune.checkpoint import load_model, save_model
from vitprune.data import DataBundle, calibration_batches, load_data, test_batches
from vitprune.decompose import decompose_model, decomposition_report, same_up_to_signs, saves_params, target_linears
from vitprune.errors import DecomposeError
from vitprune.experiments import plan_with, prune_variant, variant_name
from vitprune.gates import attach_gates
from vitprune.metrics import count_macs, count_params, evaluate
from vitprune.models import build_model
from vitprune.names import CALIBRATED_METHODS, CRITERIA
from vitprune.params import Params
from vitprune.pruning import prune, pruned_architecture
from vitprune.scoring import importance_scores, load_scores, save_scores
from vitprune.speed import measure_latency, tokens_per_image
from vitprune.stats import encode_answers
from vitprune.training import fit

_BUNDLES: dict[str, DataBundle] = {}


def bundle_of(p: Params) -> DataBundle:
    """The dataset of a parameter set, loaded once per process."""
    key = f"{p.data!r}|{p.train.seed}"
    if key not in _BUNDLES:
        _BUNDLES.clear()
        _BUNDLES[key] = load_data(p.data, seed=p.train.seed)
    return _BUNDLES[key]


def calibration_of(p: Params) -> list:
    """This seed's fixed un-augmented training batches (Taylor scores, the data-aware SVDs, refit, allocation)."""
    return calibration_batches(bundle_of(p), p.data.calib_batches, p.data.batch_size, p.train.seed)


def input_shape(bundle: DataBundle) -> tuple[int, int, int, int]:
    return (1, bundle.in_chans, bundle.image_size, bundle.image_size)


def measured(model: nn.Module, p: Params, bundle: DataBundle, timed: bool = False) -> dict[str, Any]:
    """Test accuracy (with the per-image answers), params and MACs; measured latency when `timed`."""
    acc = evaluate(model, test_batches(bundle, p.data.eval_batch_size), answers=True)
    record = {"top1": acc["top1"], "top5": acc["top5"], "params_M": count_params(model) / 1e6,
              "macs_M": count_macs(model, input_shape(bundle)) / 1e6,
              "answers": encode_answers(acc["answers"].tolist())}
    if timed:
        b = p.bench
        lat = measure_latency(model, input_shape(bundle), b.batch_sizes, b.repeats, b.warmup, b.threads)
        record.update({f"latency_bs{bs}_ms": ms for bs, ms in lat.items()})
    return record


# ---------------------------------------------------------------- 01: dense and sparse training

def train_seed(p: Params, seed_dir: Path) -> dict[str, Any]:
    """Train the dense model from scratch (or load pretrained), then sparse-train a gated copy of it."""
    bundle = bundle_of(p)
    Path(seed_dir).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(p.train.seed)
    dense = build_model(p.model, bundle.num_classes, bundle.in_chans, bundle.image_size)
    dense_history = fit(p, "dense", dense, bundle, seed_dir, "dense")
    sparse = load_model(Path(seed_dir) / "dense.safetensors")
    attach_gates(sparse, p.sparse.sites)
    sparse_history = fit(p, "sparse", sparse, bundle, seed_dir, "sparse")
    return {"dense": measured(dense, p, bundle), "sparse": measured(sparse, p, bundle),
            "dense_history": dense_history, "sparse_history": sparse_history}


# ---------------------------------------------------------------- 02: importance scores

def score_seed(p: Params, seed_dir: Path) -> dict[str, Any]:
    """Every criterion's scores (saved as scores.safetensors) and the dims each keeps at the ablation ratio."""
    sparse = load_model(Path(seed_dir) / "sparse.safetensors")
    calibration = calibration_of(p)
    scores = {c: importance_scores(sparse, c, batches=calibration, sites=p.sparse.sites, seed=p.train.seed)
              for c in CRITERIA}
    save_scores(scores, Path(seed_dir) / "scores.safetensors")
    kept = []
    for criterion, sc in scores.items():
        plan = plan_with(sparse, sc, p.prune.ablation_ratio, p.prune)
        kept += [{"criterion": criterion, "block": block, "site": site, "kept": n, "of": plan.sizes[(block, site)]}
                 for (block, site), n in sorted(plan.kept_counts().items())]
    return {"kept": kept}


# ---------------------------------------------------------------- 03: pruning

def pruning_variants(p: Params) -> list[tuple[str, float]]:
    """(criterion, ratio) of every pruned model: the gates at every ratio, every criterion at the ablation ratio."""
    variants = [("gates", r) for r in p.prune.ratios]
    return variants + [(c, p.prune.ablation_ratio) for c in CRITERIA if (c, p.prune.ablation_ratio) not in variants]


def prune_seed(p: Params, seed_dir: Path, timed: bool = False) -> dict[str, Any]:
    """Prune the sparse model with every variant; one measured row each, and the gate-pruned architectures."""
    bundle = bundle_of(p)
    sparse = load_model(Path(seed_dir) / "sparse.safetensors")
    scores = load_scores(Path(seed_dir) / "scores.safetensors")
    rows, archs = [], {}
    for criterion, ratio in pruning_variants(p):
        name, small, plan = prune_variant(sparse, scores[criterion], criterion, ratio, p.prune, seed_dir)
        rows.append({"variant": name, "criterion": criterion, "ratio": ratio, "realised_ratio": plan.realised_ratio,
                     "model": f"{name}.safetensors", **measured(small, p, bundle, timed)})
        if criterion == "gates":
            archs[f"{round(100 * ratio)} %"] = pruned_architecture(small)
    return {"variants": rows, "archs": archs, "sparse": measured(sparse, p, bundle, timed),
            "dense_arch": pruned_architecture(load_model(Path(seed_dir) / "dense.safetensors"))}


# ---------------------------------------------------------------- 04-06: decompositions

def decompose_seed(p: Params, seed_dir: Path, methods: list[str], speedup=None,
                   timed: bool = False) -> dict[str, Any]:
    """Every method at every rank ratio on the pruned source model; the models at the fine-tuning rank are
    saved as decomp_<method>.safetensors. With `timed`, the models at the fine-tuning rank (those Table Sun
    shows) get latency and `speedup(source, new)`'s speed-up columns."""
    bundle = bundle_of(p)
    source = load_model(Path(seed_dir) / f"{variant_name('gates', p.decompose.source_ratio)}.safetensors")
    calibration = calibration_of(p)
    rows = []
    for method in methods:
        for ratio in p.decompose.rank_ratios:
            t0 = time.perf_counter()
            new = decompose_model(source, method, rank_ratio=ratio, layers=p.decompose.layers,
                                  calibration=calibration if method in CALIBRATED_METHODS else None)
            seconds = time.perf_counter() - t0
            report = decomposition_report(source, new)
            at_finetune_rank = math.isclose(ratio, p.decompose.finetune_ratio)  # the rank Table Sun times
            row = {"method": method, "rank_ratio": ratio, "variant": f"decomp_{method}",
                   "layers_factorized": len(report),
                   "rel_error": sum(r["rel_error"] for r in report) / max(1, len(report)),
                   "decompose_time_s": seconds, **measured(new, p, bundle, timed and at_finetune_rank),
                   **(speedup(source, new) if timed and at_finetune_rank and speedup else {})}
            if at_finetune_rank:
                row["model"] = f"decomp_{method}.safetensors"
                save_model(new, Path(seed_dir) / row["model"])
            rows.append(row)
    return {"rows": rows}


# ---------------------------------------------------------------- 07: the equal-budget study

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
            rank = max(1, round(ratio * min(m.in_features, m.out_features)))
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
                           calibration=calibration if p.budget.method in CALIBRATED_METHODS else None)


def budget_seed(p: Params, seed_dir: Path) -> dict[str, Any]:
    """Every factorization at `budget.share` of the pruned model's parameters (plain and refit), and every
    strategy at the parameter count (and, separately, the MACs) of pruning alone at each of
    `budget.prune_ratios` (see `budget_point`)."""
    bundle = bundle_of(p)
    seed_dir = Path(seed_dir)
    calibration = calibration_of(p)
    source = load_model(seed_dir / f"{variant_name('gates', p.decompose.source_ratio)}.safetensors")
    share_target = p.budget.share * count_params(source)
    share_ratio = uniform_ratio_for(source, p.decompose.layers, share_target)
    at_share = []
    for method in p.decompose.methods:
        for refit in (False, True):
            calibrated = method in CALIBRATED_METHODS or refit
            new = decompose_model(source, method, rank_ratio=share_ratio, layers=p.decompose.layers,
                                  calibration=calibration if calibrated else None, refit=refit)
            at_share.append({"label": f"share_{method}{'_refit' if refit else ''}", "method": method, "refit": refit,
                             "rank_ratio": share_ratio, **measured(new, p, bundle)})
    sparse, dense = load_model(seed_dir / "sparse.safetensors"), load_model(seed_dir / "dense.safetensors")
    gates = load_scores(seed_dir / "scores.safetensors")["gates"]
    sensitivity = {name: layer_sensitivity(model, p.budget.method, calibration, p.budget.rank_ratios,
                                           p.decompose.layers) for name, model in (("vtp", source), ("dense", dense))}
    curves = []
    for ratio in p.budget.prune_ratios:
        pruned = prune(sparse, plan_with(sparse, gates, ratio, p.prune))
        for cost in ("params", "macs"):
            curves += budget_point(p, pruned, source, dense, sensitivity, calibration, ratio, cost, seed_dir)
    return {"share": at_share, "curves": curves, "share_target_params_M": share_target / 1e6}


def params_for(model: nn.Module, layers: list[str], pruned: nn.Module, cost: str, shape: tuple) -> float:
    """The parameter count `model` may keep to match `pruned` in `cost`: its parameters, or its MACs (the
    projections' MACs per image are their weights times the tokens; everything else stays as it is)."""
    if cost == "params":
        return count_params(pruned)
    tokens = tokens_per_image(model)
    weights = sum(projection_weights(model, layers).values())
    fixed_macs = count_macs(model, shape) - tokens * weights
    return count_params(model) - weights + (count_macs(pruned, shape) - fixed_macs) / tokens


def budget_point(p: Params, pruned: nn.Module, source: nn.Module, dense: nn.Module, sensitivity: dict,
                 calibration: list, ratio: float, cost: str, seed_dir: Path) -> list[dict[str, Any]]:
    """Every strategy held to the parameters (or MACs) of pruning alone at `ratio` (a strategy that cannot get that
    small by factorizing decompose.layers is left out); the parameter-matched models at `budget.finetune_ratio`
    are saved as budget_<strategy>.safetensors for fine-tuning."""
    bundle, layers = bundle_of(p), p.decompose.layers
    shape = input_shape(bundle)
    builders = {"prune": lambda: pruned,
                "vtp_svd": lambda: decompose_model(source, "svd", layers=layers, rank_ratio=uniform_ratio_for(
                    source, layers, params_for(source, layers, pruned, cost, shape))),
                "vtp_alloc": lambda: allocated(source, p, calibration, params_for(source, layers, pruned, cost, shape),
                                               sensitivity["vtp"]),
                "dense_alloc": lambda: allocated(dense, p, calibration, params_for(dense, layers, pruned, cost, shape),
                                                 sensitivity["dense"])}
    rows = []
    for key, build in builders.items():
        try:
            model = build()
        except DecomposeError:
            continue  # factorizing decompose.layers alone cannot reach this budget: the strategy has no point here
        prefix = "budget" if cost == "params" else "budget_macs"
        row = {"label": f"{prefix}_{key}_{round(100 * ratio)}", "strategy": key, "matched": cost,
               "budget_ratio": ratio, "target_params_M": count_params(pruned) / 1e6,
               "target_macs_M": count_macs(pruned, shape) / 1e6, **measured(model, p, bundle)}
        if cost == "params" and math.isclose(ratio, p.budget.finetune_ratio):
            row["model"] = f"budget_{key}.safetensors"
            save_model(model, Path(seed_dir) / row["model"])
        rows.append(row)
    return rows


# ---------------------------------------------------------------- 08: fine-tuning

def shared_starts(seed_dir: Path, filenames: list[str]) -> dict[str, str]:
    """Each variant file -> the first file (in order) holding the same weights up to the signs of factor pairs
    (itself if none): such variants fine-tune identically (`decompose.same_up_to_signs`), so once."""
    firsts: dict[str, nn.Module] = {}
    starts = {}
    for filename in filenames:
        model = load_model(Path(seed_dir) / filename)
        starts[filename] = next((f for f, m in firsts.items() if same_up_to_signs(m, model)), filename)
        if starts[filename] == filename:
            firsts[filename] = model
    return starts


def shared_rows(jobs: list[tuple[int, str]], results: list[dict[str, Any]],
                starts: dict[int, dict[str, str]]) -> dict[int, list[dict[str, Any]]]:
    """Per seed, one row per variant: its own fine-tuning result, or that of the variant it shares a start with
    (marked `fine_tuned_as`)."""
    done = {(seed, filename): row for (seed, filename), row in zip(jobs, results)}
    rows: dict[int, list[dict[str, Any]]] = {}
    for seed, mapping in starts.items():
        for filename, start in mapping.items():
            row = dict(done[(seed, start)])
            if start != filename:
                row.update(variant=filename.removesuffix(".safetensors"), fine_tuned_as=row["variant"])
            rows.setdefault(seed, []).append(row)
    return rows


def finetune_variant(p: Params, seed_dir: Path, filename: str) -> dict[str, Any]:
    """Fine-tune one saved variant (distilling from this seed's dense model if asked); its row and history. Only
    the gate-pruned models, whose recovery is a figure, are evaluated every epoch; the rest after the last."""
    bundle = bundle_of(p)
    name = filename.removesuffix(".safetensors")
    model = load_model(Path(seed_dir) / filename)
    teacher = load_model(Path(seed_dir) / "dense.safetensors") if p.finetune.distill > 0 else None
    history = fit(p, "finetune", model, bundle, seed_dir, f"{name}_ft", teacher=teacher,
                  curve=name.startswith("pruned_gates"))
    return {"variant": name, "model": f"{name}_ft.safetensors", "history": history, **measured(model, p, bundle)}

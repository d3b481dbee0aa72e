"""Stage 03 · pruning (VTP step 2): every criterion's plan, applied; Table VTP, the ablation, and their claims.

`prune_variant` is also what `vitprune prune` runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from vitprune.checkpoint import load_model, save_model
from vitprune.names import ratio_label
from vitprune.params import Params
from vitprune.pruning import PrunePlan, plan_pruning, prune, pruned_architecture, zero_dropped
from vitprune.registry import CRITERIA
from vitprune.scoring import Scores, load_scores
from vitprune.study.findings import WHEN, Claim, SpeedClaim
from vitprune.study.jobs import measured, owned
from vitprune.study.narrative import means, pct
from vitprune.study.records import ModelRef, SeedRecord
from vitprune.study.stages.finetuning import tuned
from vitprune.study.stages.sparse_training import DENSE
from vitprune.study.tables import with_finetuned

STAGE = "03_pruning"


def variant_name(criterion: str, ratio: float) -> str:
    """File stem (and model label) of a pruned variant: pruned_<criterion>_<percent> (names.ratio_label)."""
    return f"pruned_{criterion}_{ratio_label(ratio)}"


def pruned(criterion: str, ratio: float) -> ModelRef:
    """The handle of a pruned variant of this stage."""
    return ModelRef(STAGE, variant_name(criterion, ratio))


def plan_with(model: nn.Module, scores: Scores, ratio: float, options: Any) -> PrunePlan:
    """The pruning plan at `ratio` under a parameter set's pruning options (`options`: its PruneParams)."""
    return plan_pruning(model, scores, ratio, scope=options.scope, min_keep=options.min_keep,
                        round_to=options.round_to, head_mode=options.head_mode)


def prune_variant(model: nn.Module, scores: Scores, criterion: str, ratio: float, options: Any,
                  run_dir: str | Path) -> tuple[str, nn.Module, PrunePlan]:
    """Plan with `options` (a PruneParams), prune, and save model and plan as <run_dir>/pruned_<crit>_<NN>.*"""
    plan = plan_with(model, scores, ratio, options)
    plan.meta["criterion"] = criterion
    small = prune(model, plan)
    name = variant_name(criterion, ratio)
    save_model(small, Path(run_dir) / f"{name}.safetensors")
    plan.save(Path(run_dir) / f"{name}.plan.json")
    return name, small, plan


def pruning_variants(p: Params) -> list[tuple[str, float]]:
    """(criterion, ratio) of every pruned model: the gates at every ratio, every criterion at the ablation ratio."""
    variants = [("gates", r) for r in p.prune.ratios]
    return variants + [(c, p.prune.ablation_ratio) for c in CRITERIA.names()
                       if (c, p.prune.ablation_ratio) not in variants]


def prune_seed(p: Params, seed_dir: Path) -> SeedRecord:
    """Prune the sparse model with every variant; one measured row each, and the gate-pruned architectures."""
    sparse = load_model(Path(seed_dir) / "sparse.safetensors")
    scores = load_scores(Path(seed_dir) / "scores.safetensors")
    record = SeedRecord(extra={"archs": {}})
    rows = []
    for criterion, ratio in pruning_variants(p):
        name, small, plan = prune_variant(sparse, scores[criterion], criterion, ratio, p.prune, seed_dir)
        rows.append({"label": record.measure(name, measured(small, p)), "variant": name,
                     "criterion": criterion, "ratio": ratio, "realised_ratio": plan.realised_ratio,
                     "model": record.save(seed_dir, name, f"{name}.safetensors")})
        record.files += owned(seed_dir, f"{name}.plan.json")
        record.finetune[name] = {"file": f"{name}.safetensors"}
        if criterion == "gates":
            record.extra["archs"][variant_name(criterion, ratio)] = pruned_architecture(small)
    record.tables["variants"] = rows
    record.measure("sparse", measured(sparse, p))
    record.extra["dense_arch"] = pruned_architecture(load_model(Path(seed_dir) / "dense.safetensors"))
    return record


@torch.no_grad()
def worked_plan(sparse: nn.Module, scores: Scores, ratio: float, options: Any, images: torch.Tensor,
                block: int = 0) -> pd.DataFrame:
    """One call of `plan_pruning` and `prune` shown on a real model: block `block`'s plan (kept of each site), and
    how far the pruned model's logits are from the gated model with the dropped gates zeroed (the exactness)."""
    plan = plan_with(sparse, scores, ratio, options)
    small, reference = prune(sparse, plan), zero_dropped(sparse, plan)
    gap = float((small.eval()(images) - reference.eval()(images)).abs().max())
    return pd.DataFrame([{"block": b, "site": site, "kept": len(kept), "of": plan.sizes[(b, site)],
                          "first kept dims": ", ".join(map(str, kept[:6])) + (" …" if len(kept) > 6 else ""),
                          "max |pruned − masked| (logits)": gap}
                         for (b, site), kept in sorted(plan.kept.items()) if b == block])


# ---------------------------------------------------------------- the tables notebook 09 shows

def vtp_rows(dense: pd.DataFrame, variants: pd.DataFrame, finetuned: pd.DataFrame) -> pd.DataFrame:
    """Per seed: dense and every gate-pruned variant with accuracy before/after fine-tuning and MAC reduction."""
    head = dense.assign(variant="dense", ratio=0.0, realised_ratio=0.0, top1_ft=dense["top1"], top5_ft=dense["top5"])
    vtp = pd.concat([head, with_finetuned(finetuned, variants[variants.criterion == "gates"])], ignore_index=True)
    by_seed = dense.set_index("seed")
    vtp["macs_reduction_%"] = 100 * (1 - vtp["macs_M"] / vtp["seed"].map(by_seed["macs_M"]))
    vtp["top1_drop_ft"] = vtp["seed"].map(by_seed["top1"]) - vtp["top1_ft"]
    return vtp


def vtp_table(vtp: pd.DataFrame, latency: list[str]) -> pd.DataFrame:
    """Table VTP (per seed): the columns of `vtp_rows` the paper compares."""
    return vtp[["seed", "variant", "realised_ratio", "params_M", "macs_M", "macs_reduction_%", *latency, "top1",
                "top5", "top1_ft", "top5_ft", "top1_drop_ft"]]


def ablation_table(variants: pd.DataFrame, finetuned: pd.DataFrame, ratio: float, latency: list[str]) -> pd.DataFrame:
    """Every importance criterion at the ablation ratio (per seed)."""
    ablation = with_finetuned(finetuned, variants[variants.ratio == ratio])
    return ablation[["seed", "criterion", "realised_ratio", "params_M", "macs_M", *latency, "top1", "top1_ft",
                     "top5_ft"]]


# ---------------------------------------------------------------- claims

def claims(p: Params) -> list[Claim]:
    """VTP's: pruning the decomposed ratio costs at most prune.max_drop points after fine-tuning; the ablation:
    the gates beat every other criterion at the ablation ratio, before and after fine-tuning."""
    source, ablation = p.decompose.source_ratio, p.prune.ablation_ratio
    found = [Claim(f"vtp.cost:{variant_name('gates', source)}", "VTP", f"Pruning {round(100 * source)} % of the gated "
                   f"dimensions with the VTP gates costs at most {p.prune.max_drop:g} points of top-1 against the "
                   "dense model, after fine-tuning", tuned(pruned("gates", source)), DENSE, -p.prune.max_drop)]
    gates = pruned("gates", ablation)
    for criterion in (c for c in CRITERIA.names() if c != "gates"):
        other = pruned(criterion, ablation)
        for when, words in WHEN.items():
            a, b = (gates, other) if when == "before" else (tuned(gates), tuned(other))
            found.append(Claim(f"ablation:{gates.label}_vs_{other.label}:{when}", "VTP ablation",
                               f"At {round(100 * ablation)} % pruned, the VTP gates keep more accuracy than "
                               f"{criterion} scores, {words}", a, b))
    return found


def speed_claims(p: Params) -> list[SpeedClaim]:
    """Every pruned model is faster than the dense model it was pruned from, at every bench batch size."""
    return [SpeedClaim(f"speed:{pruned(c, r).label}_vs_dense@bs{batch}", "speed", f"{pruned(c, r).label} is faster "
                       f"than the dense model at batch {batch}", pruned(c, r), DENSE, batch)
            for c, r in pruning_variants(p) for batch in p.bench.batch_sizes]


def conclusion(before: pd.DataFrame, sparse: pd.DataFrame, ablation_ratio: float) -> str:
    """Accuracy before fine-tuning of every pruned variant (means over seeds), against the sparse model."""
    gates = means(before[before.criterion == "gates"], "variant").sort_values("ratio")
    steps = ", ".join(f"{round(100 * r.ratio)} % → {pct(r.top1)} ({r.macs_M:.3g} M MACs)" for r in gates.itertuples())
    ablation = before[before.ratio == ablation_ratio].groupby("criterion")["top1"].mean().sort_values(ascending=False)
    order = " > ".join(f"{criterion} {pct(top1)}" for criterion, top1 in ablation.items())
    return (f"Before fine-tuning, the gate-pruned models keep {steps} (means over {before.seed.nunique()} seeds), "
            f"from {pct(sparse.top1.mean())} for the sparse model. At the ablation ratio the criteria rank {order}; "
            "notebook 09 checks which of these gaps are findings.")

"""Stage 02 · importance scores: every registered criterion scores each seed's sparse model."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from vitprune.checkpoint import load_model
from vitprune.params import Params
from vitprune.registry import CRITERIA
from vitprune.scoring import importance_scores, save_scores
from vitprune.study.jobs import calibration_of, owned
from vitprune.study.records import SeedRecord
from vitprune.study.stages.pruning import plan_with

SCORES_FILE = "scores.safetensors"


def score_seed(p: Params, seed_dir: Path) -> SeedRecord:
    """Every criterion's scores (saved as scores.safetensors) and the dims each keeps at the ablation ratio."""
    sparse = load_model(Path(seed_dir) / "sparse.safetensors")
    calibration = calibration_of(p)
    scores = {c: importance_scores(sparse, c, batches=calibration, sites=p.sparse.sites, seed=p.train.seed)
              for c in CRITERIA.names()}
    save_scores(scores, Path(seed_dir) / SCORES_FILE)
    kept = []
    for criterion, sc in scores.items():
        plan = plan_with(sparse, sc, p.prune.ablation_ratio, p.prune)
        kept += [{"criterion": criterion, "block": block, "site": site, "kept": n, "of": plan.sizes[(block, site)]}
                 for (block, site), n in sorted(plan.kept_counts().items())]
    return SeedRecord(tables={"kept": kept}, files=owned(seed_dir, SCORES_FILE))


def conclusion(kept: pd.DataFrame, ratio: float) -> str:
    """Where each criterion removes dimensions at the ablation ratio."""
    totals = kept.groupby("site").sum(numeric_only=True).drop(columns="block", errors="ignore")
    parts = []
    for criterion in totals.columns:
        site = totals[criterion].idxmin()
        parts.append(f"{criterion} keeps fewest in {site} ({int(totals.loc[site, criterion])} dims)")
    return (f"At {round(100 * ratio)} % of the gated dimensions removed, the criteria disagree on where to cut: "
            + "; ".join(parts) + ". Notebook 03 measures what each choice costs in accuracy.")

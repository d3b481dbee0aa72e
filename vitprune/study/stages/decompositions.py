"""Stages 04–06 · decompositions (Sun 2023): one family each (SVD, QR, LU), every method of it at every rank
ratio on each seed's pruned model; Table Sun and the claims that compare the methods.

The three notebooks share their work through `sweep(stage)`; a method enters the stage of its registry
family (`registry.DECOMPOSITIONS`), and the claims it enters are read from its registry entry.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from vitprune import linalg
from vitprune.calibration import calibration_statistics
from vitprune.checkpoint import load_model, save_model
from vitprune.decompose import decompose_model, decomposition_report, densify, factorize, rank_decisions, target_linears
from vitprune.layers import FactorizedLinear
from vitprune.params import Params
from vitprune.registry import DECOMPOSITIONS
from vitprune.study.findings import WHEN, Claim, SpeedClaim
from vitprune.study.jobs import calibration_of, measured
from vitprune.study.narrative import means, pct
from vitprune.study.records import ModelRef, SeedRecord, table_frame
from vitprune.study.stages import STAGES
from vitprune.study.stages.finetuning import finetune_methods, tuned
from vitprune.study.stages.pruning import variant_name
from vitprune.study.tables import with_finetuned

# the columns of a sweep in which decompose.methods has no method of the stage's family
EMPTY_SWEEP = ["seed", "label", "method", "rank_ratio", "factorized", "variant", "layers_factorized", "rel_error",
               "decompose_time_s", "top1", "top5", "params_M", "macs_M"]


def stage_of(method: str) -> str:
    """The stage that studies a method: the one registered for its family."""
    family = DECOMPOSITIONS[method].family
    found = STAGES.with_option(family=family)
    if not found:
        raise KeyError(f"no stage is registered for the {family} family of '{method}' (vitprune/study/stages)")
    return found[0].name


def label(method: str, ratio: float | None = None) -> str:
    """A decomposed model's label: decomp_<method> at the fine-tuning rank (its file stem), else with @<ratio>."""
    return f"decomp_{method}" if ratio is None else f"decomp_{method}@{ratio:g}"


def decomposed(method: str) -> ModelRef:
    """The handle of a method's model at the fine-tuning rank."""
    return ModelRef(stage_of(method), label(method))


def methods_of(p: Params, family: str) -> list[str]:
    """The methods of decompose.methods that belong to `family`, in registry order."""
    return [m for m in DECOMPOSITIONS.names(family=family) if m in p.decompose.methods]


def source_label(p: Params) -> str:
    """The pruned model the decompositions start from (pruning decompose.source_ratio with the gates)."""
    return variant_name("gates", p.decompose.source_ratio)


def break_even_caps(p: Params, seed_dir: Path) -> dict[str, int]:
    """Per projection of a seed's source model, the largest rank at which factorizing it is faster in PyTorch here
    at batch 1 and at the largest bench batch (`speed.break_even_rank`): measured in the notebook's own process,
    before the jobs start, since nothing may be timed beside other work."""
    source = load_model(Path(seed_dir) / f"{source_label(p)}.safetensors")
    decisions = rank_decisions(source, rank_ratio=p.decompose.finetune_ratio, layers=p.decompose.layers,
                               only_if_faster=True, batches=(1, max(p.bench.batch_sizes)), threads=p.bench.threads)
    return {d["layer"]: d["break_even_rank"] for d in decisions}


def decompose_seed(p: Params, seed_dir: Path, family: str, caps: dict[str, int]) -> SeedRecord:
    """Every method of `family` at every rank ratio on the pruned source model; at the fine-tuning rank also
    "where it pays": the same model with every factorized projection whose rank lies above its measured
    break-even (`caps`) multiplied back into one matmul (`decompose.densify`) — the same function, never slower
    than its source. The models at the fine-tuning rank are saved as decomp_<method>[_pays].safetensors; the
    uniform one is offered for fine-tuning, the pays one is derived from its fine-tuned twin (stage 08)."""
    source = load_model(Path(seed_dir) / f"{source_label(p)}.safetensors")
    calibration = calibration_of(p)
    record = SeedRecord(tables={"rows": []})
    for method in methods_of(p, family):
        use = calibration if DECOMPOSITIONS[method].calibrated else None
        for ratio in p.decompose.rank_ratios:
            at_finetune_rank = math.isclose(ratio, p.decompose.finetune_ratio)
            t0 = time.perf_counter()
            new = decompose_model(source, method, rank_ratio=ratio, layers=p.decompose.layers, calibration=use)
            seconds = time.perf_counter() - t0
            row = _decomposed_row(record, source, new, method, ratio, "uniform", seconds, p,
                                  label(method, None if at_finetune_rank else ratio))
            if at_finetune_rank:
                _save(record, seed_dir, new, row)
                record.finetune[row["label"]] = {"file": row["model"], "method": method}
                slow = [name for name, layer in new.named_modules()
                        if isinstance(layer, FactorizedLinear) and layer.rank > caps.get(name, 0)]
                pays = densify(new, slow)
                pays_row = _decomposed_row(record, source, pays, method, ratio, "where it pays", seconds, p,
                                           f"{label(method)}_pays")
                pays_row["rel_error"] = row["rel_error"]  # the same function as the uniform model
                _save(record, seed_dir, pays, pays_row)
                record.finetune[pays_row["label"]] = {"derive": row["label"], "densify": slow, "method": method}
    return record


def _decomposed_row(record: SeedRecord, source: nn.Module, new: nn.Module, method: str, ratio: float, where: str,
                    seconds: float, p: Params, name: str) -> dict[str, Any]:
    report = decomposition_report(source, new)
    row = {"label": record.measure(name, measured(new, p)), "method": method, "rank_ratio": ratio,
           "factorized": where, "variant": name.split("@")[0], "layers_factorized": len(report),
           "rel_error": sum(r["rel_error"] for r in report) / max(1, len(report)), "decompose_time_s": seconds}
    record.tables["rows"].append(row)
    return row


def _save(record: SeedRecord, seed_dir: Path, model: nn.Module, row: dict[str, Any]) -> None:
    """Save a model of the fine-tuning rank as <label>.safetensors."""
    row["model"] = record.save(seed_dir, row["label"], f"{row['label']}.safetensors")
    save_model(model, Path(seed_dir) / row["model"])


def sweep(stage) -> tuple[dict[int, SeedRecord], pd.DataFrame]:
    """The rank sweep of a decomposition stage's family on every seed, side by side in worker processes (the
    break-even ranks measured first, here, alone); its per-seed frame. Notebooks 04, 05 and 06 each make this one
    call."""
    family = stage.entry.options["family"]
    caps = {seed: break_even_caps(stage.seed_params(seed), stage.seed_dir(seed)) for seed in stage.seeds}
    records = stage.run_jobs(decompose_seed, [(seed, family, caps[seed]) for seed in stage.seeds], "seeds")
    results = dict(zip(stage.seeds, records))
    table = table_frame(results, "rows")
    return results, table if not table.empty else pd.DataFrame(columns=EMPTY_SWEEP)


@torch.no_grad()
def worked_factorization(model: nn.Module, layer: str, methods: Iterable[str], rank: int,
                         calibration: list | None = None) -> pd.DataFrame:
    """`vp.factorize` called on one real projection of `model`: per method the factors' shapes, the relative
    weight error ||W − BA|| / ||W|| and, for reference, the Eckart–Young optimum at this rank."""
    w = target_linears(model)[layer].weight.detach().double()
    singular = torch.linalg.svdvals(w)
    optimum = float(singular[rank:].square().sum().sqrt() / singular.square().sum().sqrt())
    needs = {need for m in methods for need in DECOMPOSITIONS[m].needs}
    stats = calibration_statistics(model, [layer], calibration, fisher="row_fisher" in needs)[layer] \
        if needs and calibration is not None else {}
    rows = []
    for method in methods:
        a, b = factorize(w, method, rank, **{need: stats.get(need) for need in DECOMPOSITIONS[method].needs})
        error = float(torch.linalg.matrix_norm(w - b @ a) / torch.linalg.matrix_norm(w))
        rows.append({"method": method, "W": "×".join(map(str, w.shape)), "A": "×".join(map(str, a.shape)),
                     "B": "×".join(map(str, b.shape)), "relative error": error, "SVD optimum": optimum})
    return pd.DataFrame(rows)


def spectra(model: nn.Module, layers: Iterable[str]) -> dict[str, np.ndarray]:
    """Singular values of every chosen projection of `model`."""
    return {name: torch.linalg.svdvals(layer.weight.detach().double()).numpy()
            for name, layer in target_linears(model, layers).items()}


# ---------------------------------------------------------------- the QR study (notebook 05)

def graded_matrix(n: int, cond: float, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """A random n x n matrix with singular values log-spaced from 1 to 1/cond."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(cond), n, dtype=torch.float64)
    return ((u * s) @ v.T).to(dtype)


def lauchli(n: int, eps: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Läuchli matrix [1 ... 1; eps I]: Gram-Schmidt's classic loss-of-orthogonality example."""
    return torch.cat([torch.ones(1, n, dtype=dtype), eps * torch.eye(n, dtype=dtype)])


def orthogonality_sweep(conds: Iterable[float] = (1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7), n: int = 64,
                        dtype: torch.dtype = torch.float32) -> list[dict[str, Any]]:
    """||Q^T Q - I|| of each QR algorithm on matrices of growing condition number."""
    rows = []
    for cond in conds:
        a = graded_matrix(n, cond, dtype)
        for method in linalg.QR_ALGORITHMS:
            q, _ = linalg.qr(a, method)
            rows.append({"method": method, "cond": cond, "orth_loss": linalg.orthogonality_loss(q)})
    return rows


# ---------------------------------------------------------------- the tables notebook 09 shows

def rank_sweep_table(decomposed_frame: pd.DataFrame) -> pd.DataFrame:
    """Every method at every rank ratio, factorized uniformly, before fine-tuning (per seed)."""
    uniform = decomposed_frame[decomposed_frame.factorized == "uniform"]
    return uniform[["seed", "method", "rank_ratio", "params_M", "macs_M", "rel_error", "top1"]]


def sun_rows(decomposed_frame: pd.DataFrame, finetuned: pd.DataFrame, finetune_ratio: float,
             source_ratio: float) -> pd.DataFrame:
    """Per seed, every method at the fine-tuning rank — the paper's uniform rank, and only where it pays — with
    accuracy after fine-tuning and the drop against its fine-tuned source."""
    sun = with_finetuned(finetuned, decomposed_frame[np.isclose(decomposed_frame.rank_ratio, finetune_ratio)])
    source = finetuned[finetuned.label == variant_name("gates", source_ratio)].set_index("seed")["top1"]
    sun["top1_drop_ft_vs_pruned"] = sun["seed"].map(source) - sun["top1_ft"]
    return sun


def sun_table(sun: pd.DataFrame, latency: list[str]) -> pd.DataFrame:
    """Table Sun (per seed): the columns of `sun_rows` the paper compares, and the measured speed-up over the
    pruned source at the largest bench batch with its verdict."""
    speed = [c for c in ("speedup_vs_source_x", "faster_than_source") if c in sun]
    return sun[["seed", "method", "factorized", "rank_ratio", "layers_factorized", "params_M", "macs_M", *latency,
                *speed, "rel_error", "decompose_time_s", "top1", "top1_ft", "top1_drop_ft_vs_pruned"]]


# ---------------------------------------------------------------- claims

def claims(p: Params) -> list[Claim]:
    """Sun's: SVD keeps more accuracy than each method that enters "sun"; pivoting beats its unpivoted twin; the
    data-aware SVDs beat plain SVD — at the fine-tuning rank, before and (where both are fine-tuned) after."""
    methods, finetuned = list(p.decompose.methods), finetune_methods(p)
    pairs = [("sun", "Sun", "svd", m) for m in methods if "sun" in DECOMPOSITIONS[m].claims]
    pairs += [("pivoting", "QR/LU pivoting", m, DECOMPOSITIONS[m].improves_on) for m in methods
              if "pivoting" in DECOMPOSITIONS[m].claims]
    pairs += [("data_aware", "beyond Sun", m, DECOMPOSITIONS[m].improves_on) for m in methods
              if "data_aware" in DECOMPOSITIONS[m].claims]
    ratio = p.decompose.finetune_ratio
    found = []
    for kind, group, a, b in pairs:
        if a not in methods or b not in methods:
            continue
        for when, words in WHEN.items():
            if when == "after" and not (a in finetuned and b in finetuned):
                continue
            ra, rb = decomposed(a), decomposed(b)
            if when == "after":
                ra, rb = tuned(ra), tuned(rb)
            found.append(Claim(f"{kind}:{a}_vs_{b}@{ratio:g}:{when}", group,
                               f"{DECOMPOSITIONS[a].label} keeps more accuracy than {DECOMPOSITIONS[b].label} at "
                               f"rank ratio {ratio:g}, {words}", ra, rb))
    return found


def speed_claims(p: Params) -> list[SpeedClaim]:
    """Every factorized model at the fine-tuning rank — uniform and where it pays — is faster than the pruned model
    it was factorized from, at every bench batch size."""
    source = ModelRef("03_pruning", source_label(p))
    found = []
    for method in p.decompose.methods:
        for suffix, how in (("", "at the uniform rank"), ("_pays", "only where it pays")):
            ref = ModelRef(stage_of(method), f"{label(method)}{suffix}")
            found += [SpeedClaim(f"speed:{ref.label}_vs_source@bs{batch}", "speed", f"{DECOMPOSITIONS[method].label} "
                                 f"{how} is faster than the pruned model at batch {batch}", ref, source, batch)
                      for batch in p.bench.batch_sizes]
    return found


def conclusion(table: pd.DataFrame, rank_ratio: float) -> str:
    """Which method keeps the weights and the accuracy best at the fine-tuning rank (means over seeds)."""
    if table.empty:
        return "decompose.methods names no method of this notebook's family, so nothing was decomposed here."
    at = means(table[(table.rank_ratio == rank_ratio) & (table.factorized == "uniform")], "method") \
        .sort_values("rel_error")
    if at.empty:
        return "No method was run at the fine-tuning rank."
    best, acc = at.iloc[0], at.sort_values("top1", ascending=False).iloc[0]
    pays = table[table.factorized == "where it pays"].groupby("method")["layers_factorized"].mean()
    faster = (f" Factorized only where that is measured faster here (at batch 1 and the largest bench batch), "
              f"{pays.mean():.1f} of {at.layers_factorized.mean():.0f} projections are factorized on average."
              if not pays.empty else "")
    return (f"At rank ratio {rank_ratio:g} (means over {table.seed.nunique()} seeds), {best.method} reconstructs the "
            f"weights best (relative error {best.rel_error:.3f}) and {acc.method} keeps the most accuracy before "
            f"fine-tuning ({pct(acc.top1)}); " + ", ".join(f"{r.method} {pct(r.top1)}" for r in at.itertuples())
            + "." + faster)


def orthogonality_conclusion(orth: pd.DataFrame) -> str:
    """How far each QR algorithm's Q is from orthogonal on the worst-conditioned matrix."""
    worst = orth[orth.cond == orth.cond.max()].sort_values("orth_loss")
    order = " < ".join(f"{r.method} ({r.orth_loss:.1e})" for r in worst.itertuples())
    loss = worst.set_index("method")["orth_loss"]
    classic = all(m in loss for m in ("qr_householder", "qr_mgs", "qr_cgs")) and (
        loss["qr_householder"] <= loss["qr_mgs"] <= loss["qr_cgs"])
    verdict = ("the classic ordering Householder ≤ MGS ≤ CGS holds (theory: Householder and Givens stay "
               "orthogonal to working precision, MGS loses orthogonality like κ, CGS like κ²)" if classic else
               "this run does not show the classic ordering Householder ≤ MGS ≤ CGS")
    return (f"On a matrix of condition number {orth.cond.max():.0e}, ||QᵀQ − I|| orders the algorithms {order}: "
            f"{verdict}.")

"""Stage 08 · fine-tuning (VTP step 3): every model an earlier stage offers, fine-tuned with one schedule.

Each earlier stage's record offers the models it wants fine-tuned (`SeedRecord.finetune`); decompositions
are fine-tuned where their method is in `finetune_methods(p)`. Variants that hold the same weights up to the
signs of factor pairs (the four QR algorithms usually do) are fine-tuned once. `finetune_model` is also
what `vitprune finetune` runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from vitprune.checkpoint import load_model, save_model
from vitprune.decompose import densify, same_up_to_signs
from vitprune.params import Params
from vitprune.registry import DECOMPOSITIONS
from vitprune.study.jobs import bundle_of, measured, trained_files
from vitprune.study.narrative import means, pct, summary_notebook
from vitprune.study.records import ModelRef, SeedRecord, StageRecord
from vitprune.training import fit

STAGE = "08_finetuning"


def tuned(ref: ModelRef) -> ModelRef:
    """The handle of a model after fine-tuning (this stage records it under its source's label)."""
    return ModelRef(STAGE, ref.label)


def finetune_methods(p: Params) -> list[str]:
    """The decompositions whose models are fine-tuned: finetune.methods, or those of decompose.methods that their
    registry entry fine-tunes."""
    if p.finetune.methods is not None:
        return list(p.finetune.methods)
    return [m for m in p.decompose.methods if DECOMPOSITIONS[m].finetune]


def _offers(p: Params, records: dict[str, StageRecord], seed: int) -> dict[str, dict[str, Any]]:
    """Every model the earlier stages offer for fine-tuning (in pipeline order), its method fine-tuned."""
    methods = finetune_methods(p)
    return {label: offer for record in records.values() if seed in record.seeds
            for label, offer in record.seeds[seed].finetune.items()
            if offer.get("method") is None or offer["method"] in methods}


def offered(p: Params, records: dict[str, StageRecord], seed: int) -> dict[str, str]:
    """label -> model file of every model the earlier stages offer to be fine-tuned."""
    return {label: offer["file"] for label, offer in _offers(p, records, seed).items() if "file" in offer}


def derived(p: Params, records: dict[str, StageRecord], seed: int) -> dict[str, dict[str, Any]]:
    """label -> {"derive": the label it comes from, "densify": layers} of every model offered as a transform of
    another offered model (the same function: it shares that model's fine-tuning)."""
    return {label: offer for label, offer in _offers(p, records, seed).items() if "derive" in offer}


def derive_job(p: Params, seed_dir: Path, label: str, source_file: str, layers: list[str]) -> dict[str, Any]:
    """The fine-tuned model `source_file` with `layers` multiplied out (`decompose.densify`), measured and saved as
    <label>_ft.safetensors."""
    model = densify(load_model(Path(seed_dir) / source_file), layers)
    name = f"{label}_ft"
    save_model(model, Path(seed_dir) / f"{name}.safetensors")
    return {"measured": measured(model, p), "history": [], "model": f"{name}.safetensors",
            "files": [f"{Path(seed_dir).name}/{name}.safetensors"]}


def shared_starts(seed_dir: Path, models: dict[str, str]) -> dict[str, str]:
    """Each label -> the first label (in order) whose file holds the same weights up to the signs of factor pairs
    (itself if none): such models fine-tune identically (`decompose.same_up_to_signs`), so once."""
    firsts: dict[str, nn.Module] = {}
    starts = {}
    for label, filename in models.items():
        model = load_model(Path(seed_dir) / filename)
        starts[label] = next((first for first, m in firsts.items() if same_up_to_signs(m, model)), label)
        if starts[label] == label:
            firsts[label] = model
    return starts


def finetune_model(p: Params, source: Path, out_dir: Path, teacher: nn.Module | None = None,
                   curve: bool = True) -> tuple[nn.Module, list[dict[str, Any]], str]:
    """Fine-tune the model file `source` into out_dir/<stem>_ft.safetensors (distilling from `teacher` if given);
    the model, its history and the run name."""
    model = load_model(source)
    name = source.name.removesuffix(".safetensors") + "_ft"
    history = fit(p, "finetune", model, bundle_of(p), out_dir, name, teacher=teacher, curve=curve)
    return model, history, name


def finetune_job(p: Params, seed_dir: Path, label: str, filename: str) -> dict[str, Any]:
    """Fine-tune one offered model of a seed (distilling from its dense model if asked). Only the gate-pruned
    models, whose recovery is a figure, are evaluated every epoch; the rest after the last."""
    teacher = load_model(Path(seed_dir) / "dense.safetensors") if p.finetune.distill > 0 else None
    model, history, name = finetune_model(p, Path(seed_dir) / filename, Path(seed_dir), teacher,
                                          curve=label.startswith("pruned_gates"))
    return {"measured": measured(model, p), "history": history, "model": f"{name}.safetensors",
            "files": trained_files(seed_dir, name)}


def seed_records(jobs: list[tuple[int, str, str]], results: list[dict[str, Any]],
                 starts: dict[int, dict[str, str]], upstream: dict[str, StageRecord]) -> dict[int, SeedRecord]:
    """Per seed, every offered model fine-tuned: its own result, or that of the model it shares a start with
    (its table row says `fine_tuned_as`); a model an earlier stage did not build is recorded as not fine-tuned,
    with that stage's reason, so a claim about its fine-tuned self says why it cannot be checked."""
    done = {(seed, label): result for (seed, label, _), result in zip(jobs, results)}
    records = {}
    for seed, mapping in starts.items():
        record = SeedRecord(extra={"histories": {}}, skipped={
            label: f"{stage} did not build it: {why}" for stage, r in upstream.items() if seed in r.seeds
            for label, why in r.seeds[seed].skipped.items()})
        rows = []
        for label, start in mapping.items():
            result = done[(seed, start)]
            row = {"label": record.measure(label, result["measured"]), "variant": label, "model": result["model"]}
            record.saved[label] = result["model"]
            if start != label:
                row["fine_tuned_as"] = start
            else:
                record.files += result["files"]
                record.extra["histories"][label] = result["history"]
            rows.append(row)
        record.tables["rows"] = rows
        records[seed] = record
    return records


def derive_jobs(p: Params, records: dict[str, StageRecord], results: dict[int, SeedRecord]) -> list[tuple]:
    """(seed, label, the fine-tuned file it derives from, layers) for every derived model of every seed."""
    return [(seed, label, results[seed].saved[offer["derive"]], offer["densify"])
            for seed in results for label, offer in derived(p, records, seed).items()]


def add_derived(results: dict[int, SeedRecord], jobs: list[tuple], outputs: list[dict[str, Any]]) -> None:
    """Record the derived models (`derive_job`'s outputs) beside the fine-tuned ones (their row says which)."""
    for (seed, label, source_file, _), out in zip(jobs, outputs):
        record = results[seed]
        record.measure(label, out["measured"])
        record.saved[label] = out["model"]
        record.files += out["files"]
        record.tables["rows"].append({"label": label, "variant": label, "model": out["model"],
                                      "derived_from": source_file.removesuffix(".safetensors")})


def recovery_curves(results: dict[int, SeedRecord]) -> dict[str, list[list[dict[str, Any]]]]:
    """Per gate-pruned model, every seed's fine-tuning history (evaluated every epoch: the recovery figure)."""
    curves: dict[str, list] = {}
    for record in results.values():
        for label, history in record.extra["histories"].items():
            if label.startswith("pruned_gates"):
                curves.setdefault(label, []).append(history)
    return curves


def conclusion(after: pd.DataFrame) -> str:
    """Accuracy after fine-tuning of every variant (means over seeds)."""
    ranked = means(after, "variant").sort_values("top1", ascending=False)
    top, bottom = ranked.iloc[0], ranked.iloc[-1]
    return (f"After fine-tuning, {len(ranked)} variants range from {pct(bottom.top1)} ({bottom.variant}) to "
            f"{pct(top.top1)} ({top.variant}), means over {after.seed.nunique()} seeds; notebook "
            f"{summary_notebook()} sets them against their accuracy before fine-tuning, parameters, MACs and latency, "
            "and checks the claims.")

"""Typed stage records: what each stage ran, per seed, and where the others find its models.

A stage's record (runs/<set>/<stage>.json) holds, for every seed, the models it measured on the test
set (by label, with their per-image answers), its tables (rows that name their model by label), the
files it wrote, the models it did not build (and why) and the models it offers for fine-tuning. Other
stages and the claims name a model by a typed handle, `ModelRef(stage, label)`; asking a record for a
label it does not have is an `UnknownModel` error that names the label and what the stage has. This
module alone reads and writes records.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from vitprune.checkpoint import write_json
from vitprune.errors import MissingStageError, UnknownModel


@dataclass(frozen=True)
class ModelRef:
    """A model of one stage, by the label its record gives it (e.g. 03_pruning's pruned_gates_40)."""

    stage: str
    label: str

    def __str__(self) -> str:
        return f"{self.stage}:{self.label}"


@dataclass
class Measured:
    """One model of one seed, measured on the test set: accuracy, per-image answers, cost, latency (when timed)."""

    top1: float
    top5: float
    params_M: float
    macs_M: float
    answers: str = ""  # '0'/'1' per test image (stats.encode_answers), for paired claims
    latency_ms: dict[int, float] = field(default_factory=dict)  # batch size -> ms, timed on the first seed only

    def columns(self) -> dict[str, float]:
        """What a table shows of it: accuracy, cost and latency columns."""
        return {"top1": self.top1, "top5": self.top5, "params_M": self.params_M, "macs_M": self.macs_M,
                **{f"latency_bs{bs}_ms": ms for bs, ms in self.latency_ms.items()}}


@dataclass
class SeedRecord:
    """What one seed's share of a stage produced."""

    models: dict[str, Measured] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # rows naming their model by "label"
    files: list[str] = field(default_factory=list)  # written into the run folder (relative paths)
    saved: dict[str, str] = field(default_factory=dict)  # label -> the file in the seed folder holding that model
    skipped: dict[str, str] = field(default_factory=dict)  # label -> why the model was not built
    finetune: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> {"file", "method"}: offered
    extra: dict[str, Any] = field(default_factory=dict)  # anything else the stage's figures need

    def measure(self, label: str, measured: Measured) -> str:
        self.models[label] = measured
        return label

    def save(self, seed_dir: str | Path, label: str, filename: str) -> str:
        """Note that `label`'s model is in `filename` of the seed folder (the file is the job's to write)."""
        self.saved[label] = filename
        self.files.append(f"{Path(seed_dir).name}/{filename}")
        return filename


@dataclass
class StageRecord:
    """A finished stage: every seed's record, its prose, figures and the files it owns."""

    stage: str
    params: str
    seeds: dict[int, SeedRecord]
    summary: str = ""
    captions: dict[str, str] = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)  # published figure/table file -> content digest
    outputs: dict[str, str] = field(default_factory=dict)  # run-folder file -> content digest
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def model(self, label: str, seed: int) -> Measured:
        """The measured model `label` of `seed`; UnknownModel naming it (and the stage's labels) if absent."""
        record = self.seeds.get(seed)
        if record is None:
            raise UnknownModel(f"{self.stage} has no seed {seed} (it ran seeds {', '.join(map(str, self.seeds))})")
        if label not in record.models:
            known = ", ".join(sorted(record.models)) or "none"
            raise UnknownModel(f"{self.stage} recorded no model '{label}' for seed {seed}; it recorded: {known}")
        return record.models[label]

    def model_file(self, label: str, seed: int) -> str:
        """The file (in the seed's folder) that holds model `label`; UnknownModel if this stage saved none."""
        saved = self.seeds[seed].saved if seed in self.seeds else {}
        if label not in saved:
            raise UnknownModel(f"{self.stage} saved no model '{label}' for seed {seed}; it saved: "
                               f"{', '.join(sorted(saved)) or 'none'}")
        return saved[label]

    def skipped(self, label: str) -> str | None:
        """Why the stage did not build `label` (on any seed), or None."""
        return next((r.skipped[label] for r in self.seeds.values() if label in r.skipped), None)

    def frame(self, table: str) -> pd.DataFrame:
        """One row per seed and row of `table` (see `table_frame`)."""
        return table_frame(self.seeds, table)

    def models_frame(self, labels: list[str] | None = None) -> pd.DataFrame:
        """One row per seed and model (see `models_frame`)."""
        return models_frame(self.seeds, labels)


def table_frame(seeds: dict[int, SeedRecord], table: str) -> pd.DataFrame:
    """One row per seed and row of `table`, a `seed` column first, each row's model columns joined by its label."""
    rows = []
    for seed, record in seeds.items():
        for row in record.tables.get(table, []):
            measured = record.models[row["label"]].columns() if row.get("label") in record.models else {}
            rows.append({"seed": seed, **row, **measured})
    return pd.DataFrame(rows)


def models_frame(seeds: dict[int, SeedRecord], labels: list[str] | None = None) -> pd.DataFrame:
    """One row per seed and model (a `label` column), restricted to `labels` (in that order) where given."""
    return pd.DataFrame([{"seed": seed, "label": label, **record.models[label].columns()}
                         for seed, record in seeds.items()
                         for label in (labels if labels is not None else record.models) if label in record.models])


def write_record(path: Path, record: StageRecord) -> None:
    """The record as JSON, atomically."""
    write_json(path, dataclasses.asdict(record))


def read_record(path: Path) -> StageRecord:
    """A record written by `write_record`; MissingStageError naming the file if it is unreadable."""
    try:
        raw = json.loads(Path(path).read_text())
        seeds = {int(seed): _seed_record(r) for seed, r in raw.pop("seeds").items()}
        return StageRecord(seeds=seeds, **raw)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise MissingStageError(f"stage record '{path}' cannot be read ({type(err).__name__}: {err}); run that "
                                "stage again (vitprune reproduce ... --only N)") from None


def _seed_record(raw: dict[str, Any]) -> SeedRecord:
    models = {label: Measured(**{**m, "latency_ms": {int(bs): ms for bs, ms in m.get("latency_ms", {}).items()}})
              for label, m in raw.pop("models").items()}
    return SeedRecord(models=models, **raw)

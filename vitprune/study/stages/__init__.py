"""The study's stages, one registration line each.

A stage is three things: its notebook `notebooks/<name>.ipynb`, its module here (its per-seed jobs,
tables, prose and claims) and one line below naming the stages whose records it reads and the
parameters it reads — sections such as "train" or keys such as "decompose.source_ratio". The pipeline
re-runs a stage when a record it reads changes or a parameter it declares changes, and a stage that
reads a parameter it did not declare is stopped with an error naming this file (`Stage.p` is guarded),
so the cache cannot go stale silently. The stage list, the dependency table, the report and the
README block follow from these lines, for any number of stages.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from vitprune.errors import ParamsError

EARLIER = ("*",)  # reads: every stage registered before it
EVERYTHING = ("*",)  # params: the whole parameter set (the report shows it all)


@dataclass(frozen=True)
class StageEntry:
    name: str  # also its notebook's file name
    module: str  # vitprune.study.stages.<module>
    reads: tuple[str, ...]  # stages whose records it reads
    params: tuple[str, ...]  # parameter sections or section.key it reads
    summary: bool = False  # its conclusion is the study's summary (the README quotes it)
    options: dict[str, Any] = field(default_factory=dict)  # what a module serving several stages tells them apart by

    def load(self) -> ModuleType:
        return importlib.import_module(f"{__name__}.{self.module}")


class StageRegistry:
    """The stages in pipeline order."""

    def __init__(self) -> None:
        self._entries: dict[str, StageEntry] = {}

    def add(self, name: str, module: str, reads: tuple[str, ...] = (), params: tuple[str, ...] = (),
            summary: bool = False, **options: Any) -> None:
        earlier = tuple(self._entries)
        reads = earlier if reads == EARLIER else tuple(reads)
        unknown = [r for r in reads if r not in self._entries]
        if unknown:
            raise ParamsError(f"stage {name} reads {unknown}, which are not registered before it")
        self._entries[name] = StageEntry(name, module, reads, tuple(params), summary, options)

    def __getitem__(self, name: str) -> StageEntry:
        if name not in self._entries:
            raise ParamsError(f"unknown stage {name!r}; accepted: {', '.join(self._entries)}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def summary_stage(self) -> StageEntry:
        return next(e for e in self if e.summary)

    def with_option(self, **options: Any) -> list[StageEntry]:
        """The stages registered with these options (e.g. family="QR")."""
        return [e for e in self if all(e.options.get(k) == v for k, v in options.items())]


STAGES = StageRegistry()
STAGES.add("01_sparse_training", "sparse_training", params=("data", "model", "train", "sparse"))
STAGES.add("02_scoring", "scoring", reads=("01_sparse_training",), params=("data", "train", "sparse", "prune"))
STAGES.add("03_pruning", "pruning", reads=("01_sparse_training", "02_scoring"),
           params=("data", "train", "prune", "bench", "decompose.source_ratio"))
DECOMPOSING = ("data", "train", "decompose", "bench")
STAGES.add("04_svd", "decompositions", reads=("03_pruning",), params=DECOMPOSING, family="SVD")
STAGES.add("05_qr", "decompositions", reads=("03_pruning",), params=DECOMPOSING, family="QR")
STAGES.add("06_lu", "decompositions", reads=("03_pruning",), params=DECOMPOSING, family="LU")
STAGES.add("07_equal_budget", "equal_budget", reads=("01_sparse_training", "02_scoring", "03_pruning"),
           params=("data", "train", "prune", "decompose", "budget"))
STAGES.add("08_finetuning", "finetuning", reads=EARLIER, params=("data", "train", "finetune", "decompose.methods"))
STAGES.add("09_comparison", "comparison", reads=EARLIER, params=EVERYTHING, summary=True)

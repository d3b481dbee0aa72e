"""One registry per kind of thing: decomposition methods, importance criteria, gate sites.

Each entry is declared once, beside its algorithm (`decompose.py`, `scoring.py`, `gates.py`), with
everything the rest of vitprune needs to know about it: its name, its family, a human label, what it
needs (calibration statistics, gradients), whether the study fine-tunes it and which claims it
enters. Parameter validation, the CLI, the study's tables, figure styles and claims all read these
registries, as timm finds every model by its registered name; adding a method is one entry.

A user's own method works the same way from outside the package (`plugins:` in a parameter set
names the modules to import first)::

    @vp.register_decomposition("qr_cholesky", family="QR", label="Cholesky QR", claims=("sun",))
    def qr_cholesky(w, rank, stats):
        ...
        return a, b  # w ~= b @ a

Nothing here imports torch, so names can be checked cheaply.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from vitprune.errors import ParamsError

# the statistics a data-aware factorization may ask `calibration.calibration_statistics` for
CALIBRATION_STATS = ("gram", "abs_mean", "row_fisher")
# the decomposition families the study compares, in the order of its notebooks (04 SVD, 05 QR, 06 LU)
FAMILIES = ("SVD", "QR", "LU")


@dataclass(frozen=True)
class Decomposition:
    """A factorization W ≈ B·A of one weight matrix."""

    name: str
    family: str  # "SVD", "QR" or "LU": the notebook that studies it (04, 05, 06)
    label: str  # what a reader calls it, in tables, figures and claims
    factorize: Callable[..., Any]  # (w, rank, stats) -> (A: rank x in, B: out x rank); stats: {needs[i]: tensor}
    needs: tuple[str, ...] = ()  # calibration statistics (CALIBRATION_STATS) it cannot do without
    finetune: bool = True  # fine-tuned by the study unless finetune.methods says otherwise
    claims: tuple[str, ...] = ()  # claim families it enters: sun, refit, pivoting, data_aware
    improves_on: str | None = None  # the method a "pivoting" or "data_aware" claim says it beats

    @property
    def calibrated(self) -> bool:
        return bool(self.needs)


@dataclass(frozen=True)
class Criterion:
    """An importance criterion: one score per block, gate site and dimension."""

    name: str
    label: str
    score: Callable[..., Any]  # (model, batches, sites, seed) -> {(block, site): tensor}
    needs: tuple[str, ...] = ()  # "gates" (a sparse-trained model) or "batches" (labelled calibration data)


@dataclass(frozen=True)
class Site:
    """A VTP gate site: the feature dimension of a block that a gate multiplies."""

    name: str
    label: str
    owner: str  # "attn" or "mlp": the block child that holds the gate
    gate: str  # the gate parameter's attribute name on that child
    removes: str  # what pruning one of its dims removes
    width: Callable[[Any, Any], int]  # (block.attn, block.mlp) -> how many dims the site has in that block
    head_grouped: bool = False  # its dims are grouped by attention head
    default: bool = False  # one of VTP's four sites


E = TypeVar("E")


class Registry(Generic[E]):
    """Named entries of one kind, in registration order; a clear error for a name that is not there."""

    def __init__(self, kind: str, where: str, order: Callable[[Any], Any] | None = None):
        self.kind, self.where, self._order = kind, where, order
        self._entries: dict[str, E] = {}

    def add(self, entry: E) -> E:
        name = entry.name
        if not isinstance(name, str) or not name.isidentifier():
            raise ParamsError(f"{self.kind} name {name!r} is not accepted; accepted: a Python identifier")
        if name in self._entries:
            raise ParamsError(f"{self.kind} '{name}' is registered twice; give each {self.kind} one name")
        self._entries[name] = entry
        return entry

    def __getitem__(self, name: str) -> E:
        self._load()
        if name not in self._entries:
            raise ParamsError(f"unknown {self.kind} {name!r}; accepted: {', '.join(self.names())}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[E]:
        self._load()
        entries = list(self._entries.values())
        return iter(sorted(entries, key=self._order) if self._order else entries)  # sorted() is stable

    def names(self, **where: Any) -> tuple[str, ...]:
        """Registered names in order, of the entries whose fields equal `where` (e.g. family="QR")."""
        return tuple(e.name for e in self if all(getattr(e, k) == v for k, v in where.items()))

    def _load(self) -> None:
        importlib.import_module(self.where)  # the built-in entries register on import


def _family_rank(entry: Decomposition) -> int:
    return FAMILIES.index(entry.family) if entry.family in FAMILIES else len(FAMILIES)


DECOMPOSITIONS: Registry[Decomposition] = Registry("decomposition method", "vitprune.decompose", order=_family_rank)
CRITERIA: Registry[Criterion] = Registry("importance criterion", "vitprune.scoring")
SITES: Registry[Site] = Registry("gate site", "vitprune.gates")


def register_decomposition(name: str, *, family: str, label: str, needs: tuple[str, ...] = (),
                           finetune: bool = True, claims: tuple[str, ...] = (),
                           improves_on: str | None = None) -> Callable:
    """Decorator: register `fn(w, rank, stats) -> (A, B)` as a decomposition method."""
    unknown = [n for n in needs if n not in CALIBRATION_STATS]
    if unknown:
        raise ParamsError(f"decomposition '{name}' needs {unknown}; accepted: {', '.join(CALIBRATION_STATS)}")

    def add(fn: Callable) -> Callable:
        DECOMPOSITIONS.add(Decomposition(name, family, label, fn, tuple(needs), finetune, tuple(claims), improves_on))
        return fn

    return add


def register_criterion(name: str, *, label: str, needs: tuple[str, ...] = ()) -> Callable:
    """Decorator: register `fn(model, batches, sites, seed) -> scores` as an importance criterion."""
    def add(fn: Callable) -> Callable:
        CRITERIA.add(Criterion(name, label, fn, tuple(needs)))
        return fn

    return add


def import_plugins(modules: list[str] | tuple[str, ...]) -> None:
    """Import the modules a parameter set names under `plugins` (they register their own entries)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ParamsError(f"plugins: module '{module}' cannot be imported ({err}); accepted: importable module "
                              "names (on PYTHONPATH) that register methods or criteria") from None

"""Low-rank factorization of a model's linear projections (Sun 2023 and beyond).

``factorize(W, method, rank)`` returns ``(A, B)`` with ``W ~= B @ A`` (A: rank x in, B: out x rank)
by any registered method: the SVD family is registered here, the QR and LU algorithms in `linalg`;
`decompose_model` replaces a model's projections by `FactorizedLinear` layers at ranks chosen by
rank, rank ratio, energy or a global parameter budget, where that saves parameters.
"""

from __future__ import annotations

import copy
import heapq
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from vitprune.calibration import calibration_statistics, input_grams
from vitprune.errors import DecomposeError, ParamsError
from vitprune.layers import FactorizedLinear
from vitprune.linalg import check_matrix, check_rank
from vitprune.names import LAYERS
from vitprune.registry import DECOMPOSITIONS, register_decomposition
from vitprune.speed import break_even_rank, tokens_per_image

ASVD_ALPHA = 0.5  # ASVD's exponent on the mean |x| per input feature (Yuan et al. 2023)

__all__ = ["decompose_model", "decomposition_report", "factorize", "input_grams", "target_linears"]

# ---------------------------------------------------------------- factorize

def _svd_factors(w: torch.Tensor, rank: int, randomized: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if randomized:
        u, s, v = torch.svd_lowrank(w, q=min(rank + 10, min(w.shape)), niter=4)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].T
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    root = s.sqrt()
    return root[:, None] * vh, u * root  # balanced: A = sqrt(S) V^T, B = U sqrt(S)


def _whitener(gram: torch.Tensor) -> torch.Tensor:
    """Cholesky factor L of the (damped) activation Gram matrix, G = L L^T."""
    g = gram.double()
    damp = 1e-6 * g.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(len(g), dtype=g.dtype, device=g.device)
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(g + damp * eye)
        if info == 0:
            return chol
        damp *= 10
    raise DecomposeError("calibration Gram matrix is not positive definite even after damping")


def _weighted_svd(w: torch.Tensor, rank: int, left: torch.Tensor | None, right: torch.Tensor | None,
                  randomized: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of diag(left) W diag(right), mapped back: minimises ||diag(left) (W − BA) diag(right)||_F."""
    m = w.double()
    left = None if left is None else _positive(left.double())
    right = None if right is None else _positive(right.double())
    if left is not None:
        m = left[:, None] * m
    if right is not None:
        m = m * right[None, :]
    a, b = _svd_factors(m, rank, randomized)
    if left is not None:
        b = b / left[:, None]
    if right is not None:
        a = a / right[None, :]
    return a.to(w.dtype), b.to(w.dtype)


def _positive(weights: torch.Tensor) -> torch.Tensor:
    """Weights kept strictly positive (a floor of 1e-6 of their mean), so the weighting can be undone."""
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise DecomposeError("calibration weights must be finite and non-negative")
    return weights.clamp_min(1e-6 * float(weights.mean().clamp_min(1e-300)))


@register_decomposition("svd", family="SVD", label="SVD")
def _svd(w: torch.Tensor, rank: int, randomized: bool = False, **_) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD: optimal in the Frobenius and spectral norms (Eckart–Young)."""
    return _svd_factors(w, rank, randomized)


@register_decomposition("svd_activation", family="SVD", label="activation-aware SVD", needs=("gram",),
                        claims=("data_aware",), improves_on="svd")
def _svd_activation(w: torch.Tensor, rank: int, gram: torch.Tensor, randomized: bool = False,
                    **_) -> tuple[torch.Tensor, torch.Tensor]:
    """Whitened by the inputs' Gram matrix: truncation minimises the output error ||(W - BA) X||."""
    chol = _whitener(gram)
    a, b = _svd_factors((w.double() @ chol), rank, randomized)
    a = torch.linalg.solve_triangular(chol.T, a.T, upper=True, left=True).T  # A L^{-1}
    return a.to(w.dtype), b.to(w.dtype)


@register_decomposition("svd_fisher", family="SVD", label="Fisher-weighted SVD", needs=("row_fisher",),
                        finetune=False, claims=("data_aware",), improves_on="svd")
def _svd_fisher(w: torch.Tensor, rank: int, row_fisher: torch.Tensor, randomized: bool = False,
                **_) -> tuple[torch.Tensor, torch.Tensor]:
    """FWSVD: rows weighted by their Fisher information, minimises ||diag(sqrt F) (W - BA)||."""
    return _weighted_svd(w, rank, row_fisher.double().sqrt(), None, randomized)


@register_decomposition("svd_scaled", family="SVD", label="ASVD-style scaled SVD", needs=("abs_mean",),
                        finetune=False, claims=("data_aware",), improves_on="svd")
def _svd_scaled(w: torch.Tensor, rank: int, abs_mean: torch.Tensor, randomized: bool = False,
                **_) -> tuple[torch.Tensor, torch.Tensor]:
    """ASVD: columns scaled by the inputs' mean |x|^0.5, minimises ||(W - BA) diag(|x|^0.5)||."""
    return _weighted_svd(w, rank, None, abs_mean.double().abs() ** ASVD_ALPHA, randomized)


def factorize(w: torch.Tensor, method: str, rank: int, randomized: bool = False,
              **stats: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors (A: rank x in, B: out x rank) with W ~= B @ A, by a registered method.

    The data-aware methods need calibration statistics (`calibration.calibration_statistics`), given by
    name: ``svd_activation`` the inputs' Gram matrix ``gram=``, ``svd_fisher`` the rows' Fisher
    information ``row_fisher=``, ``svd_scaled`` the inputs' mean |x| per feature ``abs_mean=``.
    """
    try:
        entry = DECOMPOSITIONS[method]
    except ParamsError as err:
        raise DecomposeError(str(err)) from None
    check_matrix(w)
    check_rank(rank, w)
    missing = [need for need in entry.needs if stats.get(need) is None]
    if missing:
        raise DecomposeError(f"method '{method}' needs calibration data: pass {', '.join(f'{m}=' for m in missing)} "
                             "(or calibration= to decompose_model)")
    given = {name: value for name, value in stats.items() if value is not None}
    return entry.factorize(w, rank, randomized=randomized, **given)


# ---------------------------------------------------------------- layers and models

def saves_params(in_f: int, out_f: int, rank: int) -> bool:
    """A factorized layer replaces the dense one only where it has fewer weights."""
    return rank * (in_f + out_f) < in_f * out_f


def rank_for_ratio(ratio: float, in_f: int, out_f: int) -> int:
    """The rank a rank ratio (rank / min(in, out)) gives a layer: at least 1."""
    return max(1, round(ratio * min(in_f, out_f)))


def factorized_layer(layer: nn.Linear, method: str, rank: int, stats: dict[str, torch.Tensor] | None = None,
                     randomized: bool = False, refit: bool = False) -> FactorizedLinear:
    """`layer` as a FactorizedLinear of `rank` by `method` (calibration `stats` where it needs them); with refit,
    the method's A is kept and B refitted by least squares on the calibration inputs (stats["gram"])."""
    w = layer.weight.detach()
    stats = stats or {}
    a, b = factorize(w.double(), method, rank, randomized=randomized,
                     **{name: stats.get(name) for name in DECOMPOSITIONS[method].needs})
    if refit:
        b = refit_second_factor(w, a, b, stats["gram"])
    return FactorizedLinear.from_factors(a.to(w.dtype), b.to(w.dtype), layer.bias).to(w.device)


def replace_layer(model: nn.Module, name: str, layer: nn.Module) -> nn.Module:
    """Put `layer` at the qualified module name `name` of `model` (in place); returns the layer it replaced."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, attr)
    setattr(parent, attr, layer)
    return old


def target_linears(model: nn.Module, layers: Iterable[str] = LAYERS) -> dict[str, nn.Linear]:
    """{qualified name: Linear} for the chosen projections of every transformer block."""
    layers = tuple(layers)
    for name in layers:
        if name not in LAYERS:
            raise DecomposeError(f"unknown layer {name!r}; accepted: {', '.join(LAYERS)}")
    out = {}
    for i, block in enumerate(model.blocks):
        for name in layers:
            parent = block.attn if name in ("qkv", "proj") else block.mlp
            mod = getattr(parent, name)
            if isinstance(mod, nn.Linear):
                out[f"blocks.{i}.{'attn' if parent is block.attn else 'mlp'}.{name}"] = mod
    return out


def _energy_rank(s: torch.Tensor, energy: float) -> int:
    cum = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum().clamp_min(1e-300)
    return int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12).item()) + 1


def allocate_ranks(spectra: dict[str, tuple[torch.Tensor, int, int]], budget: int) -> dict[str, int]:
    """Greedy global rank allocation under a parameter budget.

    Each step adds the rank unit that removes the most relative squared error per parameter
    (sigma_i^2 / ||W||^2 / (in + out)); a layer whose rank reaches break-even stays dense.
    """
    ranks = {name: 0 for name in spectra}
    heap = []
    for name, (s, in_f, out_f) in spectra.items():
        total = float((s.double() ** 2).sum()) or 1.0
        heap.append((-float(s[0] ** 2) / total / (in_f + out_f), name))
    heapq.heapify(heap)
    used = 0
    while heap:
        gain, name = heapq.heappop(heap)
        s, in_f, out_f = spectra[name]
        if used + in_f + out_f > budget:
            continue
        ranks[name] += 1
        used += in_f + out_f
        r = ranks[name]
        if r < len(s) and saves_params(in_f, out_f, r + 1):
            total = float((s.double() ** 2).sum()) or 1.0
            heapq.heappush(heap, (-float(s[r] ** 2) / total / (in_f + out_f), name))
    return ranks


def choose_ranks(linears: dict[str, nn.Linear], rank: int | None = None, rank_ratio: float | None = None,
                 energy: float | None = None, param_budget: float | None = None,
                 ranks: dict[str, int] | None = None) -> dict[str, int]:
    """Per-layer ranks from exactly one of rank, rank_ratio (rank / min(in, out)), energy, param_budget or
    ranks (explicit per-layer ranks, e.g. from `allocation.allocate`; layers not named stay dense)."""
    given = {k: v for k, v in dict(rank=rank, rank_ratio=rank_ratio, energy=energy, param_budget=param_budget,
                                   ranks=ranks).items() if v is not None}
    if len(given) != 1:
        raise DecomposeError("give exactly one of rank, rank_ratio, energy, param_budget, ranks "
                             f"(got {sorted(given) or 'none'})")
    key, value = next(iter(given.items()))
    if key == "ranks":
        unknown = sorted(set(value) - set(linears))
        if unknown:
            raise DecomposeError(f"ranks names layers that are not projections here: {', '.join(unknown)}")
        for name, r in value.items():
            check_rank(r, linears[name].weight)
        return dict(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DecomposeError(f"{key} must be a finite number, got {value!r}")
    shapes = {n: (m.in_features, m.out_features) for n, m in linears.items()}
    if key == "rank":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DecomposeError(f"rank must be a positive int, got {value!r}")
        return {n: min(value, min(s)) for n, s in shapes.items()}
    if key == "rank_ratio":
        if not 0 < value <= 1:
            raise DecomposeError(f"rank_ratio must be in (0, 1], got {value!r}")
        return {n: rank_for_ratio(value, *s) for n, s in shapes.items()}
    spectra = {n: torch.linalg.svdvals(m.weight.detach().double()) for n, m in linears.items()}
    if key == "energy":
        if not 0 < value <= 1:
            raise DecomposeError(f"energy must be in (0, 1], got {value!r}")
        return {n: _energy_rank(s, value) for n, s in spectra.items()}
    dense = sum(i * o for i, o in shapes.values())
    budget = int(value * dense) if isinstance(value, float) and value <= 1 else int(value)
    if budget < 1:
        raise DecomposeError(f"param_budget must be a fraction in (0, 1] or a parameter count >= 1, got {value!r}")
    ranks = allocate_ranks({n: (spectra[n], *shapes[n]) for n in linears}, budget)
    return {n: r for n, r in ranks.items() if r > 0}


def rank_decisions(model: nn.Module, rank: int | None = None, rank_ratio: float | None = None,
                   energy: float | None = None, param_budget: float | None = None, layers: Iterable[str] = LAYERS,
                   only_if_faster: bool = False, batches: Iterable[int] = (1, 8), threads: int = 2,
                   ranks: dict[str, int] | None = None, runtime: str = "torch") -> list[dict[str, Any]]:
    """Per layer: the chosen rank, whether it saves parameters, and (with only_if_faster) whether two matmuls at
    that rank beat one on `runtime` here at every batch size in `batches` (`speed.break_even_rank`), so the
    factorized model is never slower than its source; `factorize` says which."""
    linears = target_linears(model, layers)
    chosen = choose_ranks(linears, rank, rank_ratio, energy, param_budget, ranks)
    rows = []
    for name, r in chosen.items():
        in_f, out_f = linears[name].in_features, linears[name].out_features
        row = {"layer": name, "in": in_f, "out": out_f, "rank": r, "saves_params": saves_params(in_f, out_f, r)}
        if only_if_faster:
            row["break_even_rank"] = min(break_even_rank(in_f, out_f, b * tokens_per_image(model), threads,
                                                         runtime=runtime) for b in batches)
        row["factorize"] = row["saves_params"] and (not only_if_faster or r <= row["break_even_rank"])
        rows.append(row)
    return rows


@torch.no_grad()
def output_error(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gram: torch.Tensor) -> float:
    """||(W - B A) X||_F^2 over calibration inputs X, from their Gram matrix G = X^T X (float64)."""
    d = w.double() - b.double() @ a.double()
    return float(torch.einsum("oi,ij,oj->", d, gram.double(), d))


def refit_second_factor(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gram: torch.Tensor,
                        ridge: float = 1e-6) -> torch.Tensor:
    """Keep A and refit B = argmin ||(W - B A) X||^2 + ridge * mean(diag(A G A^T)) * ||B||^2 (float64).

    Closed form B = W G A^T (A G A^T + lambda I)^-1, from the inputs' Gram matrix alone (in x in), so it
    fits in memory at any calibration size. The given B is returned where the fit would not lower the
    calibration output error, so refitting never makes it worse.
    """
    w, a, g = w.double(), a.double(), gram.double()
    ag = a @ g  # (r, in)
    lhs = ag @ a.T  # (r, r) = A G A^T
    damp = ridge * lhs.diagonal().mean().clamp_min(1e-300)
    eye = torch.eye(len(lhs), dtype=lhs.dtype, device=lhs.device)
    refit = torch.linalg.solve(lhs + damp * eye, ag @ w.T).T  # (out, r) = W G A^T (A G A^T + lambda I)^-1
    if not torch.isfinite(refit).all() or output_error(w, a, refit, g) > output_error(w, a, b, g):
        return b
    return refit.to(b.dtype)


@torch.no_grad()
def decompose_model(model: nn.Module, method: str, rank: int | None = None, rank_ratio: float | None = None,
                    energy: float | None = None, param_budget: float | None = None,
                    layers: Iterable[str] = LAYERS, calibration: Iterable | None = None,
                    randomized: bool = False, only_if_faster: bool = False, refit: bool = False,
                    ranks: dict[str, int] | None = None, runtime: str = "torch",
                    batches: Iterable[int] = (1, 8)) -> nn.Module:
    """A copy of `model` with the chosen projections factorized where that saves parameters (and, with
    only_if_faster, where two matmuls at that rank measure faster than one on `runtime` here, at every batch
    size of `batches`: the model is then never slower than its source). With
    refit=True (needs calibration), each layer keeps its method's first factor A and refits B by least
    squares on the calibration inputs, B = argmin ||W X - B A X||."""
    try:
        entry = DECOMPOSITIONS[method]
    except ParamsError as err:
        raise DecomposeError(str(err)) from None
    if (entry.calibrated or refit) and calibration is None:
        what = f"method '{method}'" if entry.calibrated else "refit=True"
        raise DecomposeError(f"{what} needs calibration data: pass calibration=<batches or loader>")
    factorized = [name for name, m in model.named_modules() if isinstance(m, FactorizedLinear)
                  and name.rsplit(".", 1)[-1] in tuple(layers)]
    if factorized:
        raise DecomposeError(f"the model is already factorized ({len(factorized)} projections, e.g. {factorized[0]}); "
                             "accepted: the dense or pruned model it came from (a factor pair is not factorized "
                             "again)")
    new = copy.deepcopy(model)
    linears = target_linears(new, layers)
    decisions = rank_decisions(new, rank, rank_ratio, energy, param_budget, layers, only_if_faster, batches,
                               ranks=ranks, runtime=runtime)
    chosen = {d["layer"]: d["rank"] for d in decisions if d["factorize"]}
    stats = calibration_statistics(new, chosen, calibration, fisher="row_fisher" in entry.needs) \
        if entry.calibrated or refit else {}
    for name, r in chosen.items():
        replace_layer(new, name, factorized_layer(linears[name], method, r, stats.get(name), randomized, refit))
    return new


@torch.no_grad()
def densify(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """A copy of `model` with the named FactorizedLinear layers multiplied out into one Linear (W = B·A): the same
    function, one matmul instead of two — where two matmuls run slower than one (see `slow_layers`)."""
    new = copy.deepcopy(model)
    for name in names:
        layer = new.get_submodule(name)
        if not isinstance(layer, FactorizedLinear):
            raise DecomposeError(f"'{name}' is a {type(layer).__name__}, not a factorized layer; nothing to densify")
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None).to(layer.weight.device)
        dense.weight.copy_(layer.weight)
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
        replace_layer(new, name, dense)
    return new


def slow_layers(model: nn.Module, batches: Iterable[int] = (1, 8), threads: int = 2,
                runtime: str = "torch") -> list[str]:
    """The factorized layers of `model` whose rank lies above their measured break-even (`speed.break_even_rank`)
    at some batch size of `batches` on `runtime`: there two matmuls are slower than the one they replace."""
    tokens = [b * tokens_per_image(model) for b in batches]
    return [name for name, layer in model.named_modules() if isinstance(layer, FactorizedLinear)
            and any(layer.rank > break_even_rank(layer.in_features, layer.out_features, t, threads, runtime=runtime)
                    for t in tokens)]


def decomposition_report(model: nn.Module, decomposed: nn.Module) -> list[dict[str, Any]]:
    """Per-layer rank and relative Frobenius reconstruction error of a decomposed model."""
    rows = []
    for name, mod in decomposed.named_modules():
        if isinstance(mod, FactorizedLinear):
            w = model.get_submodule(name).weight.detach().double()
            err = torch.linalg.matrix_norm(w - mod.weight.detach().double()) / torch.linalg.matrix_norm(w)
            rows.append({"layer": name, "in": mod.in_features, "out": mod.out_features, "rank": mod.rank,
                         "rel_error": float(err)})
    return rows


@torch.no_grad()
def same_up_to_signs(model_a: nn.Module, model_b: nn.Module) -> bool:
    """Whether two models hold bitwise the same weights, each factorized layer's factor pairs (row j of A with
    column j of B) allowed to differ in sign — the same function, and, since training (AdamW, clipping, weight
    decay) is equivariant to those flips, the same fine-tuning."""
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    if state_a.keys() != state_b.keys() or any(state_a[k].shape != state_b[k].shape for k in state_a):
        return False
    flips = {}
    for name, layer in model_b.named_modules():
        if isinstance(layer, FactorizedLinear):
            a_other = model_a.get_submodule(name).first.weight
            flips[f"{name}.first.weight"] = torch.where((a_other * layer.first.weight).sum(1) < 0, -1.0, 1.0)[:, None]
            flips[f"{name}.second.weight"] = flips[f"{name}.first.weight"].T
    return all(torch.equal(state_a[k], state_b[k] * flips[k].to(state_b[k].dtype) if k in flips else state_b[k])
               for k in state_a)

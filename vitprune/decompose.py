"""Matrix decompositions of linear projections (Sun 2023 and beyond).

The four QR algorithms (Householder, classical and modified Gram-Schmidt, Givens), column-pivoted
QR and LU with partial or complete pivoting are written here as vectorised tensor code, because
*how* each algorithm orthogonalises is the subject of the comparison; SVD uses LAPACK.
``factorize(W, method, rank)`` returns ``(A, B)`` with ``W ~= B @ A``.
"""

from __future__ import annotations

import copy
import heapq
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

METHODS = ("svd", "svd_activation", "qr_householder", "qr_cgs", "qr_mgs", "qr_givens", "qr_pivoted", "lu",
           "lu_complete")
QR_METHODS = ("qr_householder", "qr_cgs", "qr_mgs", "qr_givens")
LAYERS = ("qkv", "proj", "fc1", "fc2")


class DecomposeError(ValueError):
    """Bad input to a decomposition; the message names the value and what is accepted."""


# ---------------------------------------------------------------- checks

def _check_matrix(w: torch.Tensor, name: str = "W") -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise DecomposeError(f"{name} must be a 2-D tensor, got shape {shape}")
    if not w.is_floating_point():
        raise DecomposeError(f"{name} must be float32 or float64, got {w.dtype}")
    if not torch.isfinite(w).all():
        raise DecomposeError(f"{name} has NaN or infinite entries; decompositions need finite weights")


def _check_rank(rank: int, w: torch.Tensor) -> None:
    k = min(w.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= k:
        raise DecomposeError(f"rank {rank!r} is invalid for a {tuple(w.shape)} matrix; accepted: an int in [1, {k}]")


def _check_method(method: str, accepted: Iterable[str] = METHODS) -> None:
    if method not in accepted:
        raise DecomposeError(f"unknown method {method!r}; accepted: {', '.join(accepted)}")


# ---------------------------------------------------------------- QR algorithms

def _householder_vector(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v (v[0] = 1), tau and beta with (I - tau v v^T) x = beta e1 (LAPACK's dlarfg convention)."""
    alpha, sigma = x[0], x[1:].square().sum()
    norm = torch.sqrt(alpha * alpha + sigma)
    if sigma == 0:
        return torch.cat([torch.ones_like(x[:1]), torch.zeros_like(x[1:])]), x.new_zeros(()), alpha
    beta = -torch.copysign(norm, alpha)
    v = x / (alpha - beta)
    v[0] = 1.0
    return v, (beta - alpha) / beta, beta


def _qr_householder(a: torch.Tensor, k: int, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked Householder QR (compact WY, as LAPACK's geqrf/orgqr): panels of reflectors, matmul updates."""
    m, n = a.shape
    r = a.clone()
    vs, ts = [], []
    for p0 in range(0, k, block):
        p1 = min(p0 + block, k)
        v_panel = a.new_zeros(m - p0, p1 - p0)
        taus = a.new_zeros(p1 - p0)
        for j in range(p0, p1):  # unblocked panel: reflectors applied to the panel columns only
            v, tau, beta = _householder_vector(r[j:, j])
            v_panel[j - p0:, j - p0] = v
            taus[j - p0] = tau
            if j + 1 < p1:
                cols = r[j:, j + 1:p1]
                cols -= tau * torch.outer(v, v @ cols)
            r[j, j] = beta
            r[j + 1:, j] = 0
        t = _wy_t(v_panel, taus)
        if p1 < n:  # trailing update with the block reflector I - V T V^T (transposed)
            trail = r[p0:, p1:]
            trail -= v_panel @ (t.T @ (v_panel.T @ trail))
        vs.append((p0, v_panel))
        ts.append(t)
    q = a.new_zeros(m, k)
    q[:k, :k] = torch.eye(k, dtype=a.dtype, device=a.device)
    for (p0, v_panel), t in zip(reversed(vs), reversed(ts)):  # Q = H_1 ... H_k applied to I[:, :k]
        sub = q[p0:, p0:]
        sub -= v_panel @ (t @ (v_panel.T @ sub))
    return q, torch.triu(r[:k])


def _wy_t(v: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """Upper-triangular T with H_1 ... H_b = I - V T V^T (LAPACK dlarft, forward columnwise)."""
    b = len(taus)
    t = v.new_zeros(b, b)
    gram = v.T @ v
    for j in range(b):
        t[j, j] = taus[j]
        if j:
            t[:j, j] = -taus[j] * (t[:j, :j] @ gram[:j, j])
    return t


def _qr_cgs(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Classical Gram-Schmidt: each column projected against all previous q at once (no re-orthogonalisation)."""
    m, n = a.shape
    q = a.new_zeros(m, k)
    r = a.new_zeros(k, n)
    for j in range(k):
        coeffs = q[:, :j].T @ a[:, j]
        v = a[:, j] - q[:, :j] @ coeffs
        r[:j, j] = coeffs
        r[j, j] = torch.linalg.vector_norm(v)
        q[:, j] = v / r[j, j] if r[j, j] != 0 else 0.0
    if k < n:
        r[:, k:] = q.T @ a[:, k:]
    return q, r


def _qr_mgs(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Modified Gram-Schmidt: each new q is removed from all remaining columns at once (a rank-1 update)."""
    m, n = a.shape
    v = a[:, :k].clone()
    q = a.new_zeros(m, k)
    r = a.new_zeros(k, n)
    for j in range(k):
        r[j, j] = torch.linalg.vector_norm(v[:, j])
        q[:, j] = v[:, j] / r[j, j] if r[j, j] != 0 else 0.0
        if j + 1 < k:
            r[j, j + 1:k] = q[:, j] @ v[:, j + 1:]
            v[:, j + 1:] -= torch.outer(q[:, j], r[j, j + 1:k])
    if k < n:
        r[:, k:] = q.T @ a[:, k:]
    return q, torch.triu(r)


def _givens_stages(m: int, k: int) -> list[tuple[int, int, int]]:
    """Sameh-Kuck schedule: entry (i, j) is zeroed by rows (i-1, i) at stage (m-1-i) + 2j.

    The rotations of one stage touch disjoint row pairs (their rows are 2 apart), so a stage is
    one vectorised update. Returns (stage rows i from i_hi down by 2, column j_lo, count).
    """
    stages = []
    for s in range(m + k - 2):
        j_lo, j_hi = max(0, s - m + 2), min(k - 1, s // 2)  # from i <= m-1 and i > j
        if j_lo <= j_hi:
            stages.append((m - 1 - s + 2 * j_lo, j_lo, j_hi - j_lo + 1))
    return stages


def _rotate(x: torch.Tensor, top: slice, bot: slice, c: torch.Tensor, s: torch.Tensor) -> None:
    """Apply rotations [c s; -s c] to the row pairs (x[top], x[bot]) in place."""
    t, b = x[top].clone(), x[bot]
    x[top] = c * t + s * b
    x[bot] = c * b - s * t


def _qr_givens(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Givens QR in parallel sweeps: all disjoint rotations of a stage are one tensor update."""
    m, n = a.shape
    r = a.clone()
    applied = []
    for i0, j0, cnt in _givens_stages(m, k):
        # pairs t = 0..cnt-1: bottom row i0 + 2t, top row i0 + 2t - 1, column j0 + t
        bot, top = slice(i0, i0 + 2 * cnt - 1, 2), slice(i0 - 1, i0 + 2 * cnt - 2, 2)
        x = r[top, j0:j0 + cnt].diagonal()  # pair t's entries sit in column j0 + t: a diagonal view
        y = r[bot, j0:j0 + cnt].diagonal()
        h = torch.hypot(x, y)
        safe = torch.where(h == 0, torch.ones_like(h), h)
        c = torch.where(h == 0, torch.ones_like(h), x / safe).unsqueeze(1)
        s = torch.where(h == 0, torch.zeros_like(h), y / safe).unsqueeze(1)
        _rotate(r[:, j0:], top, bot, c, s)
        r[bot, j0:j0 + cnt].diagonal().zero_()  # exactly zero, not rounding noise
        applied.append((top, bot, c, s))
    q = a.new_zeros(m, k)  # Q[:, :k] = G_1^T ... G_S^T I[:, :k], accumulated backwards
    q[:k, :k] = torch.eye(k, dtype=a.dtype, device=a.device)
    for top, bot, c, s in reversed(applied):
        _rotate(q, top, bot, c, -s)
    return q, torch.triu(r[:k])


def _qr_pivoted(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Householder QR with column pivoting (Businger-Golub): A[:, perm] = Q R, |R_jj| non-increasing."""
    m, n = a.shape
    r = a.clone()
    perm = torch.arange(n, device=a.device)
    norms = r.square().sum(0)
    q = torch.eye(m, dtype=a.dtype, device=a.device)[:, :m]
    for j in range(k):
        p = j + int(torch.argmax(norms[j:]))
        if p != j:
            r[:, [j, p]] = r[:, [p, j]]
            perm[[j, p]] = perm[[p, j]]
            norms[[j, p]] = norms[[p, j]]
        v, tau, beta = _householder_vector(r[j:, j])
        sub = r[j:, j:]
        sub -= tau * torch.outer(v, v @ sub)
        r[j + 1:, j] = 0
        qs = q[:, j:]
        qs -= tau * torch.outer(qs @ v, v)
        norms[j + 1:] = r[j + 1:, j + 1:].square().sum(0)  # recomputed: exact, and cheap next to the update
    return q[:, :k], torch.triu(r[:k]), perm


def qr(w: torch.Tensor, method: str = "qr_householder", k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced QR of `w` (m x n) with one of the library's algorithms; `k` stops after k columns of Q."""
    _check_method(method, QR_METHODS + ("qr_pivoted",))
    _check_matrix(w)
    k = min(w.shape) if k is None else k
    _check_rank(k, w)
    if method == "qr_pivoted":
        q, r, perm = _qr_pivoted(w, k)
        out = torch.empty_like(r)
        out[:, perm] = r
        return q, out  # W = Q @ R with R's columns put back in W's order
    return {"qr_householder": _qr_householder, "qr_cgs": _qr_cgs, "qr_mgs": _qr_mgs,
            "qr_givens": _qr_givens}[method](w, k)


# ---------------------------------------------------------------- LU

def lu(w: torch.Tensor, k: int | None = None, complete: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated LU, W ~= L @ U with row (and, if complete, column) permutations folded in; exact at k = min(m, n)."""
    _check_matrix(w)
    m, n = w.shape
    k = min(m, n) if k is None else k
    _check_rank(k, w)
    s = w.clone()
    rows = torch.arange(m, device=w.device)
    cols = torch.arange(n, device=w.device)
    l_mat = w.new_zeros(m, k)
    u_mat = w.new_zeros(k, n)
    for j in range(k):
        if complete:
            flat = int(torch.argmax(s[j:, j:].abs()))
            pi, pj = j + flat // (n - j), j + flat % (n - j)
        else:
            pi, pj = j + int(torch.argmax(s[j:, j].abs())), j
        if pi != j:
            s[[j, pi]] = s[[pi, j]]
            rows[[j, pi]] = rows[[pi, j]]
            l_mat[[j, pi]] = l_mat[[pi, j]]
        if pj != j:
            s[:, [j, pj]] = s[:, [pj, j]]
            cols[[j, pj]] = cols[[pj, j]]
            u_mat[:, [j, pj]] = u_mat[:, [pj, j]]
        pivot = s[j, j]
        l_mat[j, j] = 1.0
        u_mat[j, j:] = s[j, j:]
        if pivot != 0:
            l_mat[j + 1:, j] = s[j + 1:, j] / pivot
        s[j + 1:, j:] -= torch.outer(l_mat[j + 1:, j], s[j, j:])
    lp = torch.empty_like(l_mat)
    lp[rows] = l_mat
    up = torch.empty_like(u_mat)
    up[:, cols] = u_mat
    return lp, up


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


def factorize(w: torch.Tensor, method: str, rank: int, gram: torch.Tensor | None = None,
              randomized: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors (A: rank x in, B: out x rank) with W ~= B @ A.

    `gram` (in x in, the calibration inputs' X^T X) is required by ``svd_activation``, whose
    truncation then minimises the output error ||X (W - BA)^T|| instead of the weight error.
    """
    _check_method(method)
    _check_matrix(w)
    _check_rank(rank, w)
    if method == "svd":
        return _svd_factors(w, rank, randomized)
    if method == "svd_activation":
        if gram is None:
            raise DecomposeError("method 'svd_activation' needs calibration data: pass gram= (or calibration= "
                                 "to decompose_model)")
        chol = _whitener(gram)
        a, b = _svd_factors((w.double() @ chol), rank, randomized)
        a = torch.linalg.solve_triangular(chol.T, a.T, upper=True, left=True).T  # A L^{-1}
        return a.to(w.dtype), b.to(w.dtype)
    if method in ("lu", "lu_complete"):
        l_mat, u_mat = lu(w, rank, complete=method == "lu_complete")
        return u_mat, l_mat
    q, r = qr(w, method, k=rank)
    return r, q


# ---------------------------------------------------------------- layers and models

class FactorizedLinear(nn.Module):
    """y = B(A x) + bias: two nn.Linear layers, the bias on the second."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    @property
    def weight(self) -> torch.Tensor:
        """The product B @ A (what the layer computes, as one matrix)."""
        return self.second.weight @ self.first.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.second.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> FactorizedLinear:
        layer = cls(a.shape[1], b.shape[0], a.shape[0], bias=bias is not None)
        with torch.no_grad():
            layer.first.weight.copy_(a)
            layer.second.weight.copy_(b)
            if bias is not None:
                layer.second.bias.copy_(bias)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def saves_params(in_f: int, out_f: int, rank: int) -> bool:
    """A factorized layer replaces the dense one only where it has fewer weights."""
    return rank * (in_f + out_f) < in_f * out_f


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


@torch.no_grad()
def input_grams(model: nn.Module, names: Iterable[str], batches: Iterable) -> dict[str, torch.Tensor]:
    """X^T X of the inputs each named Linear sees over calibration batches (float64)."""
    grams: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:
        def hook(_mod, inputs, _out, name=name):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        seen = 0
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(next(model.parameters()).device))
            seen += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not seen:
        raise DecomposeError("calibration data is empty; svd_activation needs at least one batch")
    return grams


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
                 energy: float | None = None, param_budget: float | None = None) -> dict[str, int]:
    """Per-layer ranks from exactly one of rank, rank_ratio (rank / min(in, out)), energy or param_budget."""
    given = {k: v for k, v in dict(rank=rank, rank_ratio=rank_ratio, energy=energy, param_budget=param_budget).items()
             if v is not None}
    if len(given) != 1:
        raise DecomposeError("give exactly one of rank, rank_ratio, energy, param_budget "
                             f"(got {sorted(given) or 'none'})")
    key, value = next(iter(given.items()))
    shapes = {n: (m.in_features, m.out_features) for n, m in linears.items()}
    if key == "rank":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DecomposeError(f"rank must be a positive int, got {value!r}")
        return {n: min(value, min(s)) for n, s in shapes.items()}
    if key == "rank_ratio":
        if not 0 < value <= 1:
            raise DecomposeError(f"rank_ratio must be in (0, 1], got {value!r}")
        return {n: max(1, round(value * min(s))) for n, s in shapes.items()}
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


@torch.no_grad()
def decompose_model(model: nn.Module, method: str, rank: int | None = None, rank_ratio: float | None = None,
                    energy: float | None = None, param_budget: float | None = None,
                    layers: Iterable[str] = LAYERS, calibration: Iterable | None = None,
                    randomized: bool = False) -> nn.Module:
    """A copy of `model` with the chosen projections factorized where that saves parameters."""
    _check_method(method)
    if method == "svd_activation" and calibration is None:
        raise DecomposeError("method 'svd_activation' needs calibration data: pass calibration=<batches or loader>")
    new = copy.deepcopy(model)
    linears = target_linears(new, layers)
    ranks = choose_ranks(linears, rank, rank_ratio, energy, param_budget)
    ranks = {n: r for n, r in ranks.items() if saves_params(linears[n].in_features, linears[n].out_features, r)}
    grams = input_grams(new, ranks, calibration) if method == "svd_activation" else {}
    for name, r in ranks.items():
        layer = linears[name]
        w = layer.weight.detach()
        a, b = factorize(w.double(), method, r, gram=grams.get(name), randomized=randomized)
        parent_name, _, attr = name.rpartition(".")
        setattr(new.get_submodule(parent_name), attr,
                FactorizedLinear.from_factors(a.to(w.dtype), b.to(w.dtype), layer.bias).to(w.device))
    return new


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


def orthogonality_loss(q: torch.Tensor) -> float:
    """||Q^T Q - I||_F, the loss of orthogonality of a computed Q."""
    eye = torch.eye(q.shape[1], dtype=q.dtype, device=q.device)
    return float(torch.linalg.matrix_norm(q.T @ q - eye))


def decompose_variants(model: nn.Module, methods: Iterable[str], rank_ratios: Iterable[float],
                       layers: Iterable[str], keep_ratio: float, run_dir, profile,
                       calibration: Iterable | None = None) -> list[dict[str, Any]]:
    """Decompose `model` with every method at every rank ratio; one row each (profile(model) adds accuracy,
    params, MACs, latency). The models at `keep_ratio` are saved as decomp_<method>.safetensors for fine-tuning."""
    import time
    from pathlib import Path

    from vitprune.models import save_model

    rows = []
    for method in methods:
        for ratio in rank_ratios:
            t0 = time.perf_counter()
            new = decompose_model(model, method, rank_ratio=ratio, layers=layers,
                                  calibration=calibration if method == "svd_activation" else None)
            seconds = time.perf_counter() - t0
            report = decomposition_report(model, new)
            row = {"method": method, "rank_ratio": ratio, "layers_factorized": len(report),
                   "rel_error": sum(r["rel_error"] for r in report) / max(1, len(report)),
                   "decompose_time_s": seconds, **profile(new)}
            if math.isclose(ratio, keep_ratio):
                row["model"] = f"decomp_{method}.safetensors"
                save_model(new, Path(run_dir) / row["model"])
            rows.append(row)
    return rows


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
        for method in QR_METHODS + ("qr_pivoted",):
            q, _ = qr(a, method)
            rows.append({"method": method, "cond": cond, "orth_loss": orthogonality_loss(q)})
    return rows

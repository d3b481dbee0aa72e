"""The QR and LU algorithms Sun (2023) compares, written as vectorised tensor code.

Householder (blocked, compact WY), classical and modified Gram-Schmidt, Givens (Sameh-Kuck parallel
sweeps), column-pivoted QR and LU with partial or complete pivoting live here because *how* each
algorithm orthogonalises or eliminates is the subject of the comparison; each is checked against
LAPACK in the tests. Each is registered here, beside its algorithm, as a decomposition method
(`registry.register_decomposition`): its truncated factors W ≈ B·A are the first r columns of Q (or
of P·L) and the first r rows of R (or U); `decompose` applies them to a model's layers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from vitprune.errors import DecomposeError
from vitprune.registry import register_decomposition

# ---------------------------------------------------------------- checks

def check_matrix(w: torch.Tensor, name: str = "W") -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise DecomposeError(f"{name} must be a 2-D tensor, got shape {shape}")
    if not w.is_floating_point():
        raise DecomposeError(f"{name} must be float32 or float64, got {w.dtype}")
    if not torch.isfinite(w).all():
        raise DecomposeError(f"{name} has NaN or infinite entries; decompositions need finite weights")


def check_rank(rank: int, w: torch.Tensor) -> None:
    k = min(w.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= k:
        raise DecomposeError(f"rank {rank!r} is invalid for a {tuple(w.shape)} matrix; accepted: an int in [1, {k}]")


def check_method(method: str, accepted: Iterable[str]) -> None:
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


def _qr_pivoted_in_place(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-pivoted QR with R's columns put back in W's order, so W = Q @ R."""
    q, r, perm = _qr_pivoted(w, k)
    out = torch.empty_like(r)
    out[:, perm] = r
    return q, out


# the QR algorithms under study, by method name
QR_ALGORITHMS = {"qr_householder": _qr_householder, "qr_cgs": _qr_cgs, "qr_mgs": _qr_mgs, "qr_givens": _qr_givens,
                 "qr_pivoted": _qr_pivoted_in_place}


def qr(w: torch.Tensor, method: str = "qr_householder", k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced QR of `w` (m x n) with one of the library's algorithms; `k` stops after k columns of Q."""
    check_method(method, QR_ALGORITHMS)
    check_matrix(w)
    k = min(w.shape) if k is None else k
    check_rank(k, w)
    return QR_ALGORITHMS[method](w, k)


def _truncated_qr(method: str):
    """Rank-r factors of a QR algorithm: A = R[:r] (r x in), B = Q[:, :r] (out x r)."""
    def factors(w: torch.Tensor, rank: int, **_) -> tuple[torch.Tensor, torch.Tensor]:
        q, r = qr(w, method, k=rank)
        return r, q

    return factors


_SUN = ("sun", "refit")  # Sun's comparison with SVD, before and after refitting the second factor
register_decomposition("qr_householder", family="QR", label="Householder QR", claims=_SUN)(
    _truncated_qr("qr_householder"))
register_decomposition("qr_cgs", family="QR", label="classical Gram–Schmidt QR", claims=_SUN)(_truncated_qr("qr_cgs"))
register_decomposition("qr_mgs", family="QR", label="modified Gram–Schmidt QR", claims=_SUN)(_truncated_qr("qr_mgs"))
register_decomposition("qr_givens", family="QR", label="Givens QR", claims=_SUN)(_truncated_qr("qr_givens"))
register_decomposition("qr_pivoted", family="QR", label="column-pivoted QR", claims=(*_SUN, "pivoting"),
                       improves_on="qr_householder")(_truncated_qr("qr_pivoted"))


# ---------------------------------------------------------------- LU

def lu(w: torch.Tensor, k: int | None = None, complete: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated LU, W ~= L @ U with row (and, if complete, column) permutations folded in; exact at k = min(m, n)."""
    check_matrix(w)
    m, n = w.shape
    k = min(m, n) if k is None else k
    check_rank(k, w)
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


@register_decomposition("lu", family="LU", label="LU (partial pivoting)", claims=_SUN)
def _lu_partial(w: torch.Tensor, rank: int, **_) -> tuple[torch.Tensor, torch.Tensor]:
    l_mat, u_mat = lu(w, rank)
    return u_mat, l_mat


@register_decomposition("lu_complete", family="LU", label="LU (complete pivoting)", claims=(*_SUN, "pivoting"),
                        improves_on="lu")
def _lu_complete(w: torch.Tensor, rank: int, **_) -> tuple[torch.Tensor, torch.Tensor]:
    l_mat, u_mat = lu(w, rank, complete=True)
    return u_mat, l_mat


def orthogonality_loss(q: torch.Tensor) -> float:
    """||Q^T Q - I||_F, the loss of orthogonality of a computed Q."""
    eye = torch.eye(q.shape[1], dtype=q.dtype, device=q.device)
    return float(torch.linalg.matrix_norm(q.T @ q - eye))

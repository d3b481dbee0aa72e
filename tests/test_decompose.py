"""Decompositions: exactness at full rank, agreement with LAPACK, Eckart-Young, orthogonality ordering."""

from __future__ import annotations

import pytest
import scipy.linalg
import torch

import vitprune as vp
from tests.conftest import make_arch
from vitprune import linalg
from vitprune.errors import DecomposeError
from vitprune.linalg import orthogonality_loss
from vitprune.registry import DECOMPOSITIONS
from vitprune.study.stages.decompositions import lauchli

METHODS = DECOMPOSITIONS.names()
QR_METHODS = ("qr_householder", "qr_cgs", "qr_mgs", "qr_givens")  # the four unpivoted algorithms

SHAPES = [(24, 24), (40, 16), (16, 40)]  # square, tall, wide
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rand(shape, dtype=torch.float64, seed=0, device="cpu"):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


def gram_of(n, seed=1):
    x = rand((200, n), seed=seed)
    return x.T @ x


def calibration_kwargs(shape, seed=1):
    """Statistics the data-aware methods take (the others ignore them): Gram, row Fisher, mean |x|."""
    x = rand((200, shape[1]), seed=seed)
    return {"gram": x.T @ x, "row_fisher": rand((shape[0],), seed=seed + 1).abs(), "abs_mean": x.abs().mean(0)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_reconstructs_at_full_rank(method, shape):
    w = rand(shape)
    a, b = vp.factorize(w, method, min(shape), **calibration_kwargs(shape))
    assert a.shape == (min(shape), shape[1]) and b.shape == (shape[0], min(shape))
    assert torch.linalg.matrix_norm(b @ a - w) / torch.linalg.matrix_norm(w) <= 1e-10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", QR_METHODS)
def test_qr_algorithms_match_lapack_r_up_to_signs(method, shape, dtype, device):
    w = rand(shape, dtype, device=device)
    q, r = vp.qr(w, method)
    r_ref = torch.linalg.qr(w.double().cpu()).R
    signs = torch.sign(r.diagonal().double().cpu()) * torch.sign(r_ref.diagonal())
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert (r.double().cpu() * signs[:, None] - r_ref).abs().max() <= tol * r_ref.abs().max()
    assert orthogonality_loss(q.double()) <= (1e-12 if dtype == torch.float64 else 1e-5)
    assert q.device.type == device and q.dtype == dtype


@pytest.mark.parametrize("shape", SHAPES)
def test_pivoted_qr_and_lu_match_scipy(shape):
    w = rand(shape)
    q, r, perm = linalg._qr_pivoted(w, min(shape))
    _, r_ref, perm_ref = scipy.linalg.qr(w.numpy(), mode="economic", pivoting=True)
    assert perm.tolist() == perm_ref.tolist()  # same pivot order as LAPACK's dgeqp3
    assert torch.allclose(r.diagonal().abs(), torch.tensor(r_ref.diagonal()).abs(), atol=1e-10)
    q2, r2 = vp.qr(w, "qr_pivoted")
    assert torch.allclose(q2 @ r2, w, atol=1e-10)
    l_mat, u_mat = vp.lu(w)
    p, l_ref, u_ref = scipy.linalg.lu(w.numpy())
    assert torch.allclose(u_mat, torch.tensor(u_ref[: min(shape)]), atol=1e-10)
    assert torch.allclose(l_mat, torch.tensor(p @ l_ref)[:, : min(shape)], atol=1e-10)


@pytest.mark.parametrize("rank", [1, 4, 12])
def test_svd_is_never_beaten_at_equal_rank(rank):
    w = rand((32, 24))
    errors = {m: torch.linalg.matrix_norm(w - (lambda ab: ab[1] @ ab[0])(
        vp.factorize(w, m, rank, **calibration_kwargs((32, 24))))) for m in METHODS}
    assert all(errors["svd"] <= e + 1e-12 for e in errors.values())
    sigma = torch.linalg.svdvals(w)
    assert torch.isclose(errors["svd"], sigma[rank:].square().sum().sqrt())  # Eckart-Young


def test_loss_of_orthogonality_is_ordered_householder_mgs_cgs():
    a = lauchli(12, 3e-3, torch.float32)  # Läuchli: ill-conditioned, float32
    loss = {m: orthogonality_loss(vp.qr(a, m)[0].double()) for m in ("qr_householder", "qr_mgs", "qr_cgs")}
    assert loss["qr_householder"] <= loss["qr_mgs"] <= loss["qr_cgs"]
    assert loss["qr_cgs"] > 100 * loss["qr_householder"]  # CGS really loses orthogonality here


def test_activation_aware_svd_has_lower_output_error_on_its_calibration_data():
    w = rand((48, 32))
    x = rand((500, 32), seed=3) * torch.logspace(0, -2, 32, dtype=torch.float64)  # anisotropic inputs
    for rank in (4, 8, 16):
        out = {m: torch.linalg.matrix_norm(x @ (w - (lambda ab: ab[1] @ ab[0])(
            vp.factorize(w, m, rank, gram=x.T @ x))).T) for m in ("svd", "svd_activation")}
        assert out["svd_activation"] < out["svd"]


def test_data_aware_svds_beat_plain_svd_where_their_data_says_what_matters():
    w = rand((48, 32))
    # inputs with a dominant 6-dim subspace: whitened and column-scaled SVD lower the output error on them
    basis = torch.linalg.qr(rand((32, 32), seed=5)).Q
    x = rand((500, 32), seed=3) * torch.cat([torch.full((6,), 10.0), torch.full((26,), 0.1)]).double() @ basis.T
    x = x * torch.logspace(0, -1, 32, dtype=torch.float64)  # and unequal feature scales (what ASVD sees)
    stats = {"gram": x.T @ x, "abs_mean": x.abs().mean(0)}

    def output_error(m):
        a, b = vp.factorize(w, m, 6, **stats, row_fisher=torch.ones(48, dtype=torch.float64))
        return torch.linalg.matrix_norm(x @ (w - b @ a).T)

    assert output_error("svd_activation") < output_error("svd_scaled") < output_error("svd")
    # a loss that reads only the first 8 outputs: their rows carry all the Fisher information
    logits = torch.nn.Linear(32, 48, bias=False)
    with torch.no_grad():
        logits.weight.copy_(w.float())
    net = torch.nn.Sequential(logits, Take(8))
    batches = [(x[i:i + 100].float(), torch.randint(0, 8, (100,), generator=torch.Generator().manual_seed(i)))
               for i in range(0, 500, 100)]
    from vitprune.calibration import row_fisher

    fisher = row_fisher(net, ["0"], batches)["0"]
    assert (fisher[8:] == 0).all() and (fisher[:8] > 0).all()

    def loss_rows_error(m):
        a, b = vp.factorize(w, m, 8, row_fisher=fisher)
        return torch.linalg.matrix_norm((w - b @ a)[:8])

    assert loss_rows_error("svd_fisher") < 1e-6 * torch.linalg.matrix_norm(w) < loss_rows_error("svd")


class Take(torch.nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        return x[:, : self.k]


def test_randomized_svd_is_close_to_exact():
    w = rand((64, 8)) @ rand((8, 48), seed=2)  # rank 8
    a, b = vp.factorize(w, "svd", 8, randomized=True)
    assert torch.linalg.matrix_norm(b @ a - w) / torch.linalg.matrix_norm(w) <= 1e-8


@pytest.mark.parametrize("method", METHODS)
def test_decomposed_vit_computes_the_same_function_when_weights_are_low_rank(method):
    model, x, _ = make_arch("custom_cls")
    rank = 4
    with torch.no_grad():  # make every projection exactly rank 4
        for layer in vp.decompose.target_linears(model).values():
            w = layer.weight.double()
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            layer.weight.copy_((u[:, :rank] * s[:rank]) @ vh[:rank])
    calib = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))]
    small = vp.decompose_model(model, method, rank=rank, calibration=calib)
    assert len(vp.decomposition_report(model, small)) == 8
    assert (small(x) - model(x)).abs().max() <= 1e-4
    assert vp.count_params(small) < vp.count_params(model)


def test_decomposed_model_round_trips_and_counts(tmp_path):
    model, x, _ = make_arch("deit_distilled")
    small = vp.decompose_model(model, "qr_mgs", rank_ratio=0.25)
    vp.save_model(small, tmp_path / "d.safetensors")
    back = vp.load_model(tmp_path / "d.safetensors")
    assert torch.equal(back(x), small(x))
    n = 0
    for name, mod in small.named_modules():
        if isinstance(mod, vp.FactorizedLinear):
            dense = model.get_submodule(name)
            n += dense.weight.numel() - mod.rank * (mod.in_features + mod.out_features)
    assert vp.count_params(model) - vp.count_params(small) == n > 0
    tokens = 2 + (32 // 8) ** 2
    fewer_macs = sum(model.get_submodule(nm).weight.numel() - m.rank * (m.in_features + m.out_features)
                     for nm, m in small.named_modules() if isinstance(m, vp.FactorizedLinear)) * tokens
    assert vp.count_macs(model, (1, 3, 32, 32)) - vp.count_macs(small, (1, 3, 32, 32)) == fewer_macs


def test_layers_replaced_only_where_they_save_parameters():
    model, _, _ = make_arch("custom_cls")
    small = vp.decompose_model(model, "svd", rank_ratio=0.9)
    for m in small.modules():
        if isinstance(m, vp.FactorizedLinear):
            assert m.rank * (m.in_features + m.out_features) < m.in_features * m.out_features
    assert any(isinstance(b.mlp.fc1, torch.nn.Linear) for b in small.blocks)


@pytest.mark.parametrize("kind,value", [("energy", 0.9), ("param_budget", 0.5), ("rank", 3)])
def test_rank_selection_modes(kind, value):
    model, _, _ = make_arch("custom_cls")
    small = vp.decompose_model(model, "svd", **{kind: value})
    dense_layers = sum(m.weight.numel() for m in vp.decompose.target_linears(model).values())
    if kind == "param_budget":
        kept = sum(sum(p.numel() for n, p in m.named_parameters() if n.endswith("weight"))
                   for m in (small.get_submodule(n) for n in vp.decompose.target_linears(model)))
        assert kept <= 0.5 * dense_layers
    if kind == "rank":
        assert all(m.rank == 3 for m in small.modules() if isinstance(m, vp.FactorizedLinear))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("rank", [0, -1, 25, 2.5])
def test_bad_rank(rank):
    with pytest.raises(DecomposeError, match=r"rank .* accepted: an int in \[1, 24\]"):
        vp.factorize(rand((24, 30)), "svd", rank)


def test_unknown_method_lists_methods():
    with pytest.raises(DecomposeError, match="accepted: svd, svd_activation, svd_fisher, svd_scaled, qr_householder"):
        vp.factorize(rand((4, 4)), "cholesky", 2)


def test_non_2d_and_nan_weights():
    with pytest.raises(DecomposeError, match=r"2-D tensor, got shape \(2, 3, 4\)"):
        vp.factorize(rand((2, 3, 4)), "svd", 1)
    w = rand((4, 4))
    w[1, 2] = float("nan")
    with pytest.raises(DecomposeError, match="NaN"):
        vp.qr(w, "qr_mgs")


@pytest.mark.parametrize("method, key", [("svd_activation", "gram"), ("svd_fisher", "row_fisher"),
                                         ("svd_scaled", "abs_mean")])
def test_data_aware_methods_without_calibration(method, key):
    with pytest.raises(DecomposeError, match=f"'{method}' needs calibration data: pass {key}="):
        vp.factorize(rand((8, 8)), method, 2)
    model, _, _ = make_arch("custom_cls")
    with pytest.raises(DecomposeError, match="needs calibration data"):
        vp.decompose_model(model, method, rank=2)


def calibration_for(x: torch.Tensor, seed: int = 3, batches: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(x.shape, generator=g), torch.zeros(len(x), dtype=torch.long)) for _ in range(batches)]


@pytest.mark.parametrize("method", METHODS)
def test_refit_never_increases_the_calibration_output_error(method):
    from vitprune.decompose import input_grams, output_error, target_linears

    model, x, _ = make_arch("gap")
    calibration = calibration_for(x)
    linears = target_linears(model)
    grams = input_grams(model, linears, calibration)
    plain = vp.decompose_model(model, method, rank_ratio=0.3, calibration=calibration)
    refit = vp.decompose_model(model, method, rank_ratio=0.3, calibration=calibration, refit=True)
    factorized = [n for n, m in refit.named_modules() if isinstance(m, vp.FactorizedLinear)]
    assert factorized
    improved = 0
    for name in factorized:
        w = linears[name].weight.detach().double()
        p, r = plain.get_submodule(name), refit.get_submodule(name)
        assert torch.equal(p.first.weight, r.first.weight)  # the method's A is kept
        e_plain = output_error(w, p.first.weight, p.second.weight, grams[name])
        e_refit = output_error(w, r.first.weight, r.second.weight, grams[name])
        assert e_refit <= e_plain * (1 + 1e-9)
        improved += e_refit < 0.999 * e_plain
    if method != "svd_activation":  # the whitened SVD is already optimal for its calibration data
        assert improved > 0


def test_refit_needs_calibration():
    model, _, _ = make_arch("custom_cls")
    with pytest.raises(DecomposeError, match="refit=True needs calibration data"):
        vp.decompose_model(model, "qr_mgs", rank_ratio=0.5, refit=True)


def test_the_allocator_respects_its_budget_and_favours_the_sensitive_layer():
    from vitprune.allocation import allocate, layer_sensitivity

    model, x, _ = make_arch("custom_cls")
    sensitive = "blocks.0.mlp.fc1"
    with torch.no_grad():  # make one layer's output matter far more than any other's
        model.get_submodule(sensitive).weight.mul_(8.0)
        images = [torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(2)]
        calibration = [(x, model(x).argmax(1)) for x in images]  # labels the model gets right: any change costs
    rows = layer_sensitivity(model, "svd", calibration, rank_ratios=(0.25, 0.5))
    linears = vp.decompose.target_linears(model)
    dense = {n: m.in_features * m.out_features for n, m in linears.items()}
    cheapest = sum(min([dense[n]] + [r["params"] for r in rows if r["layer"] == n]) for n in dense)
    for budget in (cheapest, cheapest + 3000, (cheapest + sum(dense.values())) // 2):
        ranks = allocate(rows, dense, budget)
        used = sum(r * (linears[n].in_features + linears[n].out_features) for n, r in ranks.items()) + sum(
            dense[n] for n in dense if n not in ranks)
        assert used <= budget
    ranks = allocate(rows, dense, (cheapest + sum(dense.values())) // 2)
    others = [r for n, r in ranks.items() if n != sensitive and n.endswith("fc1")]
    assert others and sensitive not in ranks  # the sensitive layer stays dense while another fc1 is factorized
    worst = {n: max(r["loss_increase"] for r in rows if r["layer"] == n) for n in {r["layer"] for r in rows}}
    assert max(worst, key=worst.get) == sensitive
    capped = layer_sensitivity(model, "svd", calibration, rank_ratios=(0.25, 0.5), max_ranks={sensitive: 4})
    assert {r["rank"] for r in capped if r["layer"] == sensitive} == {4}  # e.g. a measured break-even rank
    small = vp.decompose_model(model, "svd", ranks=ranks)
    assert {n for n, m in small.named_modules() if isinstance(m, vp.FactorizedLinear)} == set(ranks)
    with pytest.raises(DecomposeError, match="below the cheapest allocation"):
        allocate(rows, dense, cheapest - 1)

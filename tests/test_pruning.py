"""VTP exactness: gates, folding and physical pruning on several timm ViT shapes."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import vitprune as vp
from tests.conftest import make_arch
from vitprune.errors import ModelError, PruneError
from vitprune.gates import DEFAULT_SITES
from vitprune.layers import PrunableAttention
from vitprune.pruning import PrunePlan, check_plan
from vitprune.registry import SITES

GATE_SITES = SITES.names()
TOL = 1e-5


def gated(model, qk_norm, seed=0):
    sites = DEFAULT_SITES if qk_norm else GATE_SITES
    vp.attach_gates(model, sites)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in vp.gate_parameters(model).values():
            gate.copy_(torch.rand(gate.shape, generator=g) * 1.5 + 0.05)  # random, not all ones
    return model


def test_attaching_gates_keeps_function_and_timm_keys(arch):
    model, x, qk_norm = arch
    keys = set(model.state_dict())
    before = model(x)
    vp.attach_gates(model, DEFAULT_SITES if qk_norm else GATE_SITES)
    # the same function: timm's fused attention against vitprune's explicit one (eval, short sequences: faster)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)
    assert keys <= set(model.state_dict())  # timm's keys unchanged: a pretrained checkpoint still loads
    assert all(vp.gates.is_gate(k) for k in set(model.state_dict()) - keys)
    assert all(isinstance(b.attn, PrunableAttention) and b.attn.fused_attn for b in model.blocks)


def test_fold_gates_preserves_function(arch):
    model, x, qk_norm = arch
    gated(model, qk_norm)
    ref = model(x)
    folded = vp.fold_gates(copy.deepcopy(model))
    assert not vp.gate_parameters(folded)
    assert (folded(x) - ref).abs().max() <= TOL


@pytest.mark.parametrize("head_mode", ["topk", "whole"])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_pruned_equals_gated_with_dropped_dims_zeroed(arch, head_mode, ratio):
    model, x, qk_norm = arch
    gated(model, qk_norm)
    plan = vp.plan_pruning(model, vp.importance_scores(model), ratio, head_mode=head_mode)
    small = vp.prune(model, plan)
    reference = vp.zero_dropped(model, plan)
    assert isinstance(small, VisionTransformer) and type(small) is type(model)
    assert (small(x) - reference(x)).abs().max() <= TOL
    assert vp.count_params(small) < vp.count_params(model)
    for block in small.blocks:  # consistent, ordinary attributes; the original scale is kept
        a = block.attn
        assert a.qkv.out_features == a.num_heads * (2 * a.qk_head_dim + a.v_head_dim)
        assert a.proj.in_features == a.num_heads * a.v_head_dim == a.attn_dim
        assert a.head_dim == a.v_head_dim and a.fused_attn
    assert small.blocks[0].attn.scale == model.blocks[0].attn.scale


def test_widths_rounded_to_a_kernel_multiple_stay_exact(arch):
    """Latency-aware widths (`round_to`, e.g. `vp.fast_width_multiple`'s 8): every kept count a multiple, the
    function still the gated model's with the plan's drops zeroed."""
    model, x, qk_norm = arch
    gated(model, qk_norm)
    plan = vp.plan_pruning(model, vp.importance_scores(model), 0.4, round_to=4)
    small = vp.prune(model, plan)
    assert (small(x) - vp.zero_dropped(model, plan)(x)).abs().max() <= TOL
    for (b, site), kept in plan.kept.items():
        heads = model.blocks[b].attn.num_heads if site in SITES.names(head_grouped=True) else 1
        assert len(kept) // heads % 4 == 0 or len(kept) == plan.sizes[(b, site)]  # per head for head-grouped sites


def test_pruned_inference_over_the_whole_residual_stream_is_the_gathered_function(arch, monkeypatch):
    """Without gradients a narrow model's input-pruned layers multiply the whole residual stream by their weight with
    zero columns (`layers.PAD_INPUT_WIDTH`); with gradients, or wider than that, they gather the kept features. Both
    are the gated model with the plan's drops zeroed; the full-width weight follows in-place weight changes and is
    neither saved nor counted."""
    model, x, qk_norm = arch
    gated(model, qk_norm)
    plan = vp.plan_pruning(model, vp.importance_scores(model), 0.4)
    small = vp.prune(model, plan)
    keys, params = set(small.state_dict()), vp.count_params(small)
    gathered = small(x)  # gradients on: the compact weights take them
    gathered.sum().backward()
    assert small.blocks[0].attn.qkv.weight.grad is not None
    with torch.inference_mode():
        whole = small(x)
    layer = small.blocks[0].mlp.fc1
    assert "_full_width_weight" in layer.__dict__  # the whole-stream path ran
    assert (whole - gathered).abs().max() <= TOL
    assert (whole - vp.zero_dropped(model, plan)(x)).abs().max() <= TOL
    assert set(small.state_dict()) == keys and vp.count_params(small) == params
    seen = []  # a hooked layer runs as itself on its kept features (MAC counts, calibration statistics)
    handle = layer.register_forward_hook(lambda mod, inputs, out: seen.append(inputs[0].shape[-1]))
    with torch.no_grad():
        small(x)
    handle.remove()
    assert seen == [layer.in_features] and layer.in_features < small.blocks[0].norm2.normalized_shape[0]
    with torch.no_grad():
        layer.weight.mul_(-2.0)  # an in-place change: the full-width weight is rebuilt
        after, full = small(x), layer.__dict__["_full_width_weight"][-1]
    assert torch.equal(full[:, small.blocks[0].mlp.in_index], layer.weight) and not torch.equal(after, whole)
    monkeypatch.setattr(vp.layers, "PAD_INPUT_WIDTH", 0)  # a wide model: the gather under no_grad too
    wide = vp.prune(model, plan)
    with torch.no_grad():
        assert (wide(x) - gathered).abs().max() <= TOL
    assert not any("_full_width_weight" in m.__dict__ for m in wide.modules())


def test_pruned_model_round_trips_and_reprunes(tmp_path):
    model, x, _ = make_arch("deit_distilled")
    gated(model, False)
    small = vp.prune(model, vp.plan_pruning(model, vp.importance_scores(model), 0.4))
    vp.save_model(small, tmp_path / "s.safetensors")
    loaded = vp.load_model(tmp_path / "s.safetensors")
    assert torch.equal(loaded(x), small.eval()(x))
    again = vp.prune(loaded, vp.plan_pruning(loaded, vp.importance_scores(loaded, "magnitude"), 0.3))
    assert vp.count_params(again) < vp.count_params(loaded)


def test_whole_head_mode_drops_heads_and_topk_keeps_equal_widths():
    model, x, _ = make_arch("gap")
    gated(model, False)
    scores = vp.importance_scores(model)
    whole = vp.prune(model, vp.plan_pruning(model, scores, 0.5, head_mode="whole"))
    assert any(b.attn.num_heads < 4 for b in whole.blocks)
    assert all(b.attn.v_head_dim == 16 for b in whole.blocks)
    topk = vp.prune(model, vp.plan_pruning(model, scores, 0.5, head_mode="topk"))
    assert all(b.attn.num_heads == 4 and b.attn.v_head_dim < 16 for b in topk.blocks)


@pytest.mark.parametrize("scope", ["global", "per_site", "per_block"])
def test_plan_scopes_min_keep_round_to_and_json(scope):
    model, _, _ = make_arch("custom_cls")
    gated(model, False)
    plan = vp.plan_pruning(model, vp.importance_scores(model), 0.6, scope=scope, min_keep=4, round_to=2)
    assert abs(plan.realised_ratio - 0.6) < 0.15
    for (b, site), kept in plan.kept.items():
        assert len(kept) >= 4 and kept == sorted(set(kept))
        if site in ("attn_in", "mlp_in", "mlp_hidden"):
            assert len(kept) % 2 == 0 or len(kept) == plan.sizes[(b, site)]
    back = PrunePlan.from_json(plan.to_json())
    assert back.kept == plan.kept and back.sizes == plan.sizes and back.realised_ratio == plan.realised_ratio


def closed_form(model, img=28, patch=7, chans=1, classes=10):
    """Params and MACs of a pruned vit_custom from its widths alone (no hooks)."""
    d = model.embed_dim
    n = (img // patch) ** 2 + 1
    params = d * chans * patch * patch + d + d + n * d + 2 * d + d * classes + classes  # embed, cls, pos, norm, head
    macs = (n - 1) * d * chans * patch * patch + d * classes
    for b in model.blocks:
        a, m = b.attn, b.mlp
        qkv_out = a.num_heads * (2 * a.qk_head_dim + a.v_head_dim)
        vdim = a.num_heads * a.v_head_dim
        params += 4 * d + a.qkv.in_features * qkv_out + qkv_out + vdim * d + d
        params += m.fc1.in_features * m.fc1.out_features + m.fc1.out_features + m.fc1.out_features * d + d
        macs += n * (a.qkv.in_features * qkv_out + vdim * d + m.fc1.in_features * m.fc1.out_features
                     + m.fc1.out_features * d)
        macs += a.num_heads * n * n * (a.qk_head_dim + a.v_head_dim)
    return params, macs


def test_counts_of_pruned_model_match_closed_form_from_plan():
    model, _, _ = make_arch("custom_cls")
    gated(model, False)
    plan = vp.plan_pruning(model, vp.importance_scores(model), 0.4)
    small = vp.prune(model, plan)
    params, macs = closed_form(small)
    assert vp.count_params(small) == params
    assert vp.count_macs(small, (1, 1, 28, 28)) == macs
    counts = plan.kept_counts()
    for b, block in enumerate(small.blocks):  # the widths are the plan's
        assert block.attn.qkv.in_features == counts[(b, "attn_in")]
        assert block.attn.num_heads * block.attn.v_head_dim == counts[(b, "attn_out")]
        assert block.mlp.fc1.in_features == counts[(b, "mlp_in")]
        assert block.mlp.fc1.out_features == counts[(b, "mlp_hidden")]
    dense_params, dense_macs = closed_form(vp.fold_gates(copy.deepcopy(model)))
    assert vp.count_params(model) == dense_params and vp.count_macs(model, (1, 1, 28, 28)) == dense_macs


def test_baseline_scores_have_the_gate_structure_and_prune():
    model, x, _ = make_arch("custom_cls")
    gated(model, False)
    batches = [(x, torch.tensor([1, 2, 3]))]
    ref = vp.importance_scores(model)
    for criterion in ("magnitude", "taylor", "random"):
        s = vp.importance_scores(model, criterion, batches=batches)
        assert s.keys() == ref.keys() and all(s[k].shape == ref[k].shape for k in s)
        assert all(torch.isfinite(v).all() and (v >= 0).all() for v in s.values())
        vp.prune(model, vp.plan_pruning(model, s, 0.4))
    dense, _, _ = make_arch("custom_cls")  # baselines need no gates
    assert set(vp.importance_scores(dense, "magnitude")) == {k for k in ref if k[1] in DEFAULT_SITES}


def test_l1_penalty_and_gate_group():
    model, _, _ = make_arch("custom_cls")
    vp.attach_gates(model)
    n = sum(g.numel() for g in vp.gate_parameters(model).values())
    assert torch.isclose(vp.l1_penalty(model, 1e-4), torch.tensor(1e-4 * n))
    groups = vp.training.param_groups(model, vp.TrainConfig(gate_lr=0.5, lr=1.0))
    gate_group = [g for g in groups if g["lr_scale"] == 0.5]
    assert gate_group and gate_group[0]["weight_decay"] == 0 and len(gate_group[0]["params"]) == len(
        vp.gate_parameters(model))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "half"])
def test_ratio_outside_range_is_refused(ratio):
    model, _, _ = make_arch("custom_cls")
    vp.attach_gates(model)
    with pytest.raises(PruneError, match=r"ratio .* \[0, 1\)"):
        vp.plan_pruning(model, vp.importance_scores(model), ratio)


def test_plan_for_another_model_is_refused():
    model, _, _ = make_arch("custom_cls")
    vp.attach_gates(model)
    plan = vp.plan_pruning(model, vp.importance_scores(model), 0.4)
    other, _, _ = make_arch("gap")
    with pytest.raises(PruneError, match="plan expects"):
        vp.prune(other, plan)
    small = vp.prune(model, plan)
    with pytest.raises(PruneError, match=r"plan expects \d+ dims at block \d+ site \w+; the model has \d+"):
        check_plan(small, plan)


def test_gates_on_a_non_vit_module_are_refused():
    with pytest.raises(ModelError, match="expected a timm VisionTransformer, got Sequential"):
        vp.attach_gates(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_qk_gate_with_qk_norm_is_refused():
    model, _, _ = make_arch("qknorm_nobias")
    with pytest.raises(ModelError, match="'qk' cannot be exact .* qk-norm"):
        vp.attach_gates(model, GATE_SITES)


def test_unknown_site_and_gate_scores_without_gates():
    model, _, _ = make_arch("custom_cls")
    with pytest.raises(ModelError, match="accepted: attn_in"):
        vp.attach_gates(model, ["attn_inn"])
    with pytest.raises(vp.ScoringError, match="no gates"):
        vp.importance_scores(model, "gates")
    with pytest.raises(vp.ScoringError, match="accepted: gates, magnitude, taylor, random"):
        vp.importance_scores(model, "fisher")


def test_pruned_checkpoint_with_missing_spec_is_refused(tmp_path):
    from safetensors.torch import save_file

    model, _, _ = make_arch("custom_cls")
    vp.attach_gates(model)
    small = vp.prune(model, vp.plan_pruning(model, vp.importance_scores(model), 0.4))
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(tmp_path / "nospec.safetensors"))
    with pytest.raises(ModelError, match="nospec.safetensors' has no architecture spec"):
        vp.load_model(tmp_path / "nospec.safetensors")

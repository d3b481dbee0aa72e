"""Models: timm building, local pretrained weights, safetensors checkpoints, the DeiT MACs table."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import vitprune as vp
from tests.conftest import make_arch
from vitprune.errors import ModelError, ParamsError
from vitprune.params import ModelParams
from vitprune.training import TrainConfig, train

PARAMS = sorted((Path(__file__).resolve().parent.parent / "params").glob("*.yaml"))


@pytest.mark.parametrize("name,gmacs,mparams", [
    ("deit_tiny_patch16_224", 1.26, 5.72), ("deit_small_patch16_224", 4.61, 22.05),
    ("deit_base_patch16_224", 17.58, 86.57)])
def test_counts_reproduce_the_published_deit_table(name, gmacs, mparams):
    model = timm.create_model(name)
    assert abs(vp.count_macs(model, (1, 3, 224, 224)) / 1e9 / gmacs - 1) <= 0.01
    assert abs(vp.count_params(model) / 1e6 / mparams - 1) <= 0.01


def test_attention_matmuls_are_counted():
    model, _, _ = make_arch("custom_cls")
    linear_only = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    tokens = 17
    attn = sum(b.attn.num_heads * tokens * tokens * 2 * b.attn.head_dim for b in model.blocks)
    total = vp.count_macs(model, (1, 1, 28, 28))
    assert total - attn > linear_only  # linear layers run on every token (head on one)
    assert total == vp.count_macs(vp.attach_gates(model), (1, 1, 28, 28))


@pytest.mark.parametrize("training", [True, False])
def test_prunable_blocks_keep_the_models_mode(training):
    """Wrapping a model for pruning keeps train/eval mode in every block (eval takes another attention path)."""
    model, _, _ = make_arch("custom_cls")
    model.train(training)
    vp.attach_gates(model)
    assert {m.training for m in model.modules()} == {training}


def test_save_load_round_trip_with_gates(tmp_path, arch):
    model, x, qk_norm = arch
    vp.attach_gates(model)
    path = vp.save_model(model, tmp_path / "m.safetensors")
    back = vp.load_model(path)
    assert torch.equal(back(x), model(x))
    assert set(back.state_dict()) == set(model.state_dict())
    assert b"pickle" not in path.read_bytes()[:200]


def test_pretrained_weights_from_a_local_file(tmp_path):
    ref = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        p = ModelParams(name="deit_tiny_patch16_224", pretrained=str(tmp_path / f),
                        kwargs=dict(img_size=32, patch_size=8))
        m = vp.build_model(p, num_classes=5, in_chans=3, img_size=32)
        assert torch.equal(m.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)
        assert torch.equal(m.head.weight, ref.head.weight)
    other = vp.build_model(ModelParams(name="deit_tiny_patch16_224", pretrained=str(tmp_path / "w.pth"),
                                       kwargs=dict(img_size=32, patch_size=8)), num_classes=3, in_chans=3, img_size=32)
    assert other.head.weight.shape == (3, 192)  # new label set: new classifier, backbone loaded
    assert torch.equal(other.blocks[1].mlp.fc1.weight, ref.blocks[1].mlp.fc1.weight)


def test_model_errors(tmp_path):
    with pytest.raises(ModelError, match=r"model.pretrained '.*absent.pth' does not exist; .*never downloaded"):
        vp.build_model(ModelParams(name="deit_tiny_patch16_224", pretrained=str(tmp_path / "absent.pth")), 10, 3, 224)
    with pytest.raises(ParamsError, match="model.name 'vit_nonsense_x' is not a timm model"):
        vp.build_model(ModelParams(name="vit_nonsense_x"))
    with pytest.raises(ParamsError, match="model.name 'resnet18' is not a timm VisionTransformer"):
        vp.build_model(ModelParams(name="resnet18"), 10, 3, 32)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"foo": torch.zeros(2)}, str(wrong))
    with pytest.raises(ModelError, match="wrong.safetensors' does not match 'deit_tiny_patch16_224'"):
        vp.build_model(ModelParams(name="deit_tiny_patch16_224", pretrained=str(wrong)), 10, 3, 224)


def test_checkpoint_errors(tmp_path):
    model, _, _ = make_arch("custom_cls")
    path = vp.save_model(model, tmp_path / "m.safetensors")
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="trunc.safetensors' is not a readable safetensors file"):
        vp.load_model(tmp_path / "trunc.safetensors")
    with pytest.raises(ModelError, match="missing.safetensors' does not exist"):
        vp.load_model(tmp_path / "missing.safetensors")
    other, _, _ = make_arch("gap")
    tensors = {k: v.contiguous() for k, v in other.state_dict().items()}
    import json

    from vitprune.checkpoint import SPEC_KEY, architecture_spec
    save_file(tensors, str(tmp_path / "mismatch.safetensors"),
              metadata={SPEC_KEY: json.dumps(architecture_spec(model))})
    with pytest.raises(ModelError, match="mismatch.safetensors' does not match its architecture spec"):
        vp.load_model(tmp_path / "mismatch.safetensors")


@pytest.mark.parametrize("params_file", PARAMS, ids=[p.stem for p in PARAMS])
def test_every_params_file_builds_full_size_and_trains_two_steps(params_file, tmp_path):
    p = vp.load_params(params_file)
    chans = 1 if p.data.name in ("mnist5k", "digits") else 3
    classes = {"cifar100": 100, "imagefolder": 1000}.get(p.data.name, 10)
    bundle = vp.load_data(vp.params.DataParams(name="synthetic", in_chans=chans, image_size=p.data.image_size,
                                               num_classes=classes, train_size=4, test_size=2))
    model = vp.build_model(p.model, classes, chans, p.data.image_size)
    if p.model.name != "vit_custom":
        assert p.model.name in type(model).__name__.lower() or model.default_cfg["architecture"] == p.model.name
    if p.name == "imagenet_deit_base":
        assert abs(vp.count_params(model) / 1e6 - 86.57) < 0.5
    vp.attach_gates(model, p.sparse.sites)
    before = [q.detach().clone() for q in model.parameters()]
    cfg = TrainConfig(epochs=1, batch_size=2, eval_batch_size=2, max_steps=2, progress=False, l1=p.sparse.l1,
                      warmup_epochs=0, lr=1e-3)
    hist = train(model, bundle, cfg, tmp_path, "two_steps")
    assert len(hist) == 1 and math.isfinite(hist[0]["train_loss"])
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert sum(changed) >= 0.9 * len(changed)  # (almost) every parameter got a gradient and moved

"""Any timm ViT vitprune did not build: gates, prune, save, load, ONNX, onnxruntime; equal at each step."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import vitprune as vp
from tests.conftest import randomize
from vitprune.cli import main
from vitprune.export import TOLERANCE, check_onnx, export_onnx

EXACT = 1e-5
# the five shapes of the pruning tests, built by timm itself (no vitprune_arch), plus a bare constructor
FOREIGN = {
    "custom_cls": lambda: VisionTransformer(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=4,
                                            num_classes=10),
    "deit_distilled": lambda: timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8,
                                                embed_dim=48, depth=2, num_heads=3, num_classes=10),
    "gap": lambda: timm.create_model("vit_medium_patch16_gap_256", img_size=32, patch_size=8, embed_dim=64, depth=2,
                                     num_heads=4, num_classes=10),
    "reg_layerscale": lambda: timm.create_model("vit_base_patch16_reg4_gap_256", img_size=32, patch_size=8,
                                                embed_dim=64, depth=2, num_heads=4, init_values=0.1, num_classes=10),
    "qknorm_nobias": lambda: timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, embed_dim=64,
                                               depth=2, num_heads=4, qk_norm=True, qkv_bias=False, num_classes=10),
}


def close(a: torch.Tensor, b: torch.Tensor, tol: float = EXACT) -> bool:
    return float((a - b).abs().max()) <= tol


@pytest.mark.parametrize("key", sorted(FOREIGN))
@torch.no_grad()
def test_foreign_timm_model_round_trips_and_exports_at_every_step(key, tmp_path):
    model = randomize(FOREIGN[key]().eval())
    assert not hasattr(model, "vitprune_arch")
    chans, size = model.patch_embed.proj.in_channels, model.patch_embed.img_size[0]
    x = torch.randn(3, chans, size, size, generator=torch.Generator().manual_seed(1))
    steps = {"dense": model}
    gated = vp.attach_gates(randomize(FOREIGN[key]().eval()))
    randomize(gated, 2)
    steps["gated"] = gated
    plan = vp.plan_pruning(gated, vp.importance_scores(gated), 0.4)
    steps["pruned"] = vp.prune(gated, plan)
    assert close(steps["pruned"](x), vp.zero_dropped(gated, plan)(x))
    steps["factorized"] = vp.decompose_model(steps["pruned"], "svd", rank_ratio=0.5)
    for name, m in steps.items():
        vp.save_model(m, tmp_path / f"{name}.safetensors")
        loaded = vp.load_model(tmp_path / f"{name}.safetensors")
        assert type(loaded) is type(m) and close(loaded(x), m(x)), name
        export_onnx(loaded, tmp_path / f"{name}.onnx")
        assert check_onnx(loaded, tmp_path / f"{name}.onnx", batch=5) <= TOLERANCE, name


def test_pretrained_cfg_survives_the_checkpoint(tmp_path):
    model = timm.create_model("deit_tiny_patch16_224", depth=1)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.1, 0.2, 0.3), "input_size": (3, 224, 224)}
    vp.save_model(model, tmp_path / "m.safetensors")
    loaded = vp.load_model(tmp_path / "m.safetensors")
    assert loaded.pretrained_cfg["mean"] == [0.1, 0.2, 0.3] and loaded.pretrained_cfg["input_size"] == [3, 224, 224]


def test_onnx_batch_size_is_dynamic(tmp_path):
    model = randomize(FOREIGN["custom_cls"]().eval())
    export_onnx(model, tmp_path / "m.onnx")
    for batch in (1, 7):
        assert check_onnx(model, tmp_path / "m.onnx", batch=batch) <= TOLERANCE


def test_export_command(tmp_path, capsys):
    model = randomize(FOREIGN["gap"]().eval())
    vp.attach_gates(model)
    vp.save_model(model, tmp_path / "gated.safetensors")
    assert main(["export", str(tmp_path / "gated.safetensors"), "--onnx", str(tmp_path / "out.onnx")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_abs_diff"] <= TOLERANCE and (tmp_path / "out.onnx").stat().st_size > 1000
    assert main(["export", str(tmp_path / "gated.safetensors"), "--onnx", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_bench_command_times_a_model_and_compares_it_with_another(tmp_path, capsys):
    dense = randomize(FOREIGN["custom_cls"]().eval())
    vp.attach_gates(dense)
    small = vp.prune(dense, vp.plan_pruning(dense, vp.importance_scores(dense), 0.5))
    vp.save_model(vp.fold_gates(dense), tmp_path / "dense.safetensors")
    vp.save_model(small, tmp_path / "small.safetensors")
    args = ["bench", str(tmp_path / "small.safetensors"), "--batch", "2", "--rounds", "2"]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["runtime"] for r in rows} == {"torch", "onnxruntime"} and all(r["min_ms"] > 0 for r in rows)
    assert main([*args, "--against", str(tmp_path / "dense.safetensors"), "--runtime", "torch"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["macs_reduction_x"] > 1.3 and row["speedup_over_macs"] > 0


def test_a_killed_writers_temporary_folder_goes_with_the_next_write(tmp_path):
    """kill -9 during export leaves .<name>.pid<PID>.<random>.tmp; the next write into that folder removes it
    (a live process's stays)."""
    import os

    model = randomize(FOREIGN["gap"]().eval())
    dead, live = tmp_path / ".m.onnx.pid999999999.abc.tmp", tmp_path / f".m.onnx.pid{os.getpid()}.abc.tmp"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "m.onnx").write_bytes(b"half")
    export_onnx(model, tmp_path / "m.onnx")
    assert not dead.exists() and live.exists() and (tmp_path / "m.onnx").is_file()

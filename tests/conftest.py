"""Shared fixtures: small timm ViTs of different shapes, the smoke parameter set, temp run folders."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import vitprune as vp
from vitprune.params import ModelParams

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "params" / "smoke.yaml"

# (timm name, kwargs, in_chans, img_size, qk-norm) — class token, distilled, average pooling,
# register tokens + LayerScale, qk-norm without qkv bias: different shapes of timm ViT.
ARCHS = {
    "custom_cls": ("vit_custom", {}, 1, 28, False),
    "deit_distilled": ("deit_tiny_distilled_patch16_224",
                       dict(patch_size=8, embed_dim=48, depth=2, num_heads=3), 3, 32, False),
    "gap": ("vit_medium_patch16_gap_256", dict(patch_size=8, embed_dim=64, depth=2, num_heads=4), 3, 32, False),
    "reg_layerscale": ("vit_base_patch16_reg4_gap_256",
                       dict(patch_size=8, embed_dim=64, depth=2, num_heads=4, init_values=0.1), 3, 32, False),
    "qknorm_nobias": ("vit_small_patch16_224",
                      dict(patch_size=8, embed_dim=64, depth=2, num_heads=4, qk_norm=True, qkv_bias=False),
                      3, 32, True),
}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (zero-initialised heads and biases too) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def make_arch(key: str, seed: int = 0):
    """(model in eval mode with random weights, example input, uses qk-norm)."""
    name, kwargs, chans, size, qk_norm = ARCHS[key]
    torch.manual_seed(seed)
    p = ModelParams(name=name, patch_size=7, embed_dim=32, depth=2, num_heads=4, kwargs=dict(kwargs))
    model = vp.build_model(p, num_classes=10, in_chans=chans, img_size=size).eval()
    randomize(model, seed)
    x = torch.randn(3, chans, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return model, x, qk_norm


@pytest.fixture(params=sorted(ARCHS))
def arch(request):
    return make_arch(request.param)


@pytest.fixture
def smoke_params():
    return vp.load_params(SMOKE)


@pytest.fixture
def digits_bundle(smoke_params):
    return vp.load_data(smoke_params.data)


@contextmanager
def working_dir(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The whole smoke sequence, run once per test session from a copy of the project (its notebooks and library
    are the ones used): (root with runs/, figures/ and project/, the timing record)."""
    from vitprune.study.pipeline import reproduce

    root = tmp_path_factory.mktemp("pipeline")
    project = root / "project"
    for part in ("vitprune", "notebooks", "params"):
        shutil.copytree(ROOT / part, project / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "constraints.txt", project)
    with working_dir(project):
        timing = reproduce("params/smoke.yaml", runs_root=root / "runs", figures_root=root / "figures")
    return root, timing

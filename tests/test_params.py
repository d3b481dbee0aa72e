"""Parameter sets: every shipped file loads; overrides; bad input names the key and what is accepted."""

from __future__ import annotations

from pathlib import Path

import pytest

import vitprune as vp
from vitprune.errors import ParamsError
from vitprune.params import parse_set_args

PARAMS = sorted((Path(__file__).resolve().parent.parent / "params").glob("*.yaml"))


def test_shipped_parameter_sets_load():
    names = {p.stem for p in PARAMS}
    assert {"default", "smoke", "cifar10", "imagenet_deit_small", "imagenet_deit_base"} <= names
    for path in PARAMS:
        p = vp.load_params(path)
        assert p.name == path.stem and p.source == str(path)


def test_paper_settings():
    c = vp.load_params(PARAMS[0].parent / "cifar10.yaml")
    assert (c.data.image_size, c.model.patch_size, c.model.embed_dim, c.model.depth, c.model.num_heads) == (
        32, 4, 512, 6, 8)
    assert c.model.embed_dim * c.model.mlp_ratio == 512
    for v in ("small", "base"):
        d = vp.load_params(PARAMS[0].parent / f"imagenet_deit_{v}.yaml")
        assert d.model.name == f"deit_{v}_patch16_224"
        assert (d.sparse.l1, d.sparse.lr, d.sparse.epochs) == (1e-4, 6.25e-6, 100)


def test_overrides_dotted_and_cli():
    p = vp.load_params(PARAMS[0].parent / "default.yaml", {"train.epochs": 5, "prune.ratios": [0.5]})
    assert p.train.epochs == 5 and p.prune.ratios == [0.5]
    assert parse_set_args(["train.lr=0.01", "model.qk_norm=true", "prune.ratios=[0.1, 0.2]"]) == {
        "train.lr": 0.01, "model.qk_norm": True, "prune.ratios": [0.1, 0.2]}
    assert vp.load_params(None, {"train.lr": 1}).train.lr == 1.0  # an int is a valid float


@pytest.mark.parametrize("overrides,pattern", [
    ({"train.epochs": -3}, r"train\.epochs: -3 is out of range; accepted: int in \[0, 100000\]"),
    ({"train.epochs": "ten"}, r"train\.epochs: got 'ten' \(str\); accepted: int"),
    ({"train.epoch": 3}, r"unknown key 'train\.epoch'; accepted keys at train: epochs, lr"),
    ({"trian.epochs": 3}, r"unknown key 'trian'; accepted keys at top level: name, data"),
    ({"data.name": "mnist"}, r"data\.name: 'mnist' is not one of mnist5k, digits, cifar10"),
    ({"prune.ratios": [0.2, 1.2]}, r"prune\.ratios\[1\]: 1\.2 is out of range"),
    ({"sparse.sites": ["attn_in", "mlp_out"]}, r"sparse\.sites\[1\]: 'mlp_out' is not one of attn_in"),
    ({"model.qkv_bias": "yes"}, r"model\.qkv_bias: got 'yes' \(str\); accepted: true or false"),
    ({"train.lr": 0}, r"train\.lr: 0\.0 is out of range; accepted: float in \(0\.0, 10\.0\]"),
    ({"model.embed_dim": 65}, r"model\.embed_dim \(65\) must be divisible by model\.num_heads \(4\)"),
    ({"data.name": "cifar10"}, r"data\.root is required for data\.name 'cifar10'"),
    ({"model.global_pool": "token", "model.class_token": False}, r"global_pool 'token' needs model\.class_token"),
    ({"model.qk_norm": True, "sparse.sites": ["qk"]}, r"'qk' cannot be exact with model\.qk_norm"),
    ({"train.epochs.x": 1}, r"'epochs' is a value, not a section"),
])
def test_bad_values_name_the_key(overrides, pattern):
    with pytest.raises(ParamsError, match=pattern):
        vp.load_params(PARAMS[0].parent / "default.yaml", overrides)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match=r"params file 'nope\.yaml' does not exist"):
        vp.load_params("nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="bad.yaml' is not valid YAML"):
        vp.load_params(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="must hold a mapping of sections, got list"):
        vp.load_params(listy)
    section = tmp_path / "section.yaml"
    section.write_text("train: 5\n")
    with pytest.raises(ParamsError, match="train: expected a mapping of keys, got int"):
        vp.load_params(section)


def test_bad_set_arguments():
    with pytest.raises(ParamsError, match="expected KEY=VALUE"):
        parse_set_args(["train.epochs"])
    with pytest.raises(ParamsError, match="value is not valid YAML"):
        parse_set_args(["train.epochs=[1"])
    with pytest.raises(ParamsError, match="override key '.train' is malformed"):
        vp.load_params(None, {".train": 1})


def test_environment_yml_mirrors_the_lock():
    root = PARAMS[0].parent.parent
    lock = dict(line.strip().split("==") for line in (root / "constraints.txt").read_text().splitlines()
                if "==" in line)
    env = (root / "environment.yml").read_text()
    pins = [line.strip()[2:] for line in env.splitlines() if "==" in line]
    assert pins, "environment.yml pins nothing"
    for pin in pins:
        name, version = pin.split("==")
        assert lock.get(name) == version, f"environment.yml pins {pin}, constraints.txt has {lock.get(name)}"
    for direct in ("torch", "torchvision", "timm", "papermill", "safetensors", "mlxtend"):
        assert any(p.split("==")[0] == direct for p in pins), f"{direct} is not pinned in environment.yml"
    assert lock["torch"] == "2.14.1" and lock["torchvision"] == "0.29.1"


def test_yaml_merge_keys_are_read_as_yaml_reads_them(tmp_path):
    """`<<: *anchor` merges a mapping; keys given beside it win; a key given twice is still refused."""
    path = tmp_path / "merged.yaml"
    path.write_text("name: merged\nsparse: &common {epochs: 1, lr: 0.001}\nfinetune:\n  <<: *common\n  epochs: 2\n")
    p = vp.load_params(path)
    assert (p.finetune.lr, p.finetune.epochs, p.sparse.epochs) == (0.001, 2, 1)
    path.write_text("name: merged\nsparse: &common {epochs: 1}\nfinetune:\n  <<: *common\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ParamsError, match="'lr' is given twice"):
        vp.load_params(path)

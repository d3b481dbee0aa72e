"""Bad input through the CLI, table-driven: a non-zero exit, one line naming the culprit, nothing changed.

Every case runs `vitprune.cli.main` in a folder of fixtures (model files good and broken, parameter
files good and broken); the folder's files are compared before and after each case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vitprune as vp
from tests.conftest import ROOT, SMOKE
from vitprune.checkpoint import SPEC_KEY, architecture_spec
from vitprune.cli import main

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000") + bytes(range(256))


def _model(params_file: Path, **overrides):
    p = vp.load_params(params_file, overrides)
    bundle = vp.load_data(p.data)
    torch.manual_seed(0)
    model = vp.build_model(p.model, bundle.num_classes, bundle.in_chans, bundle.image_size)
    model.vitprune_params = {"name": p.name, "file": str(params_file), "data": p.data.name}
    return model


@pytest.fixture(scope="module")
def box(tmp_path_factory) -> Path:
    """A folder of fixtures: model files (smoke-sized, default-sized, gated, broken) and parameter files."""
    d = tmp_path_factory.mktemp("bad_inputs")
    small = _model(SMOKE)
    vp.save_model(small, d / "small.safetensors")
    gated = _model(SMOKE)
    vp.attach_gates(gated)
    vp.save_model(gated, d / "gated.safetensors")
    vp.save_model(_model(ROOT / "params" / "default.yaml"), d / "wide28.safetensors")
    (d / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    (d / "empty.safetensors").write_bytes(b"")
    save_file({"w": torch.zeros(2)}, str(d / "nospec.safetensors"))
    save_file({"w": torch.zeros(2)}, str(d / "badjson.safetensors"), metadata={SPEC_KEY: "{oops"})
    spec = architecture_spec(small)
    tensors = {k: v.contiguous() for k, v in small.state_dict().items()}
    unknown = {**spec, "timm": {"name": "vit_does_not_exist", "kwargs": {}}}
    save_file(tensors, str(d / "unknown_arch.safetensors"), metadata={SPEC_KEY: json.dumps(unknown)})
    save_file(tensors, str(d / "no_timm_key.safetensors"), metadata={SPEC_KEY: json.dumps({"format": spec["format"]})})
    wrong = dict(tensors)
    wrong["head.weight"] = torch.zeros(3, 3)
    save_file(wrong, str(d / "wrong_shapes.safetensors"), metadata={SPEC_KEY: json.dumps(spec)})
    (d / "image.yaml").write_bytes(PNG)
    (d / "empty.yaml").write_text("")
    (d / "list.yaml").write_text("- name\n- data\n")
    (d / "dup.yaml").write_text("name: a\ntrain:\n  lr: 0.1\n  lr: 0.2\n")
    (d / "typo.yaml").write_text("name: typo\ntrian:\n  epochs: 3\n")
    (d / "broken.yaml").write_text("name: [unclosed\n  train: {\n")
    (d / "weights.pth").write_bytes(b"not a torch file")
    (d / "a_file").write_text("I am a file")
    (d / "folder").mkdir()
    (d / "folder.yaml").mkdir()
    for name, text in {"figs_badjson": "{oops", "figs_dict": "{}", "figs_badcsv": "[]"}.items():
        (d / name).mkdir()
        (d / name / "findings.json").write_text(text)
    (d / "figs_badcsv" / "table_sun.csv").write_bytes(PNG)
    _issue22_fixtures(d, small, spec, tensors)
    return d


def _issue22_fixtures(d: Path, small, spec: dict, tensors: dict) -> None:
    """Files for the inputs that used to pass silently or end in a traceback: damaged specs and records,
    factorized models, YAML oddities, a named pipe, figure folders with bad claims or tables."""
    vp.save_model(vp.decompose_model(small, "svd", rank_ratio=0.25), d / "factorized.safetensors")
    for name, change in {"inf": {"mlp_ratio": float("inf")}, "neg": {"img_size": -8},
                         "huge": {"depth": 200, "embed_dim": 65536},  # 10 TB of weights claimed in a few KB
                         "mismatch": {"depth": 40}}.items():
        bad = json.loads(json.dumps(spec))
        bad["timm"]["kwargs"].update(change)
        save_file(tensors, str(d / f"spec_{name}.safetensors"), metadata={SPEC_KEY: json.dumps(bad)})
    (d / "damaged_run").mkdir()
    vp.save_model(small, d / "damaged_run" / "dense.ckpt.safetensors", metadata={"vitprune_train": "{oops"})
    (d / "lockroot" / "smoke" / ".lock").mkdir(parents=True)
    (d / "listkey.yaml").write_text("name: k\n? [a, b]\n: 1\n")
    (d / "bomb.yaml").write_text("name: bomb\na: &a [x, x, x, x, x, x, x, x, x, x]\n"
                                 + "".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n"
                                           for p, n in zip("abcde", "bcdef")) + "model: {kwargs: {x: *f}}\n")
    os.mkfifo(d / "pipe.yaml")
    claim = {"id": "c", "statement": "a beats b", "verdict": "holds", "difference": 1.0, "low": 0.5, "high": 1.5}
    for name, found in {"figs_numstatement": {"statement": 5}, "figs_lowtext": {"low": "x"},
                        "figs_nulldiff": {"difference": None}, "figs_dirtable": {}, "figs_texttop1": {}}.items():
        (d / name).mkdir()
        (d / name / "findings.json").write_text(json.dumps([{**claim, **found}]))
    (d / "figs_dirtable" / "table_sun.csv").mkdir()
    (d / "figs_texttop1" / "table_sun.csv").write_text("seed,method,top1\n0,svd,97.1\n1,svd,abc\n")


S = ["--params", str(SMOKE)]
T = ["train", *S]
EV = "evaluate"
DC = ["decompose", *S, "small.safetensors", "--method", "svd"]
# (argv, exit code, words the one-line message must contain)
CASES = [
    # parameter files
    (["train", "--params", "image.yaml"], 2, ["image.yaml", "not a text file"]),
    (["train", "--params", "empty.yaml"], 2, ["empty.yaml", "is empty"]),
    (["train", "--params", "list.yaml"], 2, ["list.yaml", "mapping"]),
    (["train", "--params", "dup.yaml"], 2, ["'lr' is given twice", "line 4"]),
    (["train", "--params", "folder.yaml"], 2, ["folder.yaml", "is a directory"]),
    (["train", "--params", "missing.yaml"], 2, ["missing.yaml", "does not exist"]),
    (["train", "--params", "typo.yaml"], 2, ["unknown key 'trian'", "accepted keys"]),
    (["train", "--params", "broken.yaml"], 2, ["broken.yaml", "not valid YAML"]),
    # overrides: numbers
    ([*T, "--set", "train.lr=nan"], 2, ["train.lr", "finite"]),
    ([*T, "--set", "train.lr=.inf"], 2, ["train.lr", "finite"]),
    ([*T, "--set", "train.lr=-1"], 2, ["train.lr", "out of range"]),
    ([*T, "--set", "train.lr=abc"], 2, ["train.lr", "'abc'"]),
    ([*T, "--set", "train.lr=100"], 2, ["train.lr", "out of range"]),
    ([*T, "--set", "train.epochs=-1"], 2, ["train.epochs", "out of range"]),
    ([*T, "--set", "train.epochs=1.5"], 2, ["train.epochs", "int"]),
    ([*T, "--set", "train.epochs=true"], 2, ["train.epochs", "int"]),
    ([*T, "--set", "train.epochs=10000000"], 2, ["train.epochs", "out of range"]),
    ([*T, "--set", "train.warmup_epochs=.inf"], 2, ["train.warmup_epochs", "finite"]),
    ([*T, "--set", "train.label_smoothing=.nan"], 2, ["train.label_smoothing", "finite"]),
    ([*T, "--set", "train.label_smoothing=1"], 2, ["train.label_smoothing", "out of range"]),
    ([*T, "--set", "train.clip_grad=.nan"], 2, ["train.clip_grad", "finite"]),
    ([*T, "--set", "train.clip_grad=.inf"], 2, ["train.clip_grad", "finite"]),
    ([*T, "--set", "sparse.l1=.nan"], 2, ["sparse.l1", "finite"]),
    ([*T, "--set", "sparse.l1=.inf"], 2, ["sparse.l1", "finite"]),
    ([*T, "--set", "finetune.distill=.nan"], 2, ["finetune.distill", "finite"]),
    ([*T, "--set", "prune.ablation_ratio=.nan"], 2, ["prune.ablation_ratio", "finite"]),
    ([*T, "--set", "decompose.finetune_ratio=.nan"], 2, ["decompose.finetune_ratio", "finite"]),
    ([*T, "--set", "train.threads=0"], 2, ["train.threads", "out of range"]),
    ([*T, "--set", "train.seed=-1"], 2, ["train.seed", "out of range"]),
    ([*T, "--set", "train.accum_steps=0"], 2, ["train.accum_steps", "out of range"]),
    # overrides: lists
    ([*T, "--set", "prune.ratios=[.nan]"], 2, ["prune.ratios[0]", "finite"]),
    ([*T, "--set", "prune.ratios=[]"], 2, ["prune.ratios", "empty"]),
    ([*T, "--set", "prune.ratios=[1.0]"], 2, ["prune.ratios[0]", "out of range"]),
    ([*T, "--set", "prune.ratios=[a]"], 2, ["prune.ratios[0]", "'a'"]),
    ([*T, "--set", "prune.ratios=0.4"], 2, ["prune.ratios", "a list"]),
    ([*T, "--set", "decompose.methods=[svd, svd]"], 2, ["decompose.methods[1]", "twice"]),
    ([*T, "--set", "decompose.methods=[bogus]"], 2, ["decompose.methods[0]", "'bogus'", "qr_mgs"]),
    ([*T, "--set", "sparse.sites=[mlp_out]"], 2, ["sparse.sites[0]", "'mlp_out'", "attn_in"]),
    ([*T, "--set", "decompose.layers=[attn]"], 2, ["decompose.layers[0]", "'attn'", "qkv"]),
    ([*T, "--set", "bench.batch_sizes=[0]"], 2, ["bench.batch_sizes[0]", "out of range"]),
    ([*T, "--set", "bench.batch_sizes=[1.5]"], 2, ["bench.batch_sizes[0]", "int"]),
    # overrides: names, choices, sizes
    ([*T, "--set", "train.device=banana"], 2, ["train.device", "'banana'", "cuda:N"]),
    ([*T, "--set", "data.name=mnist"], 2, ["data.name", "'mnist'", "mnist5k"]),
    ([*T, "--set", "prune.scope=local"], 2, ["prune.scope", "'local'", "global"]),
    ([*T, "--set", "data.image_size=100000"], 2, ["data.image_size", "out of range"]),
    ([*T, "--set", "data.batch_size=0"], 2, ["data.batch_size", "out of range"]),
    ([*T, "--set", "data.batch_size=-5"], 2, ["data.batch_size", "out of range"]),
    ([*T, "--set", "model.depth=0"], 2, ["model.depth", "out of range"]),
    ([*T, "--set", "model.embed_dim=33"], 2, ["model.embed_dim (33)", "divisible"]),
    ([*T, "--set", "model.patch_size=3"], 2, ["data.image_size (8)", "model.patch_size (3)"]),
    ([*T, "--set", "model.patch_size=16"], 2, ["model.patch_size"]),
    ([*T, "--set", "name=../evil"], 2, ["name", "'../evil'", "path separators"]),
    ([*T, "--set", "name=a/b"], 2, ["name", "'a/b'"]),
    ([*T, "--set", "name=.hidden"], 2, ["name", "'.hidden'"]),
    ([*T, "--set", "name="], 2, ["name", "None"]),
    ([*T, "--set", "train=5"], 2, ["train", "expected a mapping"]),
    ([*T, "--set", "data=[1, 2]"], 2, ["data", "expected a mapping"]),
    ([*T, "--set", "model.kwargs=5"], 2, ["model.kwargs", "a mapping"]),
    ([*T, "--set", "nosuch.key=1"], 2, ["unknown key 'nosuch'"]),
    ([*T, "--set", "train.nosuch=1"], 2, ["unknown key 'train.nosuch'"]),
    ([*T, "--set", "train..lr=1"], 2, ["train..lr", "malformed"]),
    ([*T, "--set", "trainlr"], 2, ["trainlr", "KEY=VALUE"]),
    ([*T, "--set", "train.lr=["], 2, ["train.lr=[", "not valid YAML"]),
    ([*T, "--set", "train.epochs.x=1"], 2, ["'epochs' is a value"]),
    # cross-field consistency
    ([*T, "--set", "data.name=cifar10"], 2, ["data.root is required", "cifar10"]),
    ([*T, "--set", "sparse.sites=[qk]", "--set", "model.qk_norm=true"], 2, ["'qk'", "qk_norm"]),
    ([*T, "--set", "decompose.finetune_ratio=0.9"], 2, ["decompose.finetune_ratio (0.9)", "rank_ratios"]),
    ([*T, "--set", "decompose.source_ratio=0.9"], 2, ["decompose.source_ratio (0.9)", "prune.ratios"]),
    ([*T, "--set", "model.class_token=false"], 2, ["global_pool 'token'", "class_token"]),
    # data and models named by a parameter set
    ([*T, "--set", "data.name=imagefolder", "--set", "data.root=nowhere"], 2, ["imagefolder", "nowhere"]),
    ([*T, "--set", "data.name=cifar10", "--set", "data.root=nowhere"], 2, ["data.root 'nowhere'", "does not exist"]),
    ([*T, "--set", "model.name=vit_does_not_exist"], 2, ["model.name 'vit_does_not_exist'", "not a timm model"]),
    ([*T, "--set", "model.name=resnet18"], 2, ["resnet18", "not a timm VisionTransformer"]),
    ([*T, "--set", "model.pretrained=nowhere.pth"], 2, ["model.pretrained 'nowhere.pth'", "does not exist"]),
    ([*T, "--set", "model.pretrained=weights.pth"], 2, ["weights.pth", "could not be read"]),
    ([*T, "--run-dir", "a_file"], 2, ["--run-dir 'a_file'", "is a file"]),
    # model files
    ([EV, *S, "missing.safetensors"], 2, ["missing.safetensors", "does not exist"]),
    ([EV, *S, "folder"], 2, ["folder", "is a directory"]),
    ([EV, *S, "corrupt.safetensors"], 2, ["corrupt.safetensors", "not a readable safetensors file"]),
    ([EV, *S, "empty.safetensors"], 2, ["empty.safetensors", "not a readable safetensors file"]),
    ([EV, *S, "nospec.safetensors"], 2, ["nospec.safetensors", "no architecture spec"]),
    ([EV, *S, "badjson.safetensors"], 2, ["badjson.safetensors", "not valid JSON"]),
    ([EV, *S, "unknown_arch.safetensors"], 2, ["unknown_arch.safetensors", "vit_does_not_exist"]),
    ([EV, *S, "no_timm_key.safetensors"], 2, ["no_timm_key.safetensors", "malformed"]),
    ([EV, *S, "wrong_shapes.safetensors"], 2, ["wrong_shapes.safetensors", "wrong shapes", "head.weight"]),
    ([EV, *S, "wide28.safetensors"], 2, ["wide28.safetensors", "28x28", "--params"]),
    ([EV, "wide28.safetensors", "--params", str(ROOT / "params" / "cifar10.yaml")], 2, ["data.root"]),
    (["prune", *S, "wide28.safetensors", "--ratio", "0.4"], 2, ["wide28.safetensors", "28x28"]),
    (["prune", *S, "gated.safetensors", "--ratio", "1.5"], 2, ["ratio 1.5", "[0, 1)"]),
    (["prune", *S, "gated.safetensors", "--ratio", "nan"], 2, ["ratio nan", "[0, 1)"]),
    (["prune", *S, "gated.safetensors", "--ratio", "-0.1"], 2, ["ratio -0.1"]),
    (["prune", *S, "small.safetensors", "--ratio", "0.4"], 2, ["no gates", "magnitude"]),
    (["prune", *S, "gated.safetensors", "--ratio", "0.4", "--score", "bogus"], 2, ["invalid choice", "'bogus'"]),
    (["prune", *S, "gated.safetensors"], 2, ["--ratio"]),
    (["sparse-train", *S, "corrupt.safetensors"], 2, ["corrupt.safetensors", "not a readable"]),
    (["sparse-train", *S, "wide28.safetensors"], 2, ["wide28.safetensors", "28x28"]),
    (["finetune", *S, "missing.safetensors"], 2, ["missing.safetensors", "does not exist"]),
    (["finetune", *S, "small.safetensors", "--teacher", "missing.safetensors"], 2, ["--teacher", "missing"]),
    (["finetune", *S, "small.safetensors", "--teacher", "wide28.safetensors"], 2, ["teacher", "28x28"]),
    # decompositions
    ([*DC, "--rank", "100000"], 2, ["no layer", "m*n/(m+n)", "nothing was written"]),
    ([*DC, "--rank", "0"], 2, ["rank", "positive", "0"]),
    ([*DC, "--rank", "-3"], 2, ["rank", "positive", "-3"]),
    ([*DC, "--rank-ratio", "0"], 2, ["rank_ratio", "(0, 1]"]),
    ([*DC, "--rank-ratio", "1.5"], 2, ["rank_ratio", "1.5"]),
    ([*DC, "--rank-ratio", "nan"], 2, ["rank_ratio", "finite"]),
    ([*DC, "--energy", "0"], 2, ["energy", "(0, 1]"]),
    ([*DC, "--energy", "inf"], 2, ["energy", "finite"]),
    ([*DC, "--param-budget", "nan"], 2, ["param_budget", "finite"]),
    ([*DC, "--param-budget", "-1"], 2, ["param_budget", "-1"]),
    ([*DC, "--rank", "4", "--out", "folder"], 2, ["--out 'folder'", "is a directory"]),
    ([*DC, "--rank", "4", "--out", "a_file/x.safetensors"], 2, ["a_file", "is a file"]),
    ([*DC, "--rank", "4", "--layers", "attn"], 2, ["invalid choice", "'attn'"]),
    ([*DC, "--rank", "4", "--rank-ratio", "0.5"], 2, ["not allowed with"]),
    (["decompose", *S, "small.safetensors", "--method", "bogus", "--rank", "4"], 2,
     ["--method", "unknown decomposition method 'bogus'", "qr_mgs"]),
    (["decompose", *S, "wide28.safetensors", "--method", "svd_activation", "--rank", "4"], 2, ["28x28"]),
    (["decompose", *S, "folder", "--method", "svd", "--rank", "4"], 2, ["folder", "is a directory"]),
    # info and reproduce
    (["info", "not_a_model_or_file"], 2, ["'not_a_model_or_file'", "neither a model file nor a timm model"]),
    (["info", "resnet18"], 2, ["resnet18", "not a timm VisionTransformer"]),
    (["info", "small.safetensors", "--image-size", "0"], 2, ["--image-size 0", "out of range"]),
    (["info", "small.safetensors", "--image-size", "64"], 2, ["--image-size 64", "8x8"]),
    (["info", "corrupt.safetensors"], 2, ["corrupt.safetensors", "not a readable"]),
    (["reproduce", "missing.yaml"], 2, ["missing.yaml", "does not exist"]),
    (["reproduce", "image.yaml"], 2, ["image.yaml", "not a text file"]),
    (["reproduce", str(SMOKE), "--only", "0"], 2, ["--only 0", "1..9"]),
    (["reproduce", str(SMOKE), "--only", "99"], 2, ["--only 99", "1..9"]),
    (["reproduce", str(SMOKE), "--from", "10"], 2, ["--from 10", "1..9"]),
    (["reproduce", str(SMOKE), "--seeds", "0,x"], 2, ["--seeds", "'0,x'", "comma-separated list of seeds"]),
    (["reproduce", str(SMOKE), "--seeds", "-1"], 2, ["--seeds", "non-negative"]),
    (["reproduce", str(SMOKE), "--seeds", "1,1"], 2, ["seeds[1]", "listed twice"]),
    (["reproduce", str(SMOKE), "--set", "train.lr=nan"], 2, ["train.lr", "finite"]),
    # comparing a re-run's figures with the committed ones
    (["compare", "nowhere", "folder"], 2, ["nowhere is not a folder", "figures/<set>"]),
    (["compare", "folder", "folder"], 2, ["folder/findings.json does not exist", "vitprune reproduce"]),
    (["compare", "figs_badjson", "folder"], 2, ["figs_badjson/findings.json is not JSON"]),
    (["compare", "figs_dict", "folder"], 2, ["figs_dict/findings.json is not a list of claims"]),
    (["compare", "figs_badcsv", "figs_badcsv"], 2, ["figs_badcsv/table_sun.csv is not a readable CSV table"]),
    (["reproduce", str(SMOKE), "--set", "name=../x"], 2, ["name", "'../x'"]),
    (["reproduce", str(SMOKE), "--only", "3", "--from", "2"], 2, ["--only", "--from"]),
    # runs that could not have trained, or files named for what they are not (issue 22)
    ([*T, "--set", "data.batch_size=4096"], 2, ["data.batch_size (4096)", "training set", "at most"]),
    ([*T, "--set", "train.min_lr=5"], 2, ["train.min_lr (5", "above train.lr", "accepted"]),
    ([*T, "--set", "model.mlp_ratio=0.01"], 2, ["model.mlp_ratio (0.01)", "hidden width of 0"]),
    ([*T, "--set", "prune.ratios=[0.4, 0.40001]"], 2, ["prune.ratios[1]", "_40"]),
    ([*T, "--set", "budget.prune_ratios=[0.5, 0.500001]", "--set", "budget.finetune_ratio=0.5"], 2,
     ["budget.prune_ratios[1]", "_50"]),
    (["prune", *S, "gated.safetensors", "--ratio", "0.4", "--set", "prune.min_keep=1000000"], 2,
     ["ratio 0.4", "would remove 0.000", "min_keep"]),
    (["prune", *S, "gated.safetensors", "--ratio", "0.4", "--set", "prune.round_to=4096"], 2,
     ["ratio 0.4", "round_to 4096"]),
    (["decompose", *S, "factorized.safetensors", "--method", "svd", "--rank-ratio", "0.5"], 2,
     ["already factorized", "dense or pruned model"]),
    (["finetune", *S, "small.safetensors", "--set", "finetune.distill=0.5"], 2, ["finetune.distill", "--teacher"]),
    # models timm cannot build, or memory cannot hold
    ([*T, "--set", "model.kwargs={bogus: 1}"], 2, ["model.kwargs.bogus", "not an argument", "accepted"]),
    ([*T, "--set", "model.kwargs={depth: x}"], 2, ["model.kwargs", "'depth': 'x'", "cannot build"]),
    ([*T, "--set", "model.kwargs={img_size: 32}"], 2, ["model.kwargs.img_size (32)", "contradicts the data"]),
    ([*T, "--set", "model.kwargs={num_classes: 3}"], 2, ["model.kwargs.num_classes (3)", "contradicts the data"]),
    ([*T, "--set", "model.name=vit_tiny_patch16_224"], 2, ["vit_tiny_patch16_224", "16x16 patches", "8x8"]),
    (["info", "vit_tiny_patch16_224", "--image-size", "8"], 2, ["16x16 patches", "8x8 images"]),
    ([*T, "--set", "model.embed_dim=16384", "--set", "model.depth=100", "--set", "model.num_heads=1"], 2,
     ["parameters", "GB of weights", "memory free"]),
    ([EV, *S, "spec_huge.safetensors"], 2, ["spec_huge.safetensors", "GB of weights"]),
    ([EV, *S, "spec_mismatch.safetensors"], 2, ["spec_mismatch.safetensors", "does not match its architecture"]),
    ([EV, *S, "spec_inf.safetensors"], 2, ["spec_inf.safetensors", "cannot be built", "infinity"]),
    ([EV, *S, "spec_neg.safetensors"], 2, ["spec_neg.safetensors", "cannot be built"]),
    ([*T, "--set", "train.accum_steps=100"], 2, ["train.accum_steps (100)", "must divide data.batch_size (64)"]),
    # files and folders
    ([*T, "--run-dir", "/proc/vitprune_bad_input"], 2, ["/proc/vitprune_bad_input", "writable folder"]),
    ([*T, "--run-dir", "damaged_run"], 2, ["damaged_run/dense.ckpt.safetensors", "training record", "damaged"]),
    (["train", "--params", "listkey.yaml"], 2, ["listkey.yaml", "line 2 is a list"]),
    (["train", "--params", "bomb.yaml"], 2, ["bomb.yaml", "expands to more than"]),
    (["train", "--params", "pipe.yaml"], 2, ["pipe.yaml", "not a regular file"]),
    (["reproduce", str(SMOKE), "--runs-root", "a_file"], 2, ["--runs-root 'a_file'", "is a file"]),
    (["reproduce", str(SMOKE), "--figures-root", "a_file"], 2, ["--figures-root 'a_file'", "is a file"]),
    (["reproduce", str(SMOKE), "--runs-root", "lockroot"], 1, [".lock", "not a plain file"]),
    (["compare", "figs_numstatement", "figs_numstatement"], 2, ["statement 5", "a text is needed"]),
    (["compare", "figs_lowtext", "figs_lowtext"], 2, ["low 'x'", "finite number"]),
    (["compare", "figs_nulldiff", "figs_nulldiff"], 2, ["difference None", "finite number"]),
    (["compare", "figs_dirtable", "figs_dirtable"], 2, ["table_sun.csv is not a file but a folder"]),
    (["compare", "figs_texttop1", "figs_texttop1"], 2, ["column 'top1' holds text", "'abc' in row 2"]),
]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if "__pycache__" not in p.parts}


def test_there_are_more_than_eighty_cases():
    assert len(CASES) >= 80


@pytest.mark.parametrize("argv,code,words", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input_is_refused_in_one_line_and_changes_nothing(box, monkeypatch, capsys, argv, code, words):
    monkeypatch.chdir(box)
    before = snapshot(box)
    try:
        got = main(argv)
    except SystemExit as exit_:  # argparse's own refusals: usage plus one error line
        got = exit_.code
    out, err = capsys.readouterr()
    assert got == code, f"exit {got}, stderr: {err}"
    assert "Traceback" not in err + out
    message = err.strip().splitlines()[-1] if err.strip() else ""
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    assert snapshot(box) == before, "a refused command changed files"


@pytest.mark.parametrize("argv,code,words", [CASES[0], CASES[8], CASES[79]], ids=["binary", "nan", "model"])
def test_the_installed_command_exits_with_the_code_and_no_traceback(box, argv, code, words):
    result = subprocess.run([sys.executable, "-m", "vitprune.cli", *argv], cwd=box, capture_output=True, text=True)
    assert result.returncode == code
    assert "Traceback" not in result.stderr and all(w in result.stderr for w in words)
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_readme_states_the_number_of_cases():
    assert f"{len(CASES)} bad inputs" in (ROOT / "README.md").read_text()

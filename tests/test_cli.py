"""The vitprune command end to end on the smoke parameters, and its errors."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SMOKE
from vitprune.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_sparse_prune_finetune_decompose_evaluate_info(tmp_path, capsys):
    rd = ["--params", str(SMOKE), "--run-dir", str(tmp_path)]
    assert run(capsys, "train", *rd)[0] == 0
    assert run(capsys, "sparse-train", *rd)[0] == 0
    code, out, _ = run(capsys, "prune", *rd, "--ratio", "0.4", "--score", "taylor")
    assert code == 0 and abs(json.loads(out)["realised_ratio"] - 0.4) < 0.1
    pruned = tmp_path / "pruned_taylor_40.safetensors"
    assert pruned.is_file() and (tmp_path / "pruned_taylor_40.plan.json").is_file()
    assert run(capsys, "finetune", *rd, str(pruned), "--teacher", str(tmp_path / "dense.safetensors"))[0] == 0
    assert (tmp_path / "pruned_taylor_40_ft.safetensors").is_file()
    code, out, _ = run(capsys, "decompose", *rd, str(pruned), "--method", "qr_mgs", "--rank-ratio", "0.5")
    info = json.loads(out)
    assert code == 0 and info["params"] < info["params_before"]
    code, out, _ = run(capsys, "decompose", *rd, str(pruned), "--method", "svd_activation", "--energy", "0.9",
                       "--out", str(tmp_path / "act.safetensors"))
    assert code == 0 and (tmp_path / "act.safetensors").is_file()
    code, out, _ = run(capsys, "decompose", *rd, str(pruned), "--method", "lu", "--rank-ratio", "0.5", "--refit",
                       "--out", str(tmp_path / "lu_refit.safetensors"))
    assert code == 0 and (tmp_path / "lu_refit.safetensors").is_file()
    code, out, _ = run(capsys, "evaluate", *rd, str(tmp_path / "pruned_taylor_40_qr_mgs.safetensors"))
    assert code == 0 and 0 <= json.loads(out)["top1"] <= 100
    code, out, _ = run(capsys, "info", str(pruned))
    assert code == 0 and json.loads(out)["input"] == [1, 1, 8, 8]
    code, out, _ = run(capsys, "info", "deit_base_patch16_224")
    assert code == 0 and abs(json.loads(out)["GMACs"] - 17.58) < 0.2


@pytest.mark.parametrize("argv,pattern", [
    (["train", "--params", "params/nope.yaml"], "params file 'params/nope.yaml' does not exist"),
    (["train", "--params", str(SMOKE), "--set", "train.epochs=-1"], "train.epochs: -1 is out of range"),
    (["train", "--params", str(SMOKE), "--set", "trainepochs"], "expected KEY=VALUE"),
    (["prune", "--params", str(SMOKE), "--ratio", "0.4", "/nonexistent/sparse.safetensors"],
     "checkpoint '/nonexistent/sparse.safetensors' does not exist; run the earlier stage first"),
    (["info", "not_a_model_or_file"], "'not_a_model_or_file' is neither a model file nor a timm model name"),
    (["reproduce", "params/nope.yaml"], "params file 'params/nope.yaml' does not exist"),
    (["reproduce", str(SMOKE), "--only", "10"], r"--only 10: accepted stage numbers are 1..9"),
    (["reproduce", str(SMOKE), "--set", "prune.scope=local"], "prune.scope: 'local' is not one of global"),
])
def test_bad_cli_input_names_the_culprit(capsys, argv, pattern):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert __import__("re").search(pattern, err), err


def test_prune_with_bad_ratio_and_decompose_with_bad_rank(tmp_path, capsys):
    rd = ["--params", str(SMOKE), "--run-dir", str(tmp_path)]
    run(capsys, "train", *rd, "--set", "train.epochs=1")
    dense = str(tmp_path / "dense.safetensors")
    code, _, err = run(capsys, "prune", *rd, "--ratio", "1.2", "--score", "magnitude", dense)
    assert code == 2 and "ratio 1.2 is invalid; accepted: a fraction in [0, 1)" in err
    code, _, err = run(capsys, "decompose", *rd, str(tmp_path / "dense.safetensors"), "--method", "svd", "--rank", "0")
    assert code == 2 and "rank must be a positive int, got 0" in err


def test_ctrl_c_ends_in_one_line_with_exit_130_and_the_same_command_resumes(tmp_path):
    """SIGINT during training: exit 130, one line, no traceback; the checkpoint written so far resumes."""
    import signal
    import subprocess
    import sys
    import time

    argv = [sys.executable, "-m", "vitprune.cli", "train", "--params", str(SMOKE), "--run-dir", str(tmp_path),
            "--set", "train.max_steps=null", "--set", "train.epochs=400"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    ckpt = tmp_path / "dense.ckpt.safetensors"
    deadline = time.monotonic() + 120
    while not ckpt.is_file() and time.monotonic() < deadline:  # interrupt once an epoch is saved
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("vitprune train: error: interrupted")
    assert ckpt.is_file() and not list(tmp_path.glob(".*.tmp"))

"""Training loop: exact resume, divergence handling, gradient accumulation, torchrun/DDP equivalence."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import vitprune as vp
from tests.conftest import ROOT, SMOKE
from vitprune.errors import ModelError
from vitprune.training import TrainConfig, train


def smoke_model(p, bundle):
    torch.manual_seed(0)
    return vp.build_model(p.model, bundle.num_classes, bundle.in_chans, bundle.image_size)


def cfg(**kw):
    base = dict(epochs=3, lr=2e-3, batch_size=64, eval_batch_size=256, max_steps=4, progress=False, warmup_epochs=0.5,
                threads=1)
    return TrainConfig(**{**base, **kw})


class Interrupt(Exception):
    pass


def test_resume_after_interruption_is_exact(tmp_path, smoke_params, digits_bundle):
    full = smoke_model(smoke_params, digits_bundle)
    vp.attach_gates(full)
    h_full = train(full, digits_bundle, cfg(l1=1e-3), tmp_path / "a", "run")

    def stop_after_first(record):
        if record["epoch"] == 1:
            raise Interrupt

    part = smoke_model(smoke_params, digits_bundle)
    vp.attach_gates(part)
    with pytest.raises(Interrupt):
        train(part, digits_bundle, cfg(l1=1e-3), tmp_path / "b", "run", on_epoch_end=stop_after_first)
    resumed = smoke_model(smoke_params, digits_bundle)  # a fresh process would start from scratch weights
    vp.attach_gates(resumed)
    h_res = train(resumed, digits_bundle, cfg(l1=1e-3), tmp_path / "b", "run")
    strip = [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in h_full]
    assert [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in h_res] == strip
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    fresh = smoke_model(smoke_params, digits_bundle)
    vp.attach_gates(fresh)
    again = train(fresh, digits_bundle, cfg(l1=1e-3), tmp_path / "b", "run")  # finished: loads, returns at once
    assert len(again) == 3 and torch.equal(fresh.head.weight, full.head.weight)


def test_resume_with_changed_settings_is_refused(tmp_path, smoke_params, digits_bundle):
    model = smoke_model(smoke_params, digits_bundle)
    train(model, digits_bundle, cfg(epochs=1), tmp_path, "run")
    with pytest.raises(ModelError, match=r"run.ckpt.safetensors' was made with different settings \(lr\)"):
        train(smoke_model(smoke_params, digits_bundle), digits_bundle, cfg(epochs=1, lr=1e-2), tmp_path, "run")
    fresh = smoke_model(smoke_params, digits_bundle)
    with pytest.raises(ModelError, match=r"different settings \(epochs\)"):  # the schedule depends on epochs
        train(fresh, digits_bundle, cfg(epochs=2), tmp_path, "run")
    with pytest.raises(ModelError, match=r"different settings \(initial_weights\)"):  # a different start model
        train(model, digits_bundle, cfg(epochs=1), tmp_path, "run")
    with pytest.warns(UserWarning, match=r"settings changed \(epochs\); the old checkpoint is kept as .*starts over"):
        restarted = train(fresh, digits_bundle, cfg(epochs=2), tmp_path, "run", on_config_change="restart")
    assert len(restarted) == 2
    assert len(list(tmp_path.glob("run.ckpt.*.safetensors"))) == 1  # the old checkpoint is kept, not lost


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, smoke_params, digits_bundle):
    model = smoke_model(smoke_params, digits_bundle)

    def poison(record):
        with torch.no_grad():
            model.head.weight.fill_(float("nan"))

    with pytest.raises(vp.TrainingDiverged, match=r"loss became nan at epoch 2.*run.ckpt.safetensors' \(epoch 1\)"):
        train(model, digits_bundle, cfg(), tmp_path, "run", on_epoch_end=poison)
    good = vp.load_model(tmp_path / "run.ckpt.safetensors")
    assert all(torch.isfinite(p).all() for p in good.parameters())


def test_gradient_accumulation_matches_the_full_batch(tmp_path, smoke_params, digits_bundle):
    a = smoke_model(smoke_params, digits_bundle)
    b = smoke_model(smoke_params, digits_bundle)
    train(a, digits_bundle, cfg(epochs=1, label_smoothing=0.0), tmp_path / "a", "run")
    train(b, digits_bundle, cfg(epochs=1, accum_steps=2, label_smoothing=0.0), tmp_path / "b", "run")
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5)


def test_torchrun_two_ranks_match_a_single_process(tmp_path):
    common = ["train", "--params", str(SMOKE), "--set", "train.threads=1"]
    single = subprocess.run([sys.executable, "-m", "vitprune.cli", *common, "--run-dir", str(tmp_path / "one")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "vitprune.cli", *common, "--run-dir", str(tmp_path / "two")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    h1 = json.loads((tmp_path / "one" / "dense.history.json").read_text())
    h2 = json.loads((tmp_path / "two" / "dense.history.json").read_text())
    for r1, r2 in zip(h1, h2):
        assert r1["test_top1"] == r2["test_top1"]
        assert abs(r1["train_loss"] - r2["train_loss"]) < 1e-5 and abs(r1["test_loss"] - r2["test_loss"]) < 1e-5
    m1, m2 = (vp.load_model(tmp_path / run / "dense.safetensors") for run in ("one", "two"))
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(p1, p2, atol=1e-5)


def test_divergence_before_any_checkpoint_says_nothing_is_kept(tmp_path, smoke_params, digits_bundle):
    model = smoke_model(smoke_params, digits_bundle)
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    with pytest.raises(vp.TrainingDiverged, match="no checkpoint had been written yet, so nothing is kept") as info:
        train(model, digits_bundle, cfg(), tmp_path, "run")
    assert "is kept" not in str(info.value).replace("nothing is kept", "")
    assert not (tmp_path / "run.ckpt.safetensors").exists()


def test_a_run_that_collapses_to_chance_without_nan_is_refused(tmp_path):
    from vitprune.training import fit

    p = vp.load_params(SMOKE, {"train.max_steps": None, "train.lr": 10.0, "train.clip_grad": None,
                               "train.warmup_epochs": 0, "train.epochs": 2})
    bundle = vp.load_data(p.data)
    model = smoke_model(p, bundle)
    collapse = r"collapsed to chance without a NaN: test top-1 .* \(chance 10\.0 %\)"
    with pytest.raises(vp.TrainingDiverged, match=collapse):
        fit(p, "dense", model, bundle, tmp_path, "dense")
    assert (tmp_path / "dense.safetensors").is_file()  # kept for inspection
    healthy = vp.load_params(SMOKE, {"train.max_steps": None, "train.epochs": 2})
    fit(healthy, "dense", smoke_model(healthy, bundle), bundle, tmp_path / "ok", "dense")


def test_temporary_files_of_a_killed_writer_are_cleaned_at_the_next_start(tmp_path, smoke_params, digits_bundle):
    """A writer killed mid-checkpoint leaves its temporary folder; the next run removes it (not a live one's)."""
    import os
    import signal
    import textwrap

    script = textwrap.dedent(f"""
        import os, time, safetensors.torch as st
        from pathlib import Path
        from vitprune.checkpoint import atomic_write
        def slow(tmp):
            Path(tmp).write_bytes(b"x" * 1000)
            Path(tmp).with_name(".tmpABC123").write_bytes(b"y")  # what a library's own temp file looks like
            print("writing", flush=True)
            time.sleep(60)
        atomic_write(Path({str(tmp_path)!r}) / "run.ckpt.safetensors", slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    live = [p for p in tmp_path.iterdir() if p.name.startswith(".run.ckpt")]
    assert len(live) == 1 and live[0].is_dir()
    from vitprune.checkpoint import clean_stray_temps

    assert clean_stray_temps(tmp_path) == []  # the writer is alive: its files stay
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    model = smoke_model(smoke_params, digits_bundle)
    train(model, digits_bundle, cfg(epochs=1), tmp_path, "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt.safetensors"]


def test_evaluating_only_after_the_last_epoch_trains_the_same_weights(tmp_path, smoke_params, digits_bundle):
    every, last = smoke_model(smoke_params, digits_bundle), smoke_model(smoke_params, digits_bundle)
    h_every = train(every, digits_bundle, cfg(), tmp_path / "every", "m")
    h_last = train(last, digits_bundle, cfg(eval_every=3), tmp_path / "last", "m")
    assert all(torch.equal(a, b) for a, b in zip(every.state_dict().values(), last.state_dict().values()))
    assert [("test_top1" in r) for r in h_last] == [False, False, True] and all("test_top1" in r for r in h_every)
    assert h_last[-1]["test_top1"] == h_every[-1]["test_top1"]


def test_the_final_model_is_the_finished_checkpoint_on_disk_once(tmp_path, monkeypatch):
    """fit's <name>.safetensors shares the finished checkpoint's bytes (a hard link, else a copy); it loads as the
    trained model with its parameter record, a second fit resumes at once, and an older checkpoint without
    the record is not shared but written afresh."""
    import os

    from vitprune.training import fit

    p = vp.load_params(SMOKE, {"train.epochs": 2})
    bundle = vp.load_data(p.data)
    model = smoke_model(p, bundle)
    history = fit(p, "dense", model, bundle, tmp_path, "dense")
    final, ckpt = tmp_path / "dense.safetensors", tmp_path / "dense.ckpt.safetensors"
    assert os.path.samefile(final, ckpt)
    loaded = vp.load_model(final)
    assert loaded.vitprune_params["name"] == p.name
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    again = smoke_model(p, bundle)
    assert fit(p, "dense", again, bundle, tmp_path, "dense") == history  # resumed, not retrained
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))

    def no_links(source, target):
        raise OSError("this file system has no hard links")

    monkeypatch.setattr(os, "link", no_links)
    fit(p, "dense", smoke_model(p, bundle), bundle, tmp_path / "copy", "dense")
    copied = tmp_path / "copy" / "dense.safetensors"
    assert not os.path.samefile(copied, tmp_path / "copy" / "dense.ckpt.safetensors")
    assert copied.read_bytes() == (tmp_path / "copy" / "dense.ckpt.safetensors").read_bytes()

    old = smoke_model(p, bundle)  # a checkpoint written before models carried their parameter record
    train(old, bundle, TrainConfig.from_params(p, "dense"), tmp_path / "old", "dense")
    fit(p, "dense", smoke_model(p, bundle), bundle, tmp_path / "old", "dense")
    assert not os.path.samefile(tmp_path / "old" / "dense.safetensors", tmp_path / "old" / "dense.ckpt.safetensors")
    assert vp.load_model(tmp_path / "old" / "dense.safetensors").vitprune_params["name"] == p.name

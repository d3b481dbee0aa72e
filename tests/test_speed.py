"""The careful timing routine, speed-up over MAC reduction in both runtimes, and factorizing only where it pays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vitprune as vp
from tests.conftest import make_arch
from vitprune import decompose, speed
from vitprune.speed import interleaved_times, speed_rows


def test_interleaved_times_alternate_the_order_and_report_min_and_median():
    calls = []
    runners = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = interleaved_times(runners, rounds=4, repeats=1, warmup=1, threads=1)
    blocks = [name for i, name in enumerate(calls) if i == 0 or calls[i - 1] != name]  # each runner's turn
    assert blocks == ["a", "b", "a", "b", "a", "b", "a"]  # warm-up a, b; then rounds a b | b a | a b | b a
    assert all(t["min_ms"] <= t["median_ms"] and t["busy"] in (True, False) for t in times.values())


def test_a_timing_taken_while_other_work_runs_is_marked_busy(monkeypatch):
    machine = iter([100.0, 100.0 + 50.0])  # the machine spent 50 CPU-seconds meanwhile: not this process's
    with monkeypatch.context() as patch:
        patch.setattr(speed, "_machine_cpu_seconds", lambda: next(machine))
        r = speed.interleaved_rounds({"m": lambda: sum(range(1000))}, rounds=4, repeats=1, warmup=1, threads=1)
    assert r["busy"] and r["foreign_load"] > speed.BUSY_LOAD
    quiet = speed.interleaved_rounds({"m": lambda: sum(range(1000))}, rounds=4, repeats=1, warmup=1, threads=1)
    assert set(quiet) >= {"ms", "calibration_ms", "disturbed", "foreign_load", "busy"} and len(quiet["ms"]["m"]) == 4


def test_speed_claims_read_same_speed_first_then_faster_or_slower():
    from vitprune.study.stats import EQUIVALENT, HOLDS, REVERSED, UNCLEAR, speed_claim

    rng = np.random.default_rng(0)
    source = 10 * (1 + 0.01 * rng.standard_normal(16))
    same = speed_claim("same", source, source * (1 + 0.01 * rng.standard_normal(16)), margin=0.05)
    faster = speed_claim("faster", source, source / 1.3 * (1 + 0.01 * rng.standard_normal(16)), margin=0.05)
    slower = speed_claim("slower", source, source * 1.3, margin=0.05)
    noisy = speed_claim("noisy", source[:4], source[:4] * np.array([0.6, 1.4, 0.7, 1.3]), margin=0.05)
    assert (same["verdict"], faster["verdict"], slower["verdict"], noisy["verdict"]) == (EQUIVALENT, HOLDS,
                                                                                         REVERSED, UNCLEAR)
    assert 1.25 < faster["speedup"] < 1.35 and faster["low"] <= faster["speedup"] <= faster["high"]
    assert faster["rounds"] == 16 and noisy["detectable"] > 0.05


def test_speed_rows_in_both_runtimes():
    model, x, _ = make_arch("custom_cls")
    vp.attach_gates(model)
    small = vp.prune(model, vp.plan_pruning(model, vp.importance_scores(model), 0.5))
    rows = speed_rows(vp.fold_gates(model), {"half": small}, (1, *x.shape[1:]), batch_sizes=(2,), rounds=2, repeats=1)
    assert {r["runtime"] for r in rows} == {"torch", "onnxruntime"}
    for r in rows:
        assert r["macs_reduction_x"] > 1.3 and r["latency_ms"] > 0
        assert r["speedup_over_macs"] == pytest.approx(r["speedup_x"] / r["macs_reduction_x"])


def test_break_even_rank_is_within_the_parameter_break_even():
    rank = speed.break_even_rank(64, 256, tokens=64, threads=1, rounds=2)
    assert 0 <= rank <= 64 * 256 // (64 + 256)


def test_the_width_multiple_is_where_the_measured_kernel_is_fast():
    steps_of_8 = {w: (6.2 if w % 8 == 0 else 7.0 if w % 4 == 0 else 8.5) for w in range(880, 912)}
    assert speed.choose_width_multiple(steps_of_8) == 8  # multiples of 4 average 6 % more than those of 8: too much
    near = {**steps_of_8, **{w: 6.3 for w in steps_of_8 if w % 8 == 4}}
    assert speed.choose_width_multiple(near) == 4  # within WIDTH_TOLERANCE of the best: the finer multiple
    smooth = {w: 6.0 + 0.01 * (w % 3) for w in range(880, 912)}
    assert speed.choose_width_multiple(smooth) == 1  # a flat curve gives nothing to round to
    odd_cheap = {w: (5.0 if w % 2 else 7.0) for w in range(880, 912)}
    assert speed.choose_width_multiple(odd_cheap) == 1
    assert speed.choose_width_multiple({}) == 1


def test_fast_width_multiple_is_measured_once_per_machine_and_shape(monkeypatch, tmp_path):
    monkeypatch.setenv("VITPRUNE_CACHE", str(tmp_path))
    measured = []

    def costs(in_features, widths, tokens, threads, rounds, runtime):
        measured.append((in_features, tokens, runtime))
        return {w: (1.0 if w % 16 == 0 else 2.0) for w in widths}

    monkeypatch.setattr(speed, "width_costs", costs)
    assert vp.fast_width_multiple(32, 64, tokens=8) == 16
    assert vp.fast_width_multiple(32, 64, tokens=8) == 16 and len(measured) == 1  # from the cache
    assert vp.fast_width_multiple(32, 64, tokens=16) == 16 and len(measured) == 2  # another shape: measured
    with pytest.raises(ValueError, match="accepted: torch, onnxruntime"):
        vp.fast_width_multiple(32, 64, tokens=8, runtime="tvm")


def test_width_costs_time_every_width_per_output_column():
    costs = speed.width_costs(16, range(24, 28), tokens=8, threads=1, rounds=2)
    assert list(costs) == [24, 25, 26, 27] and all(c > 0 for c in costs.values())
    assert speed.fast_width_multiple(16, 40, tokens=8, threads=1, rounds=2) in speed.WIDTH_MULTIPLES


def test_only_if_faster_keeps_dense_the_layers_two_matmuls_would_slow(monkeypatch):
    model, x, _ = make_arch("gap")
    monkeypatch.setattr(decompose, "break_even_rank", lambda i, o, tokens, threads, runtime: 8 if o > i else 0)
    decisions = decompose.rank_decisions(model, rank=8, only_if_faster=True)
    assert {d["layer"].rsplit(".", 1)[1]: d["factorize"] for d in decisions if d["layer"].startswith("blocks.0")} == {
        "qkv": True, "proj": False, "fc1": True, "fc2": False}
    new = vp.decompose_model(model, "svd", rank=8, only_if_faster=True)
    kinds = {n.rsplit(".", 1)[1] for n, m in new.named_modules() if isinstance(m, vp.FactorizedLinear)}
    assert kinds == {"qkv", "fc1"}
    with torch.no_grad():
        assert torch.isfinite(new(x)).all()


def test_the_bench_profiles_the_default_model_and_names_its_attention_share():
    """`make bench` shows where the default model's time goes, dense against pruned (what its speed goals miss by)."""
    from tests.conftest import ROOT
    from vitprune.study import bench, bench_report

    p = vp.load_params(ROOT / "params" / "default.yaml")
    rows = {r["operator"]: r for r in bench.default_model_profile(p)}
    assert rows["aten::addmm"]["pruned_ms"] < rows["aten::addmm"]["dense_ms"]  # the projections shrink
    # 64 features wide: the input-pruned layers take the whole residual stream, no gather (layers.PAD_INPUT_WIDTH)
    assert "aten::gather" not in rows
    lines = bench_report.default_profile_lines({"profile_default_pruned": {"ratio": 0.6, "batch": 64,
                                                                          "rows": list(rows.values())}})
    assert "pruned 60 %" in lines[0] and "batch-64" in lines[0] and lines[2].startswith("| operator")
    assert bench_report.default_profile_lines({}) == []  # a results file from before: nothing claimed


def test_the_bench_sets_the_pipeline_time_against_its_ten_minute_goal():
    from vitprune.study.bench_report import PIPELINE_SECONDS, pipeline_goal

    [fast] = pipeline_goal({"total_seconds": PIPELINE_SECONDS - 10, "stages": {}})
    [slow] = pipeline_goal({"total_seconds": PIPELINE_SECONDS + 11.4, "stages": {}, "carried_over": True})
    [none] = pipeline_goal(None)
    assert fast["verdict"] == "hit" and slow["verdict"] == "missed by 11 s" and "carried over" in slow["measured"]
    assert none["verdict"] == "not measured" and "make reproduce" in none["target"]

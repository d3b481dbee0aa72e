"""The notebook sequence under papermill: smoke run, skipping, determinism, failures, --smoke for every set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from tests.conftest import ROOT, SMOKE
from vitprune.errors import StageFailed
from vitprune.names import STAGES
from vitprune.pipeline import reproduce
from vitprune.reporting import reproducible_columns

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PARAMS = sorted((ROOT / "params").glob("*.yaml"))


def test_notebooks_are_stored_clean_with_a_parameters_cell():
    assert [p.stem for p in NOTEBOOKS] == list(STAGES)
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"
        tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1 and "params_file" in tagged[0].source, path.name
        assert nb.cells[0].cell_type == "markdown"
        for c in code:  # thin notebooks: logic lives in the library
            assert "def " not in c.source and ".backward(" not in c.source, f"{path.name} defines logic"


def test_every_figure_and_table_name_is_written_by_one_notebook():
    import ast

    owners: dict[str, str] = {}
    for path in NOTEBOOKS:
        source = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("save_figure", "save_table"):
                name = node.args[-1]
                assert isinstance(name, ast.Constant), f"{path.name}: figure/table names must be literals"
                assert owners.setdefault(name.value, path.stem) == path.stem, (
                    f"{name.value} written by {owners[name.value]} and {path.stem}")
    assert {"table_vtp", "table_sun", "accuracy_vs_macs", "sparsity_emerging"} <= set(owners)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    timing = reproduce(SMOKE, runs_root=root / "runs", figures_root=root / "figures")
    return root, timing


def tables(fig_dir: Path) -> dict[str, pd.DataFrame]:
    return {p.stem: reproducible_columns(pd.read_csv(p)) for p in sorted(fig_dir.glob("*.csv"))}


def test_smoke_sequence_regenerates_every_table_and_figure(smoke_run):
    root, timing = smoke_run
    assert set(timing["stages"]) == set(STAGES) and not any(s.get("skipped") for s in timing["stages"].values())
    fig = root / "figures" / "smoke"
    manifest = json.loads((fig / "MANIFEST.json").read_text())
    for name in ("table_vtp", "table_sun", "table_ablation_scores"):
        assert all((fig / f"{name}{ext}").is_file() for ext in (".md", ".csv", ".tex"))
    for name in ("training_curves", "sparsity_emerging", "gate_score_distributions", "kept_dims_per_block",
                 "singular_value_spectra", "qr_orthogonality", "reconstruction_error_vs_rank", "accuracy_vs_macs",
                 "accuracy_vs_latency"):
        assert (fig / f"{name}.png").stat().st_size > 1000 and (fig / f"{name}.pdf").is_file()
    assert set(manifest) == {p.name for p in fig.iterdir()} - {"MANIFEST.json"}
    assert set(manifest.values()) <= set(STAGES)
    vtp = pd.read_csv(fig / "table_vtp.csv")
    assert list(vtp.variant) == ["dense", "pruned_gates_40"] and vtp.macs_M[1] < vtp.macs_M[0]
    sun = pd.read_csv(fig / "table_sun.csv")
    assert set(sun.method) == {"svd", "svd_activation", "qr_householder", "qr_cgs", "qr_mgs", "qr_givens",
                               "qr_pivoted", "lu", "lu_complete"}
    assert (root / "runs" / "smoke" / "notebooks" / "08_comparison.ipynb").is_file()


def test_rerun_skips_unchanged_stages_and_forced_rerun_gives_identical_tables(smoke_run):
    root, _ = smoke_run
    kwargs = dict(runs_root=root / "runs", figures_root=root / "figures")
    before = tables(root / "figures" / "smoke")
    again = reproduce(SMOKE, **kwargs)
    assert all(s.get("skipped") for s in again["stages"].values())
    forced = reproduce(SMOKE, force=True, **kwargs)
    assert not any(s.get("skipped") for s in forced["stages"].values())
    after = tables(root / "figures" / "smoke")
    assert before.keys() == after.keys()
    for name in before:
        pd.testing.assert_frame_equal(before[name], after[name], check_exact=True, obj=name)


def test_a_stage_run_before_its_inputs_names_the_notebook_and_leaves_figures_alone(tmp_path):
    figures = tmp_path / "figures"
    with pytest.raises(StageFailed) as info:
        reproduce(SMOKE, only=3, runs_root=tmp_path / "runs", figures_root=figures)
    msg = str(info.value)
    assert "notebooks/03_pruning.ipynb, cell" in msg and "MissingStageError" in msg
    assert "01_sparse_training.ipynb" in msg and "--only 1" in msg
    assert not figures.exists() or not any(figures.rglob("*.png"))


@pytest.mark.slow
@pytest.mark.parametrize("params_file", PARAMS, ids=[p.stem for p in PARAMS])
def test_smoke_flag_runs_every_parameter_set_at_full_size(params_file, tmp_path):
    try:
        timing = reproduce(params_file, smoke=True, runs_root=tmp_path / "runs", figures_root=tmp_path / "figures")
        assert set(timing["stages"]) == set(STAGES)
        sun = pd.read_csv(tmp_path / "figures" / f"{params_file.stem}_smoke" / "table_sun.csv")
        assert len(sun) == 9 and (sun.params_M > 0).all()
    finally:
        shutil.rmtree(tmp_path / "runs", ignore_errors=True)  # DeiT-B checkpoints are large

"""The notebook sequence under papermill: smoke run in a copy of the project, figures inline, the report, a cache
that is never stale, one run per set, determinism from scratch, failures, --smoke for every set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from tests.conftest import ROOT, SMOKE, working_dir
from vitprune.errors import ParamsError, RunLocked, StageFailed
from vitprune.params import load_params
from vitprune.registry import DECOMPOSITIONS
from vitprune.study.cache import stage_hash
from vitprune.study.pipeline import progress_line, reproduce
from vitprune.study.records import read_record
from vitprune.study.reporting import reproducible_columns
from vitprune.study.stage import declared_view
from vitprune.study.stages import STAGES as REGISTERED

STAGES = REGISTERED.names()
DECOMPOSE_METHODS = DECOMPOSITIONS.names()

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
            where = {"save_figure": 1, "save_table": 1, "save_seed_table": 2}  # the name's position
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in where:
                name = node.args[where[node.func.attr]]
                assert isinstance(name, ast.Constant), f"{path.name}: figure/table names must be literals"
                assert owners.setdefault(name.value, path.stem) == path.stem, (
                    f"{name.value} written by {owners[name.value]} and {path.stem}")
    assert {"table_vtp", "table_sun", "accuracy_vs_macs", "sparsity_emerging"} <= set(owners)


def run_again(root: Path, **kwargs):
    with working_dir(root / "project"):
        return reproduce("params/smoke.yaml", runs_root=root / "runs", figures_root=root / "figures", **kwargs)


def tables(fig_dir: Path) -> dict[str, pd.DataFrame]:
    return {p.stem: reproducible_columns(pd.read_csv(p)) for p in sorted(fig_dir.glob("*.csv"))}


def test_smoke_sequence_regenerates_every_table_and_figure(smoke_run):
    root, timing = smoke_run
    assert set(timing["stages"]) == set(STAGES) and not any(s.get("skipped") for s in timing["stages"].values())
    fig = root / "figures" / "smoke"
    manifest = json.loads((fig / "MANIFEST.json").read_text())
    for name in ("table_vtp", "table_sun", "table_ablation_scores", "table_equal_share", "table_equal_budget",
                 "table_equal_budget_finetuned"):
        assert all((fig / f"{name}{ext}").is_file() for ext in (".md", ".csv", ".tex"))
    for name in ("training_curves", "sparsity_emerging", "gate_score_distributions", "kept_dims_per_block",
                 "singular_value_spectra", "qr_orthogonality", "reconstruction_error_vs_rank", "accuracy_vs_macs",
                 "accuracy_vs_latency", "accuracy_vs_rank", "ablation_scores", "finetune_curves",
                 "equal_budget_params", "equal_budget_macs", "equal_budget_finetuned"):
        assert (fig / f"{name}.png").stat().st_size > 1000 and (fig / f"{name}.pdf").is_file()
    assert set(manifest) == {p.name for p in fig.iterdir()} - {"MANIFEST.json"}
    assert set(manifest.values()) <= set(STAGES)
    vtp = pd.read_csv(fig / "table_vtp.csv")  # one row per seed and variant
    assert sorted(vtp.seed.unique()) == [0, 1] and list(vtp.variant.unique()) == ["dense", "pruned_gates_40"]
    assert (vtp.loc[vtp.variant == "pruned_gates_40", "macs_reduction_%"] > 0).all()
    sun = pd.read_csv(fig / "table_sun.csv")
    assert set(sun.method) == set(DECOMPOSE_METHODS)  # each method per seed at the uniform rank and where it pays
    assert (sun.groupby(["seed", "factorized"]).size() == len(DECOMPOSE_METHODS)).all() and sun.factorized.nunique() > 1
    shown = (fig / "table_sun.md").read_text()  # the Markdown shows mean ± std, the seeds, readable headers
    assert " ± " in shown and shown.splitlines()[0].endswith("| Seeds (n) |") and "| 2 |" in shown
    assert "| Method | Factorized |" in shown and "top1_ft" not in shown
    assert "top1_ft" in (fig / "table_sun.csv").read_text()
    found = json.loads((fig / "findings.json").read_text())
    accuracy, speed = [f for f in found if f.get("kind") != "speed"], [f for f in found if f.get("kind") == "speed"]
    assert len(accuracy) >= 20 and all(f["verdict"] in ("holds", "reversed", "equivalent",
                                                        "not distinguishable at this scale")
                                       and f["low"] <= f["difference"] <= f["high"] and f["n_seeds"] == 2
                                       and f["test_images"] > 0 for f in accuracy)
    busy = "busy while timing" in (fig / "findings.md").read_text()
    assert busy or (speed and all(f["low"] <= f["speedup"] <= f["high"] and f["rounds"] >= 6 for f in speed))
    assert (root / "runs" / "smoke" / "notebooks" / "09_comparison.ipynb").is_file()


def test_every_seed_runs_its_own_chain_and_a_seed_alone_gives_the_same_numbers(smoke_run, tmp_path):
    root, _ = smoke_run
    run_dir = root / "runs" / "smoke"
    for seed in (0, 1):
        files = {p.name for p in (run_dir / f"seed{seed}").iterdir()}
        assert {"dense.safetensors", "sparse.safetensors", "scores.safetensors", "pruned_gates_40.safetensors",
                "decomp_svd.safetensors", "decomp_svd_ft.safetensors"} <= files
    record = read_record(run_dir / "01_sparse_training.json")
    dense = {s: r.models["dense"] for s, r in record.seeds.items()}
    assert set(dense) == {0, 1} and dense[0].answers != dense[1].answers  # two different models
    with working_dir(root / "project"):  # seed 1 alone, inline: nothing of seed 0 (or of the pool) leaks into it
        reproduce("params/smoke.yaml", overrides={"seeds": [1]}, runs_root=tmp_path / "runs",
                  figures_root=tmp_path / "figures")
    for name in ("table_vtp", "table_sun", "table_ablation_scores", "table_sun_rank_sweep"):
        both = reproducible_columns(pd.read_csv(root / "figures" / "smoke" / f"{name}.csv"))
        alone = reproducible_columns(pd.read_csv(tmp_path / "figures" / "smoke" / f"{name}.csv"))
        pd.testing.assert_frame_equal(both[both.seed == 1].reset_index(drop=True), alone, check_exact=True,
                                      check_dtype=False, obj=name)  # "20" and "20.0" read back alike


def test_every_figure_is_an_image_output_of_the_notebook_that_made_it(smoke_run):
    root, _ = smoke_run
    fig = root / "figures" / "smoke"
    manifest = json.loads((fig / "MANIFEST.json").read_text())
    for stage in STAGES:
        nb = nbformat.read(root / "runs" / "smoke" / "notebooks" / f"{stage}.ipynb", as_version=4)
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        images = [o for o in outputs if "image/png" in o.get("data", {})]
        pngs = [name for name, owner in manifest.items() if owner == stage and name.endswith(".png")]
        views = sum("explorer" in c.metadata.get("tags", []) for c in nb.cells)  # the interactive view, drawn once
        assert len(images) == len(pngs) + views, f"{stage}: {len(pngs)} figures written, {len(images)} shown"
        text = json.dumps([o for o in outputs if o.get("output_type") == "stream"])
        assert "IProgress" not in text and "Traceback" not in text, stage
        assert any("What this shows" in json.dumps(o.get("data", {})) for o in outputs), stage
        last = [c for c in nb.cells if c.cell_type == "code"][-1]
        assert not any("PosixPath" in json.dumps(o.get("data", {})) for o in last.outputs), stage


def test_every_figure_speaks_in_words_tells_its_series_apart_and_draws_its_legend(smoke_run):
    """Read off the drawn figures themselves (runs/<set>/figure_audit/, written as each was saved): every axis label
    is a human label, not a column name; no two series in one axes share both colour and marker; every legend entry
    is drawn."""
    from vitprune.study.styles import is_machine_name

    root, _ = smoke_run
    audits = sorted((root / "runs" / "smoke" / "figure_audit").glob("*.json"))
    saved = {p.stem for p in (root / "figures" / "smoke").glob("*.png")}
    assert {a.stem for a in audits} == saved
    for path in audits:
        axes = json.loads(path.read_text())["axes"]
        assert any(a["xlabel"] for a in axes) and any(a["ylabel"] for a in axes), path.stem
        for a in axes:
            for text in (a["xlabel"], a["ylabel"]):
                assert not text or not is_machine_name(text), f"{path.stem}: axis label {text!r} is a column name"
            looks = [(s["colour"], s["marker"]) for s in a["series"] if s["colour"] != "per category"]
            assert len(looks) == len(set(looks)), f"{path.stem}: two series share colour and marker: {looks}"
            assert all(e["drawn"] for e in a["legend"]), f"{path.stem}: legend entry without a series: {a['legend']}"


def test_figures_are_print_ready():
    """PDFs embed TrueType fonts (not Type 3), one font family; PNGs at 200 dpi; sizes for one or two columns."""
    import matplotlib.pyplot as plt

    from vitprune.study.figures import COLUMN, DOUBLE, plot_lines, use_style

    use_style()
    assert plt.rcParams["pdf.fonttype"] == 42 and plt.rcParams["savefig.dpi"] >= 150
    frame = pd.DataFrame({"rank_ratio": [0.2, 0.5, 0.2, 0.5], "top1": [50.0, 90.0, 52.0, 91.0],
                          "method": ["svd", "svd", "lu", "lu"]})
    fig = plot_lines(frame, "rank_ratio", "top1", "method", "t")
    assert fig.get_figwidth() in (COLUMN, DOUBLE)
    import io

    pdf = io.BytesIO()
    fig.savefig(pdf, format="pdf")
    fonts = pdf.getvalue()  # TrueType glyphs, embedded whole (/TrueType) or as a CID font (/CIDFontType2)
    assert (b"/TrueType" in fonts or b"/CIDFontType2" in fonts) and b"/Type3" not in fonts
    plt.close(fig)


def test_report_links_every_figure_and_table_and_records_the_environment(smoke_run):
    root, _ = smoke_run
    fig = root / "figures" / "smoke"
    report = (fig / "REPORT.md").read_text()
    for png in fig.glob("*.png"):
        assert f"]({png.name})" in report, png.name
    for table in fig.glob("*.md"):
        if table.name not in ("REPORT.md", "findings.md"):
            assert f"**{table.stem}**" in report and table.read_text().splitlines()[0] in report, table.name
    env = json.loads((fig / "environment.json").read_text())
    assert {"cpu", "torch_threads", "torch", "timm", "numpy", "git_commit", "params_sha256"} <= set(env)
    # the notebook kernels ran on the pinned (AVX2 or narrower) kernels, whatever this CPU offers
    assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["cpu_capability"] in ("AVX2", "DEFAULT"), env
    assert "## Parameter set" in report and "## Timings" in report and "What this shows" not in report
    assert "## Findings" in report and (fig / "findings.md").read_text().splitlines()[0] in report
    assert "Seeds 0, 1 (2 chains, nothing random shared)" in report and "test images (a fixed split" in report
    index = (root / "runs" / "smoke" / "report" / "index.html").read_text()
    assert all(f"{stage}.html" in index for stage in STAGES)
    assert (root / "runs" / "smoke" / "report" / "09_comparison.html").stat().st_size > 10_000


def test_rerun_skips_unchanged_stages_and_forced_rerun_gives_identical_tables(smoke_run):
    root, _ = smoke_run
    before = tables(root / "figures" / "smoke")
    findings_before = json.loads((root / "figures" / "smoke" / "findings.json").read_text())
    timing_file = root / "runs" / "smoke" / "pipeline_timing.json"
    from_scratch = timing_file.read_text()
    again = run_again(root)
    assert all(s.get("skipped") for s in again["stages"].values())
    assert timing_file.read_text() == from_scratch  # the README quotes a from-scratch run, never a cached one
    checkpoint = root / "runs" / "smoke" / "seed0" / "dense.ckpt.safetensors"
    written = checkpoint.stat().st_mtime_ns
    forced = run_again(root, force=True)
    assert not any(s.get("skipped") for s in forced["stages"].values())
    assert checkpoint.stat().st_mtime_ns > written  # trained again from scratch, not resumed from the old file
    after = tables(root / "figures" / "smoke")
    assert before.keys() == after.keys()
    for name in before:
        pd.testing.assert_frame_equal(before[name], after[name], check_exact=True, obj=name)
    found = json.loads((root / "figures" / "smoke" / "findings.json").read_text())
    accuracy = [f for f in found if f.get("kind") != "speed"]  # speed findings are timings: they vary run to run
    assert accuracy == [f for f in findings_before if f.get("kind") != "speed"]  # the same, to the last digit


def test_forcing_the_last_stages_reruns_them_alone_from_scratch_and_keeps_the_earlier_ones(smoke_run):
    """--from 8 --force: 08 and 09 run again from scratch (the fine-tuning checkpoints are not resumed), the earlier
    stages' models stay, and the tables come out the same; afterwards nothing is stale."""
    root, _ = smoke_run
    seed_dir = root / "runs" / "smoke" / "seed0"
    dense, tuned = seed_dir / "dense.safetensors", seed_dir / "pruned_gates_40_ft.safetensors"
    dense_written, tuned_written = dense.stat().st_mtime_ns, tuned.stat().st_mtime_ns
    before = tables(root / "figures" / "smoke")
    forced = run_again(root, start=8, force=True)["stages"]
    assert list(forced) == ["08_finetuning", "09_comparison"] and all("seconds" in s for s in forced.values())
    assert dense.stat().st_mtime_ns == dense_written  # stage 01's model kept, not retrained
    assert tuned.stat().st_mtime_ns > tuned_written  # fine-tuned again, not published from the old checkpoint
    after = tables(root / "figures" / "smoke")
    for name in before:
        pd.testing.assert_frame_equal(before[name], after[name], check_exact=True, obj=name)
    assert all(s.get("skipped") for s in run_again(root)["stages"].values())


def test_a_deleted_or_altered_output_or_figure_reruns_its_stage_even_after_a_cached_run(smoke_run):
    """Runs before the tests that edit the library or delete upstream files (those leave stages to re-run)."""
    root, _ = smoke_run
    run_dir, fig = root / "runs" / "smoke", root / "figures" / "smoke"
    assert all(s.get("skipped") for s in run_again(root)["stages"].values())  # cached: nothing changed
    tuned = run_dir / "seed0" / "pruned_gates_40_ft.safetensors"  # a hard link to its finished checkpoint
    tuned.unlink()
    again = run_again(root)["stages"]
    assert "seconds" in again["08_finetuning"] and tuned.is_file()
    assert all(again[s].get("skipped") for s in STAGES[:7])
    table = fig / "table_sun_rank_sweep.csv"  # a published table, truncated
    table.write_text(table.read_text()[:40])
    again = run_again(root)["stages"]
    assert "seconds" in again["09_comparison"] and not any("seconds" in again[s] for s in STAGES[:8])
    assert len(table.read_text().splitlines()) > 2


def test_library_edits_rerun_the_stages_that_reach_them_and_only_those(smoke_run):
    root, _ = smoke_run
    project, run_dir = root / "project", root / "runs" / "smoke"
    p = load_params(SMOKE).to_dict()
    with working_dir(project):
        hashes = {s: stage_hash(s, p, run_dir) for s in STAGES}
        with open(project / "vitprune" / "study" / "bench.py", "a") as fh:
            fh.write("\n# an edit no notebook reaches\n")
        assert {s: stage_hash(s, p, run_dir) for s in STAGES} == hashes
        assert run_again(root, only=5)["stages"]["05_qr"] == {"skipped": True}
        linalg = project / "vitprune" / "linalg.py"
        linalg.write_text(linalg.read_text().replace('"""||Q^T Q - I||_F', '"""The loss ||Q^T Q - I||_F'))
        changed = {s for s in STAGES if stage_hash(s, p, run_dir) != hashes[s]}
    assert changed == set(STAGES)  # every notebook reaches linalg (through vitprune's __init__)
    assert "seconds" in run_again(root, only=5)["stages"]["05_qr"]
    notebook = project / "notebooks" / "05_qr.ipynb"  # the checkout's notebooks run, not the installed ones
    nb = nbformat.read(notebook, as_version=4)
    nb.cells.insert(1, nbformat.v4.new_markdown_cell("Edited in this checkout."))
    nbformat.write(nb, notebook)
    assert "seconds" in run_again(root, only=5)["stages"]["05_qr"]
    assert "Edited in this checkout." in (root / "runs" / "smoke" / "notebooks" / "05_qr.ipynb").read_text()


def test_a_deleted_upstream_model_reruns_the_stage_that_made_it(smoke_run):
    root, _ = smoke_run
    model = root / "runs" / "smoke" / "seed1" / "sparse.safetensors"
    model.unlink()
    assert "seconds" in run_again(root, only=1)["stages"]["01_sparse_training"]
    assert model.is_file()


def test_a_parameter_reruns_exactly_the_stages_that_declare_it(smoke_run):
    root, _ = smoke_run
    run_dir = root / "runs" / "smoke"
    with working_dir(root / "project"):
        before = {s: stage_hash(s, load_params(SMOKE).to_dict(), run_dir) for s in STAGES}
        for key, value, changed in (("finetune.epochs", 2, {"08_finetuning", "09_comparison"}),
                                    ("prune.max_drop", 1.0, {"02_scoring", "03_pruning", "07_equal_budget",
                                                             "09_comparison"}),
                                    ("bench.repeats", 3, {"03_pruning", "04_svd", "05_qr", "06_lu", "09_comparison"}),
                                    ("workers", 1, {"09_comparison"})):  # only the report shows it
            after = load_params(SMOKE, {key: value}).to_dict()
            assert {s for s in STAGES if stage_hash(s, after, run_dir) != before[s]} == changed, key


def test_a_stage_reading_a_parameter_it_did_not_declare_is_stopped():
    p = declared_view(load_params(SMOKE), "04_svd")
    assert p.decompose.rank_ratios == [0.5] and p.train.seed == 0  # declared: readable
    with pytest.raises(ParamsError, match=r"stage 04_svd reads params 'finetune.epochs', which its registration "
                                          r"line in vitprune/study/stages/__init__.py does not declare"):
        p.finetune.epochs  # noqa: B018


TOY_PLUGIN = '''"""A decomposition registered from outside the package: Cholesky QR (R = chol(WᵀW)ᵀ, Q = W R⁻¹)."""
import torch

import vitprune as vp


@vp.register_decomposition("qr_cholesky", family="QR", label="Cholesky QR", claims=("sun",))
def qr_cholesky(w, rank, **_):
    r = torch.linalg.cholesky(w.T @ w + 1e-12 * torch.eye(w.shape[1], dtype=w.dtype)).T
    q = torch.linalg.solve_triangular(r, w, upper=True, left=False)
    return r[:rank], q[:, :rank]
'''


def test_a_method_registered_by_a_plugin_goes_through_decompose_finetune_tables_and_claims(tmp_path, monkeypatch):
    """One registration in a user's own module, one params line naming it: nothing else is edited."""
    (tmp_path / "toy_plugin.py").write_text(TOY_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    overrides = {"plugins": ["toy_plugin"], "decompose.methods": ["svd", "qr_householder", "qr_cholesky"],
                 "seeds": [0]}
    reproduce(SMOKE, overrides=overrides, runs_root=tmp_path / "runs", figures_root=tmp_path / "figures")
    fig = tmp_path / "figures" / "smoke"
    sun = pd.read_csv(fig / "table_sun.csv")
    assert {"svd", "qr_householder", "qr_cholesky"} == set(sun.method)
    assert sun[sun.method == "qr_cholesky"].top1_ft.notna().all()  # uniform and where it pays, both fine-tuned
    assert "qr_cholesky" in set(pd.read_csv(fig / "table_sun_rank_sweep.csv").method)
    claims = {f["id"]: f for f in json.loads((fig / "findings.json").read_text())}
    for when in ("before", "after"):
        claim = claims[f"sun:svd_vs_qr_cholesky@0.5:{when}"]
        assert claim["statement"].startswith("SVD keeps more accuracy than Cholesky QR at rank ratio 0.5")
        assert claim["b"].endswith("decomp_qr_cholesky")


def test_one_run_per_set_a_second_is_refused_naming_the_holder(smoke_run):
    root, _ = smoke_run
    run_dir = root / "runs" / "smoke"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom pathlib import Path\nfrom vitprune.study.pipeline import run_lock\n"
        f"with run_lock(Path({str(run_dir)!r})):\n    print('held', flush=True)\n    time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=rf"in use by PID {holder.pid} \(vitprune reproduce, started "):
            run_again(root, only=9)
    finally:
        holder.kill()
        holder.wait()
    (run_dir / ".lock").write_text("PID 999999 (vitprune reproduce, started long ago)")  # a dead holder's lock
    assert run_again(root, only=9)["stages"]["09_comparison"]


def test_a_kernel_started_ahead_is_handed_over_unless_the_library_changed_meanwhile(tmp_path):
    """Each stage's kernel is started while the stage before it runs; one started before a vitprune source file
    changed has imported the old code, so a fresh kernel runs the stage instead."""
    from vitprune.study.kernel import KernelsAhead, kernel_name

    library = tmp_path / "vitprune"
    library.mkdir()
    (library / "module.py").write_text("x = 1\n")
    kernels = KernelsAhead(kernel_name(), tmp_path, library)
    try:
        with kernels.taken(more=True) as first:
            assert first.has_kernel
        assert not first.has_kernel  # ended with its stage
        ahead = kernels._ahead[0]
        with kernels.taken(more=True) as second:
            assert second is ahead and second.has_kernel
        ahead = kernels._ahead[0]
        (library / "module.py").write_text("x = 22\n")
        with kernels.taken(more=False) as third:
            assert third is not ahead and third.has_kernel and not ahead.has_kernel
        assert kernels._ahead is None
    finally:
        kernels.close()


def test_the_kernels_started_ahead_preload_what_the_notebooks_import():
    import ast

    imported = set()
    for path in NOTEBOOKS:
        source = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom):
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
    code = ("import importlib, json, sys\nfrom vitprune.study.kernel import NOTEBOOK_IMPORTS\n"
            "[importlib.import_module(m) for m in NOTEBOOK_IMPORTS]\nprint(json.dumps(sorted(sys.modules)))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout)
    assert imported and imported <= set(loaded), sorted(imported - set(loaded))


def test_the_kernels_progress_line_reaches_the_bar(tmp_path):
    from vitprune.progress import report

    class Bar:
        shown: list[str] = []

        def set_postfix_str(self, text, refresh=True):
            self.shown.append(text)

    bar = Bar()
    import time

    with progress_line(bar, tmp_path, "08_finetuning"):
        report("decomp_svd_ft epoch 3/10")
        time.sleep(1.2)
    assert "08_finetuning | decomp_svd_ft epoch 3/10" in bar.shown


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
        assert (sun.groupby(["seed", "factorized"]).size() == len(DECOMPOSE_METHODS)).all()  # uniform, where it pays
        assert sun.factorized.nunique() == 2 and (sun.params_M > 0).all()
    finally:
        shutil.rmtree(tmp_path / "runs", ignore_errors=True)  # DeiT-B checkpoints are large


def test_a_damaged_cache_record_runs_every_stage_and_force_removes_links_not_their_targets(tmp_path):
    """A truncated or foreign stages.json is no cache; --force unlinks a symlink in the run folder, never following
    it into the folder it points to."""
    from vitprune.study.cache import cache_state
    from vitprune.study.pipeline import clear_run

    state = tmp_path / "stages.json"
    for text in ('{"01_sparse_training": "ab', "[1, 2]", '{"01_sparse_training": 5}', ""):
        state.write_text(text)
        assert cache_state(state) == {}
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    run = tmp_path / "run"
    run.mkdir()
    (run / "linked").symlink_to(outside, target_is_directory=True)
    (run / ".lock").write_text("")
    clear_run(run)
    assert (outside / "keep.txt").read_text() == "mine" and [p.name for p in run.iterdir()] == [".lock"]

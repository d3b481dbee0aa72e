"""`vitprune reproduce`: execute the registered stages' notebooks in order with papermill.

A stage is skipped only when nothing it depends on has changed (`vitprune.study.cache`). The first
failing stage stops the run, naming the notebook and cell. One run per parameter set at a time (a lock
on runs/<set>/); the kernels' progress shows beside the bar; each stage's kernel is started while the
stage before it runs (`vitprune.study.kernel`); the executed notebooks are rendered as HTML under
runs/<set>/report/.
"""

from __future__ import annotations

import fcntl
import html
import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from vitprune.checkpoint import write_json, write_text
from vitprune.errors import ParamsError, RunLocked, StageFailed
from vitprune.params import load_params
from vitprune.progress import ENV as PROGRESS_ENV
from vitprune.progress import latest
from vitprune.study.cache import cache_state, files_intact, forget_stages, library_dir, notebooks_dir, stage_hash
from vitprune.study.kernel import KernelsAhead, kernel_name
from vitprune.study.records import read_record
from vitprune.study.stages import STAGES


def smoke_overrides(params_file: str | Path) -> dict[str, Any]:
    """Full architecture, synthetic data of the right shape, a couple of steps per stage."""
    p = load_params(params_file)
    in_chans = 1 if p.data.name in ("mnist5k", "digits") else 3
    classes = {"cifar10": 10, "cifar100": 100, "imagefolder": 1000}.get(p.data.name, 10)
    batch = 4
    return {"data.name": "synthetic", "data.root": None, "data.in_chans": in_chans, "data.num_classes": classes,
            "data.batch_size": batch, "data.eval_batch_size": batch, "data.train_size": 2 * batch,
            "data.test_size": batch, "data.calib_batches": 1, "data.num_workers": 0, "model.pretrained": None,
            "train.epochs": 1, "train.max_steps": 1, "train.progress": False, "sparse.epochs": 1,
            "finetune.epochs": 1, "prune.ratios": p.prune.ratios[:1], "decompose.rank_ratios": [0.25],
            "decompose.finetune_ratio": 0.25, "decompose.layers": ["proj"],  # every method, one projection kind
            "bench.batch_sizes": [1], "bench.repeats": 1, "bench.warmup": 0, "name": f"{p.name}_smoke",
            # factorizing proj alone reaches 95 % of the parameters, not a pruning ratio's (those strategies drop out)
            "budget.prune_ratios": [p.budget.finetune_ratio], "budget.rank_ratios": [0.25, 0.5], "budget.share": 0.95,
            "seeds": p.seeds[:1]}  # one chain through every stage at full size; a set's own seeds run side by side


def _select(only: int | None, start: int | None) -> list[str]:
    names = STAGES.names()
    if only is not None and start is not None:
        raise ParamsError(f"--only {only} and --from {start} contradict each other; give one of them")
    for flag, value in (("--only", only), ("--from", start)):
        if value is not None and not 1 <= value <= len(names):
            raise ParamsError(f"{flag} {value}: accepted stage numbers are 1..{len(names)} ({', '.join(names)})")
    if only is not None:
        return [names[only - 1]]
    return list(names[(start or 1) - 1:])


@contextmanager
def run_lock(run_dir: Path):
    """Hold runs/<set>/.lock for this process; a second holder is refused at once, naming the first.

    The lock is an OS file lock, released when its process ends however it ends, so a lock left by a
    killed run is simply taken over.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise RunLocked(f"'{path}' is not a plain file (a folder or a link); remove it: vitprune keeps the run's lock "
                        "there")
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise RunLocked(f"'{run_dir}' is in use by {holder}; wait for it to finish (or stop it) and run "
                        "again") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"PID {os.getpid()} (vitprune reproduce, started {time.strftime('%Y-%m-%d %H:%M:%S')})")
    fh.flush()
    try:
        yield
    finally:
        fh.close()


def clear_run(run_dir: Path) -> None:
    """--force: remove everything a run wrote (checkpoints included), so the sequence starts from scratch."""
    for path in run_dir.iterdir():
        if path.name == ".lock":
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()  # a file, or a link: the link goes, never what it points to


@contextmanager
def progress_line(bar, run_dir: Path, stage: str):
    """While a stage runs, show the line its kernel reports (model, epoch, variant) beside the bar."""
    path = run_dir / "progress.txt"
    path.unlink(missing_ok=True)
    os.environ[PROGRESS_ENV] = str(path.resolve())
    stop = threading.Event()

    def watch():
        shown = ""
        while not stop.wait(0.5):
            text = latest(path)
            if text and text != shown:
                shown = text
                bar.set_postfix_str(f"{stage} | {text}", refresh=True)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        os.environ.pop(PROGRESS_ENV, None)
        path.unlink(missing_ok=True)


def render_html(run_dir: Path) -> Path:
    """HTML of every executed notebook under runs/<set>/report/, with an index page."""
    from nbconvert import HTMLExporter

    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    exporter = HTMLExporter()
    items = []
    for stage in STAGES.names():
        executed = run_dir / "notebooks" / f"{stage}.ipynb"
        if executed.is_file():
            body, _ = exporter.from_filename(str(executed))
            write_text(out / f"{stage}.html", body)
            summary = _summary(run_dir, stage)
            items.append(f"<li><a href='{stage}.html'>{stage}</a><p>{html.escape(summary)}</p></li>")
    page = (f"<!doctype html><meta charset='utf-8'><title>vitprune: {run_dir.name}</title>"
            f"<h1>vitprune report: {run_dir.name}</h1><ol>{''.join(items)}</ol>")
    write_text(out / "index.html", page)
    return out / "index.html"


def reproduce(params_file: str | Path, overrides: dict[str, Any] | None = None, only: int | None = None,
              start: int | None = None, force: bool = False, smoke: bool = False,
              runs_root: Path = Path("runs"), figures_root: Path = Path("figures")) -> dict[str, Any]:
    """Run the notebook sequence for a parameter set; returns the timing record."""
    overrides = {**(smoke_overrides(params_file) if smoke else {}), **(overrides or {})}
    p = load_params(params_file, overrides)  # validates before anything runs
    selected = _select(only, start)
    for flag, root in (("--runs-root", runs_root), ("--figures-root", figures_root)):
        if Path(root).exists() and not Path(root).is_dir():
            raise ParamsError(f"{flag} '{root}' is a file; give a folder (it is created if missing)")
    run_dir = Path(runs_root) / p.name
    with run_lock(run_dir):
        if force:
            clear_run(run_dir) if len(selected) == len(STAGES) else forget_stages(run_dir, selected)
        from_scratch = not any(path.name != ".lock" for path in run_dir.iterdir())
        timing = _run_stages(p, params_file, overrides, selected, run_dir, runs_root, figures_root, smoke)
        _keep_timing(run_dir, timing, from_scratch and len(selected) == len(STAGES))
        render_html(run_dir)
        update_readme(Path("README.md"), Path(figures_root) / p.name, run_dir)
    return timing


def update_readme(readme: Path, fig_dir: Path, run_dir: Path) -> bool:
    """Rewrite the README's generated block for this set (if it has one) from the figures just made."""
    from vitprune.study.reporting import replace_block, results_block

    summary = _summary(run_dir, STAGES.summary_stage().name)
    if not readme.is_file() or summary is None or fig_dir.is_absolute():
        return False
    timing_path = run_dir / "pipeline_timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else None
    text = replace_block(readme.read_text(), f"results:{run_dir.name}", results_block(fig_dir, summary, timing))
    if text is None:
        return False
    write_text(readme, text)
    return True


def _run_stages(p, params_file, overrides, selected, run_dir, runs_root, figures_root, smoke) -> dict[str, Any]:
    import papermill as pm

    nb_dir = run_dir / "notebooks"
    nb_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "stages.json"
    state = cache_state(state_path)
    kernels = KernelsAhead(kernel_name(), Path.cwd(), library_dir())
    timing: dict[str, Any] = {"params": str(params_file), "smoke": smoke, "stages": {}}
    t_start = time.perf_counter()
    bar = tqdm(selected, desc=f"reproduce {p.name}", unit="stage")
    try:
        for i, stage in enumerate(bar):
            bar.set_postfix_str(stage)
            digest = stage_hash(stage, p.to_dict(), run_dir)
            if state.get(stage) == digest and files_intact(run_dir, Path(figures_root) / p.name,
                                                           (stage, *STAGES[stage].reads)):
                timing["stages"][stage] = {"skipped": True}
                continue
            t0 = time.perf_counter()
            out_nb = nb_dir / f"{stage}.ipynb"
            try:
                with progress_line(bar, run_dir, stage), kernels.taken(more=i + 1 < len(selected)) as kernel:
                    pm.execute_notebook(str(notebooks_dir() / f"{stage}.ipynb"), str(out_nb), km=kernel,
                                        kernel_name=kernel.kernel_name,
                                        parameters={"params_file": str(params_file), "overrides": overrides,
                                                    "runs_root": str(runs_root), "figures_root": str(figures_root),
                                                    **_batch_only(notebooks_dir() / f"{stage}.ipynb")},
                                        progress_bar=False, cwd=str(Path.cwd()))
            except pm.PapermillExecutionError as err:
                state.pop(stage, None)
                write_json(state_path, state)
                if err.ename == "KeyboardInterrupt":  # Ctrl-C reached the kernel too
                    raise KeyboardInterrupt from None
                raise StageFailed(f"stage {stage} failed: notebook notebooks/{stage}.ipynb, cell {err.cell_index} "
                                  f"(execution count {err.exec_count}): {err.ename}: {err.evalue}; executed notebook "
                                  f"kept at {out_nb}") from None
            state[stage] = digest
            write_json(state_path, state)
            timing["stages"][stage] = {"seconds": round(time.perf_counter() - t0, 1)}
    finally:
        kernels.close()
    timing["total_seconds"] = round(time.perf_counter() - t_start, 1)
    return timing


def _batch_only(notebook: Path) -> dict[str, Any]:
    """{"interactive": False} for a notebook whose parameters cell offers an interactive view (a batch run draws
    it once, statically); nothing for the others."""
    import nbformat

    cells = nbformat.read(notebook, as_version=4).cells
    declared = any("parameters" in c.metadata.get("tags", []) and "interactive" in c.source for c in cells)
    return {"interactive": False} if declared else {}


def _summary(run_dir: Path, stage: str) -> str | None:
    """A stage's generated "What this shows", or None if it has not run."""
    path = run_dir / f"{stage}.json"
    return read_record(path).summary if path.is_file() else None


def _keep_timing(run_dir: Path, timing: dict[str, Any], every_stage_from_scratch: bool) -> None:
    """The README and `make bench` quote a run that executed every stage from an empty run folder; a partial,
    cached or resumed run (its training picks up finished checkpoints) writes pipeline_timing_partial.json."""
    write_json(run_dir / ("pipeline_timing.json" if every_stage_from_scratch else "pipeline_timing_partial.json"),
               timing)

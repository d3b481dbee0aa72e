"""`vitprune reproduce`: execute the numbered notebooks in order with papermill.

A stage is skipped when its notebook, its parameters and the records of the stages it reads are
unchanged (content hash); the first failing stage stops the run, naming the notebook and cell.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from vitprune.checkpoint import write_json
from vitprune.errors import ParamsError, StageFailed
from vitprune.names import STAGES
from vitprune.params import load_params
from vitprune.stage import DEPENDS

PACKAGE_NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def notebooks_dir() -> Path:
    """The notebooks of the checkout in the working directory, else those beside the installed package."""
    here = Path.cwd() / "notebooks"
    if all((here / f"{stage}.ipynb").is_file() for stage in STAGES):
        return here
    if all((PACKAGE_NOTEBOOKS / f"{stage}.ipynb").is_file() for stage in STAGES):
        return PACKAGE_NOTEBOOKS
    raise ParamsError(f"no notebooks/ folder with {', '.join(STAGES)} in '{Path.cwd()}' or beside the installed "
                      f"package ('{PACKAGE_NOTEBOOKS.parent}'); run from the project root")


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
            "bench.batch_sizes": [1], "bench.repeats": 1, "bench.warmup": 0, "name": f"{p.name}_smoke"}


def _kernel_name() -> str:
    """A kernel spec for this very interpreter (works inside .venv and conda alike)."""
    digest = hashlib.sha1(sys.executable.encode()).hexdigest()[:8]
    name = f"vitprune-{digest}"
    root = Path(os.environ.get("VITPRUNE_KERNEL_DIR", Path.home() / ".cache" / "vitprune" / "jupyter"))
    spec_dir = root / "kernels" / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"vitprune ({sys.executable})", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    paths = os.environ.get("JUPYTER_PATH", "")
    if str(root) not in paths.split(os.pathsep):
        os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(root), paths) if p)
    return name


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _record_digest(run_dir: Path, stage: str) -> str | None:
    path = run_dir / f"{stage}.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def stage_hash(stage: str, params_dict: dict[str, Any], run_dir: Path) -> str:
    """Content hash of what a stage depends on: notebook, parameters, records of the stages it reads."""
    notebook = (notebooks_dir() / f"{stage}.ipynb").read_bytes()
    deps = {d: _record_digest(run_dir, d) for d in DEPENDS[stage]}
    params = {k: v for k, v in params_dict.items() if k != "source"}
    return _digest(notebook, params, deps)


def _select(only: int | None, start: int | None) -> list[str]:
    if only is not None and start is not None:
        raise ParamsError(f"--only {only} and --from {start} contradict each other; give one of them")
    for flag, value in (("--only", only), ("--from", start)):
        if value is not None and not 1 <= value <= len(STAGES):
            raise ParamsError(f"{flag} {value}: accepted stage numbers are 1..{len(STAGES)} ({', '.join(STAGES)})")
    if only is not None:
        return [STAGES[only - 1]]
    return list(STAGES[(start or 1) - 1:])


def reproduce(params_file: str | Path, overrides: dict[str, Any] | None = None, only: int | None = None,
              start: int | None = None, force: bool = False, smoke: bool = False,
              runs_root: Path = Path("runs"), figures_root: Path = Path("figures")) -> dict[str, Any]:
    """Run the notebook sequence for a parameter set; returns the timing record."""
    import papermill as pm

    overrides = {**(smoke_overrides(params_file) if smoke else {}), **(overrides or {})}
    p = load_params(params_file, overrides)  # validates before anything runs
    selected = _select(only, start)
    run_dir = Path(runs_root) / p.name
    nb_dir = run_dir / "notebooks"
    nb_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "stages.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    kernel = _kernel_name()
    timing: dict[str, Any] = {"params": str(params_file), "smoke": smoke, "stages": {}}
    t_start = time.perf_counter()
    bar = tqdm(selected, desc=f"reproduce {p.name}", unit="stage")
    for stage in bar:
        bar.set_postfix_str(stage)
        digest = stage_hash(stage, p.to_dict(), run_dir)
        if not force and state.get(stage) == digest and (run_dir / f"{stage}.json").is_file():
            timing["stages"][stage] = {"skipped": True}
            continue
        t0 = time.perf_counter()
        out_nb = nb_dir / f"{stage}.ipynb"
        try:
            pm.execute_notebook(str(notebooks_dir() / f"{stage}.ipynb"), str(out_nb), kernel_name=kernel,
                                parameters={"params_file": str(params_file), "overrides": overrides,
                                            "runs_root": str(runs_root), "figures_root": str(figures_root)},
                                progress_bar=False, cwd=str(Path.cwd()))
        except pm.PapermillExecutionError as err:
            raise StageFailed(f"stage {stage} failed: notebook notebooks/{stage}.ipynb, cell {err.cell_index} "
                              f"(execution count {err.exec_count}): {err.ename}: {err.evalue}; executed notebook "
                              f"kept at {out_nb}") from None
        state[stage] = digest
        write_json(state_path, state)
        timing["stages"][stage] = {"seconds": round(time.perf_counter() - t0, 1)}
    timing["total_seconds"] = round(time.perf_counter() - t_start, 1)
    # the README and `make bench` quote the full sequence; a partial run must not overwrite it
    full = len(selected) == len(STAGES)
    write_json(run_dir / ("pipeline_timing.json" if full else "pipeline_timing_partial.json"), timing)
    return timing

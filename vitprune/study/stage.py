"""The notebooks' handle on a pipeline stage: parameters, inputs from earlier stages, staged outputs.

A notebook opens its stage with `Stage(...)`, reads earlier stages' records and models with
`require`/`model` (only from the stages its registration line reads, `vitprune.study.stages`),
runs its per-seed jobs with `each_seed`/`run_jobs`, saves figures and tables (staged under
runs/<set>/staging/<stage>/) and calls `finish`, which publishes them into figures/<set>/ and writes
the stage's typed record. A stage that fails half-way leaves figures/ as it was, and a file already
owned by another notebook is refused, so each file has exactly one author.

`Stage.p` is the parameter set as the stage may read it: the sections its registration declares;
reading any other is an error that names the registration line, so the pipeline's cache (which
re-runs a stage when a declared parameter changes) cannot miss a dependency.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from vitprune.checkpoint import clean_stray_temps, write_json, write_text
from vitprune.errors import FigureOwnerError, MissingStageError, ParamsError
from vitprune.params import Params, load_params
from vitprune.study.records import SeedRecord, StageRecord, read_record, write_record
from vitprune.study.stages import EVERYTHING, STAGES

MANIFEST = "MANIFEST.json"
SECTIONS = ("data", "model", "train", "sparse", "prune", "decompose", "budget", "finetune", "bench", "findings")


def project_base(params_file: str | Path) -> Path:
    """Where relative paths resolve: the working directory, or the project root when run from notebooks/."""
    if Path(params_file).is_absolute() or Path(params_file).exists():
        return Path(".")
    root = Path(__file__).resolve().parents[2]
    return root if (root / params_file).exists() else Path(".")


class Undeclared:
    """Stands in for a parameter section a stage did not declare: reading it is an error naming the fix."""

    def __init__(self, section: str, stage: str):
        self._section, self._stage = section, stage

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__") or key in ("_section", "_stage"):
            raise AttributeError(key)
        raise ParamsError(f"stage {self._stage} reads params '{self._section}.{key}', which its registration line "
                          f"in vitprune/study/stages/__init__.py does not declare; add '{self._section}' (or "
                          f"'{self._section}.{key}') to its params, so a change to it re-runs the stage")


def declared_view(p: Params, stage: str) -> Params:
    """`p` with every section the stage's registration does not declare replaced by an `Undeclared` guard."""
    declared = STAGES[stage].params
    if declared == EVERYTHING:
        return p
    sections = {d.split(".", 1)[0] for d in declared}
    return dataclasses.replace(p, **{s: Undeclared(s, stage) for s in SECTIONS if s not in sections})


def declared_values(params: dict[str, Any], stage: str) -> dict[str, Any]:
    """The parameter values a stage depends on (its declared sections and keys, the seeds and plugins)."""
    declared = STAGES[stage].params
    if declared == EVERYTHING:
        return {k: v for k, v in params.items() if k != "source"}
    values = {"seeds": params["seeds"], "plugins": params.get("plugins")}
    for item in declared:
        section, _, key = item.partition(".")
        values[item] = params[section][key] if key else params[section]
    return values


class Stage:
    """A notebook's handle on its parameters, inputs and outputs."""

    def __init__(self, name: str, params_file: str, overrides: dict[str, Any] | None = None,
                 runs_root: str | Path = "runs", figures_root: str | Path = "figures"):
        from vitprune.study.figures import use_style
        from vitprune.study.provenance import pin_numerics

        self.entry = STAGES[name]
        pin_numerics()  # before the notebook's first tensor operation; the stage's workers inherit it

        self.name = name
        base = project_base(params_file)
        self.params = load_params(base / params_file, overrides or {})
        self.p: Params = declared_view(self.params, name)
        self.run_dir = base / runs_root / self.params.name
        self.fig_dir = base / figures_root / self.params.name
        self.staging = self.run_dir / "staging" / name
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        clean_stray_temps(self.run_dir)
        self._started = time.time()
        self.captions: dict[str, str] = {}
        self.summary = ""
        use_style()

    @property
    def bundle(self):
        """The dataset of this parameter set (loaded once per process, shared with the jobs run in this kernel)."""
        from vitprune.study.jobs import bundle_of

        return bundle_of(self.p)

    # ------------------------------------------------------------ seeds

    @property
    def seeds(self) -> list[int]:
        return list(self.p.seeds)

    def seed_dir(self, seed: int) -> Path:
        """runs/<set>/seed<k>/: every file of one seed's chain."""
        return self.run_dir / f"seed{seed}"

    def seed_params(self, seed: int, quiet: bool = False) -> Params:
        """The parameter set with `train.seed` = seed (and no progress bars when it runs beside others)."""
        train = dataclasses.replace(self.p.train, seed=seed, progress=self.p.train.progress and not quiet)
        return dataclasses.replace(self.p, train=train)

    def each_seed(self, fn, *args) -> dict[int, SeedRecord]:
        """fn(seed params, seed folder, *args) for every seed, side by side in worker processes."""
        return dict(zip(self.seeds, self.run_jobs(fn, [(seed, *args) for seed in self.seeds], "seeds")))

    def run_jobs(self, fn, jobs: list[tuple], label: str = "jobs") -> list[Any]:
        """fn(seed params, seed folder, *rest) for every (seed, *rest) in `jobs`, in worker processes with
        train.threads torch threads each (see `workers`); results in job order."""
        from vitprune.study.workers import default_workers, run_jobs

        workers = default_workers(self.params)
        args = [(self.seed_params(seed, quiet=workers > 1), self.seed_dir(seed), *rest) for seed, *rest in jobs]
        return run_jobs(fn, args, workers, self.p.train.threads, label, plugins=self.params.plugins or [],
                        on_done=lambda done, total: self.progress(f"{label} {done}/{total} done"))

    # ------------------------------------------------------------ inputs

    def require(self, stage: str) -> StageRecord:
        """The record an earlier stage wrote; MissingStageError naming the notebook if it has not run."""
        if stage not in self.entry.reads:
            raise MissingStageError(f"{self.name} reads {stage}, which its registration line in "
                                    "vitprune/study/stages/__init__.py does not list; add it there so the pipeline "
                                    f"re-runs {self.name} when {stage} changes")
        path = self.run_dir / f"{stage}.json"
        if not path.is_file():
            number = STAGES.names().index(stage) + 1
            raise MissingStageError(f"{self.name} needs the output of notebook {stage}.ipynb, which has not run for "
                                    f"'{self.p.name}' ({path} is missing); run it first: vitprune reproduce "
                                    f"{self.p.source} --only {number}")
        return read_record(path)

    def records(self) -> dict[str, StageRecord]:
        """The records of every stage this one reads, in pipeline order."""
        return {stage: self.require(stage) for stage in self.entry.reads}

    def model(self, filename: str, stage: str, seed: int | None = None):
        """Load a model file an earlier stage wrote (of one seed's chain if given; clear error naming that stage
        if absent)."""
        from vitprune.checkpoint import load_model

        self.require(stage)
        path = (self.seed_dir(seed) if seed is not None else self.run_dir) / filename
        if not path.is_file():
            raise MissingStageError(f"{path} is missing; re-run notebook {stage}.ipynb")
        return load_model(path)

    # ------------------------------------------------------------ outputs

    def save_figure(self, fig, name: str, caption: str = "") -> None:
        """Stage `name`.png/.pdf for figures/<set>/, note what it shows (runs/<set>/figure_audit/, for the tests),
        show the figure as this cell's output, and close it."""
        import matplotlib.pyplot as plt

        from vitprune.study.figures import audit
        from vitprune.study.reporting import save_figure

        save_figure(fig, self.staging / name)
        write_json(self.run_dir / "figure_audit" / f"{name}.json", {"stage": self.name, "axes": audit(fig)})
        self.captions[name] = caption
        _display(fig)
        plt.close(fig)

    def save_table(self, df, name: str, caption: str = "", per_seed=None):
        """Stage `name`.md/.tex (and .csv: of `per_seed`, one row per seed, where given) for figures/<set>/;
        returns the table, so a cell ending with it shows it."""
        from vitprune.study.reporting import save_table

        save_table(df, self.staging / name, per_seed)
        self.captions[name] = caption
        return df

    def save_seed_table(self, long, keys: list[str], name: str, caption: str = "", sort_by: str | None = None):
        """Stage a per-seed frame as a table of one row per `keys` (accuracy as mean ± std, n seeds) in .md/.tex,
        with every seed's row in the .csv; returns the summary, so a cell ending with it shows it."""
        from vitprune.study.tables import summary_table

        return self.save_table(summary_table(long, keys, sort_by), name, caption, per_seed=long)

    def save_text(self, filename: str, text: str) -> None:
        """Stage a text file (REPORT.md, environment.json) for figures/<set>/."""
        write_text(self.staging / filename, text)

    def report(self, records: dict[str, StageRecord], findings: str = "") -> str:
        """Stage REPORT.md and environment.json: every stage's summary, figures, tables, the parameters, the
        environment and the timings (this stage's own figures and tables included)."""
        import yaml

        from vitprune.study.provenance import environment
        from vitprune.study.reporting import report_markdown

        own = {"stage": self.name, "summary": self.summary, "captions": self.captions,
               "seconds": round(time.time() - self._started, 1)}
        sections = [{"stage": r.stage, "summary": r.summary, "captions": r.captions, "seconds": r.seconds}
                    for r in records.values()] + [own]
        tables = {}
        for record in sections:
            for item in record["captions"]:
                for folder in (self.staging, self.fig_dir):
                    if (folder / f"{item}.md").is_file():
                        tables[item] = (folder / f"{item}.md").read_text()
                        break
        env = environment(self.params.source)
        params = yaml.safe_dump({k: v for k, v in self.params.to_dict().items() if k != "source"}, sort_keys=False)
        text = report_markdown(self.p.name, sections, tables, params, env, findings, self.split_note())
        self.save_text("REPORT.md", text)
        self.save_text("environment.json", json.dumps(env, indent=1) + "\n")
        return text

    def split_note(self) -> str:
        """Seeds and data split of this parameter set, in one sentence for the report."""
        b = self.bundle
        return (f"Seeds {', '.join(map(str, self.seeds))} ({len(self.seeds)} chains, nothing random shared); data "
                f"{b.name}: {b.num_train():,} training and {b.num_test():,} test images (a fixed split, the same for "
                "every seed, so models of different seeds answer the same test images).")

    def conclude(self, text: str) -> None:
        """Show "What this shows" (generated from this run's numbers) and keep it for the report."""
        self.summary = text
        from IPython.display import Markdown

        _display(Markdown(f"### What this shows\n\n{text}"))

    def progress(self, text: str) -> None:
        """One line of progress for `vitprune reproduce` to show while this stage runs."""
        from vitprune.progress import report

        report(f"{self.name}: {text}")

    def finish(self, seeds: dict[int, SeedRecord] | None = None, **extra: Any) -> StageRecord:
        """Publish staged figures/tables into figures/<set>/ and write this stage's typed record, with the digest of
        every file it owns: the files its jobs wrote and the figures it published (a changed or missing one
        re-runs the stage)."""
        self.fig_dir.mkdir(parents=True, exist_ok=True)
        manifest_path = self.fig_dir / MANIFEST
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        staged = sorted(p for p in self.staging.iterdir() if p.is_file())
        for path in staged:
            owner = manifest.get(path.name)
            if owner in STAGES and owner != self.name:  # an owner no longer registered is a renamed notebook
                raise FigureOwnerError(f"{self.fig_dir / path.name} is written by notebook {owner}; "
                                       f"{self.name} must not write it too")
        for path in staged:
            os.replace(path, self.fig_dir / path.name)
            manifest[path.name] = self.name
        write_json(manifest_path, dict(sorted(manifest.items())))
        seeds = seeds or {}
        files = sorted({f for record in seeds.values() for f in record.files})
        record = StageRecord(
            stage=self.name, params=self.p.name, seeds=seeds, summary=self.summary, captions=self.captions,
            figures={p.name: file_digest(self.fig_dir / p.name) for p in staged},
            outputs={f: file_digest(self.run_dir / f) for f in files if (self.run_dir / f).is_file()},
            seconds=round(time.time() - self._started, 1), extra=extra)
        write_record(self.run_dir / f"{self.name}.json", record)
        return record


def file_digest(path: Path) -> str:
    """sha256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _display(obj) -> None:
    """Show `obj` as a cell output when running inside a notebook kernel (a no-op elsewhere)."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return
    if get_ipython() is not None:
        display(obj)

"""The Jupyter kernel `vitprune reproduce` runs its notebooks in: ipykernel on this very interpreter, ending with
the run that started it.

ipykernel polls for its parent only when it was reparented to PID 1; under a subreaper (containers,
systemd) a killed run's kernel would live on and keep writing into the run folder. Started as
`python -m vitprune.study.kernel`, it ends within a second of the run however the run ended
(`die_with_parent`), and its workers with it.

Each stage's kernel is started while the stage before it runs (`KernelsAhead`), and imports what the notebooks
import before it is handed its notebook: its start-up (3–5 s of ipykernel, torch, timm, pandas, matplotlib)
overlaps the previous stage instead of adding to the run.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vitprune.study.cache import library_signature
from vitprune.study.workers import die_with_parent

PRELOAD = "VITPRUNE_KERNEL_PRELOAD"  # set for the kernels `KernelsAhead` starts
# the modules the stage notebooks import (with matplotlib, seaborn, pandas and scipy behind them)
NOTEBOOK_IMPORTS = ("vitprune.study.stage", "vitprune.study.figures", "vitprune.study.tables", "vitprune.study.jobs",
                    "vitprune.study.explorer", "vitprune.study.stages.pruning", "IPython.display")


def kernel_name() -> str:
    """A kernel spec for this very interpreter (works inside .venv and conda alike), on JUPYTER_PATH."""
    digest = hashlib.sha1(sys.executable.encode()).hexdigest()[:8]
    name = f"vitprune-{digest}"
    root = Path(os.environ.get("VITPRUNE_KERNEL_DIR", Path.home() / ".cache" / "vitprune" / "jupyter"))
    spec_dir = root / "kernels" / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": [sys.executable, "-m", "vitprune.study.kernel", "-f", "{connection_file}"],
            "display_name": f"vitprune ({sys.executable})", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    paths = os.environ.get("JUPYTER_PATH", "")
    if str(root) not in paths.split(os.pathsep):
        os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(root), paths) if p)
    return name


class KernelsAhead:
    """Started kernels for `vitprune reproduce`'s stages: `taken` hands over one that was started while the previous
    stage ran, and starts the next. A kernel started before a vitprune source file changed is not handed over
    (it has imported the old code, and the stage would be cached under the new code's hash)."""

    def __init__(self, name: str, cwd: Path, library: Path):
        self.name, self.cwd, self.library = name, cwd, library
        self._ahead: tuple[Any, tuple] | None = None

    def _start(self) -> tuple[Any, tuple]:
        from jupyter_client.manager import AsyncKernelManager
        from jupyter_core.utils import run_sync

        signature = library_signature(self.library)
        manager = AsyncKernelManager(kernel_name=self.name)
        run_sync(manager.start_kernel)(cwd=str(self.cwd), env={**os.environ, PRELOAD: "1"})
        return manager, signature

    @contextmanager
    def taken(self, more: bool):
        """A started kernel (its manager) for the stage about to run, ended when the stage has run; the next stage's
        kernel is started now if `more`."""
        manager, signature = self._ahead or self._start()
        self._ahead = None
        if signature != library_signature(self.library):
            _stop(manager)
            manager, _ = self._start()
        if more:
            self._ahead = self._start()
        try:
            yield manager
        finally:
            _stop(manager)  # its notebook has finished: every file it wrote is complete

    def close(self) -> None:
        """End the kernel started for a stage that will not run."""
        if self._ahead is not None:
            _stop(self._ahead[0])
            self._ahead = None


def _stop(manager: Any) -> None:
    """End a kernel at once."""
    from jupyter_core.utils import run_sync

    if manager.has_kernel:
        run_sync(manager.shutdown_kernel)(now=True)


def _preload() -> None:
    """Import what the stage notebooks import, before the kernel is handed its notebook; with the numerics pinned
    first, as `Stage` does."""
    from vitprune.study.provenance import pin_numerics

    pin_numerics()
    for module in NOTEBOOK_IMPORTS:
        importlib.import_module(module)


if __name__ == "__main__":
    if sys.path and sys.path[0] in ("", "."):
        sys.path.pop(0)  # as ipykernel_launcher: the working folder's modules must not shadow the kernel's
    die_with_parent()
    from ipykernel import kernelapp

    app = kernelapp.IPKernelApp.instance()
    app.initialize()
    if os.environ.get(PRELOAD):
        _preload()  # after the kernel's set-up, so that matplotlib takes the inline backend, as in a notebook cell
    app.start()

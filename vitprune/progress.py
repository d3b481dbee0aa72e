"""Signs of life: a running stage reports what it is doing (model, epoch k/N, variant i/M) as one line.

`vitprune reproduce` names a file in VITPRUNE_PROGRESS_FILE for the notebook kernels it starts and
shows the line they write beside its own progress bar; outside a pipeline run `report` does nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "VITPRUNE_PROGRESS_FILE"


def report(text: str) -> None:
    """Publish one line of progress for whoever watches (nothing happens outside a pipeline run)."""
    path = os.environ.get(ENV)
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        Path(tmp).write_text(text)
        os.replace(tmp, path)
    except OSError:
        pass  # progress is a courtesy; never fail a run for it


def latest(path: str | Path) -> str:
    """The last line reported to `path` ('' if none yet)."""
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""

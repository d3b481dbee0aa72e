"""Where a run comes from: machine, thread count, library versions, git commit, parameter file hash.

Written beside the figures (environment.json, REPORT.md) so two sets of figures can be told apart.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_commit(folder: Path) -> str:
    """HEAD of the git checkout holding `folder`, with '+changes' when the work tree differs; 'unknown' outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def environment(params_file: str | Path | None) -> dict[str, Any]:
    """The facts that make two runs' numbers comparable, or explain why they differ."""
    import numpy
    import timm
    import torch

    project = Path(__file__).resolve().parent.parent
    params = Path(params_file) if params_file else None
    return {
        "cpu": cpu_model(), "machine": platform.machine(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "numpy": numpy.__version__, "git_commit": git_commit(project),
        "params_file": str(params) if params else None,
        "params_sha256": hashlib.sha256(params.read_bytes()).hexdigest() if params and params.is_file() else None,
    }

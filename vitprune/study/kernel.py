"""The Jupyter kernel `vitprune reproduce` runs its notebooks in: ipykernel on this very interpreter, ending with
the run that started it.

ipykernel polls for its parent only when it was reparented to PID 1; under a subreaper (containers,
systemd) a killed run's kernel would live on and keep writing into the run folder. Started as
`python -m vitprune.study.kernel`, it ends within a second of the run however the run ended
(`die_with_parent`), and its workers with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from vitprune.study.workers import die_with_parent


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


if __name__ == "__main__":
    if sys.path and sys.path[0] in ("", "."):
        sys.path.pop(0)  # as ipykernel_launcher: the working folder's modules must not shadow the kernel's
    die_with_parent()
    from ipykernel import kernelapp

    kernelapp.launch_new_instance()

"""Where a run comes from: pinned CPU numerics (the same floats with and without AVX-512), and the record of
machine, thread count, kernels, library versions, git commit and parameter file hash.

Written beside the figures (environment.json, REPORT.md) so two sets of figures can be told apart.

Why the numerics are pinned: PyTorch picks its CPU kernels by instruction set (ATen's vectorised ops, MKL's
GEMM, oneDNN's convolution). On a CPU with AVX-512 they take other summation orders than on one with AVX2
only, the last bits of every result differ, and over 60 epochs the training chains diverge as if they had
another seed. `pin_numerics` asks all three libraries for their AVX2 code paths (every x86-64 server of the
last ten years has them), so the same seeds give the same numbers with and without AVX-512 (MKL
promises its AVX2 branch on Intel CPUs only; on AMD it takes its AUTO reproducibility branch). A variable already set
wins (e.g. ATEN_CPU_CAPABILITY=avx512 for native speed).
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import warnings
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

PINNED_NUMERICS = {
    "ATEN_CPU_CAPABILITY": "avx2",  # ATen's vectorised kernels (softmax, layer norm, GELU, reductions, attention)
    "MKL_CBWR": "AVX2,STRICT",  # MKL's conditional numerical reproducibility: GEMM/LAPACK on the AVX2 branch
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN's convolution (the patch embedding)
}


def pin_numerics(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the PINNED_NUMERICS variables that are not set yet (in os.environ unless `env` is given) and return the
    values in force. Call it before the first tensor operation of the process: the libraries read them once.
    Spawned workers and notebook kernels inherit them."""
    env = os.environ if env is None else env
    for name, value in PINNED_NUMERICS.items():
        env.setdefault(name, value)
    return {name: env[name] for name in PINNED_NUMERICS}


def numerics() -> dict[str, str]:
    """The CPU kernels this process uses (ATen's capability) and the pinning variables, for the record; warns
    when ATen runs wider kernels than asked (an operation ran before `pin_numerics`)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    asked = os.environ.get("ATEN_CPU_CAPABILITY", "")
    if asked.lower() == "avx2" and capability.upper().startswith("AVX512"):
        warnings.warn(f"torch runs {capability} kernels although ATEN_CPU_CAPABILITY=avx2: a tensor operation ran "
                      "before vitprune pinned the numerics, so the numbers may differ in the last bits from another "
                      "machine's; restart the kernel and create the Stage first", RuntimeWarning, stacklevel=2)
    return {"cpu_capability": capability, **{name: os.environ.get(name, "unset") for name in PINNED_NUMERICS}}


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

    project = Path(__file__).resolve().parents[2]
    params = Path(params_file) if params_file else None
    return {
        "cpu": cpu_model(), "machine": platform.machine(), "torch_threads": torch.get_num_threads(),
        **numerics(),
        "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "numpy": numpy.__version__, "git_commit": git_commit(project),
        "params_file": str(params) if params else None,
        "params_sha256": hashlib.sha256(params.read_bytes()).hexdigest() if params and params.is_file() else None,
    }

"""Where a run comes from: pinned CPU numerics (the same floats with and without AVX-512), and the record of
machine, thread count, kernels, library versions, git commit and parameter file hash.

Written beside the figures (environment.json, REPORT.md) so two sets of figures can be told apart.

Why the numerics are pinned: PyTorch picks its CPU kernels by instruction set (ATen's vectorised ops, MKL's
GEMM, oneDNN's convolution). On a CPU with AVX-512 they take other summation orders than on one with AVX2
only, the last bits of every result differ, and over 60 epochs the training chains diverge as if they had
another seed. `pin_numerics` asks all three libraries for their AVX2 code paths (every x86-64 server of the
last ten years has them), so the same seeds give the same numbers with and without AVX-512 (MKL
promises its AVX2 branch on Intel CPUs only; on AMD it takes its AUTO reproducibility branch, which
`mkl_branch` records). A variable already set wins (e.g. ATEN_CPU_CAPABILITY=avx512 for native speed).

MKL_CBWR=COMPATIBLE would give one branch on every x86 CPU, vendor-independent floats; `make bench` measures
what it costs a training step against these pins (`bench.mkl_compatible_cost`), above the 1.3x the project
accepts, so Intel against AMD is left to the seeds, intervals and the verdicts' robustness (`stats.can_move`).
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import subprocess
import sys
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


def mkl_branch() -> dict[str, str]:
    """MKL's version and the conditional-numerical-reproducibility branch its GEMM takes here (MKL_VERBOSE of one
    small matmul, in a child process with this process's variables): 'AVX2,STRICT' on Intel under the pins,
    'AUTO,STRICT' on AMD, where MKL keeps its own choice."""
    code = "import torch; torch.mm(torch.ones(8, 8), torch.ones(8, 8))"
    try:
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MKL_VERBOSE": "1"}, capture_output=True,
                             text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return {"mkl": "unknown", "mkl_cnr_branch": "unknown"}
    text = out.stdout + out.stderr
    version, branch = re.search(r"MKL_VERBOSE (.*?) Product build", text), re.search(r"CNR:(\S+)", text)
    return {"mkl": version.group(1) if version else "not used", "mkl_cnr_branch": branch.group(1) if branch else
            "not used"}


def cpu_vendor() -> str:
    """The CPU's vendor id (GenuineIntel, AuthenticAMD, ...) from /proc/cpuinfo; '' where unknown."""
    from vitprune.speed import cpu_field  # here, not at the top: pin_numerics must be importable before torch

    return cpu_field("vendor_id")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform knows."""
    from vitprune.speed import cpu_field

    return cpu_field("model name") or platform.processor() or platform.machine()


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
        "cpu": cpu_model(), "cpu_vendor": cpu_vendor(), "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(), **numerics(), **mkl_branch(),
        "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "numpy": numpy.__version__, "git_commit": git_commit(project),
        "params_file": str(params) if params else None,
        "params_sha256": hashlib.sha256(params.read_bytes()).hexdigest() if params and params.is_file() else None,
    }

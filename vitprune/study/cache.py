"""Whether a stage must run again: the hash of everything it ran from and the files it owns.

A stage is skipped only when nothing it depends on has changed: its notebook, the parameters its
registration declares (`vitprune.study.stages`), the records and files of the stages it reads, its own
files (in runs/<set>/ and the figures and tables it published), the source of every vitprune module its
notebook reaches (imports followed through the package, lazy ones included, and the modules of the
stages it reads), the plugins' sources and the lock file.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from vitprune.checkpoint import read_json_mapping, write_json
from vitprune.errors import MissingStageError, ParamsError
from vitprune.study.records import read_record
from vitprune.study.stage import declared_values, file_digest
from vitprune.study.stages import STAGES

PACKAGE = Path(__file__).resolve().parents[1]
PACKAGE_NOTEBOOKS = PACKAGE.parent / "notebooks"
LOCK_FILE = "constraints.txt"


def notebooks_dir() -> Path:
    """The notebooks of the checkout in the working directory, else those beside the installed package."""
    here = Path.cwd() / "notebooks"
    names = STAGES.names()
    if all((here / f"{stage}.ipynb").is_file() for stage in names):
        return here
    if all((PACKAGE_NOTEBOOKS / f"{stage}.ipynb").is_file() for stage in names):
        return PACKAGE_NOTEBOOKS
    raise ParamsError(f"no notebooks/ folder with {', '.join(names)} in '{Path.cwd()}' or beside the installed "
                      f"package ('{PACKAGE_NOTEBOOKS.parent}'); run from the project root")


def library_dir() -> Path:
    """The vitprune source the kernels import: the checkout in the working directory, else the installed one."""
    here = Path.cwd() / "vitprune"
    return here if (here / "__init__.py").is_file() else PACKAGE


def package_modules(library: Path) -> dict[str, Path]:
    """Dotted name -> source file of every module of the vitprune package at `library`."""
    modules = {}
    for path in library.rglob("*.py"):
        parts = path.relative_to(library.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _with_parents(name: str) -> set[str]:
    """A dotted module and the packages above it (importing it runs their __init__ too)."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def imported_modules(source: str, known: set[str]) -> set[str]:
    """vitprune modules that Python `source` imports anywhere in it (lazy imports too), with their packages."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vitprune":
            found |= _with_parents(node.module) | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {m for a in node.names if a.name.split(".")[0] == "vitprune" for m in _with_parents(a.name)}
    return found & known


def module_closure(roots: set[str], library: Path) -> list[str]:
    """`roots` and every vitprune module they reach through imports, sorted."""
    files = package_modules(library)
    seen: set[str] = set()
    todo = [m for m in roots if m in files]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += sorted(imported_modules(files[module].read_text(), set(files)) - seen)
    return sorted(seen)


def stage_modules(stage: str, library: Path) -> list[str]:
    """The vitprune modules a stage's notebook reaches, with the modules of the stage and of the stages it reads
    (loaded by name, e.g. for their claims)."""
    import nbformat

    nb = nbformat.read(notebooks_dir() / f"{stage}.ipynb", as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    roots = imported_modules(code, set(package_modules(library)))
    roots |= {f"vitprune.study.stages.{STAGES[s].module}" for s in (stage, *STAGES[stage].reads)}
    return module_closure(roots, library)


def plugin_sources(plugins: list[str] | None) -> dict[str, str]:
    """Content hashes of the plugin modules a parameter set imports (their code can change any stage)."""
    import importlib.util

    out = {}
    for name in plugins or []:
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin) if spec and spec.origin else None
        out[name] = hashlib.sha256(origin.read_bytes()).hexdigest() if origin and origin.is_file() else "missing"
    return out


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def stage_hash(stage: str, params_dict: dict[str, Any], run_dir: Path) -> str:
    """Content hash of what a stage depends on: notebook, the parameters it declares, the records of the stages it
    reads, the source of the library modules it reaches, the plugins and the lock file."""
    notebook = notebooks_dir() / f"{stage}.ipynb"
    library = library_dir()
    files = package_modules(library)
    source = {m: hashlib.sha256(files[m].read_bytes()).hexdigest() for m in stage_modules(stage, library)}
    deps = {d: _digest((run_dir / f"{d}.json").read_bytes()) if (run_dir / f"{d}.json").is_file() else None
            for d in STAGES[stage].reads}
    lock = library.parent / LOCK_FILE
    return _digest(notebook.read_bytes(), declared_values(params_dict, stage), deps, source,
                   plugin_sources(params_dict.get("plugins")), lock.read_bytes() if lock.is_file() else b"")


def files_intact(run_dir: Path, fig_dir: Path, stages: tuple[str, ...]) -> bool:
    """Whether every file these stages own — in the run folder and the figures they published — still exists with
    the content they recorded."""
    for stage in stages:
        path = run_dir / f"{stage}.json"
        if not path.is_file():
            return False
        try:
            record = read_record(path)
        except MissingStageError:  # an unreadable record: the stage runs again
            return False
        owned = [(run_dir / name, digest) for name, digest in record.outputs.items()]
        owned += [(fig_dir / name, digest) for name, digest in record.figures.items()]
        for file, digest in owned:
            if not file.is_file() or _content_digest(str(file), *_signature(file)) != digest:
                return False
    return True


def _signature(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


def library_signature(library: Path) -> tuple:
    """(module, size, mtime, inode) of every vitprune source file at `library`: whether any changed since, without
    reading them (a kernel started ahead of its stage has imported them)."""
    return tuple(sorted((name, *_signature(path)) for name, path in package_modules(library).items()))


@functools.lru_cache(maxsize=4096)
def _content_digest(path: str, size: int, mtime_ns: int, inode: int) -> str:
    """file_digest, read once per version of a file: several stages check the same upstream files."""
    return file_digest(Path(path))


def forget_stages(run_dir: Path, stages: list[str]) -> None:
    """--force with --only/--from: these stages run again from scratch — their cache entries, records and the
    files they recorded (checkpoints included) go — while what the other stages made stays."""
    state = cache_state(run_dir / "stages.json")
    for stage in stages:
        path = run_dir / f"{stage}.json"
        try:
            owned = read_record(path).outputs if path.is_file() else {}
        except MissingStageError:  # an unreadable record owns nothing we can name
            owned = {}
        for name in owned:
            if not Path(name).is_absolute() and ".." not in Path(name).parts:
                (run_dir / name).unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        state.pop(stage, None)
    write_json(run_dir / "stages.json", state)


def cache_state(path: Path) -> dict[str, str]:
    """{stage: hash of what it ran from}; a missing, truncated or foreign stages.json is no cache (all stages run)."""
    return read_json_mapping(path, str)

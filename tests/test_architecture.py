"""The house in order: the library apart from the study, no import cycles, no borrowed private names, one error base,
one registry per kind of thing, modules short enough to read in one sitting."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import vitprune
from vitprune import names
from vitprune.errors import VitpruneError

PACKAGE = Path(vitprune.__file__).resolve().parent
STUDY = "vitprune.study"
JOINING = {"vitprune.cli", "vitprune.commands"}  # the command line: it joins the library and the study


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
MODULES = sorted(FILES)
LIBRARY = [m for m in MODULES if not m.startswith(STUDY) and m not in JOINING]


def imports_of(module: str) -> list[tuple[str, list[str]]]:
    """(imported vitprune module, names taken from it) for every import in `module`, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(FILES[module].read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vitprune":
            submodules = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in FILES]
            taken = [a.name for a in node.names if f"{node.module}.{a.name}" not in FILES]
            found += [(m, []) for m in submodules] + ([(node.module, taken)] if taken or not submodules else [])
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "vitprune"]
    return found


def test_the_library_imports_nothing_from_the_study():
    for module in LIBRARY:
        borrowed = [dep for dep, _ in imports_of(module) if dep.startswith(STUDY)]
        assert not borrowed, f"{module} (library) imports {borrowed} from the study; the library stands alone"
    code = "import sys, vitprune, vitprune.training, vitprune.export; print([m for m in sys.modules if 'study' in m])"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", f"importing the library loads study modules: {loaded}"


def test_no_import_cycle_among_vitprune_modules():
    graph = {m: {dep for dep, _ in imports_of(m) if dep in FILES and dep != m} for m in MODULES}
    done: set[str] = set()

    def visit(m: str, path: tuple[str, ...]) -> None:
        assert m not in path, f"import cycle: {' -> '.join(path + (m,))}"
        if m in done:
            return
        for dep in graph[m]:
            visit(dep, path + (m,))
        done.add(m)

    for m in MODULES:
        visit(m, ())


def test_no_module_imports_another_modules_private_name():
    for module in MODULES:
        for dep, taken in imports_of(module):
            private = [n for n in taken if n.startswith("_")]
            assert not private, f"{module} imports private {private} from {dep}"


def test_every_exception_class_derives_from_the_one_base():
    for module in MODULES:
        mod = importlib.import_module(module)
        for name, obj in inspect.getmembers(mod, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == mod.__name__:
                assert issubclass(obj, VitpruneError), f"{module}.{name} does not derive from VitpruneError"


def test_no_module_grows_past_a_sitting():
    for module, path in FILES.items():
        assert len(path.read_text().splitlines()) <= 420, f"{module} is over ~400 lines; split it by job"


def test_names_registries_and_errors_do_not_import_torch():
    for module in ("vitprune.names", "vitprune.registry", "vitprune.errors", "vitprune.schema"):
        assert not any(dep in ("torch", "timm") for dep, _ in imports_of(module))
        source = FILES[module].read_text()
        assert "import torch" not in source and "import timm" not in source, module


def test_lists_of_names_are_defined_once():
    """A tuple literal equal to one of names.py's lists, anywhere else in the package, is a second definition."""
    lists = {getattr(names, n) for n in dir(names) if n.isupper() and isinstance(getattr(names, n), tuple)}
    lists = {t for t in lists if len(t) > 1}
    for module, path in FILES.items():
        if module == "vitprune.names":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List)) and all(isinstance(e, ast.Constant) for e in node.elts):
                values = tuple(e.value for e in node.elts)
                assert values not in lists, f"{path.name}:{node.lineno} repeats {values}; import it from names"
    for nb in (PACKAGE.parent / "notebooks").glob("*.ipynb"):
        text = nb.read_text()
        for t in lists:
            assert repr(t) not in text and repr(list(t)) not in text, f"{nb.name} repeats {t}"


def test_methods_criteria_and_sites_are_named_only_in_their_registration():
    """No module but the one that registers a method, criterion or site spells out the list of them: the rest read
    the registry (a second hand-written list is how a new method used to be silently left out)."""
    groups = [vitprune.DECOMPOSITIONS.names(), vitprune.DECOMPOSITIONS.names(family="QR"),
              vitprune.DECOMPOSITIONS.names(family="SVD"), vitprune.CRITERIA.names(), vitprune.SITES.names(),
              vitprune.SITES.names(default=True)]
    for module, path in FILES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and all(isinstance(e, ast.Constant)
                                                                         for e in node.elts):
                values = {e.value for e in node.elts}
                assert not any(values == set(g) for g in groups if len(g) > 2), (
                    f"{module}:{node.lineno} lists {sorted(values)}; read the registry instead")

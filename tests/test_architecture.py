"""The house in order: no import cycles, no borrowed private names, one error base, one list per name."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import vitprune
from vitprune import names
from vitprune.errors import VitpruneError

PACKAGE = Path(vitprune.__file__).resolve().parent
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def imports_of(module: str) -> list[tuple[str, list[str]]]:
    """(imported vitprune module, names taken from it) for every import in `module`, lazy ones included."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vitprune"):
            if node.module == "vitprune":  # from vitprune import linalg
                found += [(alias.name, []) for alias in node.names if alias.name in MODULES]
            else:
                found.append((node.module.split(".")[1], [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name.split(".")[1], []) for a in node.names if a.name.startswith("vitprune.")]
    return found


def test_no_import_cycle_among_vitprune_modules():
    graph = {m: {dep for dep, _ in imports_of(m) if dep in MODULES and dep != m} for m in MODULES}
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
            assert not private, f"vitprune.{module} imports private {private} from vitprune.{dep}"


def test_every_exception_class_derives_from_the_one_base():
    for module in MODULES:
        mod = importlib.import_module(f"vitprune.{module}")
        for name, obj in inspect.getmembers(mod, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == mod.__name__:
                assert issubclass(obj, VitpruneError), f"vitprune.{module}.{name} does not derive from VitpruneError"


def test_no_module_grows_past_a_sitting():
    for path in PACKAGE.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 420, f"{path.name} is over ~400 lines; split it by job"


def test_params_and_names_do_not_import_torch():
    for module in ("names", "params", "errors"):
        assert not any(dep in ("torch", "timm") for dep, _ in imports_of(module))
        source = (PACKAGE / f"{module}.py").read_text()
        assert "import torch" not in source and "import timm" not in source, module


def test_lists_of_names_are_defined_once():
    """A tuple literal equal to one of names.py's lists, anywhere else in the package, is a second definition."""
    lists = {getattr(names, n) for n in dir(names) if n.isupper() and isinstance(getattr(names, n), tuple)}
    lists = {t for t in lists if len(t) > 1}
    for path in PACKAGE.glob("*.py"):
        if path.stem == "names":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List)) and all(isinstance(e, ast.Constant) for e in node.elts):
                values = tuple(e.value for e in node.elts)
                assert values not in lists, f"{path.name}:{node.lineno} repeats {values}; import it from names"
    notebooks = Path(PACKAGE.parent / "notebooks")
    for nb in notebooks.glob("*.ipynb"):
        text = nb.read_text()
        for t in lists:
            assert repr(t) not in text and repr(list(t)) not in text, f"{nb.name} repeats {t}"

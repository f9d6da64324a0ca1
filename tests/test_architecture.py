"""The package's shape: imports point one way, and no module reaches into another's private names.

Read from the source with :mod:`ast` (every import, also those inside functions), so the tests
see what would run, not only what runs at import time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "learned_optim"
BENCHMARKS = ROOT / "benchmarks"


def module_name(path: Path) -> str:
    """``learned_optim/rule/math.py`` -> ``learned_optim.rule.math`` (a package: its __init__)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path) -> set[str]:
    """The package's modules that ``path`` imports (a ``from X import Y`` of a submodule Y
    counts as an import of ``X.Y``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return {name for name in found if name in MODULES}


def import_graph() -> dict[str, set[str]]:
    return {name: imported_modules(path) - {name} for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first = last), or ``None``."""
    done: set[str] = set()
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in stack:
            return stack[stack.index(node):] + [node]
        if node in done:
            return None
        stack.append(node)
        for target in sorted(graph[node]):
            cycle = visit(target)
            if cycle:
                return cycle
        stack.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node)
        if cycle:
            return cycle
    return None


def test_the_import_graph_is_read_from_the_source():
    graph = import_graph()
    assert "learned_optim.rule.math" in graph["learned_optim.rule.tape"]
    # "from learned_optim.rule import policy" is an import of the module rule.policy
    assert "learned_optim.rule.policy" in graph["learned_optim.rule.math"]
    assert "learned_optim.evaluate" in graph["learned_optim.train"]


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


@pytest.mark.parametrize("lower, upper", [
    ("learned_optim.rule", "learned_optim"),  # the rule knows nothing of the rest
    ("learned_optim.evaluate", "learned_optim.train"),  # evaluation sits below training
    ("learned_optim.optimizer", "learned_optim.finetune"),
])
def test_imports_point_one_way(lower, upper):
    graph = import_graph()
    for name, targets in graph.items():
        if name == lower or name.startswith(lower + "."):
            above = {t for t in targets if (t == upper or t.startswith(upper + "."))
                     and not (t == lower or t.startswith(lower + "."))}
            assert not above, f"{name} imports {sorted(above)}"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(path: Path, own_package: str) -> list[str]:
    """Private names of the package's modules that ``path`` imports or reads as attributes of
    an imported module (``from m import _x``, ``m._x``); a private module is private to the
    package that holds it."""
    tree = ast.parse(path.read_text())
    found = []
    module_aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("learned_optim"):
                continue
            holder = node.module.rsplit(".", 1)[0]
            if _is_private(node.module.rsplit(".", 1)[-1]) and holder != own_package:
                found.append(f"{node.lineno}: module {node.module}")
            for alias in node.names:
                if f"{node.module}.{alias.name}" in MODULES:
                    module_aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                elif _is_private(alias.name):
                    found.append(f"{node.lineno}: {node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES and alias.asname:
                    module_aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in module_aliases and _is_private(node.attr)):
            found.append(f"{node.lineno}: {module_aliases[node.value.id]}.{node.attr}")
    return found


@pytest.mark.parametrize("path", sorted([*PACKAGE.rglob("*.py"), *BENCHMARKS.glob("*.py")]),
                         ids=lambda path: str(path.relative_to(ROOT)))
def test_no_module_imports_another_modules_private_names(path):
    own_package = module_name(path).rsplit(".", 1)[0]
    assert private_imports(path, own_package) == []


def test_the_private_name_check_catches_both_forms(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("from learned_optim.evaluate import _x\n"
                      "from learned_optim import plots\nplots._y()\n")
    assert private_imports(source, "benchmarks") == ["1: learned_optim.evaluate._x",
                                                     "3: learned_optim.plots._y"]

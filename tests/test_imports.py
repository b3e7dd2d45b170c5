"""klayer's modules import one another in one direction only: no import cycles.

The graph is read from the source (every ``import klayer...`` and ``from klayer...
import ...``, at module level or inside functions), so an import hidden in a function
to dodge a cycle at import time still counts.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "klayer"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: the modules of the package it imports}, for every .py file under root."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from ..a import b
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                # `from pkg import name` imports the module pkg.name when there is one
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                           for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        return exc.args[1]
    return None


def test_klayer_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 20  # every module was read
    assert "klayer.study.sections" in graph["klayer.commands.reproduce"]  # function-level imports count
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_check_finds_a_cycle_through_a_function_level_import(tmp_path):
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("from pkg.sub import b\n")
    (root / "a.py").write_text("from pkg.sub import b\n")
    (root / "sub" / "b.py").write_text("def f():\n    from ..a import g\n")
    graph = import_graph(root)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"}
    assert set(find_cycle(graph)) == {"pkg.a", "pkg.sub.b"}
    (root / "sub" / "b.py").write_text("import pkg\n")
    assert find_cycle(import_graph(root)) is None
    (root / "sub" / "b.py").write_text("import pkg.sub\n")  # its own package imports it
    assert set(find_cycle(import_graph(root))) == {"pkg.sub", "pkg.sub.b"}


@pytest.mark.parametrize("module", ["klayer.search", "klayer.study.sections", "klayer.study.extended",
                                    "klayer.study.report"])
def test_the_modules_import_alone(module):
    """Each imports in a fresh interpreter (a cycle would show as a partial module)."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", f"import {module}"], check=True,
                   cwd=PACKAGE.parent, timeout=120)


def test_the_core_imports_nothing_else_from_klayer():
    graph = import_graph(PACKAGE)
    core = {name for name in graph if name == "klayer.nn" or name.startswith("klayer.nn.")}
    assert "klayer.nn.population" in core and "klayer.nn.network" in core
    outside = {name: sorted(t for t in graph[name] if t not in core) for name in core}
    assert not any(outside.values()), f"the core imports the shell: {outside}"

"""Dependencies point one way: ``gateway`` → ``backends``, ``policies``, and no module of
the three packages imports itself back through others (no import cycles), counting every
import: module level, inside functions, and under ``TYPE_CHECKING``."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "backends", "policies")


def _modules() -> dict[str, Path]:
    """Every module of the packages: dotted name → file."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of the packages that ``name`` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule; `from mod import name` the module.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a name inside a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_the_graph_sees_relative_function_level_and_type_checking_imports(tmp_path):
    graph = _graph()
    assert "gateway.routing.tiers" in graph["gateway.routing"]        # from .tiers import
    assert "gateway.errors" in graph["gateway.pipeline"]              # from .errors import
    assert "gateway.routing.train" in graph["gateway.cli.route"]      # from ..routing import train
    assert "backends" in graph["gateway.pipeline"]                    # absolute
    sample = tmp_path / "sample.py"
    sample.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                      "    from ..runtime import Snapshot\n"
                      "def f():\n    from . import capacity\n")
    assert _imports("gateway.routing.sample", sample, _modules()) == {
        "gateway.runtime", "gateway.routing.capacity"}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_itself_back():
    assert _cycles(_graph()) == []


def test_backends_and_policies_never_import_the_gateway():
    graph = _graph()
    wrong = {f"{name} -> {target}" for name, targets in graph.items()
             if not name.startswith("gateway") for target in targets
             if target.split(".")[0] == "gateway"}
    assert wrong == set()


def test_routing_decides_from_plain_data():
    """Routing knows nothing of the runtime or of HTTP: it raises its own refusals."""
    graph = _graph()
    routing = {n for n in graph if n.startswith("gateway.routing")}
    reached = {t for n in routing for t in graph[n]} - routing
    assert reached <= {"backends", "policies"}, reached


@pytest.mark.parametrize("name", sorted(n for n in _modules() if not n.endswith("__main__")))
def test_every_module_imports(name):
    """(``__main__`` modules are left out: importing one runs the command.)"""
    importlib.import_module(name)

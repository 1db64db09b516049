"""The package's import graph: one direction (no cycles) and no private names across modules.

The graph is read from the source with :mod:`ast` (every import, at module level or inside
a function, counts), so the test needs no TensorFlow and sees lazy imports too.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tile2audio"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str):
    """(imported module, imported names) for every import statement of one file."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, [alias.name for alias in node.names]


def import_graph(modules=MODULES) -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from . import x`` counts as importing ``x``)."""
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target, names in _imports(path, name):
            if not target.startswith("tile2audio"):
                continue
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            edges.update(subs or ([target] if target in modules else []))
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def private_imports(files) -> list[str]:
    """``file: from module import _name`` for every private name imported from a tile2audio module."""
    bad = []
    for path in files:
        name = _module_name(path) if PACKAGE in path.parents else path.stem
        for target, names in _imports(path, name):
            if target.startswith("tile2audio"):
                bad += [f"{path.relative_to(ROOT)}: from {target} import {n}"
                        for n in names if n.startswith("_") and not n.startswith("__")]
    return bad


def test_the_checker_sees_a_cycle_and_a_private_import(tmp_path):
    # The checker itself must be able to fail.
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    graph = import_graph({"tile2audio.x": _write(tmp_path / "x.py", "from .y import f\n"),
                          "tile2audio.y": _write(tmp_path / "y.py", "def f():\n    from .x import g\n")})
    assert find_cycles(graph) == [["tile2audio.x", "tile2audio.y"]]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_no_import_cycles_inside_the_package():
    graph = import_graph()
    assert "tile2audio.runs" in graph["tile2audio.embed"]  # the graph is really read
    assert find_cycles(graph) == []


@pytest.mark.parametrize("where", ["tile2audio", "experiments"])
def test_no_private_names_are_imported_from_other_modules(where):
    files = sorted((ROOT / where).rglob("*.py"))
    assert files
    assert private_imports(files) == []

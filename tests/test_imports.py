"""The package's layout: no import cycles between jaxpost's modules, and recipes short enough to read in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxpost"
MAX_RECIPE_LINES = 120


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """``{module: modules of the package it imports at its top level}``, read from the source.

    Only module-level statements count (including those under ``if``/``try``
    at module level): an import inside a function runs when it is called, by
    which time every module is loaded, so it cannot form a cycle at import
    time. ``from a.b import c`` names the module ``a.b.c`` when that is a
    module of the package, else ``a.b``. Relative imports are resolved.
    """
    modules = {_module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        edges = set()
        tree = ast.parse(path.read_text(), filename=str(path))
        todo = list(tree.body)
        while todo:
            node = todo.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                continue
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    edges.add(full if full in modules else base)
            else:
                todo.extend(ast.iter_child_nodes(node))
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (a depth-first search, deterministic order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle_and_names_it(tmp_path):
    """The check above can fail: a two-module package that imports itself in a circle is caught."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import f\n\ndef g():\n    from pkg import c  # lazy: no edge\n")
    (pkg / "b.py").write_text("import os\nfrom pkg import a\n")
    (pkg / "c.py").write_text("from . import a\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"} and graph["pkg.c"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None


def test_demo_and_cli_do_not_import_each_other_and_config_does_not_import_the_demo():
    graph = import_graph()
    assert "jaxpost.cli" not in graph["jaxpost.demo.run"]
    source = (PACKAGE / "config.py").read_text()
    assert "jaxpost.demo" not in source


def test_each_recipe_reads_in_one_sitting():
    recipes = sorted((PACKAGE / "recipes").glob("*.py"))
    assert len(recipes) > 5
    long = {p.name: n for p in recipes if (n := len(p.read_text().splitlines())) > MAX_RECIPE_LINES}
    assert not long, f"recipes over {MAX_RECIPE_LINES} lines (move library parts below jaxpost/recipes): {long}"

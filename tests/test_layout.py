"""The package's import graph has no circle: every import of one opt_queue module by another is
counted, at module level, inside functions and under ``TYPE_CHECKING`` alike, so that each module
can be read (and moved) knowing only the ones below it."""

from __future__ import annotations

import ast
from pathlib import Path

import opt_queue

PACKAGE = Path(opt_queue.__file__).parent


def module_name(path: Path) -> str:
    parts = ["opt_queue", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The opt_queue modules that ``path`` imports, wherever in the file."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]  # a module or a name in one
        else:
            continue
        for name in names:
            while name and name not in modules:  # opt_queue.jobs.Job -> opt_queue.jobs
                name = name.rpartition(".")[0]
            if name and name != here and name != "opt_queue":  # the package's face imports no room
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_finder_sees_a_circle_and_every_kind_of_import(tmp_path: Path) -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
    sample = PACKAGE / "request.py"  # a module that imports no other room: the test reads others'
    graph = import_graph()
    assert graph[module_name(sample)] <= {"opt_queue.errors"}
    assert "opt_queue.jobs" in graph["opt_queue.engine"]  # from opt_queue.jobs import ...
    assert "opt_queue.keys" in graph["opt_queue.jobs"]  # from opt_queue import keys
    assert "opt_queue.runner" in graph["opt_queue.ui"]  # an import inside a function counts
    assert "opt_queue.answers" in graph["opt_queue.formats"]  # so does one under TYPE_CHECKING


def test_no_module_imports_itself_back_through_others() -> None:
    found = circles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)

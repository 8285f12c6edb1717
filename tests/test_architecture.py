"""The package's import structure: no import cycles, and a cheap ``import embedsearch``.

The layering rules themselves are import-linter contracts (pyproject.toml, ``lint-imports`` in
.ci/run); import-linter has no rule against cycles in general, so this test looks for them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

pytestmark = pytest.mark.no_store  # never opens a library

REPO = Path(__file__).resolve().parents[1]


def _graph() -> grimp.ImportGraph:
    # Every import statement counts: those inside functions (grimp reads them all) and those under
    # ``if TYPE_CHECKING:`` (not excluded). External packages stay out. No cache: never stale.
    return grimp.build_graph("embedsearch", exclude_type_checking_imports=False, cache_dir=None)


def _edges(graph: grimp.ImportGraph) -> dict[str, set[str]]:
    """Module -> the modules it imports by name.

    Only explicit imports: that Python runs ``embedsearch/__init__.py`` before any of its submodules
    is no edge here, but ``from embedsearch import __version__`` is an edge to the package module.
    """
    return {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: every strongly connected component, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def _describe(graph: grimp.ImportGraph, component: list[str]) -> str:
    """The component's modules and one shortest cycle through its first module, with line numbers."""
    members = set(component)
    start = component[0]
    back = min((_chain(graph, nxt, start) for nxt in _into(graph, start, members)), key=len)
    cycle = [start, *back]
    steps = []
    for importer, imported in zip(cycle, cycle[1:], strict=False):
        lines = sorted({d["line_number"] for d in graph.get_import_details(importer=importer, imported=imported)})
        steps.append(f"    {importer} -> {imported} (l.{', l.'.join(map(str, lines))})")
    return f"  {', '.join(component)}\n" + "\n".join(steps)


def _into(graph: grimp.ImportGraph, start: str, members: set[str]) -> list[str]:
    return sorted(m for m in graph.find_modules_directly_imported_by(start) if m in members)


def _chain(graph: grimp.ImportGraph, importer: str, imported: str) -> tuple[str, ...]:
    if importer == imported:
        return (importer,)
    return graph.find_shortest_chain(importer=importer, imported=imported) or (importer, imported)


def test_strongly_connected_finds_cycles_and_only_cycles() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"d"}}
    assert sorted(strongly_connected(edges)) == [["a", "b", "c"], ["d"], ["e"], ["f"]]


def test_the_package_has_no_import_cycles() -> None:
    graph = _graph()
    edges = _edges(graph)
    assert "embedsearch.engine" in edges["embedsearch"], "the graph misses the package's lazy import of the engine"
    cycles = [c for c in strongly_connected(edges) if len(c) > 1]
    cycles += [[m] for m in sorted(edges) if m in edges[m]]  # a module importing itself
    report = "\n".join(_describe(graph, c) for c in cycles)
    assert not cycles, f"import cycles (imports inside functions and under TYPE_CHECKING count):\n{report}"


def test_importing_the_package_loads_neither_torch_faiss_sqlalchemy_nor_ray() -> None:
    heavy = "('torch', 'faiss', 'sqlalchemy', 'ray')"
    code = f"import sys, embedsearch; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

"""The package's import structure: no cycles, and each layer imports only what it may.

The imports are read from the source with ``ast``, not by importing the package, so
function-local imports are seen too and nothing runs. An edge is one import of one
module by another; imports under ``if TYPE_CHECKING:`` are left out (they never run).
Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``, but those implied
edges are left out: with them every module would sit on a cycle through the facade.

Layers (each rule below is one test):

- ``worker`` runs tasks and never reaches into ``scheduler``;
- ``scheduler`` decides, and talks to workers only through ``comm.protocol``: it
  imports neither ``worker`` nor ``memory``, nor any other part of ``comm``;
- ``comm`` and ``memory`` are below both and import neither;
- the facade ``aiodagger/__init__.py`` is for users: no module of the package imports it.
"""

from __future__ import annotations

import ast
import functools
import textwrap
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = ROOT / "aiodagger"
PACKAGE = PACKAGE_DIR.name


@dataclass(frozen=True, order=True)
class Edge:
    """``source`` imports ``target`` at ``line`` of ``file`` (relative to the package's parent)."""

    source: str
    target: str
    line: int
    file: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.source} imports {self.target}"


# -- the walker ----------------------------------------------------------------------------


def find_modules(package_dir: Path) -> dict[str, Path]:
    """Every module of the package under ``package_dir``, by dotted name."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return (
        isinstance(test, ast.Attribute)
        and test.attr == "TYPE_CHECKING"
        and isinstance(test.value, ast.Name)
        and test.value.id in ("typing", "typing_extensions")
    )


def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: anywhere, except under ``if TYPE_CHECKING:``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # the else branch does run
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _existing(name: str, modules: dict[str, Path]) -> str | None:
    """``name`` or its longest prefix that is a module (``pkg.mod.Class`` -> ``pkg.mod``)."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def _targets(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, package: str,
    modules: dict[str, Path],
) -> Iterator[str]:
    def inside(name: str) -> bool:
        return name == package or name.startswith(package + ".")

    if isinstance(node, ast.Import):
        for alias in node.names:
            if inside(alias.name) and (target := _existing(alias.name, modules)):
                yield target
        return
    if node.level:
        here = module.split(".") if is_package else module.split(".")[:-1]
        up = node.level - 1
        if up >= len(here):
            return  # above the package: not ours
        base = ".".join(here[: len(here) - up] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if not inside(base):
        return
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself.
        target = submodule if submodule in modules else _existing(base, modules)
        if target:
            yield target


def import_edges(package_dir: Path) -> list[Edge]:
    """Every runtime import of a module of the package by another, sorted."""
    modules = find_modules(package_dir)
    edges = set()
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        file = path.relative_to(package_dir.parent).as_posix()
        for node in _runtime_imports(tree):
            for target in _targets(node, module, is_package, package_dir.name, modules):
                if target != module:  # a package importing its own name is no dependency
                    edges.add(Edge(module, target, node.lineno, file))
    return sorted(edges)


def _graph(edges: Iterable[Edge]) -> dict[str, dict[str, Edge]]:
    """source -> target -> the first import of target by source."""
    graph: dict[str, dict[str, Edge]] = {}
    for edge in sorted(edges, key=lambda e: e.line):
        graph.setdefault(edge.source, {}).setdefault(edge.target, edge)
        graph.setdefault(edge.target, {})
    return graph


def strongly_connected(graph: dict[str, dict[str, Edge]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def shortest_cycle(component: list[str], graph: dict[str, dict[str, Edge]]) -> list[Edge]:
    """A shortest cycle through the component's first module, within the component."""
    start, members = component[0], set(component)
    came_by: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w, edge in sorted(graph[v].items()):
                if w == start:
                    path = [edge]
                    while path[0].source != start:
                        path.insert(0, came_by[path[0].source])
                    return path
                if w in members and w not in came_by:
                    came_by[w] = edge
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle in component {component}")


def cycle_report(edges: Iterable[Edge]) -> list[str]:
    """One entry per strongly connected component: its modules, one concrete cycle with
    where each of its imports is, and every import inside the component (the ones to
    cut from: breaking the one cycle shown may leave others)."""
    edges = list(edges)
    graph = _graph(edges)
    out = []
    for component in strongly_connected(graph):
        members = set(component)
        cycle = shortest_cycle(component, graph)
        inside = [e for e in edges if e.source in members and e.target in members]
        lines = [
            f"{len(component)} modules on a cycle: {', '.join(component)}",
            "  " + " -> ".join([e.source for e in cycle] + [cycle[0].source]),
            *(f"    {e}" for e in cycle),
            f"  all {len(inside)} imports inside these modules:",
            *(f"    {e}" for e in inside),
        ]
        out.append("\n".join(lines))
    return out


# -- the rules on the package --------------------------------------------------------------


@functools.cache
def _package_edges() -> tuple[Edge, ...]:
    return tuple(import_edges(PACKAGE_DIR))


def _under(*packages: str) -> Callable[[str], bool]:
    names = [f"{PACKAGE}.{p}" for p in packages]
    return lambda module: any(module == n or module.startswith(n + ".") for n in names)


def _violations(source: Callable[[str], bool], target: Callable[[str], bool]) -> list[str]:
    return [str(e) for e in _package_edges() if source(e.source) and target(e.target)]


def _fail_with(what: str, violations: list[str]) -> None:
    # Every violation at once, without pytest's repr of the list cutting it short.
    if violations:
        pytest.fail(f"{what}: {len(violations)}\n" + "\n".join(violations), pytrace=False)


def test_the_walker_sees_the_package() -> None:
    # A walker that found nothing would pass every rule below.
    edges = _package_edges()
    assert len(find_modules(PACKAGE_DIR)) > 20
    assert any(e.source == f"{PACKAGE}.cluster" for e in edges)


def test_no_import_cycles() -> None:
    _fail_with("groups of modules on import cycles", cycle_report(_package_edges()))


def test_worker_does_not_import_scheduler() -> None:
    _fail_with("imports of the scheduler by the worker",
               _violations(_under("worker"), _under("scheduler")))


def test_scheduler_imports_neither_worker_nor_memory() -> None:
    _fail_with("imports of the worker or memory by the scheduler",
               _violations(_under("scheduler"), _under("worker", "memory")))


def test_comm_and_memory_import_neither_scheduler_nor_worker() -> None:
    _fail_with("imports of the scheduler or worker by comm or memory",
               _violations(_under("comm", "memory"), _under("scheduler", "worker")))


def test_scheduler_reaches_comm_only_through_protocol() -> None:
    protocol = f"{PACKAGE}.comm.protocol"
    _fail_with(f"imports of comm other than {protocol} by the scheduler",
               _violations(_under("scheduler"), lambda t: _under("comm")(t) and t != protocol))


def test_nothing_in_the_package_imports_the_facade() -> None:
    _fail_with(f"imports of the facade {PACKAGE}/__init__.py from inside the package",
               _violations(lambda s: s != PACKAGE, lambda t: t == PACKAGE))


# -- the walker on a package made for it ---------------------------------------------------

_FAKE = {
    "__init__.py": '"""The facade: imports nothing."""\n',
    "a.py": """\
        from typing import TYPE_CHECKING

        from . import b

        if TYPE_CHECKING:
            from .c import C
        else:
            from . import sub
        """,
    "b.py": """\
        import os


        def f():
            from fakepkg.c import C
            return C, os
        """,
    "c.py": """\
        import typing

        from .a import b

        if typing.TYPE_CHECKING:
            import fakepkg.sub.d

        C = 1


        class K:
            def m(self):
                import fakepkg as facade
                return facade
        """,
    "sub/__init__.py": "",
    "sub/d.py": """\
        from .. import c
        from ..sub import d
        import fakepkg.sub
        """,
}


def test_walker_on_a_made_up_package(tmp_path: Path) -> None:
    root = tmp_path / "fakepkg"
    for name, text in _FAKE.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    edges = import_edges(root)

    found = {(e.source.removeprefix("fakepkg"), e.target.removeprefix("fakepkg"), e.line)
             for e in edges}
    assert found == {
        (".a", ".b", 3),  # from . import b: the submodule
        (".a", ".sub", 8),  # the else branch of TYPE_CHECKING runs; its body (.c) does not
        (".b", ".c", 5),  # a function-local import
        (".c", ".a", 3),  # from .a import b: b is no submodule of a, so a itself
        (".c", "", 13),  # the facade, from a method; typing.TYPE_CHECKING's .sub.d is not
        (".sub.d", ".c", 1),  # from .. import c
        (".sub.d", ".sub", 3),  # import fakepkg.sub; `from ..sub import d` is itself
    }

    (report,) = cycle_report(edges)
    assert report.splitlines()[:2] == [
        "3 modules on a cycle: fakepkg.a, fakepkg.b, fakepkg.c",
        "  fakepkg.a -> fakepkg.b -> fakepkg.c -> fakepkg.a",
    ]
    assert "fakepkg/b.py:5: fakepkg.b imports fakepkg.c" in report
    # Without the cycle's closing import there is none.
    assert cycle_report(e for e in edges if (e.source, e.target) != ("fakepkg.c", "fakepkg.a")) == []

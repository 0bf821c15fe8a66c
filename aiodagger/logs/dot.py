"""The task graph as Graphviz DOT text: ``dot -Tsvg graph.dot > graph.svg``.

One node per task seen in the log, labelled with its name and id and filled by its
final state; one edge per dependency, from the dependency to the dependent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .records import Logs

__all__ = ["to_dot"]

FILL = {
    "finished": "#c8e6c9",
    "failed": "#ffcdd2",
    "cancelled": "#e0e0e0",
}
PENDING_FILL = "#fff9c4"  # not done when the log was fetched


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(logs: Logs) -> str:
    states = logs.states
    lines = [
        "digraph aiodagger {",
        "  rankdir=LR;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica"];',
    ]
    tasks = logs.tasks
    for task, name in tasks.items():
        state = states.get(task, "pending")
        label = _quote(f"{name}\n#{task} {state}")
        lines.append(f"  t{task} [label={label}, fillcolor={_quote(FILL.get(state, PENDING_FILL))}];")
    edges = logs.edges
    for dep in dict.fromkeys(dep for dep, _ in edges if dep not in tasks):
        lines.append(f'  t{dep} [label="#{dep}\\n(spawned before logging)", style="rounded,dashed"];')
    for dep, task in edges:
        lines.append(f"  t{dep} -> t{task};")
    lines.append("}")
    return "\n".join(lines) + "\n"

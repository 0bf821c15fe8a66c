"""The workloads, defined once and shared by every peer.

Each peer implements a workload as a method named after its key in lower case
(``w1``, ``w2``...), so a new workload is one entry here plus one method per peer
that supports it; a peer without the method is reported as 'n/a'.

The task functions live at module level on purpose: systems that ship functions
to other processes (Ray, later aiodagger's subprocess workers) pickle them by
reference, which needs an importable name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def inc(x: int) -> int:
    """The unit of work for the sync workloads: small enough that overhead dominates."""
    return x + 1


async def sleep0_identity(i: int) -> int:
    """The unit of work for the async workloads: one trip through the event loop."""
    await asyncio.sleep(0)
    return i


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    n: int  # the figure is elapsed time / n
    unit: str  # what one of the n is: "task", "link"...
    description: str
    expected: Callable[[int], Any]  # n -> the result a correct run returns

    @property
    def label(self) -> str:
        return f"{self.key} {self.title}"


WORKLOADS: dict[str, Workload] = {
    w.key: w
    for w in (
        Workload(
            key="W1",
            title="independent sync tasks",
            n=10_000,
            unit="task",
            description=(
                "10,000 independent sync `inc(i)` tasks, all spawned, then all gathered. "
                "Measures per-task scheduling overhead for thread-pool work."
            ),
            expected=lambda n: [i + 1 for i in range(n)],
        ),
        Workload(
            key="W2",
            title="dependency chain",
            n=1_000,
            unit="link",
            description=(
                "A 1,000-link chain `t = spawn(inc, t)`, starting from `inc(0)`; only the "
                "last task is awaited. Measures dependency-resolution latency: nothing "
                "runs in parallel, so every link pays the full hand-off."
            ),
            expected=lambda n: n,
        ),
        Workload(
            key="W3",
            title="async def tasks",
            n=10_000,
            unit="task",
            description=(
                "10,000 `async def` tasks that `await asyncio.sleep(0)` and return i, all "
                "spawned, then all gathered. Measures per-task overhead for coroutine work "
                "that runs on the event loop."
            ),
            expected=lambda n: list(range(n)),
        ),
    )
}

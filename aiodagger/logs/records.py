"""What a log holds: the recorded scheduler events, and the ``Logs`` view over them.

Records carry task ids and names, never the tasks themselves, so a log keeps no
value alive. Times are ``time.perf_counter()`` seconds, as the scheduler reports them.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Done", "Event", "Logs", "Memory", "Moved", "Ran", "Spawned", "Stored", "Summary", "WorkerChange"]


class Spawned(NamedTuple):
    """``task`` was registered, waiting for ``dependencies`` (task ids)."""

    task: int
    name: str
    dependencies: tuple[int, ...]
    time: float


class Ran(NamedTuple):
    """One run (attempt) of ``task`` on ``processor`` of ``worker``; ``ok`` is False if it raised."""

    task: int
    name: str
    worker: int
    processor: str
    start: float
    stop: float
    ok: bool
    thread: str = ""  # the thread it ran on, where known ("event loop" for coroutines)


class Done(NamedTuple):
    """``task`` reached its final ``state`` ("finished", "failed" or "cancelled")."""

    task: int
    name: str
    state: str
    time: float


class Moved(NamedTuple):
    """Value ``key`` (a task id, or -chunk id) went from worker ``source`` to ``target``."""

    key: int
    nbytes: int
    source: int
    target: int
    start: float
    stop: float


class Stored(NamedTuple):
    """Worker ``worker``'s store ``how`` ("spilled", "loaded", "sent") chunk ``key``."""

    worker: int
    key: int
    nbytes: int
    how: str
    start: float
    stop: float


class Memory(NamedTuple):
    """A sample of worker ``worker``'s memory: bytes in its store, its limit, bytes spilled."""

    worker: int
    used: int
    limit: int | None
    spilled: int
    time: float


class WorkerChange(NamedTuple):
    """Worker ``worker`` "joined", "left", was "lost", "paused" or "resumed"."""

    worker: int
    what: str
    detail: str  # its processors (joined), why (left, lost)
    time: float


Event = Spawned | Ran | Done | Moved | Stored | Memory | WorkerChange
_TASK_EVENTS = (Spawned, Ran, Done)


class Lane(NamedTuple):
    """A row of a timeline: runs on one thread of a worker (its processor where the
    thread is not known), split into rows where they overlap (coroutines on a loop)."""

    worker: int
    processor: str  # the thread's name, else the processor's
    row: int  # 0, 1, ... within the thread

    @property
    def label(self) -> str:
        return self.processor if self.row == 0 else f"{self.processor} #{self.row + 1}"


class Logs:
    """Events recorded while logging was enabled (``await dagger.fetch_logs()``).

    ``events`` holds the records in the order the scheduler reported them (a run is
    reported when it ends); ``runs``, ``tasks``, ``states`` and ``edges`` are views over it. Export with :meth:`to_chrome_trace`, :meth:`gantt` and :meth:`to_dot`.
    """

    def __init__(self, events: list[Event], origin: float) -> None:
        self.events = events
        self.origin = origin  # perf_counter() when logging began: time zero of the exports

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)

    def __repr__(self) -> str:
        return f"<Logs: {len(self.tasks)} tasks, {len(self.runs)} runs, {len(self.events)} events>"

    @property
    def runs(self) -> list[Ran]:
        """Every run, in the order they ended."""
        return [e for e in self.events if type(e) is Ran]

    @property
    def tasks(self) -> dict[int, str]:
        """Task id -> name, for every task seen, in the order first seen."""
        out: dict[int, str] = {}
        for e in self.events:
            if type(e) in _TASK_EVENTS and e.task not in out:  # type: ignore[union-attr]
                out[e.task] = e.name  # type: ignore[union-attr]
        return out

    @property
    def states(self) -> dict[int, str]:
        """Task id -> final state, for the tasks that are done."""
        return {e.task: e.state for e in self.events if type(e) is Done}

    @property
    def moves(self) -> list[Moved]:
        return [e for e in self.events if type(e) is Moved]

    @property
    def stored(self) -> list[Stored]:
        return [e for e in self.events if type(e) is Stored]

    @property
    def memory(self) -> list[Memory]:
        return [e for e in self.events if type(e) is Memory]

    @property
    def workers(self) -> list[WorkerChange]:
        return [e for e in self.events if type(e) is WorkerChange]

    def summary(self) -> Summary:
        """Per function (task name): how many runs, their total, mean and longest
        seconds, and how many raised; most total time first. Prints as a table; its
        rows are dicts (``pandas.DataFrame(logs.summary())``)."""
        by_name: dict[str, list[float]] = {}
        failures: dict[str, int] = {}
        for run in self.runs:
            by_name.setdefault(run.name, []).append(run.stop - run.start)
            failures[run.name] = failures.get(run.name, 0) + (not run.ok)
        ordered = sorted(by_name.items(), key=lambda item: -sum(item[1]))
        return Summary([{"function": name, "count": len(times), "total_s": sum(times),
                         "mean_s": sum(times) / len(times), "max_s": max(times), "failures": failures[name]}
                        for name, times in ordered])

    @property
    def edges(self) -> list[tuple[int, int]]:
        """(dependency, dependent) task id pairs, one per dependency."""
        return [(dep, e.task) for e in self.events if type(e) is Spawned for dep in e.dependencies]

    def lanes(self) -> list[tuple[Lane, Ran]]:
        """Each run with the timeline row it is drawn on.

        A processor runs several tasks at once (threads, coroutines), and a timeline
        row must not hold overlapping bars (Perfetto requires slices on one thread to
        nest), so each run takes the first row of its processor that is free by then.
        """
        placed: list[tuple[Lane, Ran]] = []
        # Per processor: a heap of (end, row) for busy rows and a heap of free rows, so
        # that 10,000 overlapping coroutines cost O(n log n), and a run takes the lowest
        # free row (stable pictures).
        busy: dict[tuple[int, str], list[tuple[float, int]]] = {}
        free: dict[tuple[int, str], list[int]] = {}
        for run in sorted(self.runs, key=lambda r: (r.start, r.stop)):
            key = (run.worker, run.thread or run.processor)  # a thread's runs never overlap
            rows, idle = busy.setdefault(key, []), free.setdefault(key, [])
            while rows and rows[0][0] <= run.start:
                heapq.heappush(idle, heapq.heappop(rows)[1])
            row = heapq.heappop(idle) if idle else len(rows)
            heapq.heappush(rows, (run.stop, row))
            placed.append((Lane(run.worker, run.thread or run.processor, row), run))
        return placed

    # -- exports ---------------------------------------------------------------------------
    def to_chrome_trace(self, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """The Chrome Trace Event JSON (open it in ui.perfetto.dev or chrome://tracing).

        Written to ``path`` when given; the trace is returned as a dict either way.
        """
        from .trace import chrome_trace, write_json

        trace = chrome_trace(self)
        if path is not None:
            write_json(trace, path)
        return trace

    def gantt(self, path: str | os.PathLike[str] | IO[bytes] | None = None, *,
              title: str | None = None) -> Figure:
        """A Gantt chart of the task runs, one row per processor lane (needs matplotlib).

        Saved as a PNG to ``path`` (a file name or a binary file object) when given; the
        matplotlib ``Figure`` is returned either way.
        """
        from .gantt import gantt

        return gantt(self, path, title=title)

    def to_dot(self) -> str:
        """The task graph as Graphviz DOT text: one node per task, one edge per dependency."""
        from .dot import to_dot

        return to_dot(self)


class Summary(list[dict[str, Any]]):
    """:meth:`Logs.summary`'s rows, printed as a table."""

    COLUMNS = (("function", "{}"), ("count", "{:,}"), ("total_s", "{:.4f}"), ("mean_s", "{:.6f}"),
               ("max_s", "{:.6f}"), ("failures", "{:,}"))

    def __str__(self) -> str:
        cells = [[name for name, _ in self.COLUMNS]]
        cells += [[fmt.format(row[name]) for name, fmt in self.COLUMNS] for row in self]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.COLUMNS))]
        lines = []
        for n, r in enumerate(cells):
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)

"""What the dashboard knows: an Instrument that folds the scheduler's events into
bounded aggregates, and the loop-lag monitor.

Every event costs O(1) on the cluster's loop, and memory stays bounded whatever the
graph's size: counters per function name (at most ``MAX_FUNCTIONS`` names; later ones
share one row), ring buffers for the recent runs, the last ``GRAPH_KEEP`` tasks and the
last ``ERRORS_KEEP`` errors, and fixed-bucket histograms for run times and loop lag.
Anything costlier (formatting a traceback, sorting the rows) waits for an update, which
runs a few times a second and only while someone watches.
"""

from __future__ import annotations

import asyncio
import traceback
from bisect import bisect_left
from collections import deque
from collections.abc import Iterator
from itertools import islice
from time import perf_counter
from typing import TYPE_CHECKING, Any

from ..errors import UpstreamError
from ..scheduler.events import Instrument

if TYPE_CHECKING:
    from ..task import DTask

__all__ = ["DURATION_BUCKETS", "LAG_BUCKETS", "DashboardState", "Histogram", "LagMonitor"]

MAX_FUNCTIONS = 200
OTHER = "(other functions)"
STREAM_KEEP = 4096
GRAPH_KEEP = 200
GRAPH_DEPS = 16  # edges kept per node: a reduction over 10,000 inputs draws as 16
ERRORS_KEEP = 50
TRACEBACK_CHARS = 8000

DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class Histogram:
    """Counts per fixed bucket (not cumulative; Prometheus wants them summed up)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """[(upper bound, observations at or below it)], ending with "+Inf"."""
        out, total = [], 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out


class FunctionStats:
    """Counts of one function name's tasks, as events saw them."""

    __slots__ = ("name", "spawned", "dispatched", "ran", "retried", "finished", "failed",
                 "cancelled", "seconds", "last")

    def __init__(self, name: str) -> None:
        self.name = name
        self.spawned = self.dispatched = self.ran = self.retried = 0
        self.finished = self.failed = self.cancelled = 0
        self.seconds = 0.0
        self.last = 0  # the state's event count at its latest event: recent rows sort first

    def row(self, dispatch_seen: bool) -> dict[str, Any]:
        done = self.finished + self.failed + self.cancelled
        left = max(0, self.spawned - done)
        # Running needs task_dispatched (a run's start); without it a run is seen only
        # when it ends, and every unfinished task counts as waiting.
        running = min(left, max(0, self.dispatched - self.ran)) if dispatch_seen else 0
        return {"name": self.name, "spawned": self.spawned, "finished": self.finished,
                "failed": self.failed, "cancelled": self.cancelled, "running": running,
                "waiting": left - running, "seconds": round(self.seconds, 6)}


class DashboardState(Instrument):
    """The dashboard's view of one scheduler. Its event methods run on the cluster's
    loop thread, and so does everything that reads it (the server shares that loop)."""

    def __init__(self) -> None:
        self.origin = perf_counter()
        self.functions: dict[str, FunctionStats] = {}
        self.events = 0  # a clock for recency that costs less than reading the time
        self.spawned = 0
        self.done = {"finished": 0, "failed": 0, "cancelled": 0}
        self.retried = 0
        self.durations = Histogram(DURATION_BUCKETS)
        self.bytes_moved = 0
        self.moves = 0
        self.stored = {"spilled": 0, "loaded": 0, "sent": 0}  # bytes, by how
        self.dispatch_seen = False
        # (seq, task id, name, worker, processor, start, stop, ok)
        self.stream: deque[tuple[int, int, str, int, str, float, float, bool]] = deque(maxlen=STREAM_KEEP)
        self.stream_seq = 0
        # task id -> [id, name, dependency ids, state, worker], the last GRAPH_KEEP spawned
        self.graph: dict[int, list[Any]] = {}
        self._graph_order: deque[int] = deque()
        self.graph_version = 0
        # (seq, task id, name, exception or message): formatted when an update reads them
        self.errors: deque[tuple[int, int, str, BaseException | str]] = deque(maxlen=ERRORS_KEEP)
        self.errors_seq = 0
        self.upstream_failed = 0  # failed only because an input failed: counted, not listed
        self._formatted: dict[int, dict[str, Any]] = {}
        self.lag = LagMonitor()

    # -- events (the loop's hot path: O(1) each) ----------------------------------------
    def _stats(self, name: str) -> FunctionStats:
        stats = self.functions.get(name)
        if stats is None:
            if len(self.functions) >= MAX_FUNCTIONS:
                name = OTHER  # names made per task (options(name=f"x{i}")) share one row
                stats = self.functions.get(name)
            if stats is None:
                stats = self.functions[name] = FunctionStats(name)
        self.events += 1
        stats.last = self.events
        return stats

    def task_spawned(self, task: DTask[Any], dependencies: list[DTask[Any]]) -> None:
        self._stats(task.name).spawned += 1
        self.spawned += 1
        graph = self.graph
        order = self._graph_order
        if len(order) >= GRAPH_KEEP:
            graph.pop(order.popleft(), None)
        deps = [d.id for d in dependencies[:GRAPH_DEPS]] if dependencies else []
        graph[task.id] = [task.id, task.name, deps, "waiting", None]
        order.append(task.id)
        self.graph_version += 1

    def task_dispatched(self, task: DTask[Any], worker: int, at: float) -> None:
        self.dispatch_seen = True
        self._stats(task.name).dispatched += 1
        node = self.graph.get(task.id)
        if node is not None:
            node[3] = "running"
            node[4] = worker
            self.graph_version += 1

    def task_ran(self, task: DTask[Any], worker: int, processor: str, start: float, stop: float,
                 ok: bool) -> None:
        seconds = stop - start
        stats = self._stats(task.name)
        stats.ran += 1
        stats.seconds += seconds
        self.durations.observe(seconds)
        self.stream_seq += 1
        self.stream.append((self.stream_seq, task.id, task.name, worker, processor, start, stop, ok))
        node = self.graph.get(task.id)
        if node is not None:
            node[4] = worker

    def task_retried(self, task: DTask[Any], reason: str, at: float) -> None:
        self.retried += 1
        stats = self._stats(task.name)
        stats.retried += 1
        # the attempt that ended this way had no task_ran: its dispatch is over
        if stats.dispatched > stats.ran:
            stats.dispatched -= 1

    def task_done(self, task: DTask[Any]) -> None:
        state = task.state
        stats = self._stats(task.name)
        if state == "finished":
            stats.finished += 1
        elif state == "failed":
            stats.failed += 1
            self._failed(task)
        else:
            stats.cancelled += 1
        self.done[state] = self.done.get(state, 0) + 1
        node = self.graph.get(task.id)
        if node is not None:
            node[3] = state
            self.graph_version += 1

    def _failed(self, task: DTask[Any]) -> None:
        exc = task.exception()
        if isinstance(exc, UpstreamError):
            self.upstream_failed += 1  # its origin is listed (it failed on its own)
            return
        self.errors_seq += 1
        self.errors.append((self.errors_seq, task.id, task.name, exc if exc is not None else "failed"))

    def worker_left(self, worker: int, reason: str, lost: bool, at: float) -> None:
        if lost:
            self.errors_seq += 1
            self.errors.append((self.errors_seq, -1, f"worker {worker}", f"worker {worker} lost: {reason}"))

    def data_moved(self, key: int, nbytes: int, source: int, target: int, start: float,
                   stop: float) -> None:
        self.bytes_moved += nbytes
        self.moves += 1

    def chunk_stored(self, worker: int, key: int, nbytes: int, how: str, start: float,
                     stop: float) -> None:
        self.stored[how] = self.stored.get(how, 0) + nbytes

    # -- reading (updates: a few times a second, bounded work) ---------------------------
    def rel(self, t: float) -> float:
        """A perf_counter time as seconds since this state was made (what the page plots)."""
        return round(t - self.origin, 6)

    def function_rows(self, limit: int = 60) -> list[dict[str, Any]]:
        """The busiest ``limit`` functions: unfinished work first, then the most recent."""
        rows = sorted(self.functions.values(),
                      key=lambda s: (s.spawned > s.finished + s.failed + s.cancelled, s.last),
                      reverse=True)
        return [s.row(self.dispatch_seen) for s in rows[:limit]]

    def runs_since(self, seq: int, cap: int) -> tuple[list[list[Any]], int]:
        """Runs newer than ``seq`` (the newest ``cap`` of them, oldest first) as
        [seq, id, name, worker, processor, start, stop, ok], and how many were left out."""
        new = self.stream_seq - seq
        take = min(new, cap, len(self.stream))
        recent: Iterator[tuple[int, int, str, int, str, float, float, bool]] = islice(reversed(self.stream), take)
        out = [[r[0], r[1], r[2], r[3], r[4], self.rel(r[5]), self.rel(r[6]), r[7]] for r in recent]
        out.reverse()
        return out, new - take

    def graph_nodes(self) -> list[list[Any]]:
        return [list(node) for node in self.graph.values()]

    def errors_since(self, seq: int) -> list[dict[str, Any]]:
        out = []
        for entry in self.errors:
            if entry[0] > seq:
                out.append(self._format(entry))
        live = {e[0] for e in self.errors}
        for key in [k for k in self._formatted if k not in live]:
            del self._formatted[key]
        return out

    def _format(self, entry: tuple[int, int, str, BaseException | str]) -> dict[str, Any]:
        seq, task_id, name, exc = entry
        done = self._formatted.get(seq)
        if done is None:
            if isinstance(exc, BaseException):
                text = "".join(traceback.format_exception(exc))
                summary = f"{type(exc).__name__}: {exc}"
            else:
                text = summary = exc
            if len(text) > TRACEBACK_CHARS:
                text = text[:TRACEBACK_CHARS // 2] + "\n...\n" + text[-TRACEBACK_CHARS // 2:]
            done = self._formatted[seq] = {"seq": seq, "task": task_id, "name": name,
                                           "error": summary[:500], "traceback": text}
        return done


class LagMonitor:
    """How late the loop runs a timer due every ``interval`` seconds: lag = when it ran -
    when it was due. The recent samples give percentiles; the histogram, all of them."""

    def __init__(self, interval: float = 0.1, keep: int = 600) -> None:
        self.interval = interval
        self.histogram = Histogram(LAG_BUCKETS)
        self.recent: deque[float] = deque(maxlen=keep)  # the last minute, at 100 ms
        self.max = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due = 0.0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._due = perf_counter() + self.interval
        self._handle = loop.call_later(self.interval, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        assert self._loop is not None
        # perf_counter, not loop.time(): uvloop's clock counts whole milliseconds
        now = perf_counter()
        lag = max(0.0, now - self._due)
        self.histogram.observe(lag)
        self.recent.append(lag)
        self.max = max(self.max, lag)
        self._due = now + self.interval
        self._handle = self._loop.call_later(self.interval, self._tick)

    def summary(self) -> dict[str, float]:
        """Percentiles of the recent samples, in milliseconds."""
        samples = sorted(self.recent)
        if not samples:
            return {"p50": 0.0, "p99": 0.0, "max": 0.0, "last": 0.0}

        def pct(q: float) -> float:
            return round(1000 * samples[min(len(samples) - 1, int(q * len(samples)))], 3)

        return {"p50": pct(0.5), "p99": pct(0.99), "max": round(1000 * samples[-1], 3),
                "last": round(1000 * self.recent[-1], 3)}

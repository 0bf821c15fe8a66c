"""Recording the scheduler's event stream: enable_logging, disable_logging, fetch_logs.

An :class:`EventLog` is an :class:`~aiodagger.scheduler.events.Instrument` appended to a
cluster's scheduler. With logging off no instrument is attached, so the scheduler's
cost per event stays one truth test of an empty list.

``enable_logging()`` attaches a log to the cluster a ``spawn`` here would use (without
starting one) and, through ``cluster.on_cluster_start``, to every cluster started while
logging stays enabled. A cluster keeps its log after ``disable_logging()`` or its own
close, so ``fetch_logs(cluster)`` still reads it.
"""

from __future__ import annotations

import concurrent.futures
import threading
import weakref
from time import perf_counter
from typing import TYPE_CHECKING, Any

from .._asynclib import await_future
from .._bridge import call_soon_quietly
from ..cluster import Cluster, on_cluster_start, running_cluster
from ..scheduler.events import Instrument
from .records import Done, Event, Logs, Memory, Moved, Ran, Spawned, Stored, WorkerChange

if TYPE_CHECKING:
    from ..scheduler.core import Scheduler
    from ..task import DTask

__all__ = ["EventLog", "disable_logging", "enable_logging", "fetch_logs"]


class EventLog(Instrument):
    """Appends one small record per event. Runs on the cluster's loop thread.

    Memory grows with the number of events while enabled (three records per task):
    ``fetch_logs(clear=True)`` drains it.
    """

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.origin = perf_counter()
        self._threads: dict[int, str] = {}  # task id -> thread of the run being reported

    def task_spawned(self, task: DTask[Any], dependencies: list[DTask[Any]]) -> None:
        self.events.append(Spawned(task.id, task.name, tuple(d.id for d in dependencies), perf_counter()))

    def task_thread(self, task: DTask[Any], worker: int, thread: str) -> None:
        if len(self._threads) > 65536:  # runs that never reported an end (cancelled)
            self._threads.clear()
        self._threads[task.id] = thread

    def task_ran(self, task: DTask[Any], worker: int, processor: str, start: float, stop: float,
                 ok: bool) -> None:
        thread = self._threads.pop(task.id, "") if self._threads else ""
        self.events.append(Ran(task.id, task.name, worker, processor, start, stop, ok, thread))

    def data_moved(self, key: int, nbytes: int, source: int, target: int, start: float, stop: float) -> None:
        self.events.append(Moved(key, nbytes, source, target, start, stop))

    def chunk_stored(self, worker: int, key: int, nbytes: int, how: str, start: float, stop: float) -> None:
        self.events.append(Stored(worker, key, nbytes, how, start, stop))

    def memory_sampled(self, worker: int, used: int, limit: int | None, spilled: int, at: float) -> None:
        self.events.append(Memory(worker, used, limit, spilled, at))

    def worker_joined(self, worker: int, name: str, address: str, processors: tuple[str, ...],
                      at: float) -> None:
        self.events.append(WorkerChange(worker, "joined", ", ".join(processors), at))

    def worker_left(self, worker: int, reason: str, lost: bool, at: float) -> None:
        self.events.append(WorkerChange(worker, "lost" if lost else "left", reason, at))

    def worker_paused(self, worker: int, paused: bool, at: float) -> None:
        self.events.append(WorkerChange(worker, "paused" if paused else "resumed", "", at))

    def task_done(self, task: DTask[Any]) -> None:
        self.events.append(Done(task.id, task.name, task.state, perf_counter()))

    def snapshot(self, clear: bool) -> list[Event]:
        events = self.events
        if clear:
            self.events = []
            return events
        return list(events)


# One log per scheduler, kept (weakly) after logging is disabled so it can be fetched.
_logs: weakref.WeakKeyDictionary[Scheduler, EventLog] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _attach(cluster: Cluster) -> None:
    sched = cluster._scheduler
    with _lock:
        log = _logs.get(sched)
        if log is None:
            log = _logs[sched] = EventLog()
        if log not in sched.instruments:
            # Copy on write: the loop iterates the list it read, so any thread may swap it.
            sched.attach(log)


def enable_logging() -> None:
    """Record scheduler events of the current cluster and of clusters started from now on.

    Read them with ``await dagger.fetch_logs()``. Costs a few hundred nanoseconds per
    task event while enabled, nothing once disabled.
    """
    with _lock:
        if _attach not in on_cluster_start:
            on_cluster_start.append(_attach)
    cluster = running_cluster()
    if cluster is not None:
        _attach(cluster)


def disable_logging() -> None:
    """Stop recording, on every cluster. What was recorded stays fetchable."""
    with _lock:
        if _attach in on_cluster_start:
            on_cluster_start.remove(_attach)
        for sched, log in list(_logs.items()):
            sched.detach(log)


def logging_enabled() -> bool:
    return _attach in on_cluster_start


async def fetch_logs(cluster: Cluster | None = None, *, clear: bool = False) -> Logs:
    """The events recorded so far on ``cluster`` (default: the current one).

    ``clear=True`` also empties the log, so that the next fetch returns only newer
    events. The cluster may be closed already: its log outlives it.
    """
    if cluster is None:
        cluster = running_cluster()
        if cluster is None:
            raise RuntimeError(
                "fetch_logs(): no cluster is running here. Call it inside `async with "
                "dagger.Cluster()`, or pass the cluster: `await dagger.fetch_logs(cluster)`"
            )
    sched = cluster._scheduler
    with _lock:
        log = _logs.get(sched)
    if log is None:
        raise RuntimeError(
            f"fetch_logs(): nothing was recorded on {cluster!r}. Call dagger.enable_logging() "
            "before spawning the tasks you want to see"
        )
    if cluster.state == "running" and sched.dist is not None and sched.dist.workers:
        # A round trip to every worker: what each saw before it answered is here after.
        await cluster.worker_stats()
    return Logs(await _snapshot_on_loop(cluster, log, clear), log.origin)


async def _snapshot_on_loop(cluster: Cluster, log: EventLog, clear: bool) -> list[Event]:
    """Take the events on the cluster's loop thread, where they are appended."""
    sched = cluster._scheduler
    if cluster.state != "running" or threading.get_ident() == sched.loop_thread_id:
        return log.snapshot(clear)
    result: concurrent.futures.Future[list[Event]] = concurrent.futures.Future()

    def take() -> None:
        result.set_result(log.snapshot(clear))

    if not call_soon_quietly(sched.loop, take):  # the loop closed: nothing appends any more
        return log.snapshot(clear)
    return await await_future(result)

"""Scheduler events, for observers: logs, traces, progress, dashboards, metrics.

Every observer reads the same stream through :class:`Instrument`. With none attached,
the scheduler pays one truth test of an empty list per event, and worker processes
send none (they batch theirs to the scheduler only while an instrument is attached:
``Scheduler.listening``).

Times are ``time.perf_counter()`` seconds of the cluster's process. Events that
happened in a worker process carry that process's times moved onto this clock by the
offset estimated when it registered (its clock read halfway through a round trip), so
the lanes of a trace line up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..task import DTask

__all__ = ["Instrument"]


class Instrument:
    """Override the events you need. Called on the cluster's loop thread: keep it quick.

    Task events, in the order one task meets them: spawned, ready (every input done),
    dispatched (handed to a worker), ran (one attempt ended, with where and when it
    ran), then retried (another attempt follows) or done (final: ``task.state`` is
    finished, failed or cancelled). Workers: joined, then paused/resumed (memory
    pressure), then left (closed or retired) or lost (died, unreachable). Data: moved
    between workers, spilled to disk, loaded back, sent from disk; memory sampled.
    """

    # -- tasks ---------------------------------------------------------------------------
    def task_spawned(self, task: DTask[Any], dependencies: list[DTask[Any]]) -> None:
        """``task`` was registered; it waits for ``dependencies`` (unfinished or not)."""

    def task_ready(self, task: DTask[Any], at: float) -> None:
        """Every input of ``task`` is done: it waits for a processor."""

    def task_dispatched(self, task: DTask[Any], worker: int, at: float) -> None:
        """``task`` was handed to ``worker`` (0: this process)."""

    def task_ran(self, task: DTask[Any], worker: int, processor: str, start: float, stop: float,
                 ok: bool) -> None:
        """One run (attempt) of ``task`` ended; ``ok`` is False if it raised."""

    def task_thread(self, task: DTask[Any], worker: int, thread: str) -> None:
        """The thread ``task``'s last run used (its name), when known: called just
        before :meth:`task_ran` for runs on pool threads."""

    def task_retried(self, task: DTask[Any], reason: str, at: float) -> None:
        """A run of ``task`` ended without its result (its worker was lost, an input
        was lost...) and it will run again."""

    def task_done(self, task: DTask[Any]) -> None:
        """``task`` reached its final state (``task.state``)."""

    # -- workers -------------------------------------------------------------------------
    def worker_joined(self, worker: int, name: str, address: str, processors: tuple[str, ...],
                      at: float) -> None:
        """A worker registered (worker 0, this process, is there from the start)."""

    def worker_left(self, worker: int, reason: str, lost: bool, at: float) -> None:
        """A worker left: closed or retired (``lost`` False), or died or stopped
        answering (``lost`` True)."""

    def worker_paused(self, worker: int, paused: bool, at: float) -> None:
        """A worker stopped (``paused``) or started again taking tasks under memory pressure."""

    def memory_sampled(self, worker: int, used: int, limit: int | None, spilled: int, at: float) -> None:
        """A worker's memory: bytes in its store, its limit, bytes spilled so far."""

    # -- data ----------------------------------------------------------------------------
    def data_moved(self, key: int, nbytes: int, source: int, target: int, start: float,
                   stop: float) -> None:
        """A value went from worker ``source`` to worker ``target`` (0: this process)."""

    def chunk_stored(self, worker: int, key: int, nbytes: int, how: str, start: float,
                     stop: float) -> None:
        """A worker's store moved a chunk: ``how`` is "spilled" (written to disk),
        "loaded" (read back) or "sent" (served from its file without loading it)."""

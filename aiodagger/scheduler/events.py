"""Scheduler events, for observers: logs, traces, progress, dashboards.

Every observer reads the same stream through :class:`Instrument`. With none attached,
the scheduler pays one truth test of an empty list per event.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..task import DTask

__all__ = ["Instrument"]


class Instrument:
    """Override the events you need. Called on the cluster's loop thread: keep it quick.

    Times are ``time.perf_counter()`` seconds.
    """

    def task_spawned(self, task: DTask[Any], dependencies: list[DTask[Any]]) -> None:
        """``task`` was registered; it waits for ``dependencies`` (unfinished or not)."""

    def task_ran(self, task: DTask[Any], worker: int, processor: str, start: float, stop: float,
                 ok: bool) -> None:
        """One run (attempt) of ``task`` ended; ``ok`` is False if it raised."""

    def task_done(self, task: DTask[Any]) -> None:
        """``task`` reached its final state (``task.state``)."""

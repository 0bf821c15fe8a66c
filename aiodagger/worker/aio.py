"""AsyncProc: runs coroutine-function tasks on the worker's event loop.

Each task is one asyncio Task created in the cluster's own context, so a nested
``dagger.spawn`` finds its cluster and the spawner's ``dagger.options`` block does not
leak into the task.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine
from time import perf_counter
from typing import TYPE_CHECKING, Any

from ..task import DTask
from .execute import run_async

if TYPE_CHECKING:
    from ..scheduler.core import Scheduler

__all__ = ["AsyncProc"]


class AsyncProc:
    """The loop of one worker, as a processor for ``async def`` tasks."""

    kind = "async"

    def __init__(self, worker_id: int, sched: Scheduler, context: contextvars.Context) -> None:
        self.worker_id = worker_id
        self._sched = sched
        self._loop = sched.loop
        self._context = context
        self.running: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"AsyncProc(worker={self.worker_id})"

    def submit(self, task: DTask[Any], coro: Coroutine[Any, Any, Any] | None = None) -> None:
        handle = self._loop.create_task(self._run(task, task._attempts, coro), context=self._context)
        task._handle = handle
        self.running.add(handle)

    async def _run(self, task: DTask[Any], attempt: int, coro: Coroutine[Any, Any, Any] | None) -> None:
        start = perf_counter()
        try:
            if coro is None:
                if task._resolve or task._opts.restore is not None or task._opts.checkpoint is not None:
                    coro = run_async(task)
                else:  # the common case, one coroutine frame fewer
                    fn, args, kwargs = task._fn, task._args, task._kwargs
                    if fn is None or args is None or kwargs is None:
                        raise asyncio.CancelledError
                    coro = fn(*args, **kwargs)
            value = await coro
            ok = True
        except BaseException as exc:  # noqa: BLE001 - a task's failure is its result
            value, ok = exc, False
        # Discarded here rather than by a done-callback: that would cost every task a
        # second trip through the loop.
        me = asyncio.current_task()
        self.running.discard(me)
        if task._handle is me:
            task._handle = None
        self._sched.complete(task, attempt, ok, value, perf_counter() - start)

    async def close(self) -> None:
        """Cancel what still runs and wait for it to unwind."""
        running = list(self.running)
        for handle in running:
            handle.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)

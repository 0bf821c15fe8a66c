"""AsyncProc: runs coroutine-function tasks on the worker's event loop.

Each task is one asyncio Task created in the cluster's own context, so a nested
``dagger.spawn`` finds its cluster and the spawner's ``dagger.options`` block does not
leak into the task.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
from collections.abc import Callable, Coroutine
from time import perf_counter
from typing import TYPE_CHECKING, Any

from ..task import DTask
from .execute import run_async

if TYPE_CHECKING:
    from ..interfaces import ProcessorOwner

__all__ = ["HURRY_GRACE", "AsyncProc"]

logger = logging.getLogger(__name__)

# Seconds that running tasks get to end when their worker stops now (Ctrl-C, a signal to
# a subprocess worker): cancelled coroutines unwind in that time; sync code cannot be
# interrupted, and is left to its daemon thread.
HURRY_GRACE = 0.5


class AsyncProc:
    """The loop of one worker, as a processor for ``async def`` tasks."""

    kind = "async"
    thread = "event loop"  # where every run goes, for observers

    def __init__(self, worker_id: int, owner: ProcessorOwner, context: contextvars.Context) -> None:
        self.worker_id = worker_id
        self._owner = owner
        self._loop = owner.loop
        self._context = context
        # A counter rather than a set of handles: W3 (10,000 tiny coroutines) showed
        # set bookkeeping plus current_task() as a measurable share of a task's cost.
        self.running = 0
        self._idle: asyncio.Future[None] | None = None
        # On asyncio's own loops, create_task() is Task(coro, loop=..., context=...)
        # behind three Python calls (create_task, _check_closed, _set_task_name) when no
        # task factory is set: made here directly, W3 (10,000 coroutines spawned, then
        # gathered) ran 2.6 % fewer instructions a task (66,907 against 68,704, valgrind
        # --tool=cachegrind). Other loops (uvloop) and a factory set at any time keep it.
        self._direct = (isinstance(self._loop, asyncio.BaseEventLoop)
                        and type(self._loop).create_task is asyncio.BaseEventLoop.create_task)

    def __repr__(self) -> str:
        return f"AsyncProc(worker={self.worker_id})"

    def submit(self, task: DTask[Any], coro: Coroutine[Any, Any, Any] | None = None) -> None:
        self.running += 1
        task._handle = self._task(self._run(task, task._attempts, coro))

    def _task(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        loop = self._loop
        if self._direct and loop._task_factory is None:  # type: ignore[attr-defined]
            return asyncio.Task(coro, loop=loop, context=self._context)
        return loop.create_task(coro, context=self._context)

    def start_plain(self, task: DTask[Any], finished: Callable[[DTask[Any], Any], None]) -> None:
        """Start a task without inputs, keywords or options, spawned on this loop of a
        cluster without worker processes, store or observers (Scheduler.spawn): it
        reports its value to ``finished`` (the scheduler's finished_plain), its error
        as submit()'s tasks do. W3's shape (10,000 coroutines spawned, then gathered;
        medians of 15, taking turns with asyncio's create_task): 1.56-1.61x asyncio's
        time through submit() and complete(), 1.50-1.52x through this (with the inlined
        cluster lookup of spawn)."""
        self.running += 1
        loop = self._loop
        coro = self._run_plain(task, finished)
        if self._direct and loop._task_factory is None:  # type: ignore[attr-defined]  # _task(), inlined
            task._handle = asyncio.Task(coro, loop=loop, context=self._context)
        else:
            task._handle = loop.create_task(coro, context=self._context)

    async def _run_plain(self, task: DTask[Any], finished: Callable[[DTask[Any], Any], None]) -> None:
        try:
            fn, args = task._fn, task._args
            if fn is None or args is None:  # cancelled before it started
                raise asyncio.CancelledError
            value = await fn(*args)
        except BaseException as exc:  # noqa: BLE001 - a task's failure is its result
            self._ended()
            self._owner.complete(task, task._attempts, False, exc, 0.0, 0.0, self)
            return
        self.running -= 1  # _ended(), inlined
        if self._idle is not None:
            self._ended_idle()
        finished(task, value)

    def _ended(self) -> None:
        self.running -= 1
        if self._idle is not None:
            self._ended_idle()

    def _ended_idle(self) -> None:
        """Tell close() once the last coroutine has ended."""
        if self.running == 0 and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    async def _run(self, task: DTask[Any], attempt: int, coro: Coroutine[Any, Any, Any] | None) -> None:
        # Timed only for observers: run times of coroutines are not learned (they overlap).
        timed = self._owner.timed
        start = perf_counter() if timed else 0.0
        try:
            if coro is None:
                if (task._resolve or task._opts.restore is not None or task._opts.checkpoint is not None
                        or "cupy" in sys.modules):  # device arrays among the inputs go to host
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
        self._ended()
        self._owner.complete(task, attempt, ok, value, start, perf_counter() - start if timed else 0.0, self)

    def cancel(self, handle: asyncio.Task[None]) -> None:
        """Cancel a task's coroutine. A wrapper cancelled before its first step never
        runs its body (where the counter drops), so that case is counted here."""
        if handle.cancel():
            handle.add_done_callback(self._after_cancel)

    def _after_cancel(self, handle: asyncio.Task[None]) -> None:
        if handle.cancelled():  # never started: _run swallows every exception once started
            self._ended()

    async def close(self, timeout: float | None = None) -> bool:
        """Wait for running coroutines to unwind (their tasks were cancelled), at most
        ``timeout`` seconds; False, with a warning, if some did not: a coroutine that
        swallows CancelledError must not keep the cluster from closing."""
        if not self.running:
            return True
        self._idle = self._loop.create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._idle), timeout)
        except TimeoutError:
            logger.warning("%r: %d coroutine task(s) still running %s s after being cancelled "
                           "(do they swallow CancelledError?); left behind", self, self.running,
                           timeout)
            return False
        return True

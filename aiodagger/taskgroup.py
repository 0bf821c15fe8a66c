"""TaskGroup: structured concurrency over DTasks, shaped like ``asyncio.TaskGroup``.

It works in trio code as well (anyio's trio backend too), where it is the one way to
have a failure, or the block's cancel scope, cancel the DTasks themselves: a nursery
that cancels tasks awaiting DTasks ends their waits only (aiodagger/task.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import Any

from ._asynclib import caller_loop, is_cancellation, uncancellable
from .api import spawn_with_options
from .errors import TaskCancelledError, UpstreamError
from .task import FAILED, DTask
from .taskoptions import current_options

__all__ = ["TaskGroup"]


class TaskGroup:
    """``async with dagger.TaskGroup() as tg: tg.spawn(fn, ...)``.

    Leaving the block waits for every task spawned in it. The first task that fails
    cancels the rest, and the failures are raised together as an ``ExceptionGroup``
    (an UpstreamError whose origin already failed in the group is not repeated). If
    the block itself raises, or the waiting coroutine is cancelled, the tasks are
    cancelled too.
    """

    def __init__(self) -> None:
        self._tasks: list[DTask[Any]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aborting = False
        self._exited = False
        self._left = 0
        self._all_done: asyncio.Future[None] | None = None

    async def __aenter__(self) -> TaskGroup:
        if self._loop is not None:
            raise RuntimeError("a TaskGroup can be entered once")
        self._loop = caller_loop()
        return self

    def spawn(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> DTask[Any]:
        if self._loop is None:
            raise RuntimeError("use the TaskGroup inside `async with dagger.TaskGroup() as tg:`")
        if self._exited:
            raise RuntimeError("this TaskGroup has exited; it takes no new task")
        if self._aborting:
            raise RuntimeError("this TaskGroup is shutting down after a failure; it takes no new task")
        task = spawn_with_options(current_options(), fn, args, kwargs)
        self._tasks.append(task)
        self._left += 1
        task._on_done_in(self._loop, self._task_done)
        return task

    def _task_done(self, task: DTask[Any]) -> None:
        self._left -= 1
        if task._state is FAILED and not task._cancelled and not self._aborting:
            self._abort()
        if self._left == 0 and self._all_done is not None and not self._all_done.done():
            self._all_done.set_result(None)

    def _abort(self) -> None:
        self._aborting = True
        for t in self._tasks:
            if not t.done():
                t.cancel()

    async def __aexit__(self, et: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._loop is not None
        if exc is not None:
            self._abort()
        cancelled_while_waiting: BaseException | None = None
        while self._left:
            self._all_done = self._loop.create_future()
            try:
                if cancelled_while_waiting is None:
                    await self._all_done
                else:
                    await uncancellable(self._all_done)
            except BaseException as err:
                if not is_cancellation(err):
                    raise
                cancelled_while_waiting = err
                self._abort()  # then go on waiting: the tasks unwind first
        self._exited = True
        errors = self._errors()
        if exc is not None and not is_cancellation(exc):
            errors.insert(0, exc)
        if cancelled_while_waiting is not None and not errors:
            raise cancelled_while_waiting
        if errors:
            raise BaseExceptionGroup("unhandled errors in a TaskGroup", errors)

    def _errors(self) -> list[BaseException]:
        failed = [t for t in self._tasks if t._state is FAILED and not t._cancelled]
        failed_ids = {t.id for t in failed}
        errors: list[BaseException] = []
        for t in failed:
            err = t._exc
            assert err is not None
            if isinstance(err, UpstreamError) and getattr(err.origin, "id", None) in failed_ids:
                continue
            if isinstance(err, TaskCancelledError):
                continue
            errors.append(err.with_traceback(t._tb))
        return errors

"""Crossing between threads and event loops: the few ways aiodagger does it, each once.

* :func:`call_soon_quietly` - call back into a loop from any thread, unless that loop
  has closed (then nobody is left to call: the cluster or the caller is gone).
* :class:`Wakeup` - coalesced wake-ups: any number of requests, from any thread, before
  the callback runs cost one ``call_soon_threadsafe`` (a queue drained in one go).
* :func:`block_until_done`, :func:`run_on_loop_blocking`, :func:`run_on_loop_awaitable`
  - waiting for a task, or running a coroutine on the cluster's loop, from another
  thread or another loop (a trio run's too).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from ._asynclib import foreign_loop
from ._context import pool_thread

if TYPE_CHECKING:
    from .task import DTask

__all__ = ["Wakeup", "block_until_done", "call_soon_quietly", "run_on_loop_awaitable",
           "run_on_loop_blocking"]


def call_soon_quietly(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any,
                      context: contextvars.Context | None = None) -> bool:
    """``loop.call_soon_threadsafe(fn, *args)``; False if the loop has closed."""
    try:
        loop.call_soon_threadsafe(fn, *args, context=context)
    except RuntimeError:
        return False
    return True


class Wakeup:
    """Run ``fn`` on ``loop`` once for every burst of :meth:`request` calls.

    The callback clears ``pending`` before it runs ``fn``, so a request made while ``fn``
    drains its queue schedules one more run rather than being lost. Hot paths test
    ``pending`` themselves before calling :meth:`request` (one attribute read per task).
    """

    __slots__ = ("_fn", "_loop", "_threadsafe", "pending")

    def __init__(self, loop: asyncio.AbstractEventLoop, fn: Callable[[], None], *,
                 threadsafe: bool = True) -> None:
        self._loop = loop
        self._fn = fn
        self._threadsafe = threadsafe
        self.pending = False

    def request(self) -> bool:
        """Schedule the callback unless it is pending; False if the loop has closed."""
        if self.pending:
            return True
        self.pending = True
        if not self._threadsafe:
            self._loop.call_soon(self._run)
        elif not call_soon_quietly(self._loop, self._run):
            self.pending = False
            return False
        return True

    def _run(self) -> None:
        self.pending = False
        self._fn()


def block_until_done(task: DTask[Any], timeout: float | None, loop_thread_id: int) -> None:
    """Block this thread until ``task`` is done; a pool thread hands its slot back meanwhile."""
    if threading.get_ident() == loop_thread_id:
        raise RuntimeError(
            f"fetch() on {task!r} was called on the cluster's event loop thread, where "
            "blocking would deadlock the loop that runs the task. Write `await task` "
            "(or `await dagger.gather(...)`) here instead."
        )
    event = threading.Event()
    task._on_done(lambda _t: event.set())
    pool = getattr(pool_thread, "pool", None)
    if pool is not None:
        with pool.blocked():
            finished = event.wait(timeout)
    else:
        finished = event.wait(timeout)
    if not finished:
        raise TimeoutError(
            f"{task._describe()} did not finish within {timeout} s; it keeps running "
            "(fetch it again, or cancel it)"
        )


def run_on_loop_awaitable(coro: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop) -> Awaitable[Any]:
    """``coro`` run on ``loop``, as an awaitable for the caller's own loop (or trio run)."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        try:
            foreign_loop()
        except RuntimeError:
            coro.close()
            raise
        from ._trio import await_future

        return await_future(asyncio.run_coroutine_threadsafe(coro, loop))
    if running is loop:
        return coro
    return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


def run_on_loop_blocking(coro: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop,
                         loop_thread_id: int, timeout: float | None) -> Any:
    """Run ``coro`` on ``loop`` and block this (other) thread for its result."""
    if threading.get_ident() == loop_thread_id:
        coro.close()
        raise RuntimeError("fetch() on the event loop thread that runs the tasks would deadlock "
                           "it; write `await task` here instead")
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

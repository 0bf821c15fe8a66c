"""The waiting part of an event loop, for trio code (trio itself, or anyio's trio backend).

See :mod:`aiodagger._asynclib`: this module is imported only once trio is found
running. Tasks complete on the cluster's asyncio loop thread; a callback for a trio
task crosses over with ``TrioToken.run_sync_soon``, and what the trio task awaits is a
:class:`TrioFuture` over a ``trio.Event``: nothing polls, and no thread blocks for a
wait. Cancelling a trio wait (a cancel scope) ends that wait only, never the DTask, as
cancelling an asyncio awaiter does (aiodagger/task.py says why).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
from collections.abc import Callable, Generator
from typing import Any, TypeVar, cast

import trio

__all__ = ["TrioFuture", "TrioLoop", "await_future", "run_in_thread", "running_loop"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class TrioFuture:
    """The part of ``asyncio.Future`` that aiodagger's waiters use, for a trio task.

    Set on the run's own thread only, where :meth:`TrioLoop.call_soon_threadsafe`
    brings every callback.
    """

    __slots__ = ("_event", "_value")

    def __init__(self) -> None:
        self._event = trio.Event()
        self._value: Any = None

    def done(self) -> bool:
        return self._event.is_set()

    def cancelled(self) -> bool:
        return False  # a cancelled trio wait leaves its future pending

    def set_result(self, value: Any) -> None:
        if self._event.is_set():
            raise asyncio.InvalidStateError("this future has its result already")
        self._value = value
        self._event.set()

    def result(self) -> Any:
        if not self._event.is_set():
            raise asyncio.InvalidStateError("this future has no result yet")
        return self._value

    def __await__(self) -> Generator[Any, None, Any]:
        return self._wait().__await__()

    async def _wait(self) -> Any:
        await self._event.wait()
        return self._value

    async def wait_for(self, timeout: float | None) -> None:
        """Wait at most ``timeout`` seconds; ``TimeoutError`` after, as asyncio's."""
        if timeout is None:
            await self._event.wait()
            return
        with trio.move_on_after(timeout):
            await self._event.wait()
        if not self._event.is_set():
            raise TimeoutError

    async def wait_shielded(self) -> None:
        """Wait, deaf to cancellation: trio's goes on being delivered at every checkpoint
        until its scope is left, where asyncio's is delivered once."""
        with trio.CancelScope(shield=True):
            await self._event.wait()


class TrioLoop:
    """What aiodagger's waiters call on the caller's loop, for one trio run."""

    __slots__ = ("_token",)

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token

    def call_soon_threadsafe(self, callback: Callable[..., object], *args: Any,
                             context: contextvars.Context | None = None) -> None:
        """Run ``callback(*args)`` on the run's thread; ``trio.RunFinishedError`` (a
        RuntimeError, as a closed asyncio loop raises) once the run has ended."""
        self._token.run_sync_soon(_guarded, callback, args, context)

    def create_future(self) -> TrioFuture:
        return TrioFuture()

    def time(self) -> float:
        return trio.current_time()

    def __repr__(self) -> str:
        return f"<TrioLoop {self._token!r}>"


def _guarded(callback: Callable[..., object], args: tuple[Any, ...],
             context: contextvars.Context | None) -> None:
    # An exception out of a run_sync_soon callback crashes the whole trio run; asyncio
    # logs a failing callback and goes on, and so does this.
    try:
        if context is None:
            callback(*args)
        else:
            context.run(callback, *args)
    except Exception:
        logger.exception("exception in callback %r", callback)


_loop_var: trio.lowlevel.RunVar[TrioLoop] = trio.lowlevel.RunVar("aiodagger_loop")


def running_loop() -> asyncio.AbstractEventLoop:
    """The running trio run's TrioLoop, one per run (``progress`` compares loops)."""
    try:
        loop = _loop_var.get()
    except LookupError:
        loop = TrioLoop(trio.lowlevel.current_trio_token())
        _loop_var.set(loop)
    # Typed as the part of an asyncio loop that it is (see aiodagger/_asynclib.py).
    return cast(asyncio.AbstractEventLoop, loop)


async def await_future(cfut: concurrent.futures.Future[T]) -> T:
    """Await a future of another thread (of the cluster's loop, say) from trio.

    Cancelling the wait cancels ``cfut``, as cancelling an ``asyncio.wrap_future`` of
    it does: a coroutine that ``run_coroutine_threadsafe`` runs is cancelled with it.
    """
    here = running_loop()
    done = TrioFuture()

    def finished(_f: concurrent.futures.Future[T]) -> None:
        try:
            here.call_soon_threadsafe(done.set_result, None)
        except RuntimeError:
            pass  # the trio run has ended: nobody waits

    cfut.add_done_callback(finished)
    try:
        await done
    except BaseException:
        cfut.cancel()
        raise
    return cfut.result()


async def run_in_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a worker thread, to the end even if the caller is cancelled meanwhile."""
    return await trio.to_thread.run_sync(fn)

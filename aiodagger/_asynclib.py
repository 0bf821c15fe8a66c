"""The caller's event loop, whichever async library runs the caller: asyncio or trio.

The cluster always runs on an asyncio loop. What waits for its tasks from elsewhere
(``await t``, ``gather``, ``wait``, ``as_completed``, ``progress``, ``TaskGroup``)
needs only a small part of the *caller's* loop: ``call_soon_threadsafe``, to be called
back on its own thread when a task is done; ``create_future``, for what it then
awaits; and ``time``. Under asyncio (anyio's asyncio backend too) that is the running
loop itself. Under trio (anyio's trio backend too) :mod:`aiodagger._trio` supplies that
part on top of the run's ``TrioToken``.

asyncio is asked first, at the cost it always had (``asyncio.get_running_loop``), and
only when no asyncio loop runs in this thread is sniffio asked which library does.
sniffio is no dependency of aiodagger: trio requires it, so wherever trio runs, it is
installed; without it, no library but asyncio can be running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["await_future", "caller_loop", "foreign_loop", "is_cancellation", "run_in_thread",
           "uncancellable", "wait_for"]

T = TypeVar("T")


def current_library() -> str | None:
    """The async library running in this thread (asked when asyncio's loop is not)."""
    try:
        import sniffio
    except ImportError:
        return None
    try:
        return sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return None


def foreign_loop() -> asyncio.AbstractEventLoop:
    """The loop-like of the trio run in this thread, for when asyncio has no loop here.

    It is not an asyncio loop: it has only the part described above, and the futures
    it makes are trio's (:class:`aiodagger._trio.TrioFuture`).
    """
    library = current_library()
    if library == "trio":
        from ._trio import running_loop

        return running_loop()
    if library is None or library == "asyncio":
        raise RuntimeError(
            "no event loop is running in this thread: await aiodagger's tasks inside "
            "asyncio or trio code (anyio's either backend); from synchronous code, call "
            "t.fetch() or dagger.fetch(t)")
    raise RuntimeError(
        f"this code runs on {library}, and aiodagger waits for its tasks in asyncio or trio "
        "code only (anyio's either backend); here, call t.fetch() in a worker thread")


def caller_loop() -> asyncio.AbstractEventLoop:
    """The running asyncio loop, or trio's loop-like (see :func:`foreign_loop`)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return foreign_loop()


def is_cancellation(exc: BaseException | None) -> bool:
    """Whether ``exc`` is how the caller's library cancels: asyncio's or trio's."""
    if isinstance(exc, asyncio.CancelledError):
        return True
    trio = sys.modules.get("trio")
    return trio is not None and isinstance(exc, trio.Cancelled)


async def wait_for(fut: Any, timeout: float | None, *, shield: bool = False) -> None:
    """Await ``fut``, made by :func:`caller_loop`'s ``create_future``, for at most
    ``timeout`` seconds; ``TimeoutError`` after that. With ``shield`` the timeout
    leaves ``fut`` pending rather than cancelling it (trio's futures never are)."""
    if isinstance(fut, asyncio.Future):
        await asyncio.wait_for(asyncio.shield(fut) if shield else fut, timeout)
    else:
        await fut.wait_for(timeout)


def uncancellable(fut: Any) -> Awaitable[Any]:
    """``fut`` to await again once a cancellation of its waiter was caught: asyncio
    delivers a cancellation once, trio's stays until its scope is left."""
    if isinstance(fut, asyncio.Future):
        return fut
    return fut.wait_shielded()


async def run_in_thread(fn: Callable[[], T]) -> T:
    """``fn()``, which blocks, on a worker thread of the caller's non-asyncio library."""
    foreign_loop()  # trio's, or an error that says what to do instead
    from ._trio import run_in_thread

    return await run_in_thread(fn)


def await_future(cfut: concurrent.futures.Future[T]) -> Awaitable[T]:
    """A future of another thread, as an awaitable for the caller's asyncio loop or trio
    run; cancelling the wait cancels ``cfut``."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        foreign_loop()  # trio's, or an error that says what to do instead
        from ._trio import await_future

        return await_future(cfut)
    return asyncio.wrap_future(cfut)

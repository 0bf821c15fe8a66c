"""Awaiting GPU work without blocking the event loop.

A GPU task's completion is a CUDA event recorded after its work. The loop must learn
when it fires without polling and without calling into the driver itself. CUDA's host
callbacks (``cudaLaunchHostFunc``) run on a driver thread that would need the GIL, and
deadlock under it when Python holds the GIL while waiting on that same stream
(numba-cuda #317), so they are not used. Instead a small pool of waiter threads each
call ``synchronize()`` on a *blocking-sync* event (the thread sleeps in the driver, it
does not spin, and lets the GIL go), then resolve the awaiting future with
``call_soon_threadsafe``.

Anything with ``synchronize()`` (and optionally a ``done`` property) can be waited on:
cupy's Event and Stream, or a test's stand-in. An object already done resolves at once
without a thread hop. An error raised by ``synchronize()`` (a CUDA error of the work
waited for) becomes the future's exception. A waiter that never returns (a hung
kernel) holds one daemon thread: it never hangs the loop or the cluster's close, and the
other threads go on serving.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any

__all__ = ["WaiterPool", "waiters"]

logger = logging.getLogger(__name__)

# Waits run concurrently up to this many; more queue. A GPU has a handful of streams in
# flight per worker, so a few threads cover them; each idle one costs a parked thread.
DEFAULT_THREADS = 4
# A waiter thread with nothing to wait for this long ends (one is started again with the
# next wait, ~0.1 ms): a program between bursts of GPU work keeps no parked threads.
IDLE_EXIT_S = 2.0
_STOP = object()


class WaiterPool:
    """Threads that wait on GPU events and hand the result to an asyncio loop."""

    def __init__(self, threads: int = DEFAULT_THREADS, idle_exit: float = IDLE_EXIT_S) -> None:
        if threads < 1:
            raise ValueError(f"WaiterPool(threads={threads!r}): at least one thread is needed")
        self._size = threads
        self._idle_exit = idle_exit
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        self.waited = 0  # waits that went through a thread (the others were done already)

    def __repr__(self) -> str:
        return f"WaiterPool(threads={len(self._threads)}/{self._size})"

    def wait(self, syncable: Any, loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future[Any]:
        """A future on ``loop`` (the running one by default) that resolves to ``syncable``
        once its ``synchronize()`` returns, or fails with what it raised."""
        loop = loop or asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if self._closed:
            fut.set_exception(RuntimeError("this GPU waiter pool is closed; the worker is stopping"))
            return fut
        try:
            already = bool(getattr(syncable, "done", False))
        except Exception:  # noqa: BLE001 - a failing query is answered by synchronize() below
            already = False
        if already:
            fut.set_result(syncable)
            return fut
        # Queued first: a thread ending idle looks at the queue under the lock, so either
        # it sees this item and stays, or it is gone before the count below.
        self._queue.put((syncable, fut, loop))
        self._start_threads()
        return fut

    def _start_threads(self) -> None:
        with self._lock:
            while len(self._threads) < self._size and not self._closed:
                t = threading.Thread(target=self._serve, name=f"aiodagger-gpu-waiter-{len(self._threads)}",
                                     daemon=True)
                self._threads.append(t)
                t.start()

    def _serve(self) -> None:
        me = threading.current_thread()
        while True:
            try:
                item = self._queue.get(timeout=self._idle_exit)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty() and not self._closed:
                        self._threads.remove(me)
                        return
                continue
            if item is _STOP:
                return
            syncable, fut, loop = item
            self.waited += 1
            try:
                syncable.synchronize()
            except BaseException as exc:  # noqa: BLE001 - the awaiting task gets it
                _resolve(loop, fut, None, exc)
            else:
                _resolve(loop, fut, syncable, None)

    def close(self, timeout: float = 1.0) -> bool:
        """Stop the threads; False if some thread was still inside a wait at the timeout
        (left to its daemon thread: a hung kernel must not keep the worker from stopping)."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(_STOP)
        clean = True
        for t in threads:
            t.join(timeout)
            if t.is_alive():
                clean = False
        if not clean:
            logger.warning("%r: a GPU wait was still in progress when the pool closed; left behind", self)
        self._threads.clear()
        return clean


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], value: Any,
             exc: BaseException | None) -> None:
    def settle() -> None:
        if fut.done():
            return  # the awaiting side gave up (cancelled)
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass  # the loop closed while the wait ran: nobody awaits it any more


_shared: WaiterPool | None = None
_shared_lock = threading.Lock()


def waiters() -> WaiterPool:
    """This process's pool (made at the first GPU wait)."""
    global _shared
    if _shared is None:
        with _shared_lock:
            if _shared is None:
                _shared = WaiterPool()
    return _shared

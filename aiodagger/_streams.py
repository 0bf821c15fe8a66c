"""The pieces of a stream in each process (the design is in :mod:`aiodagger.streaming`).

* :class:`Stream`, the handle ``spawn_streaming`` returns, and the readers a consumer
  gets in its place (:class:`AsyncReader`, :class:`Reader`), which attach where they
  are first read and leave when done, closed or dropped.
* The producers, the task functions that run a stream's generator and feed its
  :class:`Outlet` as credit allows.
* :class:`StreamPort`, one per process and cluster, on its loop: the outlets of
  producers and the inlets (:class:`Inlet`) of readers there. Producers and readers
  may be on the loop, on another loop, or on a pool thread; what they share with the
  loop is a deque (appended and popped whole), an int, and one waiter callback each.

Kept apart from ``streaming.py`` so that the scheduler and worker processes import it
without the cluster side that ``spawn_streaming`` needs.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from ._asynclib import foreign_loop
from ._bridge import call_soon_quietly
from ._context import current_cluster_var, pool_thread
from .errors import TaskCancelledError
from .task import DTask

__all__ = ["AsyncReader", "Inlet", "Outlet", "Reader", "Stream", "StreamPort", "bind_readers",
           "port_here", "produce_async", "produce_sync"]

# A producer on the loop sends its batch at once when this many values (or half its
# window) wait, without waiting for the loop to go idle: with a large window the
# readers start on the first half while it makes the second.
MAX_BATCH = 4096
# A thread waiting this long for credit or values hands its pool slot back (as a
# blocking fetch does); shorter waits do not pay for that hand-off.
HAND_BACK_AFTER_S = 0.005


class Stream(DTask[int]):
    """The handle of a streaming task: a DTask whose value is the number of values it
    produced, and what tasks read it from (pass it as an argument).

    ``async for v in s`` reads it here; ``for v in s`` does from synchronous code.
    """

    __slots__ = ("_hub", "buffer")
    _streaming = True
    buffer: int  # how many values the producer may run ahead of its slowest reader
    _hub: Any  # the cluster's StreamHub

    def __aiter__(self) -> AsyncReader:
        reader: AsyncReader = self._hub.caller_reader(self, AsyncReader)
        return reader

    def __iter__(self) -> Reader:
        reader: Reader = self._hub.caller_reader(self, Reader)
        return reader

    def __repr__(self) -> str:
        return f"<Stream {self.name!r} id={self.id} {self.state} buffer={self.buffer}>"


# -- producers (the task functions a stream runs) ----------------------------------------
async def produce_async(key: int, buffer: int, fn: Callable[..., Any], /, *args: Any,
                         **kwargs: Any) -> int:
    agen = fn(*args, **kwargs)  # wrong arguments fail here, before anything is opened
    port = port_here()
    outlet = port.open(key, buffer)
    try:
        while True:
            if outlet.produced >= outlet.limit:
                await outlet.credit()
            try:
                value = await agen.__anext__()
            except StopAsyncIteration:
                break
            outlet.put(value)
        return outlet.produced
    finally:
        try:
            await agen.aclose()  # cancelled or failed: no generator is left suspended
        finally:
            # What is left goes out before the task's completion (or its error) does.
            port.close(outlet)


def produce_sync(key: int, buffer: int, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> int:
    gen = fn(*args, **kwargs)
    port = port_here()
    outlet = port.open(key, buffer)
    try:
        while True:
            if outlet.produced >= outlet.limit:
                outlet.credit_blocking()
            try:
                value = next(gen)
            except StopIteration:
                break
            outlet.put_threadsafe(value)
        return outlet.produced
    finally:
        gen.close()
        # Waits for the loop to send what is left: the task's completion (or error),
        # posted once this returns, must not overtake it; a value that cannot be sent
        # fails the task.
        port.run_blocking(port.close, outlet)


def port_here() -> StreamPort:
    """The stream port of the cluster this task (or this pool thread) belongs to."""
    cluster = current_cluster_var.get() or getattr(pool_thread, "cluster", None)
    if cluster is None:
        raise RuntimeError("a stream can only be produced or read inside a cluster's task, or "
                           "by iterating the Stream itself")
    port: StreamPort = cluster._scheduler.streams
    return port


# -- the ends, in the process where a producer or reader runs -----------------------------
class Outlet:
    """A producer's end: its values wait here to be sent, and its credit arrives here.

    ``limit`` is written on the port's loop and read by the producer (on the loop, or
    on its thread): a plain int, read whole.
    """

    __slots__ = ("error", "key", "limit", "port", "produced", "queue", "sent", "_flush_at", "_waiter")

    def __init__(self, port: StreamPort, key: int, buffer: int) -> None:
        self.port = port
        self.key = key
        self.queue: deque[Any] = deque()
        self.produced = 0
        self.sent = 0
        self.limit = 0  # no credit until the stream has a reader
        self.error: BaseException | None = None
        self._waiter: Callable[[], Any] | None = None
        self._flush_at = min(MAX_BATCH, max(1, buffer // 2))

    def put(self, value: Any) -> None:
        """A value from a producer on the port's loop."""
        if self.error is not None:
            raise self.error
        queue = self.queue
        queue.append(value)
        self.produced += 1
        n = len(queue)
        if n == 1:
            self.port.flush_soon(self)
        elif n >= self._flush_at:
            self.port.flush(self)

    def put_threadsafe(self, value: Any) -> None:
        """A value from a producer on a thread. The loop drains the queue until it is
        empty, so only a value that finds it empty needs to ask for a flush."""
        if self.error is not None:
            raise self.error
        queue = self.queue
        queue.append(value)
        self.produced += 1
        if len(queue) == 1:
            self.port.flush_soon_threadsafe(self)

    def grant(self, limit: int) -> None:
        """On the port's loop: the producer may have produced ``limit`` values (-1: stop)."""
        if self.limit >= 0 and (limit < 0 or limit > self.limit):  # stopped stays stopped
            self.limit = limit
            self._wake()

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error
        if self.limit < 0:
            raise TaskCancelledError(f"stream (task id {self.key}) was stopped: it was cancelled, "
                                     "or every reader left")

    async def credit(self) -> None:
        """Wait, on the port's loop, until the producer may make another value."""
        while self.produced >= self.limit:
            self._check()
            fut = self.port.loop.create_future()
            self._waiter = functools.partial(_set_future, fut)
            await fut
        self._check()

    def credit_blocking(self) -> None:
        """:meth:`credit` for a producer on a pool thread."""
        while self.produced >= self.limit:
            self._check()
            event = threading.Event()
            self._waiter = event.set
            if self.produced < self.limit or self.limit < 0 or self.error is not None:
                continue  # granted between the test and the waiter being set
            _wait_on_thread(event)
        self._check()


class Inlet:
    """A reader's end: values delivered on the port's loop, taken by the reader (on
    that loop, another loop, or a pool thread)."""

    __slots__ = ("ended", "error", "key", "reader", "values", "waiter")

    def __init__(self, key: int, reader: int) -> None:
        self.key = key
        self.reader = reader
        self.values: deque[Any] = deque()
        self.ended = False
        self.error: BaseException | None = None
        self.waiter: Callable[[], Any] | None = None

    def push(self, values: list[Any]) -> None:
        self.values.extend(values)
        self._wake()

    def finish(self, error: BaseException | None) -> None:
        if not self.ended:
            self.error = error
            self.ended = True
            self._wake()

    def _wake(self) -> None:
        # The reader sets its waiter, then looks at the values again: whichever side
        # comes second sees the other's write, so no wake-up is lost.
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            waiter()


class StreamPort:
    """This process's ends of its cluster's streams, on one loop: outlets of producers
    running here, inlets of readers reading here. Subclasses say how their messages go
    up (``_open``, ``_send_values``, ``_send_ack``); the hub's answers come down
    through :meth:`deliver`, :meth:`end` and :meth:`credit`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, loop_thread_id: int) -> None:
        from ._bridge import Wakeup

        self.loop = loop
        self.loop_thread_id = loop_thread_id
        self.outlets: dict[int, Outlet] = {}
        self.inlets: dict[tuple[int, int], Inlet] = {}
        self._dirty: deque[Outlet] = deque()
        self._acks: deque[tuple[Inlet, int, bool]] = deque()
        self._soon = Wakeup(loop, self._flush_all, threadsafe=False)
        self._soon_threadsafe = Wakeup(loop, self._flush_all)

    # -- upstream: how this port's messages reach the hub (subclasses) -------------------
    def _open(self, key: int) -> None:
        raise NotImplementedError

    def _send_values(self, key: int, first: int, values: list[Any]) -> None:
        raise NotImplementedError

    def _send_ack(self, key: int, reader: int, consumed: int, done: bool) -> None:
        raise NotImplementedError

    # -- crossing to the loop ---------------------------------------------------------------
    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """``fn(*args)`` on the port's loop: now if this is its thread."""
        if threading.get_ident() == self.loop_thread_id:
            fn(*args)
        else:
            call_soon_quietly(self.loop, fn, *args)

    def run_blocking(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop and wait for it (from another thread); its
        exception is raised here."""
        done = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - raised in the waiting thread
                failed.append(exc)
            finally:
                done.set()

        if not call_soon_quietly(self.loop, run):
            raise RuntimeError("the cluster's event loop has closed")
        while not done.wait(1.0):
            if self.loop.is_closed():
                raise RuntimeError("the cluster's event loop has closed")
        if failed:
            raise failed[0]

    # -- producers ------------------------------------------------------------------------
    def open(self, key: int, buffer: int) -> Outlet:
        """The outlet of a producer that starts here (any thread)."""
        outlet = Outlet(self, key, buffer)
        self.call(self._add_outlet, outlet)
        return outlet

    def _add_outlet(self, outlet: Outlet) -> None:
        self.outlets[outlet.key] = outlet
        self._open(outlet.key)

    def close(self, outlet: Outlet) -> None:
        """On the loop: send what is left (raising what kept values from going), then
        forget the outlet."""
        try:
            self.flush(outlet)
            if outlet.error is not None:
                raise outlet.error
        finally:
            if self.outlets.get(outlet.key) is outlet:
                del self.outlets[outlet.key]

    def flush_soon(self, outlet: Outlet) -> None:
        self._dirty.append(outlet)
        if not self._soon.pending:
            self._soon.request()

    def flush_soon_threadsafe(self, outlet: Outlet) -> None:
        self._dirty.append(outlet)
        if not self._soon_threadsafe.pending:
            self._soon_threadsafe.request()

    def flush(self, outlet: Outlet) -> None:
        """Send the values waiting in ``outlet`` as one batch (on the loop)."""
        queue = outlet.queue
        if not queue or outlet.error is not None:
            return
        # Until empty, not a count taken first: a producer thread appends meanwhile, and
        # asks for a flush only when its value finds the queue empty.
        values = []
        while queue:
            values.append(queue.popleft())
        first = outlet.sent
        outlet.sent += len(values)
        try:
            self._send_values(outlet.key, first, values)
        except Exception as exc:  # noqa: BLE001 - e.g. a value that cannot be pickled
            exc.add_note(f"aiodagger: values {first}..{first + len(values) - 1} of stream (task id "
                         f"{outlet.key}) could not be sent to its readers")
            outlet.fail(exc)

    def _flush_all(self) -> None:
        dirty = self._dirty
        while dirty:
            self.flush(dirty.popleft())
        acks = self._acks
        while acks:
            self._report(*acks.popleft())

    def credit(self, key: int, limit: int) -> None:
        outlet = self.outlets.get(key)
        if outlet is not None:
            outlet.grant(limit)

    # -- readers ---------------------------------------------------------------------------
    def attach(self, inlet: Inlet) -> None:
        """On the loop: ``inlet`` reads here from now on (its first ack says so)."""
        self.inlets[inlet.key, inlet.reader] = inlet
        self._send_ack(inlet.key, inlet.reader, 0, False)

    def report(self, inlet: Inlet, consumed: int, done: bool) -> None:
        """A reader (any thread) has taken ``consumed`` values; ``done``: it leaves."""
        if threading.get_ident() == self.loop_thread_id:
            self._report(inlet, consumed, done)
            return
        self._acks.append((inlet, consumed, done))
        if not self._soon_threadsafe.pending:
            self._soon_threadsafe.request()

    def leave(self, inlet: Inlet) -> None:
        """A reader dropped before the end (garbage collected: any thread)."""
        self.report(inlet, 0, True)

    def _report(self, inlet: Inlet, consumed: int, done: bool) -> None:
        key = (inlet.key, inlet.reader)
        if done:
            if self.inlets.get(key) is not inlet:
                return  # left already
            del self.inlets[key]
        self._send_ack(inlet.key, inlet.reader, consumed, done)

    def deliver(self, key: int, readers: list[int], values: list[Any]) -> None:
        inlets = self.inlets
        for reader in readers:
            inlet = inlets.get((key, reader))
            if inlet is not None:
                inlet.push(values)

    def end(self, key: int, readers: list[int], error: BaseException | None) -> None:
        for reader in readers:
            inlet = self.inlets.get((key, reader))
            if inlet is not None:
                inlet.finish(error)


def _set_future(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _wait_on_thread(event: threading.Event) -> None:
    """Wait on a thread; a pool thread that waits long hands its slot back meanwhile."""
    if event.wait(HAND_BACK_AFTER_S):
        return
    pool = getattr(pool_thread, "pool", None)
    if pool is None:
        event.wait()
        return
    with pool.blocked():
        event.wait()


# -- readers (what a consumer task receives in the stream's place) -------------------------
class _ReaderBase:
    """A reader of one stream, for one consumer: pickled as its stream's key and its id,
    it attaches to the port of the process where it is first read."""

    __slots__ = ("__weakref__", "_acked", "_buffer", "_consumed", "_every", "_finalizer", "_id",
                 "_inlet", "_key", "_port")

    def __init__(self, key: int, reader: int, buffer: int, port: StreamPort | None = None) -> None:
        self._key = key
        self._id = reader
        self._buffer = buffer
        self._port = port
        self._inlet: Inlet | None = None
        self._consumed = 0
        self._acked = 0
        # Taken values are reported every half window, and before waiting for more.
        self._every = max(1, buffer // 2)
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._key, self._id, self._buffer))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of stream id={self._key}: {self._consumed} taken>"

    def _attach(self) -> Inlet:
        port = self._port
        if port is None:
            port = self._port = port_here()
        inlet = self._inlet = Inlet(self._key, self._id)
        # Dropped before the end (a consumer that stops reading): it leaves then.
        self._finalizer = weakref.finalize(self, port.leave, inlet)
        self._finalizer.atexit = False  # at exit the loops are gone: nobody to tell
        port.call(port.attach, inlet)
        return inlet

    def _take(self) -> Any:
        """The next value if one is here, else _EMPTY; raises at the end (_End if it finished)."""
        inlet = self._inlet
        if inlet is None:
            inlet = self._attach()
        values = inlet.values
        if values:
            value = values.popleft()
            n = self._consumed = self._consumed + 1
            if n - self._acked >= self._every:
                self._acked = n
                assert self._port is not None
                self._port.report(inlet, n, False)
            return value
        if inlet.ended:
            self._leave()
            if inlet.error is not None:
                raise inlet.error
            raise _End
        return _EMPTY

    def _arm(self, wake: Callable[[], Any]) -> bool:
        """Have ``wake`` called when a value or the end comes; False if one came meanwhile."""
        inlet = self._inlet
        assert self._port is not None and inlet is not None
        if self._consumed > self._acked:  # the producer may be waiting for exactly these
            self._acked = self._consumed
            self._port.report(inlet, self._consumed, False)
        # Set, then look again: a value delivered in between finds the waiter, or is seen.
        inlet.waiter = wake
        if inlet.values or inlet.ended:
            inlet.waiter = None
            return False
        return True

    def _leave(self) -> None:
        finalizer = self._finalizer
        if finalizer is not None and finalizer.detach() is not None:
            assert self._port is not None and self._inlet is not None
            self._port.report(self._inlet, self._consumed, True)

    @property
    def taken(self) -> int:
        """How many values this reader has taken."""
        return self._consumed


class _End(Exception):
    """The stream finished: StopIteration or StopAsyncIteration, by reader."""


_EMPTY: Any = object()  # no value here yet


class AsyncReader(_ReaderBase):
    """``async for value in reader``: a stream's values, in order, as they come."""

    __slots__ = ()

    def __aiter__(self) -> AsyncReader:
        return self

    async def __anext__(self) -> Any:
        """The next value; StopAsyncIteration at the end, or the producer's exception."""
        while True:
            try:
                value = self._take()
            except _End:
                raise StopAsyncIteration from None
            if value is not _EMPTY:
                return value
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # a trio run's (aiodagger/_asynclib.py)
                loop = foreign_loop()
            fut = loop.create_future()
            assert self._port is not None
            wake: Callable[[], Any] = functools.partial(_set_future, fut)
            if loop is not self._port.loop:  # the caller's own loop, in another thread
                wake = functools.partial(call_soon_quietly, loop, _set_future, fut)
            if self._arm(wake):
                await fut

    async def aclose(self) -> None:
        """Stop reading: the producer no longer waits for this reader."""
        self._leave()


class Reader(_ReaderBase):
    """``for value in reader``: a stream's values for a sync consumer (a pool thread)."""

    __slots__ = ()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        while True:
            try:
                value = self._take()
            except _End:
                raise StopIteration from None
            if value is not _EMPTY:
                return value
            assert self._port is not None
            if threading.get_ident() == self._port.loop_thread_id:
                raise RuntimeError("`for v in stream` on the cluster's event loop would block the "
                                   "loop that brings the values: write `async for v in stream` here")
            event = threading.Event()
            if self._arm(event.set):
                _wait_on_thread(event)

    def close(self) -> None:
        """Stop reading: the producer no longer waits for this reader."""
        self._leave()


def bind_readers(value: Any, make: Callable[[Stream], Any]) -> Any:
    """``value`` with every Stream in it (also inside lists, tuples and dicts) replaced
    by ``make(stream)``; the caller's containers are left as they are."""
    if isinstance(value, Stream):
        return make(value)
    kind = type(value)
    if kind is list or kind is tuple:
        items = [bind_readers(v, make) for v in value]
        return items if kind is list else tuple(items)
    if kind is dict:
        return {k: bind_readers(v, make) for k, v in value.items()}
    return value


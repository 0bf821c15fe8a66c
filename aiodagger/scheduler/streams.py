"""The hub of a cluster's streams, in the scheduler's process (see :mod:`aiodagger.streaming`).

For each stream it keeps a :class:`_Feed`: the readers that joined it, where each one
reads (worker 0 or a worker process, known from its first ack), how many values each
has taken, how many values went by, and the credit granted to the producer. Values
come in batches from the producer's outlet and go out, one batch per batch, to the
readers' processes: a batch from a worker process is relayed as it came, pickled, and
unpickled here only for readers in this process; a batch made here is pickled once,
and only for readers elsewhere. Values do not go from worker to worker directly.

The hub is worker 0's stream port too: producers and readers in this process talk to
it by plain calls. Everything here runs on the cluster's loop; other threads reach it
through :meth:`StreamPort.call`, except :meth:`StreamHub.spawn_stream`, which puts a
new stream's feed in place (one dict insert) before the stream's task exists, so that
nothing about the stream can reach the hub before its feed.
"""

from __future__ import annotations

import functools
import itertools
import logging
from typing import TYPE_CHECKING, Any

from .._streams import AsyncReader, Reader, Stream, StreamPort, bind_readers
from ..comm import protocol as P
from ..errors import FrameTooLargeError, TaskCancelledError, WorkerLostError
from ..task import FAILED, DTask

if TYPE_CHECKING:
    from ..taskoptions import TaskOptions
    from .core import Scheduler
    from .registry import RemoteWorker

__all__ = ["StreamHub"]

logger = logging.getLogger(__name__)

LOCAL = 0  # worker 0, this process


class _Batch:
    """Values that arrived together: a list (made here) or a pickle (from a worker),
    each form made at most once, when a reader needs it."""

    __slots__ = ("count", "first", "_frame", "_values")

    def __init__(self, first: int, count: int, values: list[Any] | None = None,
                 frame: list[Any] | None = None) -> None:
        self.first = first
        self.count = count
        self._values = values
        self._frame = frame

    def values(self) -> list[Any]:
        if self._values is None:
            assert self._frame is not None
            values = P.loads(self._frame[0], self._frame[1:])
            if type(values) is not list or len(values) != self.count:
                raise P.ProtocolError(f"a batch of {self.count} stream values held "
                                      f"{type(values).__name__} instead")
            self._values = values
        return self._values

    def frame(self) -> list[Any]:
        if self._frame is None:
            assert self._values is not None
            payload, parts = P.dumps(self._values)
            self._frame = [payload, *parts]
        return self._frame


class _Reader:
    """One reader of one stream, as the hub counts it."""

    __slots__ = ("acked", "id", "pending", "start", "where")

    def __init__(self, rid: int, start: int) -> None:
        self.id = rid
        self.start = start  # the number of the first value it gets
        self.acked = 0      # values it has reported taken
        self.where: int | None = None  # worker it reads on, from its first ack
        self.pending: list[_Batch] = []  # values for it while nobody knows where it reads


class _Feed:
    """One stream's state at the hub."""

    __slots__ = ("buffer", "departed", "ended", "error", "granted", "key", "producer", "readers",
                 "sent", "stream")

    def __init__(self, key: int, buffer: int) -> None:
        self.key = key
        self.buffer = buffer
        self.stream: Stream | None = None
        self.sent = 0      # values that went by (the number of the next one)
        self.granted = 0   # the producer's credit: values it may have made in all
        self.producer: int | None = None  # the worker its producer runs on, once it started
        self.readers: dict[int, _Reader] = {}
        self.departed: set[int] = set()
        self.ended = False
        self.error: BaseException | None = None  # what readers raise at the end (None: finished)


class StreamHub(StreamPort):
    """Every stream of one cluster; worker 0's stream port."""

    def __init__(self, sched: Scheduler) -> None:
        super().__init__(sched.loop, sched.loop_thread_id)
        self.sched = sched
        self._feeds: dict[int, _Feed] = {}
        self._reader_ids = itertools.count(1)

    # -- the user's side (any thread) --------------------------------------------------------
    def spawn_stream(self, opts: TaskOptions, producer: Any, fn: Any, args: tuple[Any, ...],
                     kwargs: dict[str, Any], buffer: int) -> Stream:
        sched = self.sched
        key = sched.new_id()
        name = opts.name or getattr(fn, "__qualname__", None) or type(fn).__name__
        opts = opts.merged({"name": name, "retries": 0})  # its values may have been read
        feed = self._feeds[key] = _Feed(key, buffer)
        # The generator function in the task's function, not among its arguments: a
        # function is pickled by value where it cannot be imported (a script's, a lambda).
        run = functools.partial(producer, key, buffer, fn)
        try:
            stream = sched.spawn(opts, run, args, kwargs, key=key, cls=Stream)
        except BaseException:
            del self._feeds[key]
            raise
        assert isinstance(stream, Stream)
        stream.buffer = buffer
        stream._hub = self
        feed.stream = stream
        stream._on_done(functools.partial(self.call, self._stream_done))
        return stream

    def bind(self, task: DTask[Any], args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``task``'s arguments with a reader in place of each stream, joined now (at
        spawn: the stream counts it from here); it leaves when ``task`` is done."""
        joined: list[tuple[int, int]] = []
        reader_cls = AsyncReader if task._kind == "async" else Reader

        def check(stream: Stream) -> Stream:
            if stream._sched is not self.sched:
                raise ValueError(f"{stream!r} belongs to another cluster; a task can only read "
                                 "streams of its own cluster")
            return stream

        def make(stream: Stream) -> Any:
            rid = next(self._reader_ids)
            joined.append((stream.id, rid))
            self.call(self._join, stream, rid)
            return reader_cls(stream.id, rid, stream.buffer, self)

        for value in (*args, *kwargs.values()):  # all checked before any joins
            bind_readers(value, check)
        args = tuple([bind_readers(a, make) for a in args])
        kwargs = {k: bind_readers(v, make) for k, v in kwargs.items()}
        task._on_done(functools.partial(self.call, self._consumer_done, joined))
        return args, kwargs

    def caller_reader(self, stream: Stream, reader_cls: type[Any]) -> Any:
        """A reader for ``async for v in stream`` (or ``for``) where the caller is."""
        rid = next(self._reader_ids)
        self.call(self._join, stream, rid)
        return reader_cls(stream.id, rid, stream.buffer, self)

    # -- membership (loop) -----------------------------------------------------------------
    def _feed_of(self, stream: Stream) -> _Feed:
        feed = self._feeds.get(stream.id)
        if feed is None:  # over, and forgotten once its last reader left: made again, ended
            feed = self._feeds[stream.id] = _Feed(stream.id, stream.buffer)
            feed.stream = stream
            feed.ended = True
            feed.error = _end_error(stream)
        return feed

    def _join(self, stream: Stream, rid: int) -> None:
        feed = self._feed_of(stream)
        feed.readers[rid] = _Reader(rid, feed.sent)
        self._grant(feed)

    def _consumer_done(self, joined: list[tuple[int, int]], task: DTask[Any]) -> None:
        for key, rid in joined:
            feed = self._feeds.get(key)
            reader = feed.readers.get(rid) if feed is not None else None
            if feed is not None and reader is not None:
                # A sync consumer cancelled while it waits cannot be interrupted: its
                # reader ends, so that its thread does.
                self._leave(feed, reader, TaskCancelledError(
                    f"{task._describe()}, which reads this stream, ended"))

    def _leave(self, feed: _Feed, reader: _Reader, tell: BaseException | None = None) -> None:
        del feed.readers[reader.id]
        feed.departed.add(reader.id)
        if tell is not None and not feed.ended and reader.where is not None:
            self._send_end(feed, [reader], tell)
        if feed.ended:
            if not feed.readers:
                del self._feeds[feed.key]
        elif feed.readers:
            self._grant(feed)
        elif feed.stream is not None:
            # Every reader left before the end: nobody takes the rest. Cancelling the task
            # ends the feed (_stream_done) and stops its producer.
            self.sched.cancel(feed.stream)

    def worker_lost(self, wid: int) -> None:
        """Readers on a lost worker are gone (a run of their task elsewhere cannot take
        up their place); its producers fail with their tasks."""
        for feed in list(self._feeds.values()):
            for reader in [r for r in feed.readers.values() if r.where == wid]:
                self._leave(feed, reader)

    # -- the producer's side (loop) ----------------------------------------------------------
    def _grant(self, feed: _Feed) -> None:
        if feed.ended or not feed.readers:
            return
        limit = min(r.start + r.acked for r in feed.readers.values()) + feed.buffer
        if limit > feed.granted:
            feed.granted = limit
            self._send_credit(feed, limit)

    def _send_credit(self, feed: _Feed, limit: int) -> None:
        where = feed.producer
        if where == LOCAL:
            self.credit(feed.key, limit)
        elif where is not None and (worker := self._worker(where)) is not None:
            worker.send_quietly(P.StreamCredit(feed.key, limit))

    def _opened(self, feed: _Feed, where: int) -> None:
        feed.producer = where
        if feed.ended:  # over before its run began (cancelled, say): stop it
            self._send_credit(feed, -1)
        elif feed.granted:
            self._send_credit(feed, feed.granted)

    def _stream_done(self, stream: DTask[Any]) -> None:
        feed = self._feeds.get(stream.id)
        if feed is None or feed.ended:
            return
        feed.ended = True
        feed.error = _end_error(stream)
        if feed.error is not None:
            self._send_credit(feed, -1)  # a producer on a thread cannot be interrupted otherwise
        attached = [r for r in feed.readers.values() if r.where is not None]
        if attached:
            self._send_end(feed, attached, feed.error)
        if not feed.readers:
            del self._feeds[feed.key]

    def _forward(self, feed: _Feed, batch: _Batch) -> None:
        if feed.ended:
            return  # late values of a stream that was stopped
        feed.sent += batch.count
        local: list[_Reader] = []
        remote: dict[int, list[_Reader]] = {}
        for reader in feed.readers.values():
            where = reader.where
            if where is None:
                reader.pending.append(batch)
            elif where == LOCAL:
                local.append(reader)
            else:
                remote.setdefault(where, []).append(reader)
        if local:
            self._deliver_here(feed, local, batch)
        for wid, readers in remote.items():
            self._send_items(feed, wid, readers, batch)

    def _deliver_here(self, feed: _Feed, readers: list[_Reader], batch: _Batch) -> None:
        try:
            values = batch.values()
        except Exception as exc:  # noqa: BLE001 - e.g. a class this process cannot import
            exc.add_note(f"aiodagger: values of stream (task id {feed.key}) could not be loaded "
                         "in the scheduler's process")
            self.end(feed.key, [r.id for r in readers], exc)
            return
        self.deliver(feed.key, [r.id for r in readers], values)

    def _send_items(self, feed: _Feed, wid: int, readers: list[_Reader], batch: _Batch) -> None:
        worker = self._worker(wid)
        if worker is None:
            return
        try:
            frame = batch.frame()
            size = sum(len(p) if type(p) is bytes else memoryview(p).nbytes for p in frame)
            if size > worker.max_frame:
                raise FrameTooLargeError.of(f"a batch of values of stream (task id {feed.key})",
                                            size, worker.max_frame)
        except Exception as exc:  # noqa: BLE001 - those readers end with it
            self._send_end(feed, readers, exc)
            return
        try:
            worker.endpoint.send_nowait(
                P.StreamItems(feed.key, batch.first, batch.count, [r.id for r in readers]), frame)
        except ConnectionError:
            pass  # the worker is being lost: its readers leave with it

    def _send_end(self, feed: _Feed, readers: list[_Reader], error: BaseException | None) -> None:
        by_worker: dict[int, list[int]] = {}
        for reader in readers:
            assert reader.where is not None
            by_worker.setdefault(reader.where, []).append(reader.id)
        for wid, ids in by_worker.items():
            self._end_at(feed.key, wid, ids, error)

    def _end_at(self, key: int, wid: int, ids: list[int], error: BaseException | None) -> None:
        if wid == LOCAL:
            self.end(key, ids, error)
            return
        worker = self._worker(wid)
        if worker is None:
            return
        if error is None:
            msg, buffers = P.StreamEnd(key, "finished", ids), []
        else:
            msg, buffers = P.StreamEnd(key, "error", ids), [P.dumps_error(error)]
        try:
            worker.endpoint.send_nowait(msg, buffers)
        except ConnectionError:
            pass

    # -- the readers' side (loop) --------------------------------------------------------------
    def _acked(self, key: int, rid: int, consumed: int, done: bool, where: int) -> None:
        feed = self._feeds.get(key)
        reader = feed.readers.get(rid) if feed is not None else None
        if feed is None or reader is None or (reader.where is not None and reader.where != where):
            if not done:  # a consumer run again elsewhere, or after its stream was forgotten
                self._end_at(key, where, [rid], WorkerLostError(
                    f"this reader of stream (task id {key}) has no place in it any more: a "
                    "consumer run again (its worker was lost) cannot resume a stream, whose "
                    "values are not kept"))
            return
        if reader.where is None:  # its first ack: it reads there
            reader.where = where
            pending, reader.pending = reader.pending, []
            for batch in pending:
                if where == LOCAL:
                    self._deliver_here(feed, [reader], batch)
                else:
                    self._send_items(feed, where, [reader], batch)
            if feed.ended:
                self._send_end(feed, [reader], feed.error)
        if consumed > reader.acked:
            # never more than it was sent: a reader cannot grant credit for values it never got
            reader.acked = min(consumed, feed.sent - reader.start)
        if done:
            self._leave(feed, reader)
        else:
            self._grant(feed)

    # -- worker 0's port: producers and readers in this process ----------------------------------
    def _open(self, key: int) -> None:
        feed = self._feeds.get(key)
        if feed is None:
            self.credit(key, -1)  # a stream over and forgotten
        else:
            self._opened(feed, LOCAL)

    def _send_values(self, key: int, first: int, values: list[Any]) -> None:
        feed = self._feeds.get(key)
        if feed is not None:
            assert first == feed.sent or feed.ended, (first, feed.sent)
            self._forward(feed, _Batch(first, len(values), values=values))

    def _send_ack(self, key: int, reader: int, consumed: int, done: bool) -> None:
        self._acked(key, reader, consumed, done, LOCAL)

    # -- workers in other processes ----------------------------------------------------------------
    def _worker(self, wid: int) -> RemoteWorker | None:
        dist = self.sched.dist
        return dist.workers.get(wid) if dist is not None else None

    def on_message(self, worker: RemoteWorker, msg: Any, buffers: list[Any]) -> None:
        """A stream message from a worker process (the registry's handler)."""
        kind = type(msg)
        if kind is P.StreamItems:
            feed = self._feeds.get(msg.stream)
            if feed is None or feed.ended:
                return  # late values of a stream that was stopped
            if feed.producer != worker.id or msg.first != feed.sent or msg.to:
                raise P.ProtocolError(
                    f"worker {worker.id} sent values {msg.first}.. of stream {msg.stream} (to "
                    f"{msg.to}), which runs on worker {feed.producer} and is at value {feed.sent}")
            self._forward(feed, _Batch(msg.first, msg.nvalues, frame=list(buffers)))
        elif kind is P.StreamAck:
            self._acked(msg.stream, msg.reader, msg.consumed, msg.done, worker.id)
        else:
            assert kind is P.StreamOpen
            feed = self._feeds.get(msg.stream)
            if feed is None:
                worker.send_quietly(P.StreamCredit(msg.stream, -1))  # over and forgotten
                return
            if not feed.ended and worker.running.get(msg.stream) is not feed.stream:
                raise P.ProtocolError(f"worker {worker.id} opened stream {msg.stream}, which it "
                                      "does not run")
            self._opened(feed, worker.id)


def _end_error(stream: DTask[Any]) -> BaseException | None:
    """What the readers of a stream that ended raise: None if it finished."""
    if stream._cancelled:
        return stream._cancelled_error()
    if stream._state is FAILED:
        return stream._exc
    return None

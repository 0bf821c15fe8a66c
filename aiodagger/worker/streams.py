"""A worker process's stream port: producers and readers here, the hub over the wire.

The hub (``scheduler/streams.py``) is in the scheduler's process; this port speaks to
it in the stream messages of :mod:`aiodagger.comm.protocol`, on the worker's one
connection to the scheduler: values up in ``stream-items`` batches (pickled once per
batch), a reader's progress in ``stream-ack``, and down come values for the readers
here, the end of a stream, and the producer's credit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._streams import StreamPort
from ..comm import protocol as P
from ..errors import FrameTooLargeError, WorkerLostError

if TYPE_CHECKING:
    from .process import WorkerProcess

__all__ = ["WorkerStreams"]


class WorkerStreams(StreamPort):
    """The streams of the tasks running in one worker process."""

    def __init__(self, worker: WorkerProcess) -> None:
        super().__init__(worker.loop, worker.loop_thread_id)
        self.worker = worker

    def _send(self, msg: Any, buffers: Sequence[Any] = ()) -> None:
        endpoint = self.worker.endpoint
        if endpoint is None:
            raise ConnectionResetError("this worker is not connected to its scheduler")
        endpoint.send_nowait(msg, buffers)

    def _send_quietly(self, msg: Any) -> None:
        try:
            self._send(msg)
        except ConnectionError:
            pass  # the session is ending: disconnected() ends what waits here

    # -- up -------------------------------------------------------------------------------
    def _open(self, key: int) -> None:
        self._send_quietly(P.StreamOpen(key))

    def _send_values(self, key: int, first: int, values: list[Any]) -> None:
        payload, parts = P.dumps(values)
        size = len(payload) + sum(p.nbytes for p in parts)
        limit = min(self.worker._scheduler_limit(), P.BATCH_BYTES)
        if size > limit or len(parts) + 1 > P.MAX_BUFFERS:
            if len(values) == 1:
                raise FrameTooLargeError.of(f"value {first} of stream (task id {key}), pickled,",
                                            size, self.worker._scheduler_limit())
            half = len(values) // 2  # large values: fewer to a frame
            self._send_values(key, first, values[:half])
            self._send_values(key, first + half, values[half:])
            return
        self._send(P.StreamItems(key, first, len(values), []), [payload, *parts])

    def _send_ack(self, key: int, reader: int, consumed: int, done: bool) -> None:
        self._send_quietly(P.StreamAck(key, reader, consumed, done))

    # -- down -----------------------------------------------------------------------------
    def on_message(self, msg: Any, buffers: list[Any]) -> None:
        kind = type(msg)
        if kind is P.StreamItems:
            try:
                values = P.loads(buffers[0], buffers[1:])
                if type(values) is not list or len(values) != msg.nvalues:
                    raise P.ProtocolError(f"a batch of {msg.nvalues} stream values held "
                                          f"{type(values).__name__} instead")
            except Exception as exc:  # noqa: BLE001 - e.g. a class this worker cannot import
                exc.add_note(f"aiodagger: values of stream (task id {msg.stream}) could not be "
                             f"loaded on worker {self.worker.worker_id}")
                self.end(msg.stream, msg.to, exc)
                return
            self.deliver(msg.stream, msg.to, values)
        elif kind is P.StreamEnd:
            self.end(msg.stream, msg.to, P.loads_error(buffers[0]) if msg.status == "error" else None)
        else:
            assert kind is P.StreamCredit
            self.credit(msg.stream, msg.limit)

    def disconnected(self) -> None:
        """The connection to the scheduler ended: nothing more comes for what is here."""
        error = WorkerLostError("this worker lost its connection to the scheduler, which relays "
                                "stream values")
        for inlet in list(self.inlets.values()):
            inlet.finish(error)
        self.inlets.clear()
        for outlet in list(self.outlets.values()):
            outlet.fail(error)

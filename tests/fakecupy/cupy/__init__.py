"""A stand-in for cupy on machines with no CUDA device: the part of cupy's API that
aiodagger calls, over numpy, so that GPU processors, their routing, stream pools, event
waits and host/device moves run end to end in the CPU test suite. Put this directory
first on PYTHONPATH (tests/test_gpu.py does, for the cluster and its worker processes).

What it models: device arrays are a distinct type (an ndarray subclass with a
``device``); each thread has a current device and stream; work is done at once, so an
event recorded on a stream is done when recorded, unless the test arms a delay or an
error (``FAKE.event_delay``, ``FAKE.event_error``); ``FAKE.oom_next`` makes the next
``asarray`` raise OutOfMemoryError. Everything is counted in ``FAKE`` for the tests.
"""

from __future__ import annotations

import os
import threading
import time
from types import SimpleNamespace

import numpy

__version__ = "0.0-fake"

FAKE = SimpleNamespace(streams_made=0, waits=0, to_device=0, to_host=0, events=0,
                       event_delay=float(os.environ.get("FAKECUPY_EVENT_DELAY", "0")),
                       event_error=None, oom_next=int(os.environ.get("FAKECUPY_OOM_NEXT", "0")),
                       current_streams=[])
_local = threading.local()


class _Dev:
    def __init__(self, id: int = 0) -> None:
        self.id = id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Dev) and other.id == self.id

    def __hash__(self) -> int:
        return self.id


class ndarray(numpy.ndarray):
    """A "device" array: numpy's, tagged with its device."""

    device = _Dev(0)

    def __array_finalize__(self, obj) -> None:
        device = getattr(obj, "device", None)  # numpy's own arrays say "cpu"
        self.device = device if isinstance(device, _Dev) else _Dev(_current_device())

    def get(self) -> numpy.ndarray:
        return numpy.asarray(self).view(numpy.ndarray).copy()

    def __reduce_ex__(self, protocol):  # as cupy's: rebuilt on a device by whoever loads it
        return (array, (self.get(),))


def array(host):
    return asarray(host)


def _current_device() -> int:
    return getattr(_local, "device", 0)


def asarray(a, dtype=None):
    if FAKE.oom_next:
        FAKE.oom_next -= 1
        raise cuda.memory.OutOfMemoryError(numpy.asarray(a).nbytes, 0)
    if isinstance(a, ndarray):
        return a
    FAKE.to_device += 1
    FAKE.current_streams.append(cuda.get_current_stream())
    out = numpy.array(a, dtype=dtype, copy=True).view(ndarray)
    out.device = _Dev(_current_device())
    return out


def asnumpy(a, stream=None):
    FAKE.to_host += 1
    if isinstance(a, ndarray):
        return numpy.asarray(a).view(numpy.ndarray).copy()
    return numpy.asarray(a)


def get_array_module(*args):
    return __import__("cupy") if any(isinstance(a, ndarray) for a in args) else numpy


def arange(*args, **kwargs):
    return asarray(numpy.arange(*args, **kwargs))


class _Pool:
    def total_bytes(self) -> int:
        return 0

    def used_bytes(self) -> int:
        return 0

    def free_all_blocks(self) -> None:
        pass


def get_default_memory_pool() -> _Pool:
    return _Pool()


class _Runtime:
    class CUDARuntimeError(RuntimeError):
        pass

    @staticmethod
    def getDeviceCount() -> int:
        return int(os.environ.get("FAKECUPY_DEVICES", "1"))


class _Memory:
    class OutOfMemoryError(MemoryError):
        def __init__(self, size: int, total: int) -> None:
            super().__init__(f"Out of memory allocating {size:,} bytes (allocated so far: {total:,} bytes).")
            self.size = size


class Device:
    def __init__(self, id: int | None = None) -> None:
        self.id = _current_device() if id is None else id
        self._saved: list[int] = []

    def use(self) -> None:
        _local.device = self.id

    def synchronize(self) -> None:
        pass

    def __enter__(self) -> Device:
        self._saved.append(_current_device())
        _local.device = self.id
        return self

    def __exit__(self, *exc) -> None:
        _local.device = self._saved.pop()


class Stream:
    null: Stream

    def __init__(self, non_blocking: bool = False, null: bool = False) -> None:
        if not null:
            FAKE.streams_made += 1
        self.non_blocking = non_blocking
        self.device_id = _current_device()
        self._saved: list[Stream] = []

    def __enter__(self) -> Stream:
        self._saved.append(get_current_stream())
        _local.stream = self
        return self

    def __exit__(self, *exc) -> None:
        _local.stream = self._saved.pop()

    def use(self) -> Stream:
        _local.stream = self
        return self

    def wait_event(self, event: Event) -> None:
        FAKE.waits += 1

    def synchronize(self) -> None:
        pass

    def record(self, event: Event | None = None) -> Event:
        event = event or Event()
        event.record(self)
        return event


Stream.null = Stream(null=True)


def get_current_stream() -> Stream:
    return getattr(_local, "stream", Stream.null)


class Event:
    def __init__(self, block: bool = False, disable_timing: bool = False, interprocess: bool = False) -> None:
        self.block = block
        self._fires_at = 0.0
        self._error = None

    def record(self, stream: Stream | None = None) -> None:
        FAKE.events += 1
        self._fires_at = time.monotonic() + FAKE.event_delay
        self._error, FAKE.event_error = FAKE.event_error, None

    @property
    def done(self) -> bool:
        return self._error is None and time.monotonic() >= self._fires_at

    def synchronize(self) -> None:
        left = self._fires_at - time.monotonic()
        if left > 0:
            time.sleep(left)
        if self._error is not None:
            raise self._error


cuda = SimpleNamespace(Device=Device, Stream=Stream, Event=Event, runtime=_Runtime, memory=_Memory,
                       get_current_stream=get_current_stream)


class RawKernel:
    """A kernel compiled from source: here it does nothing when launched."""

    def __init__(self, code: str, name: str) -> None:
        self.name = name

    def __call__(self, grid, block, args) -> None:
        pass


def __getattr__(name: str):
    """The rest of numpy's namespace, with arrays it returns made device arrays."""
    attr = getattr(numpy, name)
    if callable(attr) and not isinstance(attr, type):
        def on_device(*args, **kwargs):
            out = attr(*args, **kwargs)
            if isinstance(out, numpy.ndarray) and not isinstance(out, ndarray):
                out = out.view(ndarray)
            return out
        return on_device
    return attr

"""Streams of one device, and the events that say when a result on them is ready.

Dagger.jl gives every device one stream that all its tasks share, and synchronizes the
device when data moves. Here each GPU task takes a stream from a pool of non-blocking
streams (independent tasks overlap), and its result carries the event recorded after
its work: a GPU task that consumes it on another stream waits for that event on the
device (``stream.wait_event``), never by a host synchronize; a CPU consumer copies it
to host on the producer's stream, after the work that made it.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, NamedTuple

from .arrays import is_device_array, map_arrays, to_host

__all__ = ["Made", "Readiness", "StreamPool", "host_arguments", "readiness", "wait_for_inputs"]

# Streams per device. Kernels from more streams than this rarely overlap further
# (the hardware runs a handful of kernels concurrently), and each stream is a driver
# resource held for the worker's life.
DEFAULT_STREAMS = 4


class StreamPool:
    """A device's non-blocking streams, handed out least busy first. ``factory`` makes
    one (cupy's ``Stream(non_blocking=True)``, with the device current)."""

    def __init__(self, factory: Any, size: int = DEFAULT_STREAMS) -> None:
        if size < 1:
            raise ValueError(f"StreamPool(size={size!r}): at least one stream is needed")
        self._factory = factory
        self._size = size
        self._streams: list[Any] = []
        self._busy: list[int] = []
        self._lock = threading.Lock()

    def acquire(self) -> Any:
        """The stream with the fewest tasks on it now (a new one while fewer than
        ``size`` exist and every existing one is taken)."""
        with self._lock:
            busy = self._busy
            if busy:
                i = min(range(len(busy)), key=busy.__getitem__)
                if busy[i] == 0 or len(busy) >= self._size:
                    busy[i] += 1
                    return self._streams[i]
            self._streams.append(self._factory())
            busy.append(1)
            return self._streams[-1]

    def release(self, stream: Any) -> None:
        with self._lock:
            for i, s in enumerate(self._streams):
                if s is stream:
                    self._busy[i] -= 1
                    return
        raise ValueError(f"{stream!r} is not a stream of this pool")

    def busy(self) -> list[int]:
        """Tasks per stream now (for tests and stats)."""
        with self._lock:
            return list(self._busy)


class Made(NamedTuple):
    """Where a device result was made: its device, stream, and the event after its work."""

    device: int
    stream: Any
    event: Any


class Readiness:
    """The :class:`Made` of each live device result, by identity. An entry goes with its
    value (weakref callback), so a result's event lives exactly as long as it can be
    consumed; values that cannot be weakly referenced are not recorded (their consumers
    fall back to the device's default ordering)."""

    def __init__(self) -> None:
        self._made: dict[int, tuple[weakref.ref[Any], Made]] = {}
        self._lock = threading.Lock()

    def note(self, value: Any, made: Made) -> None:
        key = id(value)

        def gone(_: Any, key: int = key) -> None:
            with self._lock:
                entry = self._made.get(key)
                if entry is not None and entry[0]() is None:
                    del self._made[key]

        try:
            ref = weakref.ref(value, gone)
        except TypeError:
            return
        with self._lock:
            self._made[key] = (ref, made)

    def of(self, value: Any) -> Made | None:
        with self._lock:
            entry = self._made.get(id(value))
        if entry is None or entry[0]() is not value:
            return None
        return entry[1]

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for ref, _ in self._made.values() if ref() is not None)


def wait_for_inputs(values: list[Any], stream: Any, readiness: Readiness) -> int:
    """Make ``stream`` wait, on the device, for the events of the inputs made on other
    streams; the number of waits enqueued."""
    n = 0
    for v in values:
        made = readiness.of(v)
        if made is not None and made.stream is not stream:
            stream.wait_event(made.event)
            n += 1
    return n


# The results of this process's GPU tasks, by identity: one registry per process, since
# a consumer may run on another device's processor, or on a CPU thread.
readiness = Readiness()


def host_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A CPU task's arguments with device arrays copied to host, each on the stream that
    made it when known (the copy then follows that work)."""
    def move(value: Any) -> Any:
        if not is_device_array(value):
            return value
        made = readiness.of(value)
        return to_host(value, made.stream if made is not None else None)

    return map_arrays(args, kwargs, move)

"""The device tier of a :class:`~aiodagger.memory.store.ChunkStore`: results left on a
GPU, kept under a limit per device by moving the least recently used ones to host.

A value that :class:`DeviceTier` recognises (a cupy array, by default) counts toward
the bytes of its device, not toward RAM. Above ``device_limit`` on a device, or when a
task that ran out of device memory asks (:meth:`DeviceMemory.free`), unpinned values
of that device are copied to host in a thread, least recently used first; the host
copy then replaces the device value and is an ordinary chunk of the RAM tier, which
may spill to disk like any other.

A value being moved stays the chunk's value, readable and counted on its device, until
its host copy replaces it: no reader finds the chunk missing, and no count holds it
twice. A move whose chunk was deleted meanwhile drops its copy; one whose chunk was
pinned meanwhile (a task started reading it on the device) drops its copy and leaves
the chunk on the device, to be moved once unpinned if still needed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from ..gpu import arrays
from .sizes import parse_memory_limit, sizeof

__all__ = ["DeviceTier", "parse_device_limit"]

logger = logging.getLogger(__name__)

# Copies in flight at once, per store. Two let two devices copy at the same time; on one
# device they share one link to the host, and a second copy there costs nothing.
_MOVERS = 2


class DeviceTier:
    """How a store tells device values apart and copies them to host.

    ``device_of(value)`` is the device number of a device value and None for any other
    value; it runs on every ``put``, so it must be cheap and import nothing.
    ``nbytes(value)`` is a device value's size on its device. ``to_host(value, stream)``
    returns a host copy, ordered on ``stream`` (the producer's, as given to ``put``, or
    None); it runs in a thread. The defaults are cupy's, through
    :mod:`aiodagger.gpu.arrays`, which never import cupy for a host value.
    """

    __slots__ = ("device_of", "nbytes", "to_host")

    def __init__(self, device_of: Callable[[Any], int | None] = arrays.device_of,
                 nbytes: Callable[[Any], int] = arrays.device_nbytes,
                 to_host: Callable[[Any, Any], Any] = arrays.to_host) -> None:
        self.device_of = device_of
        self.nbytes = nbytes
        self.to_host = to_host

    def __repr__(self) -> str:
        return (f"DeviceTier(device_of={self.device_of!r}, nbytes={self.nbytes!r}, "
                f"to_host={self.to_host!r})")


def parse_device_limit(value: int | str | None) -> int | None:
    """Bytes per device, or None for no limit: an int, or a string with a unit."""
    if isinstance(value, float):
        raise TypeError(f"device_limit={value!r}: bytes per device, as an int or a string with "
                        f"a unit ('8GiB'); a float would be a fraction of host memory")
    try:
        return parse_memory_limit(value)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"device_limit={value!r}: bytes per device, as an int or a string with "
                        f"a unit ('8GiB', '500MB'), or None for no limit") from exc


class _Chunk(Protocol):
    """What this module reads and writes of a store's entry."""

    key: Hashable
    value: Any
    nbytes: int
    pins: int
    live: bool
    writing: bool  # here: its move to host is in flight
    unspillable: bool  # here: it never leaves its device
    device: int | None
    stream: Any


class DeviceMemory:
    """The device chunks of one store: bytes per device, LRU order, moves to host.

    ``on_host(chunk, value, nbytes)`` is the store's: it makes ``value`` (the host copy,
    ``nbytes`` as :func:`sizeof` counts it) the chunk's value in the RAM tier. Every
    method runs on the store's loop.
    """

    def __init__(self, tier: DeviceTier, limit: int | None, worker_name: str,
                 on_host: Callable[[Any, Any, int], None]) -> None:
        self.tier = tier
        self.limit = limit
        self.used: dict[int, int] = {}  # bytes on each device, moves in flight included
        self.chunks = 0
        self.moved_bytes = 0  # device bytes that were replaced by their host copy
        self.moves = 0
        self.move_errors = 0
        self.last_error: BaseException | None = None
        # Movable chunks (unpinned, not moving, not stuck), least recently used first.
        self._lru: dict[int, OrderedDict[Hashable, _Chunk]] = {}
        self._moving: dict[int, int] = {}  # bytes of the moves in flight, per device
        self._moves: dict[int, set[asyncio.Task[int]]] = {}
        self._on_host = on_host
        self._worker_name = worker_name
        # Made at the first move: a store that never holds a device value starts no thread.
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False

    # -- chunks, as the store adds, reads, pins and drops them ------------------------

    def add(self, chunk: _Chunk) -> None:
        """Count a new chunk whose value is on ``chunk.device``; move others off if that
        is over the limit now."""
        device = chunk.device
        assert device is not None
        self.used[device] = self.used.get(device, 0) + chunk.nbytes
        self.chunks += 1
        if not chunk.unspillable:
            self._lru_of(device)[chunk.key] = chunk
        self.check(device)

    def remove(self, chunk: _Chunk) -> None:
        """Uncount a chunk deleted or replaced while on its device (a move in flight
        then drops its copy)."""
        device = chunk.device
        assert device is not None
        self.used[device] -= chunk.nbytes
        self.chunks -= 1
        self._lru_of(device).pop(chunk.key, None)

    def touch(self, chunk: _Chunk) -> None:
        assert chunk.device is not None
        lru = self._lru_of(chunk.device)
        if chunk.key in lru:
            lru.move_to_end(chunk.key)

    def unqueue(self, chunk: _Chunk) -> None:
        """Not movable any more: pinned by a task that reads it."""
        assert chunk.device is not None
        self._lru_of(chunk.device).pop(chunk.key, None)

    def queue(self, chunk: _Chunk) -> None:
        """Movable again (unpinned): the most recently used of its device."""
        assert chunk.device is not None
        self._lru_of(chunk.device)[chunk.key] = chunk
        self.check(chunk.device)

    # -- moves ---------------------------------------------------------------------

    def check(self, device: int) -> None:
        """Start moves off ``device`` until the bytes left there are within the limit."""
        if self.limit is None:
            return
        # Moves in flight leave the device soon: only the rest needs new ones.
        excess = self.used[device] - self._moving.get(device, 0) - self.limit
        if excess > 0:
            self._start(device, excess)

    async def free(self, device: int, nbytes: int) -> int:
        """Move unpinned chunks off ``device`` until ``nbytes`` have left it, or none is
        left to move; the bytes that left it (moves already in flight count when they
        end while this waits)."""
        freed = 0
        waited: set[asyncio.Task[int]] = set()
        while freed < nbytes:
            self._start(device, nbytes - freed - self._moving.get(device, 0))
            # A done move may stay in the set until its callback runs: its bytes left
            # before this call.
            tasks = {task for task in self._moves.get(device, ()) if not task.done()} - waited
            if not tasks:
                break  # nothing movable is left on the device
            waited |= tasks
            # wait() and not gather(): a caller cancelled here leaves the moves running.
            done, _ = await asyncio.wait(tasks)
            freed += sum(task.result() for task in done)
        return freed

    def _start(self, device: int, nbytes: int) -> None:
        if self._closing:
            return  # a closing store drops its chunks: moving them is wasted
        lru = self._lru.get(device)
        if lru and nbytes > 0 and self._executor is None:
            self._executor = ThreadPoolExecutor(
                _MOVERS, thread_name_prefix=f"aiodagger-device-{self._worker_name}")
        while lru and nbytes > 0:
            _, chunk = lru.popitem(last=False)
            chunk.writing = True
            self._moving[device] = self._moving.get(device, 0) + chunk.nbytes
            # The value is taken now: the chunk may be deleted before the task starts.
            task = asyncio.create_task(self._move(chunk, device, chunk.value, chunk.stream),
                                       name="aiodagger-device-move")
            moves = self._moves.setdefault(device, set())
            moves.add(task)
            task.add_done_callback(moves.discard)
            nbytes -= chunk.nbytes

    async def _move(self, chunk: _Chunk, device: int, value: Any, stream: Any) -> int:
        """Copy one chunk to host and put the copy in its place; the device bytes freed."""
        nbytes = chunk.nbytes
        loop = asyncio.get_running_loop()
        try:
            host, host_nbytes = await loop.run_in_executor(self._executor, self._copy, value, stream)
        except Exception as exc:  # noqa: BLE001 - a failed copy leaves the chunk where it is
            failure: Exception | None = exc
        else:
            failure = None
        finally:
            self._moving[device] -= nbytes
            chunk.writing = False
        if not chunk.live:
            return 0  # deleted meanwhile: remove() uncounted it, the copy goes
        if failure is not None or chunk.pins:
            if failure is not None:
                self._move_failed(chunk, device, failure)
            # else a task reads it on the device now: queue() brings it back after.
            # Either way it stays, and the excess it was to free falls to others.
            self.check(device)
            return 0
        self.used[device] -= nbytes
        self.chunks -= 1
        self.moved_bytes += nbytes
        self.moves += 1
        chunk.device = chunk.stream = None
        self._on_host(chunk, host, host_nbytes)
        return nbytes

    def _copy(self, value: Any, stream: Any) -> tuple[Any, int]:
        # In the mover's thread: sizeof may pickle what is not an array.
        host = self.tier.to_host(value, stream)
        return host, sizeof(host)

    def _move_failed(self, chunk: _Chunk, device: int, exc: Exception) -> None:
        # Not tried again: a copy that failed once (a CUDA error, say) would fail at
        # every put that follows, and each attempt would hold a thread.
        chunk.unspillable = True
        self.move_errors += 1
        self.last_error = exc
        logger.warning("worker %s: copying chunk %r (%d bytes) from device %d to host failed "
                       "(%r); it stays on the device and is not moved again",
                       self._worker_name, chunk.key, chunk.nbytes, device, exc)

    # -- lifecycle and figures -----------------------------------------------------

    async def close(self) -> None:
        """Wait for the moves in flight, then stop the movers' threads."""
        self._closing = True
        while True:
            tasks = {task for moves in self._moves.values() for task in moves if not task.done()}
            if not tasks:
                break
            await asyncio.wait(tasks)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._lru.clear()
        self.used = {device: 0 for device in self.used}
        self.chunks = 0

    def moving_bytes(self) -> int:
        return sum(self._moving.values())

    def _lru_of(self, device: int) -> OrderedDict[Hashable, _Chunk]:
        lru = self._lru.get(device)
        if lru is None:
            lru = self._lru[device] = OrderedDict()
        return lru

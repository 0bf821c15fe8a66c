"""ChunkStore: a worker's chunks, kept under its memory limit by spilling to disk.

Memory counts as :mod:`.pressure` says: the chunks in RAM plus the unmanaged rest of
the process's RSS. Above the spill threshold (60 % of the limit by default) a background
task writes least-recently-used chunks to disk, one executor call per batch and two
batches at a time, until memory is back under it. Above the pause threshold (80 %) :meth:`ChunkStore.wait_admitted`
blocks, and so does reading a chunk back, while the spill makes room: a worker that
calls it before each task takes no new work while the disk catches up. Without that
a fast producer outruns an asynchronous spill (dask/distributed#4424).

A chunk leaves RAM only once its file is completely written, and a chunk read back
keeps its file: evicting it again costs no write. When memory cannot be brought down
(spilling failed, or every chunk is already on disk) the store *overruns*: it says so
once in the log and in :meth:`~ChunkStore.stats`, and admits work anyway, because a
deadlock is worse than memory over its limit.

Values on a GPU (cupy arrays) are a tier above RAM, counted per device apart from it,
and moved to RAM under their own limit: see :mod:`.device`.

Chunks are treated as immutable: a value changed in place must be ``put`` again,
which drops its file. Every method is called from the loop the store started on.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Hashable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import psutil

from ..comm import framing
from ..errors import SerializationError
from . import process, shared, spilldir, spillfile
from .device import DeviceMemory, DeviceTier, parse_device_limit
from .pressure import Pressure
from .sizes import parse_memory_limit, sizeof
from .spillfile import SpillCorruptedError

__all__ = ["ChunkStore", "StoreState"]

K = TypeVar("K", bound=Hashable)

logger = logging.getLogger(__name__)

_MISSING: Any = object()
# A spill batch is one executor call: small chunks share it (one hop for many files),
# large ones go one by one so that the first is out of RAM as soon as it is written.
_BATCH_BYTES = 32 << 20
_BATCH_CHUNKS = 256
# Batches written at once. Writing to the page cache is a CPU-bound copy in the kernel,
# so while new work is paused one writer leaves the other cores idle. W6 (24 chunks of
# 128 MiB through 1 GiB, 2 cores) with one writer spent 20 % of the machine's time idle
# (perf record -a), most of it at the pause threshold waiting for that one write.
_WRITERS = 2
# Dropped chunks can stay in the C heap, where RSS shows them as unmanaged memory:
# a store with a memory limit trims the heap once this much was dropped (one without
# keeps the memory for the next results: see memory.process.tune_heap). Putting 1 GiB of 16 MiB chunks
# through a 256 MiB store and reading them back peaked at 246-294 MiB RSS without
# trimming, 214-245 MiB with it (4 runs each).
_TRIM_AFTER = 8 << 20


class StoreState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class _Entry:
    __slots__ = ("key", "value", "nbytes", "path", "file_bytes", "pins", "writing", "hot",
                 "loading", "unspillable", "live")
    # Class attributes, not slots: a host chunk costs no more to make than before there
    # were device chunks (_DeviceEntry has the slots).
    device: int | None = None
    stream: Any = None

    def __init__(self, key: Hashable, value: Any, nbytes: int) -> None:
        self.key = key
        self.value = value  # _MISSING while only on disk
        self.nbytes = nbytes
        self.path: Path | None = None  # the spill file, while there is one
        self.file_bytes = 0
        self.pins = 0
        self.writing = False  # a write of its file (or its move to host) is in flight
        self.hot = False  # read while its write was in flight: keep it in RAM afterwards
        self.loading: asyncio.Future[Any] | None = None
        self.unspillable = False  # pickling (or moving to host) failed once
        self.live = True  # False once deleted or replaced


class _DeviceEntry(_Entry):
    """A chunk put as a device value; ``device`` is None once its value moved to host."""

    __slots__ = ("device", "stream")

    def __init__(self, key: Hashable, value: Any, nbytes: int, device: int, stream: Any) -> None:
        super().__init__(key, value, nbytes)
        self.device = device
        self.stream = stream  # the stream that made the value: its move is ordered on it


class ChunkStore:
    """Chunks by key, in RAM or spilled to disk, under a memory limit.

    ``memory_limit`` takes anything :func:`~aiodagger.memory.sizes.parse_memory_limit`
    does; None means no limit (nothing is spilled, nothing paused). Use it as
    ``async with ChunkStore(...) as store`` or call :meth:`start` and :meth:`close`.
    ``monitor_interval`` is how often the process's RSS is sampled (None: count the
    chunks only).

    ``device_limit`` is the bytes each GPU may hold in device values (an int, or a
    string with a unit); above it the least recently used move to RAM. None: they are
    counted, and move only when :meth:`free_device` asks. ``device_tier`` says which
    values are device values and copies them (cupy's arrays by default; a test passes
    its own).
    """

    def __init__(self, memory_limit: int | float | str | None,
                 spill_dir: str | os.PathLike[str] | None = None,
                 spill_fraction: float = 0.6, pause_fraction: float = 0.8,
                 worker_name: str = "w0", monitor_interval: float | None = 0.2,
                 device_limit: int | str | None = None,
                 device_tier: DeviceTier | None = None) -> None:
        if monitor_interval is not None and not monitor_interval > 0:
            raise ValueError(f"monitor_interval={monitor_interval!r}: seconds > 0, or None")
        self.device_limit = parse_device_limit(device_limit)
        self.memory_limit = parse_memory_limit(memory_limit)
        self.worker_name = worker_name
        self.directory = spilldir.path_for(spill_dir, worker_name)
        self._pressure = Pressure(self.memory_limit, spill_fraction, pause_fraction, worker_name)
        self._monitor_interval = monitor_interval
        self.state = StoreState.NEW

        self._entries: dict[Hashable, _Entry] = {}
        # In RAM, unpinned, not being written, spillable; least recently used first.
        self._evictable: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._used = 0
        self._in_memory = 0
        self._pinned = 0  # entries with pins > 0
        self._orphan_pins: dict[Hashable, int] = {}  # pins of entries deleted while pinned
        self._writing = 0  # entries in the batches being written
        self._writing_bytes = 0  # and their bytes, which are on their way out of RAM
        self._writers: set[asyncio.Task[None]] = set()
        self._busy_since = 0.0  # when the writers last went from none to some
        self._reading = 0  # files being read back: each becomes room (it has its file)
        self._file_seq = 0
        self._spilled_bytes = 0
        self._spilled_now = 0
        self._spill_writes = 0
        self._spill_seconds = 0.0
        self._loads = 0
        self._sent_from_disk = 0  # chunks handed out as their file's parts, not loaded
        self._spill_errors = 0
        self._last_error: BaseException | None = None
        self._spill_disabled = False
        self._unspillable = 0
        self._dropped = 0  # bytes dropped from RAM since malloc_trim last ran
        # Called with a key whose value leaves RAM (deleted, replaced or spilled): what a
        # worker keeps beside the store for that value (its shared segment) goes with it.
        self.on_drop: Callable[[Hashable], None] | None = None
        # Observers: on_event(how, key, nbytes, start, stop) for each chunk "spilled",
        # "loaded" back or "sent" from its file (perf_counter times); None: nobody asks.
        self.on_event: Callable[[str, Hashable, int, float, float], None] | None = None
        self._trimming = False
        self._devices = DeviceMemory(device_tier or DeviceTier(), self.device_limit,
                                     worker_name, self._moved_to_host)
        # Bound once: put() asks every value, and most are not device values.
        self._device_of = self._devices.tier.device_of

        self._executor: ThreadPoolExecutor | None = None
        self._owner_lock: int | None = None  # held while the spill directory is ours
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._io: set[asyncio.Future[Any]] = set()
        self._closing: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Create the spill directory (removing stale ones) and start the background tasks.

        A directory that cannot be created is a failed spill write: the store runs
        without spilling and says why in its stats.
        """
        if self.state is not StoreState.NEW:
            raise RuntimeError(f"ChunkStore {self.worker_name!r} is {self.state.value}: start it once")
        spilldir.claim(self.directory)
        # One thread per writer, and two for reads back and removals, which need not
        # queue behind a write.
        self._executor = ThreadPoolExecutor(_WRITERS + 2,
                                            thread_name_prefix=f"aiodagger-spill-{self.worker_name}")
        try:
            await self._run_io(self._create_directory)
        except OSError as exc:
            self._spill_errors += 1
            self._disable_spilling(exc)
        except BaseException:
            self._executor.shutdown(wait=True)  # a cancelled start: the directory may be made
            spilldir.remove(self.directory, self._owner_lock)
            spilldir.release(self.directory)
            raise
        self.state = StoreState.RUNNING
        if self.memory_limit is not None:
            self._tasks.append(asyncio.create_task(self._spill_loop(), name="aiodagger-spill"))
        if self._monitor_interval is not None:
            self._pressure.sample(self._used)
            self._tasks.append(asyncio.create_task(self._monitor(), name="aiodagger-memory-monitor"))

    def _create_directory(self) -> None:
        # Kept here, not returned: a start cancelled meanwhile still finds it to remove.
        self._owner_lock = spilldir.create(self.directory)

    async def close(self) -> None:
        """Finish the write in flight, drop every chunk and remove the spill directory.

        Idempotent; a close that is cancelled still completes in the background.
        """
        if self.state is StoreState.NEW:
            self.state = StoreState.CLOSED
            return
        if self._closing is None:
            if self.state is not StoreState.RUNNING:
                return
            self._closing = asyncio.create_task(self._close(), name="aiodagger-spill-close")
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        self.state = StoreState.CLOSING
        self._pressure.open_gates()  # nobody waits on a store that is going away
        self._wake.set()  # the spill loop sees CLOSING once its batch is written
        for task in self._tasks:
            if task.get_name() == "aiodagger-memory-monitor":
                task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        await self._devices.close()  # moves to host in flight end in RAM, cleared below
        while self._io:  # loads and removals in flight
            await asyncio.wait(list(self._io))
        self._entries.clear()
        self._evictable.clear()
        self._used = self._in_memory = self._spilled_now = 0
        await self._run_io(spilldir.remove, self.directory, self._owner_lock)
        self._owner_lock = None
        assert self._executor is not None
        self._executor.shutdown(wait=True)  # idle by now: every job was awaited above
        spilldir.release(self.directory)
        self.state = StoreState.CLOSED

    async def __aenter__(self) -> ChunkStore:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- chunks --------------------------------------------------------------------

    def put(self, key: Hashable, value: Any, nbytes: int | None = None, spillable: bool = True,
            stream: Any = None) -> None:
        """Store ``value`` under ``key`` (replacing any chunk there), counted as ``nbytes``.

        ``nbytes`` defaults to ``sizeof(value)``, or to its device bytes for a device
        value, which counts toward its device and not RAM. Never blocks: a worker calls
        :meth:`wait_admitted` *before* running the task that produces the value.
        ``spillable=False`` keeps it where it is for good (what keeps a mutable alive).
        ``stream`` is the stream that made a device value: its move to host is ordered
        after that work (ignored for other values).
        """
        self._check_running("put")
        device = self._device_of(value)
        if device is not None:
            self._put_device(key, value, device, nbytes, spillable, stream)
            return
        if nbytes is None:
            nbytes = sizeof(value)
        if key in self._entries:
            self.delete(key)
        entry = _Entry(key, value, nbytes)
        self._entries[key] = entry
        if spillable:
            self._evictable[key] = entry
        else:
            entry.unspillable = True
        self._used += nbytes
        self._in_memory += 1
        self._update()

    def _put_device(self, key: Hashable, value: Any, device: int, nbytes: int | None,
                    spillable: bool, stream: Any) -> None:
        if nbytes is None:
            nbytes = self._devices.tier.nbytes(value)
        if key in self._entries:
            self.delete(key)
        entry = _DeviceEntry(key, value, nbytes, device, stream)
        entry.unspillable = not spillable
        self._entries[key] = entry
        self._devices.add(entry)  # RAM is unchanged: no _update()

    async def get(self, key: Hashable) -> Any:
        """The chunk's value, read back from disk if it was spilled (KeyError if absent).

        Raises :class:`SpillCorruptedError` when its file cannot be read back; the
        entry is dropped then, so that the chunk can be recomputed and put again.
        """
        self._check_running("get")
        entry = self._entries[key]
        if entry.value is not _MISSING:
            self._touch(entry)
            return entry.value
        if entry.loading is None:
            entry.loading = self._track(asyncio.create_task(self._load(entry)))
        # Shielded: one getter cancelled does not fail the others waiting on this load.
        return await asyncio.shield(entry.loading)

    async def read_spilled(self, key: Hashable) -> tuple[memoryview, list[memoryview]] | None:
        """The pickle and buffers of a chunk that is on disk, read from its file and
        checked; None if the chunk is in RAM (serialize its value instead).

        For sending a chunk on to another process: the parts are in the wire's format
        already, so they are not unpickled, and they do not enter the store, so the
        chunk stays spilled and no other chunk is pushed out to make room for it.
        KeyError if absent; :class:`SpillCorruptedError` as :meth:`get` raises it.
        """
        self._check_running("read_spilled")
        entry = self._entries[key]
        if entry.value is not _MISSING or entry.loading is not None:
            return None  # in RAM, or on its way there: no second read
        # Its buffers are the caller's once handed over: not counted after the read.
        start = time.perf_counter()
        parts = await self._read_file(entry, spillfile.read_parts)
        self._update()
        self._sent_from_disk += 1
        if self.on_event is not None:
            self.on_event("sent", entry.key, entry.file_bytes, start, time.perf_counter())
        return parts

    def swap(self, key: Hashable, old: Any, new: Any) -> bool:
        """Hold ``new`` (an equal value: the same data elsewhere in memory) in place of
        ``old`` under ``key``, if ``old`` is what is held there and in RAM; no other
        change. False if not."""
        entry = self._entries.get(key)
        if entry is None or entry.value is not old or entry.device is not None:
            return False  # a device value has no equal elsewhere in host memory
        entry.value = new
        return True

    def peek_in_memory(self, key: Hashable, default: Any = None) -> Any:
        """The value if it is in RAM (or on a device) now, else ``default``; no I/O and
        no LRU touch."""
        entry = self._entries.get(key)
        if entry is None or entry.value is _MISSING:
            return default
        return entry.value

    def delete(self, key: Hashable) -> bool:
        """Forget ``key`` and remove its file; False if there was no such chunk."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        entry.live = False
        if entry.pins:
            self._pinned -= 1
            # Tasks that pinned it unpin by key when they end: those unpins are its, not
            # those of a chunk put under the same key meanwhile (a recomputed value).
            self._orphan_pins[key] = self._orphan_pins.get(key, 0) + entry.pins
        if entry.device is not None:
            self._devices.remove(entry)
            if self.on_drop is not None:
                self.on_drop(key)
            entry.value = _MISSING
        elif entry.value is not _MISSING:
            self._evictable.pop(key, None)
            self._drop_value(entry)
        if entry.path is not None and not entry.writing:  # a write in flight removes its own file
            self._remove_file(entry)
        self._update()
        return True

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[Hashable]:
        return list(self._entries)

    def pin(self, key: Hashable) -> None:
        """Keep ``key`` in RAM (once it is there), or on its device, until as many
        :meth:`unpin` calls."""
        self._pin(self._entries[key])

    def unpin(self, key: Hashable) -> None:
        orphans = self._orphan_pins.get(key)
        if orphans:  # a pin of a chunk deleted or replaced since
            if orphans == 1:
                del self._orphan_pins[key]
            else:
                self._orphan_pins[key] = orphans - 1
            return
        entry = self._entries.get(key)
        if entry is not None:
            self._unpin(entry)

    def unpin_all(self, keys: Iterable[Hashable]) -> None:
        for key in keys:
            self.unpin(key)

    async def pin_and_load(self, keys: Iterable[K]) -> tuple[dict[K, Any], dict[K, Exception]]:
        """Pin every key and load its value, for a task about to read them.

        Returns ``(values, unavailable)``: ``unavailable`` maps the keys that are not
        here, or whose spill file is damaged, to why. When any is unavailable nothing
        stays pinned (the task cannot run now); otherwise every key stays pinned until
        :meth:`unpin_all` of the values' keys after the task (each pinned once, however
        often it was listed). Worker 0 and worker processes both start their tasks
        through this.
        """
        values: dict[K, Any] = {}
        unavailable: dict[K, Exception] = {}
        for key in dict.fromkeys(keys):
            try:
                self.pin(key)
            except KeyError as exc:
                unavailable[key] = exc
                continue
            try:
                values[key] = await self.get(key)
            except (KeyError, SpillCorruptedError) as exc:
                self.unpin(key)
                unavailable[key] = exc
        if unavailable:
            self.unpin_all(values)
            values = {}
        return values, unavailable

    @contextlib.asynccontextmanager
    async def pinned(self, key: Hashable) -> AsyncIterator[Any]:
        """``async with store.pinned(key) as value``: loaded, and not spilled meanwhile."""
        entry = self._entries[key]
        self._pin(entry)
        try:
            yield await self.get(key)
        finally:
            self._unpin(entry)

    # -- memory --------------------------------------------------------------------

    @property
    def used(self) -> int:
        """Bytes of the chunks in RAM (and of those being read back)."""
        return self._used

    @property
    def spilled_bytes(self) -> int:
        """Bytes written to spill files since the start."""
        return self._spilled_bytes

    @property
    def device_used(self) -> dict[int, int]:
        """Bytes of device values on each device (a copy), moves in flight included."""
        return dict(self._devices.used)

    @property
    def device_spilled_bytes(self) -> int:
        """Device bytes moved to host since the start."""
        return self._devices.moved_bytes

    @property
    def spilled_now(self) -> int:
        """Bytes in spill files now."""
        return self._spilled_now

    @property
    def spill_seconds(self) -> float:
        """Seconds with a spill write in flight, the one in flight now included: a disk
        too slow to ever catch up would otherwise show none."""
        busy = time.perf_counter() - self._busy_since if self._writers else 0.0
        return self._spill_seconds + busy

    @property
    def spill_errors(self) -> int:
        """Spill writes that failed: disk errors and chunks that cannot be pickled."""
        return self._spill_errors

    @property
    def last_error(self) -> BaseException | None:
        return self._last_error

    @property
    def spill_disabled(self) -> bool:
        """True once a write failed with an OSError: nothing more is spilled."""
        return self._spill_disabled

    @property
    def paused(self) -> bool:
        """Above the pause threshold while spilling makes room: new work waits."""
        return self._pressure.paused

    @property
    def overrun(self) -> bool:
        """Above the pause threshold with no way to make room: new work goes on anyway."""
        return self._pressure.overrun

    @property
    def memory(self) -> int:
        """The process's memory as the thresholds see it: chunks in RAM + unmanaged."""
        return self._used + self._pressure.unmanaged

    async def wait_admitted(self) -> None:
        """Return once memory is under the pause threshold (at once if it is).

        Also returns when the store cannot bring memory down (see ``overrun``). Chunks
        pinned by running tasks count as room to come, so a task that waits here while
        holding pins of its own (a nested task) can wait for itself: run nested work
        without waiting for admission.
        """
        self._check_running("wait_admitted")
        await self._pressure.wait_admitted()

    async def free_device(self, device: int, nbytes: int) -> int:
        """Move device values of ``device`` to RAM, least recently used first, until
        ``nbytes`` have left it or nothing movable is left there; the bytes freed.

        For a task that ran out of device memory: free, then retry once. Values pinned
        by running tasks stay; moves already in flight there count as they end.
        """
        self._check_running("free_device")
        if isinstance(device, bool) or not isinstance(device, int):
            raise TypeError(f"free_device(device={device!r}, ...): pass the device number, "
                            f"an int (cupy's array.device.id), not a {type(device).__name__}")
        if device < 0:
            raise ValueError(f"free_device(device={device}, ...): device numbers start at 0")
        return await self._devices.free(device, nbytes)

    def stats(self) -> dict[str, Any]:
        """Counters for a worker's status: bytes unless named otherwise."""
        limit, pressure = self.memory_limit, self._pressure
        return {
            "worker": self.worker_name,
            "memory_limit": limit,
            "spill_threshold": pressure.spill_at,
            "pause_threshold": pressure.pause_at,
            "memory": self.memory,
            "used": self._used,
            "unmanaged": pressure.unmanaged,
            "process_memory": pressure.rss,  # None when not monitored
            "peak_process_memory": pressure.peak_rss or None,
            "chunks": len(self._entries),
            "chunks_in_memory": self._in_memory,
            "pinned": self._pinned,
            "writing": self._writing,
            "spilled_bytes": self.spilled_bytes,
            "spilled_now": self.spilled_now,
            "spill_writes": self._spill_writes,
            "spill_seconds": self.spill_seconds,
            "loads": self._loads,
            "sent_from_disk": self._sent_from_disk,
            "spill_errors": self.spill_errors,
            "last_error": None if self.last_error is None else repr(self.last_error),
            "spill_disabled": self.spill_disabled,
            "paused": self.paused,
            "overrun": self.overrun,
            "over_limit": 0 if limit is None else max(0, self.memory - limit),
            "unspillable": self._unspillable,
            "spill_dir": str(self.directory),
            **self._device_stats(),
        }

    def _device_stats(self) -> dict[str, Any]:
        devices = self._devices
        return {
            "device_limit": self.device_limit,
            "device_used": dict(devices.used),  # device number -> bytes
            "device_chunks": devices.chunks,
            "device_moving": devices.moving_bytes(),
            "device_spilled_bytes": devices.moved_bytes,
            "device_moves": devices.moves,
            "device_move_errors": devices.move_errors,
            "device_last_error": None if devices.last_error is None else repr(devices.last_error),
        }

    def __repr__(self) -> str:
        return (f"<ChunkStore {self.worker_name!r} {self.state.value}: {len(self._entries)} chunks, "
                f"{self._used} B in RAM, {self.spilled_now} B on disk, limit {self.memory_limit}>")

    # -- internals -----------------------------------------------------------------

    def _check_running(self, what: str) -> None:
        if self.state is not StoreState.RUNNING:
            hint = ("use `async with ChunkStore(...)` or `await store.start()` first"
                    if self.state is StoreState.NEW else "it was closed")
            raise RuntimeError(f"ChunkStore {self.worker_name!r} is {self.state.value}: "
                               f"cannot {what} ({hint})")

    def _run_io(self, fn: Any, *args: Any) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _track(self, fut: asyncio.Future[Any]) -> asyncio.Future[Any]:
        """Keep ``fut`` until it is done, so that close() can wait for it."""
        self._io.add(fut)
        fut.add_done_callback(self._io_done)
        return fut

    def _io_done(self, fut: asyncio.Future[Any]) -> None:
        self._io.discard(fut)
        if not fut.cancelled():
            fut.exception()  # a failed load nobody awaited any more is not worth a log line

    def _touch(self, entry: _Entry) -> None:
        if entry.key in self._evictable:
            self._evictable.move_to_end(entry.key)
        elif entry.device is not None:
            self._devices.touch(entry)
        elif entry.writing:
            entry.hot = True

    def _pin(self, entry: _Entry) -> None:
        entry.pins += 1
        if entry.pins == 1 and entry.live:
            self._pinned += 1
            if entry.device is None:
                self._evictable.pop(entry.key, None)
            else:
                self._devices.unqueue(entry)

    def _unpin(self, entry: _Entry) -> None:
        if entry.pins == 0:
            raise RuntimeError(f"unpin({entry.key!r}) without a matching pin")
        entry.pins -= 1
        if entry.pins == 0 and entry.live:
            self._pinned -= 1
            self._make_evictable(entry)
            self._update()

    def _make_evictable(self, entry: _Entry, oldest: bool = False) -> None:
        if (entry.live and entry.value is not _MISSING and not entry.pins
                and not entry.writing and not entry.unspillable):
            if entry.device is not None:
                self._devices.queue(entry)
                return
            self._evictable[entry.key] = entry
            if oldest:
                self._evictable.move_to_end(entry.key, last=False)

    def _moved_to_host(self, entry: _Entry, value: Any, nbytes: int) -> None:
        """The host copy of a device value takes its place: a chunk of the RAM tier now."""
        entry.value, entry.nbytes = value, nbytes
        self._used += nbytes
        self._in_memory += 1
        # The least recently used on its device: by the same rule, the first to leave RAM.
        self._make_evictable(entry, oldest=True)
        self._update()

    def _drop_value(self, entry: _Entry) -> None:
        if self.on_drop is not None:
            self.on_drop(entry.key)
        entry.value = _MISSING
        self._used -= entry.nbytes
        self._in_memory -= 1
        self._dropped += entry.nbytes

    def _trim(self) -> None:
        # Idle receive buffers and free shared segments are the first memory to give back.
        framing.drop_warm_buffers()
        shared.drop_idle()
        self._dropped = 0
        self._trimming = True
        fut = self._track(self._run_io(process.trim_heap))
        fut.add_done_callback(self._trimmed)

    def _trimmed(self, _: asyncio.Future[Any]) -> None:
        self._trimming = False

    def _remove_file(self, entry: _Entry) -> None:
        assert entry.path is not None
        self._spilled_now -= entry.file_bytes
        path, entry.path, entry.file_bytes = entry.path, None, 0
        if self.state is StoreState.RUNNING:
            self._track(self._run_io(spillfile.discard, path))

    def _update(self) -> None:
        """Wake the spill loop and recompute the gates; O(1), after every change."""
        if self.state is not StoreState.RUNNING:
            return
        if self.memory_limit is None:
            # Nothing counts RSS against a limit: freed blocks stay for the next results
            # (W7-p: trimming every 8 MiB dropped made each array fresh, faulted-in pages).
            return  # no thresholds, no gates: twice per task in a worker without a limit (W4)
        if self._dropped >= _TRIM_AFTER and not self._trimming:
            self._trim()  # no thresholds, no gates: twice per task in a worker without a limit (W4)
        disabled = self._spill_disabled
        if (not disabled and self._evictable and len(self._writers) < _WRITERS
                and self._pressure.excess(self._used) > self._writing_bytes):
            self._wake.set()  # the same conditions as _start_writers': no idle wake-ups
        self._pressure.update(self._used,
                              spilling=not disabled and bool(self._evictable or self._writing
                                                             or self._reading),
                              pinned=not disabled and bool(self._pinned),
                              disabled_by=self._last_error if disabled else None)

    async def _monitor(self) -> None:
        assert self._monitor_interval is not None
        while True:
            await asyncio.sleep(self._monitor_interval)
            try:
                self._pressure.sample(self._used)
            except psutil.Error as exc:
                logger.warning("worker %s: cannot read this process's memory (%s); counting "
                               "chunks only from now on", self.worker_name, exc)
                self._pressure.stop_sampling()
                return
            self._update()

    async def _spill_loop(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self.state is not StoreState.RUNNING:
                    return
                self._start_writers()
                self._update()  # chunks dropped for free may have opened the gates
        finally:
            if self._writers:  # close() waits for the files in flight
                await asyncio.wait(self._writers)

    def _start_writers(self) -> None:
        """Start batches until the bytes on their way out cover the excess, or every
        writer is busy."""
        while not self._spill_disabled and len(self._writers) < _WRITERS:
            # Bytes being written leave RAM soon: only the rest needs new victims.
            excess = self._pressure.excess(self._used) - self._writing_bytes
            if excess <= 0:
                return
            batch = self._take_victims(excess)
            if batch:
                if not self._writers:
                    self._busy_since = time.perf_counter()
                writer = asyncio.create_task(self._write_batch(batch), name="aiodagger-spill-write")
                self._writers.add(writer)
                writer.add_done_callback(self._writer_done)
            elif not self._evictable:
                return

    def _writer_done(self, writer: asyncio.Task[None]) -> None:
        self._writers.discard(writer)
        if not self._writers:  # time with any write in flight: rates stay per store
            self._spill_seconds += time.perf_counter() - self._busy_since
        if not writer.cancelled() and writer.exception() is not None:
            logger.error("worker %s: a spill write failed unexpectedly", self.worker_name,
                         exc_info=writer.exception())
        self._update()  # waiters go as soon as memory is under the pause threshold; more to write?

    def _take_victims(self, excess: int) -> list[_Entry]:
        """Free ``excess`` bytes: drop chunks that have a file, pick the others to write."""
        batch: list[_Entry] = []
        batch_bytes = 0
        while self._evictable and excess > 0:
            if batch and (batch_bytes >= _BATCH_BYTES or len(batch) >= _BATCH_CHUNKS):
                break
            _, entry = self._evictable.popitem(last=False)
            if entry.path is not None:  # read back earlier, its file still there: free
                self._drop_value(entry)
            else:
                entry.writing = True
                batch.append(entry)
                batch_bytes += entry.nbytes
            excess -= entry.nbytes
        self._writing += len(batch)
        self._writing_bytes += batch_bytes
        return batch

    async def _write_batch(self, batch: list[_Entry]) -> None:
        jobs = []
        for entry in batch:
            self._file_seq += 1
            jobs.append((self.directory / f"{self._file_seq}.spill", entry.value))
        results: list[int | Exception | None]
        start = time.perf_counter()
        try:
            results = await self._run_io(spillfile.dump_many, jobs)
        except Exception as exc:  # MemoryError in the thread, say: a failed write all the same
            results = [exc, *[None] * (len(jobs) - 1)]
        if self.on_event is not None:
            stop = time.perf_counter()
            for entry, result in zip(batch, results, strict=True):
                if isinstance(result, int):
                    self.on_event("spilled", entry.key, result, start, stop)
        self._writing -= len(batch)
        self._writing_bytes -= sum(entry.nbytes for entry in batch)
        # Put back what was not written in LRU order, oldest first.
        for entry, (path, _), result in reversed(list(zip(batch, jobs, results, strict=True))):
            entry.writing = False
            if isinstance(result, int):
                self._spill_writes += 1
                self._spilled_bytes += result
                self._written(entry, path, result)
            elif result is not None:
                self._write_failed(entry, result)
            else:
                self._make_evictable(entry, oldest=True)

    def _written(self, entry: _Entry, path: Path, size: int) -> None:
        if not entry.live:  # deleted while it was being written
            self._track(self._run_io(spillfile.discard, path))
            return
        entry.path, entry.file_bytes = path, size
        self._spilled_now += size
        if entry.pins or entry.hot:  # in use since the write began: keep it, file and all
            entry.hot = False
            self._make_evictable(entry)
        else:
            self._drop_value(entry)

    def _write_failed(self, entry: _Entry, exc: BaseException) -> None:
        self._spill_errors += 1
        self._last_error = exc
        entry.hot = False
        if isinstance(exc, SerializationError):
            entry.unspillable = True
            self._unspillable += entry.live
            logger.warning("worker %s: chunk %r cannot be spilled, it stays in memory: %s",
                           self.worker_name, entry.key, exc.__cause__)
            return
        self._make_evictable(entry, oldest=True)
        self._disable_spilling(exc)

    def _disable_spilling(self, exc: BaseException) -> None:
        if self._spill_disabled:
            return
        self._spill_disabled = True
        self._last_error = exc
        logger.warning("worker %s: writing a spill file to %s failed (%s); no more spilling "
                       "there, chunks stay in memory", self.worker_name, self.directory, exc)

    async def _load(self, entry: _Entry) -> Any:
        start = time.perf_counter()
        try:
            value = await self._read_file(entry, spillfile.load)
        finally:
            entry.loading = None
        if self.on_event is not None:
            self.on_event("loaded", entry.key, entry.file_bytes, start, time.perf_counter())
        self._loads += 1
        if entry.live and entry.value is _MISSING:
            entry.value = value
            self._used += entry.nbytes
            self._in_memory += 1
            self._make_evictable(entry)
        self._update()
        return value

    async def _read_file(self, entry: _Entry, read: Any) -> Any:
        """``read(path)`` of the entry's file in the executor, once the load gate opens;
        a file that fails drops the entry (see :meth:`_load_failed`). Call
        :meth:`_update` afterwards.
        """
        await self._pressure.wait_load()
        path = entry.path
        if not entry.live or path is None:
            raise KeyError(entry.key)  # deleted while it waited
        # Counted from the start: the buffers are allocated as the file is read, and a
        # second read must see them.
        self._used += entry.nbytes
        self._reading += 1
        self._update()
        try:
            result = await self._run_io(read, path)
        except BaseException as exc:
            self._used -= entry.nbytes
            self._reading -= 1
            if not isinstance(exc, Exception):
                raise
            failure = self._load_failed(entry, path, exc)
            if failure is exc:
                raise
            raise failure from (None if isinstance(failure, KeyError) else exc)
        self._used -= entry.nbytes
        self._reading -= 1
        return result

    def _load_failed(self, entry: _Entry, path: Path, exc: Exception) -> Exception:
        """The exception for a getter, once the entry is dropped."""
        if not entry.live:
            return KeyError(entry.key)  # deleted while it was being read
        self.delete(entry.key)
        dropped = f"chunk {entry.key!r} is dropped from worker {self.worker_name}'s store: recompute it"
        if isinstance(exc, SpillCorruptedError):
            exc.key = entry.key
            exc.add_note(dropped)
            return exc
        return SpillCorruptedError(f"the spill file of chunk {entry.key!r} ({path}) cannot be "
                                   f"read back: {exc!r}; {dropped}", str(path), entry.key)


# How long a task waits for admission at most. Chunks pinned by running tasks count as
# room to come; a running task blocked on a nested task that waits here would wait for
# itself. Past this, work goes on (and the store's own warnings say memory is high):
# a stall of a few seconds beats a deadlock.
ADMISSION_TIMEOUT_S = 5.0


async def admit(store: ChunkStore, timeout: float = ADMISSION_TIMEOUT_S) -> None:
    """Wait for ``store`` to admit new work, at most ``timeout`` seconds."""
    if not store.paused:
        return
    try:
        await asyncio.wait_for(store.wait_admitted(), timeout)
    except TimeoutError:
        logger.warning("worker %s: still above its pause threshold after %.0f s; starting a task "
                       "anyway so that tasks waiting on others cannot deadlock", store.worker_name, timeout)

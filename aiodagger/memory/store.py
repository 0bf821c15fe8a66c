"""ChunkStore: a worker's chunks, kept under its memory limit by spilling to disk.

Memory is what the worker's process holds: the chunks in RAM (``used``, counted with
:func:`~aiodagger.memory.sizes.sizeof`) plus *unmanaged* memory, everything else the
process's RSS shows (interpreter, libraries, a running task's temporaries), sampled
every ``monitor_interval`` seconds. Two thresholds act on it:

* above ``spill_fraction`` of the limit, a background task writes least-recently-used
  chunks to disk, one executor call per batch, until memory is back under it;
* above ``pause_fraction``, :meth:`ChunkStore.wait_admitted` blocks, so that a worker
  calling it before each task takes no new work while the disk catches up. Without it
  a fast producer outruns an asynchronous spill (dask/distributed#4424).

A chunk leaves RAM only once its file is completely written, and a chunk read back
keeps its file: evicting it again costs no write. When memory cannot be brought down
(spilling failed, or every chunk is already on disk) the store *overruns*: it says so
once in the log and in :meth:`~ChunkStore.stats`, and admits work anyway, because a
deadlock is worse than memory over its limit.

Chunks are treated as immutable: a value changed in place must be ``put`` again,
which drops its file. Every method is called from the loop the store started on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import logging
import os
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Hashable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

from ..comm import serialize
from ..errors import SerializationError
from . import spilldir, spillfile
from .sizes import parse_memory_limit, sizeof
from .spillfile import SpillCorruptedError

__all__ = ["ChunkStore", "StoreState"]

logger = logging.getLogger(__name__)

_MISSING: Any = object()
# A spill batch is one executor call: small chunks share it (one hop for many files),
# large ones go one by one so that the first is out of RAM as soon as it is written.
_BATCH_BYTES = 32 << 20
_BATCH_CHUNKS = 256
# glibc keeps freed memory below its mmap threshold (which grows to 32 MiB) in its
# heaps, where RSS still shows it as unmanaged: given back once this much was dropped.
# Putting 1 GiB of 16 MiB chunks through a 256 MiB store and reading them back peaked
# at 246-294 MiB RSS without it, 214-245 MiB with it (4 runs each); a call costs ~40 µs.
_TRIM_AFTER = 8 << 20


def _find_malloc_trim() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; musl has none
    except (OSError, AttributeError):
        return None


_malloc_trim = _find_malloc_trim()


class StoreState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class _Entry:
    __slots__ = ("key", "value", "nbytes", "path", "file_bytes", "pins", "writing", "hot",
                 "loading", "unspillable", "live")

    def __init__(self, key: Hashable, value: Any, nbytes: int) -> None:
        self.key = key
        self.value = value  # _MISSING while only on disk
        self.nbytes = nbytes
        self.path: Path | None = None  # the spill file, while there is one
        self.file_bytes = 0
        self.pins = 0
        self.writing = False  # a write of its file is in flight
        self.hot = False  # read while its write was in flight: keep it in RAM afterwards
        self.loading: asyncio.Future[Any] | None = None
        self.unspillable = False  # pickling it failed once
        self.live = True  # False once deleted or replaced


class ChunkStore:
    """Chunks by key, in RAM or spilled to disk, under a memory limit.

    ``memory_limit`` takes anything :func:`~aiodagger.memory.sizes.parse_memory_limit`
    does; None means no limit (nothing is spilled, nothing paused). Use it as
    ``async with ChunkStore(...) as store`` or call :meth:`start` and :meth:`close`.
    ``monitor_interval`` is how often the process's RSS is sampled (None: count the
    chunks only).
    """

    def __init__(self, memory_limit: int | float | str | None,
                 spill_dir: str | os.PathLike[str] | None = None,
                 spill_fraction: float = 0.6, pause_fraction: float = 0.8,
                 worker_name: str = "w0", monitor_interval: float | None = 0.2) -> None:
        if not 0 < spill_fraction <= pause_fraction <= 1:
            raise ValueError(f"need 0 < spill_fraction <= pause_fraction <= 1, got spill_fraction="
                             f"{spill_fraction!r}, pause_fraction={pause_fraction!r} (defaults: 0.6, 0.8)")
        if monitor_interval is not None and not monitor_interval > 0:
            raise ValueError(f"monitor_interval={monitor_interval!r}: seconds > 0, or None")
        self.memory_limit = parse_memory_limit(memory_limit)
        self.worker_name = worker_name
        self.directory = spilldir.path_for(spill_dir, worker_name)
        limit = self.memory_limit
        self._spill_at = None if limit is None else int(limit * spill_fraction)
        self._pause_at = None if limit is None else int(limit * pause_fraction)
        self._monitor_interval = monitor_interval
        self.state = StoreState.NEW

        self._entries: dict[Hashable, _Entry] = {}
        # In RAM, unpinned, not being written, spillable; least recently used first.
        self._evictable: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._used = 0
        self._in_memory = 0
        self._pinned = 0  # entries with pins > 0
        self._writing = 0  # entries in the batch being written
        self._process = psutil.Process()
        self._rss: int | None = None
        self._peak_rss = 0
        self._unmanaged = 0
        self._file_seq = 0
        self.spilled_bytes = 0
        self.spilled_now = 0
        self._spill_writes = 0
        self._spill_seconds = 0.0
        self._loads = 0
        self.spill_errors = 0
        self.last_error: BaseException | None = None
        self.spill_disabled = False
        self.paused = False
        self.overrun = False
        self._warned_overrun = False
        self._unspillable = 0
        self._dropped = 0  # bytes dropped from RAM since malloc_trim last ran
        self._trimming = False

        self._executor: ThreadPoolExecutor | None = None
        self._wake = asyncio.Event()
        self._admitted = asyncio.Event()  # set while new work may start
        self._admitted.set()
        self._loads_go = asyncio.Event()  # set while a spilled chunk may be read back
        self._loads_go.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._io: set[asyncio.Future[Any]] = set()

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Create the spill directory (removing stale ones) and start the background tasks."""
        if self.state is not StoreState.NEW:
            raise RuntimeError(f"ChunkStore {self.worker_name!r} is {self.state.value}: start it once")
        spilldir.claim(self.directory)
        self._executor = ThreadPoolExecutor(2, thread_name_prefix=f"aiodagger-spill-{self.worker_name}")
        try:
            await self._run_io(spilldir.create, self.directory)
        except BaseException:
            self._executor.shutdown(wait=True)
            spilldir.release(self.directory)
            raise
        self.state = StoreState.RUNNING
        if self.memory_limit is not None:
            self._tasks.append(asyncio.create_task(self._spill_loop(), name="aiodagger-spill"))
        if self._monitor_interval is not None:
            self._sample_memory()
            self._tasks.append(asyncio.create_task(self._monitor(), name="aiodagger-memory-monitor"))

    async def close(self) -> None:
        """Finish the write in flight, drop every chunk and remove the spill directory."""
        if self.state is StoreState.NEW:
            self.state = StoreState.CLOSED
            return
        if self.state is not StoreState.RUNNING:
            return
        self.state = StoreState.CLOSING
        self._admitted.set()  # nobody waits on a store that is going away
        self._loads_go.set()
        self._wake.set()  # the spill loop sees CLOSING once its batch is written
        for task in self._tasks:
            if task.get_name() == "aiodagger-memory-monitor":
                task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        while self._io:  # loads and removals in flight
            await asyncio.wait(list(self._io))
        self._entries.clear()
        self._evictable.clear()
        self._used = self._in_memory = self.spilled_now = 0
        await self._run_io(spilldir.remove, self.directory)
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

    def put(self, key: Hashable, value: Any, nbytes: int | None = None) -> None:
        """Store ``value`` under ``key`` (replacing any chunk there), counted as ``nbytes``.

        ``nbytes`` defaults to ``sizeof(value)``. Never blocks: a worker calls
        :meth:`wait_admitted` *before* running the task that produces the value.
        """
        self._check_running("put")
        if nbytes is None:
            nbytes = sizeof(value)
        if key in self._entries:
            self.delete(key)
        entry = _Entry(key, value, nbytes)
        self._entries[key] = entry
        self._evictable[key] = entry
        self._used += nbytes
        self._in_memory += 1
        self._update()

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

    def peek_in_memory(self, key: Hashable, default: Any = None) -> Any:
        """The value if it is in RAM now, else ``default``; no I/O and no LRU touch."""
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
        if entry.value is not _MISSING:
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

    def pin(self, key: Hashable) -> None:
        """Keep ``key`` in RAM (once it is there) until as many :meth:`unpin` calls."""
        self._pin(self._entries[key])

    def unpin(self, key: Hashable) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            self._unpin(entry)

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
        """Bytes of the chunks in RAM."""
        return self._used

    @property
    def memory(self) -> int:
        """The process's memory as the thresholds see it: chunks in RAM + unmanaged."""
        return self._used + self._unmanaged

    async def wait_admitted(self) -> None:
        """Return once memory is under the pause threshold (at once if it is).

        Also returns when the store cannot bring memory down (see ``overrun``).
        """
        self._check_running("wait_admitted")
        while not self._admitted.is_set():
            await self._admitted.wait()

    def stats(self) -> dict[str, Any]:
        """Counters for a worker's status: bytes unless named otherwise."""
        limit = self.memory_limit
        return {
            "worker": self.worker_name,
            "memory_limit": limit,
            "spill_threshold": self._spill_at,
            "pause_threshold": self._pause_at,
            "memory": self.memory,
            "used": self._used,
            "unmanaged": self._unmanaged,
            "process_memory": self._rss,
            "peak_process_memory": self._peak_rss or None,
            "chunks": len(self._entries),
            "chunks_in_memory": self._in_memory,
            "pinned": self._pinned,
            "spilled_bytes": self.spilled_bytes,
            "spilled_now": self.spilled_now,
            "spill_writes": self._spill_writes,
            "spill_seconds": self._spill_seconds,
            "loads": self._loads,
            "spill_errors": self.spill_errors,
            "last_error": None if self.last_error is None else repr(self.last_error),
            "spill_disabled": self.spill_disabled,
            "unspillable": self._unspillable,
            "paused": self.paused,
            "overrun": self.overrun,
            "over_limit": 0 if limit is None else max(0, self.memory - limit),
            "spill_dir": str(self.directory),
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
        elif entry.writing:
            entry.hot = True

    def _pin(self, entry: _Entry) -> None:
        entry.pins += 1
        if entry.pins == 1 and entry.live:
            self._pinned += 1
            self._evictable.pop(entry.key, None)

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
            self._evictable[entry.key] = entry
            if oldest:
                self._evictable.move_to_end(entry.key, last=False)

    def _drop_value(self, entry: _Entry) -> None:
        entry.value = _MISSING
        self._used -= entry.nbytes
        self._in_memory -= 1
        self._dropped += entry.nbytes

    def _trim(self) -> None:
        self._dropped = 0
        self._trimming = True
        fut = self._track(self._run_io(_malloc_trim, 0))
        fut.add_done_callback(lambda _: setattr(self, "_trimming", False))

    def _remove_file(self, entry: _Entry) -> None:
        assert entry.path is not None
        self.spilled_now -= entry.file_bytes
        path, entry.path, entry.file_bytes = entry.path, None, 0
        if self.state is StoreState.RUNNING:
            self._track(self._run_io(_unlink_quietly, path))

    def _can_make_room(self) -> bool:
        return not self.spill_disabled and bool(self._evictable or self._writing or self._pinned)

    def _update(self) -> None:
        """Recompute paused/overrun and wake the spill loop; O(1), after every change."""
        if self.state is not StoreState.RUNNING:
            return
        if self._dropped >= _TRIM_AFTER and _malloc_trim is not None and not self._trimming:
            self._trim()
        if self._pause_at is None:
            return
        memory = self._used + self._unmanaged
        assert self._spill_at is not None
        if memory > self._spill_at and self._evictable and not self.spill_disabled:
            self._wake.set()
        if memory <= self._pause_at:
            self.paused = self.overrun = False
        elif self._can_make_room():
            self.paused, self.overrun = True, False
        else:
            self.paused, self.overrun = False, True
            if not self._warned_overrun:
                self._warned_overrun = True
                why = (f"spilling is disabled after {self.last_error!r}" if self.spill_disabled
                       else "nothing left in memory can be spilled")
                logger.warning(
                    "worker %s: memory %d MiB is above the pause threshold (%d of %d MiB) and "
                    "cannot be brought down (%s); running tasks anyway", self.worker_name,
                    memory >> 20, self._pause_at >> 20, (self.memory_limit or 0) >> 20, why)
        if self.paused:
            self._admitted.clear()
        else:
            self._admitted.set()
        if memory > self._pause_at and not self.spill_disabled and (self._evictable or self._writing):
            self._loads_go.clear()
        else:
            self._loads_go.set()

    def _sample_memory(self) -> None:
        rss = self._process.memory_info().rss
        self._rss = rss
        self._peak_rss = max(self._peak_rss, rss)
        self._unmanaged = max(0, rss - self._used)

    async def _monitor(self) -> None:
        assert self._monitor_interval is not None
        while True:
            await asyncio.sleep(self._monitor_interval)
            self._sample_memory()
            self._update()

    async def _spill_loop(self) -> None:
        assert self._spill_at is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.state is not StoreState.RUNNING:
                return
            while (not self.spill_disabled and self.state is StoreState.RUNNING
                   and self._used + self._unmanaged > self._spill_at):
                batch = self._take_victims(self._used + self._unmanaged - self._spill_at)
                if batch:
                    await self._write_batch(batch)
                    self._update()  # waiters go as soon as memory is under the pause threshold
                elif not self._evictable:
                    break
            self._update()

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
        self._writing = len(batch)
        return batch

    async def _write_batch(self, batch: list[_Entry]) -> None:
        jobs = []
        for entry in batch:
            self._file_seq += 1
            jobs.append((self.directory / f"{self._file_seq}.spill", entry.value))
        started = time.perf_counter()
        results = await self._run_io(_write_files, jobs)
        self._spill_seconds += time.perf_counter() - started
        self._writing = 0
        # Put back what was not written in LRU order, oldest first.
        for entry, (path, _), result in reversed(list(zip(batch, jobs, results, strict=True))):
            entry.writing = False
            if isinstance(result, int):
                self._spill_writes += 1
                self.spilled_bytes += result
                self._written(entry, path, result)
            elif result is not None:
                self._write_failed(entry, result)
            else:
                self._make_evictable(entry, oldest=True)

    def _written(self, entry: _Entry, path: Path, size: int) -> None:
        if not entry.live:  # deleted while it was being written
            self._track(self._run_io(_unlink_quietly, path))
            return
        entry.path, entry.file_bytes = path, size
        self.spilled_now += size
        if entry.pins or entry.hot:  # in use since the write began: keep it, file and all
            entry.hot = False
            self._make_evictable(entry)
        else:
            self._drop_value(entry)

    def _write_failed(self, entry: _Entry, exc: BaseException) -> None:
        self.spill_errors += 1
        self.last_error = exc
        if isinstance(exc, SerializationError):
            entry.unspillable = True
            self._unspillable += entry.live
            logger.warning("worker %s: chunk %r cannot be spilled, it stays in memory: %s",
                           self.worker_name, entry.key, exc.__cause__)
            return
        self._make_evictable(entry, oldest=True)
        if not self.spill_disabled:
            self.spill_disabled = True
            logger.warning("worker %s: writing a spill file to %s failed (%s); no more spilling "
                           "there, chunks stay in memory", self.worker_name, self.directory, exc)

    async def _load(self, entry: _Entry) -> Any:
        # Reading back is throttled like new work, but only while the spill loop is
        # making room on its own: a load that waited for a pinned chunk to be released
        # could wait for the very task that needs it.
        while not self._loads_go.is_set():
            await self._loads_go.wait()
        if not entry.live:
            entry.loading = None
            raise KeyError(entry.key)  # deleted while it waited
        path = entry.path
        assert path is not None
        # Counted from the start: the buffers are allocated as the file is read, and a
        # second load must see them.
        self._used += entry.nbytes
        self._update()
        try:
            value = await self._run_io(spillfile.load, path)
        except Exception as exc:
            self._used -= entry.nbytes
            entry.loading = None
            if not entry.live:
                raise KeyError(entry.key) from None  # deleted while it was being read
            self.delete(entry.key)
            dropped = f"chunk {entry.key!r} is dropped from worker {self.worker_name}'s store: recompute it"
            if isinstance(exc, SpillCorruptedError):
                exc.key = entry.key
                exc.add_note(dropped)
                raise
            raise SpillCorruptedError(f"the spill file of chunk {entry.key!r} ({path}) cannot be "
                                      f"read back: {exc!r}; {dropped}", str(path), entry.key) from exc
        self._used -= entry.nbytes
        entry.loading = None
        self._loads += 1
        if entry.live and entry.value is _MISSING:
            entry.value = value
            self._used += entry.nbytes
            self._in_memory += 1
            self._make_evictable(entry)
        self._update()
        return value


def _write_files(jobs: list[tuple[Path, Any]]) -> list[int | BaseException | None]:
    """Runs in the I/O thread: each file's size, or its error; None after a disk error."""
    results: list[int | BaseException | None] = []
    for path, value in jobs:
        try:
            payload, buffers = serialize.dumps(value)
        except Exception as exc:
            err = SerializationError(f"cannot pickle a {type(value).__name__} to spill it")
            err.__cause__ = exc
            results.append(err)
            continue
        try:
            results.append(spillfile.write_parts(path, payload, buffers))
        except OSError as exc:
            results.append(exc)
            break
    results.extend([None] * (len(jobs) - len(results)))
    return results


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

"""Same-host shared memory: large values handed to readers on this machine through
files in ``/dev/shm`` instead of a socket.

A holder asked for a value by a reader on its own machine (the reader's :func:`host_key`
equals its own) whose buffers come to ``MIN_BYTES`` or more writes the value's pickle and
out-of-band buffers once into a *segment*: a file of the spill format
(:mod:`.spillfile`, ``ALIGNED | UNCHECKED``) in a directory of its own in ``/dev/shm``,
named, owned and locked as a spill directory is (:mod:`.spilldir`). The reply names the
file; the reader maps it (privately: a task may write into its input; nothing copied) and
unpickles the value from the mapping, so numpy arrays come as views of the shared pages.
Later readers of the same value get the same segment.

Lifetime: a segment lives as long as its value in the holder's store. At the value's
release it is renamed (no reader can name it any more) and kept, free, for the next
value of about its size (:class:`Segments`: at most ``FREE_BYTES``, for ``FREE_SECONDS``,
all of them under memory pressure), and its directory goes when the holder stops. A
reader pins a segment while any view of a value read from it lives (a shared lock on
the file), and the holder writes into a free segment only when it can lock it
exclusively; so a reader's view never changes under it. A reader keeps its mapping of a
segment after the views die (:class:`_Mappings`), and reads the next value written
there through page tables already filled in, as Ray's readers keep its arena mapped.
A segment is named in a reply only once written whole, so no reader sees a partial one.
A holder killed outright leaves its directory with its owner's lock free: the cluster
removes it when it sees the process end, and every start removes such stale ones, as
for spill directories.

Readers on another machine, or with ``AIODAGGER_SHM=0`` in their environment, get the
value over TCP as before.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import logging
import mmap
import os
import re
import threading
import time
import weakref
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from ..comm import serialize
from . import spilldir, spillfile

__all__ = ["EAGER_BYTES", "ENV", "FREE_BYTES", "FREE_SECONDS", "MIN_BYTES", "SHM_DIR", "Segments", "drop_gone",
           "drop_idle", "host_key", "keep_mappings", "load", "remove_stale"]

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
ENV = "AIODAGGER_SHM"
# Below this a value goes over the socket. Every segment is fresh pages of /dev/shm,
# which the kernel allocates and zeroes: W7-p (2,047 tasks on 1 MiB arrays, 2 worker
# processes) ran in 0.61-1.34 s with its 1 MiB values in segments (130,000-190,000 page
# faults per worker and run) and in 0.29-0.51 s over TCP into warm receive buffers
# (next to none), taking turns on the same machine. Large values are where copies
# through a socket cost more than fresh pages (W5, 256 MiB: 6.7-7.8 GB/s through a
# segment made as the value was, 3.35 over TCP).
MIN_BYTES = 16 << 20
# A worker whose values readers on its machine have taken through segments writes each
# new result of this size or more into a segment as it is made (as Ray puts results in
# its shared object store), before reporting it done, and keeps the segment's mapping as
# the value. A reader then maps it at once: W5 (256 MiB) paid 0.10 s writing the segment
# and 0.03 s reading it while it waited, against 0.03 s.
EAGER_BYTES = MIN_BYTES
# Free segments a holder keeps for its next values, at most (each worker process).
FREE_BYTES = 512 << 20
# ... and for this long after their value's release (then their RAM goes back).
FREE_SECONDS = 30.0
# Idle mappings a reader keeps, at most, and how often it looks for ones whose file is gone.
KEPT_MAPPINGS = 8
SWEEP_SECONDS = 5.0
_PAGE = mmap.PAGESIZE
_FLAGS = spillfile.ALIGNED | spillfile.UNCHECKED
_SEGMENT_RE = re.compile(r"^aiodagger-shm-\d+-[A-Za-z0-9._-]+@[0-9a-f]{8}/v-?\d+$")


def host_key() -> str:
    """What names this machine's ``/dev/shm`` (its boot, and the mount itself), or "" where
    segments cannot be used: no ``/dev/shm``, not writable, or ``AIODAGGER_SHM=0``."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return ""
    return _host_key()


@functools.cache
def _host_key() -> str:
    try:
        st = os.stat(SHM_DIR)
        if not os.access(SHM_DIR, os.W_OK | os.X_OK):
            return ""
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        return ""
    return f"{boot}:{st.st_dev}:{st.st_ino}"


def remove_stale() -> list[Path]:
    """Remove the segment directories in ``/dev/shm`` whose owner is gone."""
    if not SHM_DIR.is_dir():
        return []
    return spilldir.remove_stale(SHM_DIR)


def load(path: str) -> Any:
    """The value in the segment ``path``, read through a private mapping (no copy).

    ``path`` comes from a peer: only a segment file in a segment directory of
    ``/dev/shm`` is opened (ValueError otherwise). Raises OSError when it is gone (its
    value was released meanwhile), SpillCorruptedError when it is not whole.
    """
    relative = os.path.relpath(path, SHM_DIR)
    if os.path.isabs(path) is False or not _SEGMENT_RE.match(relative):
        raise ValueError(f"{path!r} is not a shared segment of this machine")
    return _MAPPINGS.load(path)


def keep_mappings(keep: bool) -> None:
    """A memory limit on this process begins (False) or ends (True): while any does, the
    process keeps no idle mapping of a segment (see _Mappings): a kept mapping's pages
    count in its RSS, which the limit counts, though the memory is the holder's."""
    with _MAPPINGS._lock:
        _MAPPINGS.limits += -1 if keep else 1
        if not keep:
            _MAPPINGS.drop_idle()


def drop_gone() -> None:
    """Let go at once of idle mappings whose file is gone (a cluster's workers stopped)."""
    _MAPPINGS.sweep()


def drop_idle() -> int:
    """Let go of what this process keeps for segments to come: its holders' free
    segments and its readers' idle mappings (under memory pressure); the bytes of
    /dev/shm let go."""
    freed = sum(segments.drop_free() for segments in list(_ALL))
    _MAPPINGS.drop_idle()
    return freed


class _Mapping:
    """A reader's private mapping of one segment file, kept while the file lives so that
    the next value written into it is read through page tables already filled in."""

    __slots__ = ("address", "fd", "ident", "map", "size", "uses")

    def __init__(self, fd: int, ident: tuple[int, int], size: int) -> None:
        import mmap

        import numpy as np

        # An open file of its own, not the pinning one: mmap keeps a duplicate of the
        # descriptor it maps, and with it the lock. Also to see whether the file is gone.
        self.fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            # Not MAP_POPULATE: on a writable private mapping it faults every page in for
            # writing, which copies them all (0.11 s for 256 MiB here, against 0.02 s for
            # the read faults of summing it).
            self.map: Any = mmap.mmap(self.fd, size, flags=mmap.MAP_PRIVATE,
                                      prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.address = np.frombuffer(self.map, np.uint8).ctypes.data
        self.ident = ident
        self.size = size
        self.uses = 0  # values read through it that are still alive here

    def written_here(self) -> bool:
        """Whether a page of the mapping is this process's own copy (a task wrote into
        its input): such a page would hide what the holder writes there next. True also
        where that cannot be told."""
        import numpy as np

        pages = -(-self.size // _PAGE)
        try:
            with open("/proc/self/pagemap", "rb", buffering=0) as f:
                raw = os.pread(f.fileno(), pages * 8, self.address // _PAGE * 8)
        except OSError:
            return True
        if len(raw) != pages * 8:
            return True
        entries = np.frombuffer(raw, np.uint64)
        # bit 63: in RAM, 62: swapped out, 61: a page of the file (not a private copy)
        touched = (entries >> np.uint64(62)) != 0
        return bool(np.any(touched & ((entries >> np.uint64(61)) & np.uint64(1) == 0)))

    def gone(self) -> bool:
        try:
            return os.fstat(self.fd).st_nlink == 0
        except OSError:
            return True

    def close(self) -> None:
        # Dropped, not closed: the last view's buffer may still be let go of (a finalizer
        # runs before that), and the mapping goes with the last reference to it.
        self.map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Mappings:
    """This process's mappings of segments, one per segment file (by inode).

    A value read from a segment pins the file while any view of it is alive here: a
    shared ``flock`` on an open file of its own, let go when the last view dies (a
    finalizer on the array the views come from). A holder writes a new value into a
    free segment only if it can lock the file exclusively: never under a live view.
    Once a value's views are gone, its mapping is kept for the next value written into
    the same file, unless a task wrote into it (its pages are then this process's own
    and would hide the new value) or the file is removed. Reading a 256 MiB value
    through a kept mapping took 13 ms here against 35 ms through a fresh one: the
    difference is filling in the page tables, which MADV_POPULATE_READ does not avoid.
    """

    def __init__(self) -> None:
        # Reentrant: a view may die, and its finalizer run, in the middle of a load.
        self._lock = threading.RLock()
        self._kept: dict[tuple[int, int], _Mapping] = {}
        self._sweeping: threading.Timer | None = None
        self.limits = 0  # memory limits on this process now (keep_mappings)

    def load(self, path: str) -> Any:
        import numpy as np

        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # its holder is writing another value into it
                raise FileNotFoundError(errno.ENOENT, "segment in use for another value", path) from None
            st = os.fstat(fd)
            ident = (st.st_dev, st.st_ino)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != ident:
                raise FileNotFoundError(errno.ENOENT, "segment released and used again", path)
            flags, offsets, lengths, sums = spillfile.read_layout(fd, st.st_size, path, trailing=True)
            mapping = self._use(fd, ident, st.st_size)
            base = np.frombuffer(mapping.map, np.uint8)
        except BaseException:
            os.close(fd)
            raise
        # The pin goes when the last view of base does (base is every part's exporter).
        weakref.finalize(base, self._unuse, mapping, fd)
        view = base.data
        del base
        parts = [view[offset:offset + n] for offset, n in zip(offsets, lengths, strict=True)]
        view.release()
        spillfile.check_parts(parts, sums, flags, path)
        return serialize.loads(parts[0], parts[1:])

    def _use(self, fd: int, ident: tuple[int, int], size: int) -> _Mapping:
        with self._lock:
            mapping = self._kept.get(ident)
            if mapping is not None and (mapping.uses or mapping.size != size):
                # In use here already (its pages may be written by that use), or the file
                # changed size: a mapping of its own for this value.
                del self._kept[ident]
                if not mapping.uses:
                    mapping.close()
                mapping = None
            if mapping is None:
                mapping = _Mapping(fd, ident, size)
                self._kept[ident] = mapping
            mapping.uses += 1
            return mapping

    def _unuse(self, mapping: _Mapping, fd: int) -> None:
        os.close(fd)  # the pin: the holder may write another value into the file now
        with self._lock:
            mapping.uses -= 1
            if mapping.uses:
                return
            kept = self._kept.get(mapping.ident) is mapping
            if (not kept or self.limits or len(self._kept) > KEPT_MAPPINGS or mapping.gone()
                    or mapping.written_here()):
                if kept:
                    del self._kept[mapping.ident]
                mapping.close()
            elif self._sweeping is None:
                self._sweeping = threading.Timer(SWEEP_SECONDS, self._sweep)
                self._sweeping.daemon = True
                self._sweeping.start()

    def sweep(self) -> None:
        """Let go of idle mappings of files their holders removed (the pages live as long
        as a mapping does)."""
        with self._lock:
            for ident, mapping in list(self._kept.items()):
                if not mapping.uses and mapping.gone():
                    del self._kept[ident]
                    mapping.close()

    def _sweep(self) -> None:
        """sweep(), and again later while any mapping is kept."""
        with self._lock:
            self._sweeping = None
            self.sweep()
            if self._kept:
                self._sweeping = threading.Timer(SWEEP_SECONDS, self._sweep)
                self._sweeping.daemon = True
                self._sweeping.start()

    def drop_idle(self) -> None:
        with self._lock:
            for ident, mapping in list(self._kept.items()):
                if not mapping.uses:
                    del self._kept[ident]
                    mapping.close()

    def __len__(self) -> int:
        return len(self._kept)


_MAPPINGS = _Mappings()
_ALL: weakref.WeakSet[Segments] = weakref.WeakSet()


class Segments:
    """The shared segments of one worker's values, in one directory made on first use.

    A released value's segment is kept as a *free* segment (renamed, so that no reader
    can name it any more) for the next value of about its size, up to ``free_limit``
    bytes and ``FREE_SECONDS``: writing into pages that exist took 39-49 ms for 256 MiB
    here against 51-103 ms for fresh ones, and readers that kept their mapping of the
    file read the new value without filling in page tables again (:class:`_Mappings`).
    A free segment is written into only while no reader anywhere holds a view of its
    last value (an exclusive ``flock`` taken without waiting); else a fresh one is made.
    """

    def __init__(self, worker_name: str, free_limit: int = FREE_BYTES) -> None:
        self.worker_name = worker_name
        self.free_limit = free_limit
        self.directory: Path | None = None
        self._lock: int | None = None
        self._made: dict[Hashable, tuple[str, int]] = {}  # key -> (path, size)
        self._making: dict[int, asyncio.Future[tuple[str, int]]] = {}
        self._doomed: set[Hashable] = set()  # released while being written
        # Free segments, oldest first: (path, size, monotonic time freed).
        self._free: list[tuple[str, int, float]] = []
        self._freed = 0  # names free segments
        self._expiring: asyncio.TimerHandle | None = None
        # The directory being made: two first offers at once (two readers asking for two
        # values) both made it, and the second's claim failed ("another ChunkStore in
        # this process already spills to ..."): the read failed, the value was computed again.
        self._opening: asyncio.Future[None] | None = None
        self.bytes = 0  # in /dev/shm now, free segments included
        self.closed = False
        _ALL.add(self)

    def __len__(self) -> int:
        return len(self._made)

    @property
    def free_bytes(self) -> int:
        return sum(size for _, size, _ in self._free)

    def get(self, key: int) -> tuple[str, int] | None:
        """The segment (path, size) of ``key``'s value if it was written already."""
        return self._made.get(key)

    async def offer(self, key: int, payload: Any, buffers: list[Any]) -> tuple[str, int]:
        """The segment (path, size) of ``key``'s value, written from its parts on first
        ask. Raises KeyError if the value is released (or the segments closed) meanwhile,
        OSError if it cannot be written (the caller sends the value over the socket)."""
        made = self._made.get(key)
        if made is not None:
            return made
        pending = self._making.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        if self.closed:
            raise KeyError(key)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[str, int]] = loop.create_future()
        self._making[key] = fut
        free: tuple[str, int, float] | None = None
        try:
            if self.directory is None:
                if self._opening is None:
                    self._opening = loop.run_in_executor(None, self._open)
                try:
                    await asyncio.shield(self._opening)
                except Exception:
                    self._opening = None  # the next offer tries again
                    raise
            assert self.directory is not None
            path = str(self.directory / f"v{key}")
            free = self._take_free(spillfile.size_of(payload, buffers, _FLAGS))
            size, reused = await loop.run_in_executor(
                None, _write, path, None if free is None else free[0], payload, buffers)
            if free is not None:
                if reused:
                    self.bytes -= free[1]
                else:  # a reader's view of its last value lives: later, perhaps
                    self._free.append(free)
                    self._free.sort(key=lambda f: f[2])
                free = None
            if key in self._doomed or self.closed:
                spillfile.discard(path)
                raise KeyError(key)
            self._made[key] = made = (path, size)
            self.bytes += size
            fut.set_result(made)
            return made
        except BaseException as exc:
            if free is not None:  # written into in part: no longer of use
                self.bytes -= free[1]
                spillfile.discard(free[0])
            fut.set_exception(exc)
            fut.exception()  # retrieved: whoever waits on it gets it raised
            raise
        finally:
            del self._making[key]
            self._doomed.discard(key)

    def _take_free(self, size: int) -> tuple[str, int, float] | None:
        """The smallest free segment that holds ``size`` bytes wasting under a quarter."""
        best = None
        for i, (_, free_size, _) in enumerate(self._free):
            if size <= free_size <= size + size // 4 and (best is None or free_size < self._free[best][1]):
                best = i
        return None if best is None else self._free.pop(best)

    def _open(self) -> None:
        directory = spilldir.path_for(SHM_DIR, self.worker_name, kind="shm")
        spilldir.claim(directory)
        try:
            self._lock = spilldir.create(directory)
        except BaseException:
            spilldir.release(directory)
            raise
        self.directory = directory

    def drop(self, key: Hashable) -> None:
        """``key``'s value is released: its segment goes (readers keep their mappings), to
        the free ones where there is room."""
        made = self._made.pop(key, None)
        if made is not None:
            self.bytes -= made[1]
            self._free_or_discard(*made)
        elif key in self._making:
            self._doomed.add(key)

    def _free_or_discard(self, path: str, size: int) -> None:
        if self.closed or self.directory is None or size > self.free_limit or size < MIN_BYTES:
            spillfile.discard(path)
            return
        self._freed += 1
        free = str(self.directory / f"free{self._freed}")
        try:
            os.rename(path, free)
        except OSError:
            spillfile.discard(path)
            return
        self._free.append((free, size, time.monotonic()))
        self.bytes += size
        while self.free_bytes > self.free_limit:
            self._discard_free(0)
        if self._expiring is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop to expire them: they are bounded, and go at close
            self._expiring = loop.call_later(FREE_SECONDS, self._expire)

    def _discard_free(self, index: int) -> None:
        path, size, _ = self._free.pop(index)
        self.bytes -= size
        spillfile.discard(path)

    def _expire(self) -> None:
        self._expiring = None
        deadline = time.monotonic() - FREE_SECONDS
        while self._free and self._free[0][2] <= deadline:
            self._discard_free(0)
        if self._free:
            self._expiring = asyncio.get_running_loop().call_later(
                self._free[0][2] - deadline, self._expire)

    def drop_free(self) -> int:
        """Remove every free segment; return their bytes."""
        freed = self.free_bytes
        while self._free:
            self._discard_free(0)
        return freed

    def close(self) -> None:
        """Remove every segment and the directory (at the worker's stop)."""
        self.closed = True
        self._opening = None
        self._made.clear()
        self._free.clear()
        if self._expiring is not None:
            self._expiring.cancel()
            self._expiring = None
        self.bytes = 0
        if self.directory is not None:
            spilldir.remove(self.directory, self._lock)
            spilldir.release(self.directory)
            self.directory, self._lock = None, None


def _write(path: str, free: str | None, payload: Any, buffers: list[Any]) -> tuple[int, bool]:
    """Write the parts into the free segment ``free``, then named ``path``, if no reader
    holds a view of its last value, else into a new file ``path``. Returns the file's
    size, and whether it was the free one."""
    if free is not None:
        fd = os.open(free, os.O_WRONLY | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # a reader's view lives: that file stays as it is
            else:
                spillfile.write_parts_to(fd, payload, buffers, _FLAGS)
                size = os.fstat(fd).st_size
                os.rename(free, path)  # readers may name it now, whole
                return size, True
        finally:
            os.close(fd)  # and the lock with it
    return spillfile.write_parts(path, payload, buffers, _FLAGS), False

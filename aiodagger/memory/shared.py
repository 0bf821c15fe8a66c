"""Same-host shared memory: large values handed to readers on this machine through
files in ``/dev/shm`` instead of a socket.

A holder asked for a value by a reader on its own machine (the reader's :func:`host_key`
equals its own) whose buffers come to ``MIN_BYTES`` or more writes the value's pickle and
out-of-band buffers once into a *segment*: a file of the spill format
(:mod:`.spillfile`, ``ALIGNED | UNCHECKED``) in a directory of its own in ``/dev/shm``,
named, owned and locked as a spill directory is (:mod:`.spilldir`). The reply names the
file; the reader maps it (:func:`~.spillfile.map_parts`: private, nothing copied) and
unpickles the value from the mapping, so numpy arrays come as views of the shared pages.
Later readers of the same value get the same segment.

Lifetime: a segment lives as long as its value in the holder's store. It is removed
when the value is released there, and its directory when the holder stops; a reader's
mapping stays valid after that (the kernel frees the pages with the last mapping). A
segment is named in a reply only once written whole, so no reader sees a partial one.
A holder killed outright leaves its directory with its owner's lock free: the cluster
removes it when it sees the process end, and every start removes such stale ones, as
for spill directories.

Readers on another machine, or with ``AIODAGGER_SHM=0`` in their environment, get the
value over TCP as before.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from ..comm import serialize
from . import spilldir, spillfile

__all__ = ["EAGER_BYTES", "ENV", "MIN_BYTES", "SHM_DIR", "Segments", "host_key", "load", "remove_stale"]

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
    payload, buffers = spillfile.map_parts(path)
    return serialize.loads(payload, buffers)


class Segments:
    """The shared segments of one worker's values, in one directory made on first use."""

    def __init__(self, worker_name: str) -> None:
        self.worker_name = worker_name
        self.directory: Path | None = None
        self._lock: int | None = None
        self._made: dict[Hashable, tuple[str, int]] = {}  # key -> (path, size)
        self._making: dict[int, asyncio.Future[tuple[str, int]]] = {}
        self._doomed: set[Hashable] = set()  # released while being written
        # The directory being made: two first offers at once (two readers asking for two
        # values) both made it, and the second's claim failed ("another ChunkStore in
        # this process already spills to ..."): the read failed, the value was computed again.
        self._opening: asyncio.Future[None] | None = None
        self.bytes = 0  # in /dev/shm now
        self.closed = False

    def __len__(self) -> int:
        return len(self._made)

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
            size = await loop.run_in_executor(None, spillfile.write_parts, path, payload, buffers, _FLAGS)
            if key in self._doomed or self.closed:
                spillfile.discard(path)
                raise KeyError(key)
            self._made[key] = made = (path, size)
            self.bytes += size
            fut.set_result(made)
            return made
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: whoever waits on it gets it raised
            raise
        finally:
            del self._making[key]
            self._doomed.discard(key)

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
        """``key``'s value is released: remove its segment (readers keep their mappings)."""
        made = self._made.pop(key, None)
        if made is not None:
            self.bytes -= made[1]
            spillfile.discard(made[0])
        elif key in self._making:
            self._doomed.add(key)

    def close(self) -> None:
        """Remove every segment and the directory (at the worker's stop)."""
        self.closed = True
        self._opening = None
        self._made.clear()
        self.bytes = 0
        if self.directory is not None:
            spilldir.remove(self.directory, self._lock)
            spilldir.release(self.directory)
            self.directory, self._lock = None, None

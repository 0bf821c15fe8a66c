"""One chunk in one file, in the wire's out-of-band format.

Layout (integers little-endian)::

    magic "ADGSPILL" | version u16 | flags u16 | nparts u32
    nparts x (length u64 | checksum u64)   part 0 is the pickle, then the raw buffers
    checksum u64 of everything above
    the pickle, then each buffer, back to back

Flags: ``ALIGNED``, each part starts at a multiple of 64 bytes from the file's start
(zero bytes between), so that a file mapped into memory gives numpy aligned arrays;
``UNCHECKED``, the parts' checksums are 0 and not checked (the header's still is).
Spill files have neither. A same-host shared segment (:mod:`.shared`) is a file of
this format in ``/dev/shm`` with both: it is read through a mapping, not a copy, and
never leaves RAM, where checksumming 256 MiB on each side would cost more than the copy
the segment saves.

Checksums are XXH3-64 (the ``xxhash`` package). It is the spill path's one CPU cost
besides the copy to the kernel, so its speed matters: on a 128 MiB array on the
development machine, XXH3-64 took 7.6 ms where ``zlib.crc32`` took 52 ms and summing
the array 9.6 ms (best of 7). With crc32, checksumming was 18 % of a W6 worker's
samples under py-spy, twice the time of the sums the workload computes.

The parts are written with ``os.writev`` straight from the memory that
:func:`aiodagger.comm.serialize.dumps` hands back, so a numpy array's data is never
copied on its way to disk. Reading allocates each part once (``numpy.empty``: no
zero-filling, unlike ``bytearray(n)``, which costs ~0.1 s per 128 MiB here) and reads
into it with ``os.readv``; lengths and checksums are checked before anything is
unpickled, and a file that fails a check raises :class:`SpillCorruptedError`.

Files are written and read off the event loop, one executor call per chunk. aiofiles
was measured against this and not chosen: each of its calls is one executor hop, so a
chunk costs open + one ``write`` per part + close hops instead of one. Medians of 5
runs, sequential, to the page cache of an ext4 ``/tmp`` on the 2-core development
machine (loaded by other work, so +-30 %), two runs of
``python -m benchmarks.spill --compare-aiofiles``::

                               write           read
    2000 chunks of 4 KiB
        aiofiles               4.15 / 4.04 s   1.26 / 2.29 s
        one call               2.60 / 2.06 s   0.49 / 0.55 s
    16 chunks of 32 MiB
        aiofiles               0.37 / 0.51 s   0.44 / 0.49 s
        one call               0.39 / 0.48 s   0.44 / 0.77 s

Large chunks are bound by the copy to the kernel either way (equal within the noise);
small ones pay for the hops, 1.6-2x on writes and 2.6-4x on reads. The store goes
further and writes a batch of small chunks in one call.

No ``fsync``: a spill file never has to outlive its process (a crash leaves a stale
directory that the next start removes), and the kernel's dirty-page throttling already
slows a writer that outruns the disk.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any

import xxhash

from ..comm import serialize
from ..errors import DaggerError, SerializationError

__all__ = [
    "ALIGNED",
    "UNCHECKED",
    "SpillCorruptedError",
    "check_parts",
    "checksum",
    "discard",
    "dump",
    "dump_many",
    "load",
    "read",
    "read_parts",
    "read_layout",
    "read_raw",
    "size_of",
    "write",
    "write_parts",
    "write_parts_to",
]

ALIGNED = 1
UNCHECKED = 2
ALIGNMENT = 64
MAGIC = b"ADGSPILL"
VERSION = 2  # 1 had crc32 checksums
_PREFIX = struct.Struct("<8sHHI")  # magic, version, flags, nparts
_PART = struct.Struct("<QQ")  # length, checksum
_CHECKSUM = struct.Struct("<Q")
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)
# writev takes at most IOV_MAX buffers per call (1024 on Linux)
try:
    _IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))
except (AttributeError, OSError, ValueError):
    _IOV_MAX = 16

Buffer = bytes | bytearray | memoryview


class SpillCorruptedError(DaggerError):
    """A spill file is truncated, damaged or unreadable: the chunk in it is lost.

    The store drops the entry when it raises this, so the chunk can be recomputed
    from its lineage. ``path`` is the file and ``key`` the chunk, where known.
    """

    def __init__(self, message: str, path: str | None = None, key: Any = None) -> None:
        super().__init__(message)
        self.path = path
        self.key = key


def checksum(data: Buffer) -> int:
    """The 64-bit checksum that a spill file keeps of each part and of its header."""
    return xxhash.xxh3_64_intdigest(data)


def header(parts: Sequence[Buffer], flags: int = 0) -> bytes:
    """The header that describes ``parts`` (the pickle first, then the buffers)."""
    if flags & UNCHECKED:
        table = b"".join(_PART.pack(memoryview(p).nbytes, 0) for p in parts)
    else:
        table = b"".join(_PART.pack(memoryview(p).nbytes, checksum(p)) for p in parts)
    head = _PREFIX.pack(MAGIC, VERSION, flags, len(parts)) + table
    return head + _CHECKSUM.pack(checksum(head))


def _offsets(start: int, lengths: Sequence[int], flags: int) -> tuple[list[int], int]:
    """Where each part starts, for parts written from ``start`` on; and where they end."""
    offsets = []
    pos = start
    for n in lengths:
        if flags & ALIGNED:
            pos += -pos % ALIGNMENT
        offsets.append(pos)
        pos += n
    return offsets, pos


def write_parts(path: str | os.PathLike[str], payload: Buffer, buffers: Sequence[Buffer],
                flags: int = 0) -> int:
    """Write one chunk's parts to ``path`` (created or replaced); return the file's size.

    A failed write removes the partial file before raising.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_CLOEXEC | _O_BINARY, 0o600)
    try:
        size = write_parts_to(fd, payload, buffers, flags)
    except BaseException:
        os.close(fd)
        discard(path)
        raise
    os.close(fd)
    return size


def write_parts_to(fd: int, payload: Buffer, buffers: Sequence[Buffer], flags: int = 0) -> int:
    """Write one chunk's parts at ``fd``'s position (an open file's start); return the bytes
    written. What the file holds past them is left as it is (see ``trailing`` in
    :func:`read_layout`)."""
    parts = [payload, *buffers]
    head = header(parts, flags)
    pieces: list[Buffer] = [head]
    if flags & ALIGNED:
        offsets, _ = _offsets(len(head), [memoryview(p).nbytes for p in parts], flags)
        pos = len(head)
        for part, offset in zip(parts, offsets, strict=True):
            if offset > pos:
                pieces.append(bytes(offset - pos))
            pieces.append(part)
            pos = offset + memoryview(part).nbytes
    else:
        pieces.extend(parts)
    return _write_all(fd, pieces)


def size_of(payload: Buffer, buffers: Sequence[Buffer], flags: int = 0) -> int:
    """The size of the file that :func:`write_parts` makes of these parts."""
    lengths = [memoryview(p).nbytes for p in (payload, *buffers)]
    head_size = _PREFIX.size + len(lengths) * _PART.size + _CHECKSUM.size
    return _offsets(head_size, lengths, flags)[1]


def dump(path: str | os.PathLike[str], obj: Any) -> int:
    """Serialize ``obj`` into ``path``; return the file's size."""
    payload, buffers = serialize.dumps(obj)
    return write_parts(path, payload, buffers)


def dump_many(jobs: Sequence[tuple[str | os.PathLike[str], Any]]) -> list[int | Exception | None]:
    """:func:`dump` each ``(path, obj)`` in turn, one result per job: the file's size, or
    the error (:class:`~aiodagger.errors.SerializationError` for an object that cannot be
    pickled). The first ``OSError`` stops the run, so that a full disk is not written
    to again; the jobs after it get None.
    """
    results: list[int | Exception | None] = []
    for path, obj in jobs:
        try:
            payload, buffers = serialize.dumps(obj)
        except Exception as exc:
            err = SerializationError(f"cannot pickle a {type(obj).__name__} to spill it: {exc!r}")
            err.__cause__ = exc
            results.append(err)
            continue
        try:
            results.append(write_parts(path, payload, buffers))
        except OSError as exc:
            results.append(exc)
            break
    results.extend([None] * (len(jobs) - len(results)))
    return results


def read_parts(path: str | os.PathLike[str]) -> tuple[memoryview, list[memoryview]]:
    """The pickle and the buffers stored in ``path``, checked against the header.

    Raises :class:`SpillCorruptedError` on a truncated or damaged file, and the
    ``OSError`` itself when the file cannot be opened or read.
    """
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC | _O_BINARY)
    try:
        size = os.fstat(fd).st_size
        flags, offsets, lengths, sums = read_layout(fd, size, os.fspath(path))
        import numpy as np  # here, not at import: a worker's start-up is measured (W0)

        parts = [np.empty(n, dtype=np.uint8).data for n in lengths]
        views: list[memoryview] = []
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        for part, offset in zip(parts, offsets, strict=True):
            if offset > pos:
                views.append(memoryview(bytearray(offset - pos)))  # the alignment's padding
            views.append(part)
            pos = offset + part.nbytes
        _read_all(fd, views, os.fspath(path))
    finally:
        os.close(fd)
    check_parts(parts, sums, flags, os.fspath(path))
    return parts[0], parts[1:]


def check_parts(parts: Sequence[memoryview], sums: Sequence[int], flags: int, path: str) -> None:
    """Raise SpillCorruptedError unless each part matches its checksum (or the file is
    ``UNCHECKED``)."""
    if flags & UNCHECKED:
        return
    for i, (part, expected) in enumerate(zip(parts, sums, strict=True)):
        if checksum(part) != expected:
            what = "the pickle" if i == 0 else f"buffer {i - 1}"
            raise SpillCorruptedError(f"spill file {path!r}: checksum mismatch in {what}", path)


def load(path: str | os.PathLike[str]) -> Any:
    """The object stored in ``path``."""
    payload, buffers = read_parts(path)
    return serialize.loads(payload, buffers)


async def write(path: str | os.PathLike[str], obj: Any, executor: Executor | None = None) -> int:
    """:func:`dump` in ``executor`` (the loop's default one if None)."""
    return await asyncio.get_running_loop().run_in_executor(executor, dump, path, obj)


async def read(path: str | os.PathLike[str], executor: Executor | None = None) -> Any:
    """:func:`load` in ``executor`` (the loop's default one if None)."""
    return await asyncio.get_running_loop().run_in_executor(executor, load, path)


async def read_raw(path: str | os.PathLike[str],
                   executor: Executor | None = None) -> tuple[memoryview, list[memoryview]]:
    """:func:`read_parts` in ``executor``: the parts, checked, for sending on as they are."""
    return await asyncio.get_running_loop().run_in_executor(executor, read_parts, path)


def read_layout(fd: int, size: int, path: str, *,
                trailing: bool = False) -> tuple[int, list[int], list[int], list[int]]:
    """flags, and each part's offset, length and checksum, from the header of the file
    open at ``fd`` (``size`` bytes), read from its start; the file is left just after
    the header. ``trailing``: the file may be longer than its parts (a shared segment
    used again for a smaller value), else that is an error."""
    os.lseek(fd, 0, os.SEEK_SET)
    def corrupted(why: str) -> SpillCorruptedError:
        return SpillCorruptedError(f"spill file {path!r}: {why}", path)

    if size < _PREFIX.size:
        raise corrupted(f"{size} bytes, shorter than a header: truncated")
    prefix = _read_exact(fd, _PREFIX.size, path)
    magic, version, flags, nparts = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise corrupted(f"starts with {magic!r}, not {MAGIC!r}: not a spill file or damaged")
    if version != VERSION:
        raise corrupted(f"format version {version}; this aiodagger reads version {VERSION}")
    head_size = _PREFIX.size + nparts * _PART.size + _CHECKSUM.size
    if head_size > size:  # checked before reading, so a damaged nparts allocates nothing
        raise corrupted(f"{size} bytes, shorter than its header says ({head_size}): truncated")
    rest = _read_exact(fd, head_size - _PREFIX.size, path)
    table, (expected,) = rest[:-_CHECKSUM.size], _CHECKSUM.unpack(rest[-_CHECKSUM.size:])
    if checksum(prefix + table) != expected:
        raise corrupted("header checksum mismatch")
    if flags & ~(ALIGNED | UNCHECKED):
        raise corrupted(f"unknown flags {flags:#x}")
    entries = list(_PART.iter_unpack(table))
    lengths = [n for n, _ in entries]
    offsets, expected = _offsets(head_size, lengths, flags)
    if size < expected or (size > expected and not trailing):
        state = "truncated" if size < expected else "trailing bytes"
        raise corrupted(f"{size} bytes where the header announces {expected}: {state}")
    return flags, offsets, lengths, [s for _, s in entries]


def _write_all(fd: int, parts: Sequence[Buffer]) -> int:
    """writev every part, resuming after short writes (Linux caps one call near 2 GiB)."""
    views = [v for v in (memoryview(p).cast("B") for p in parts) if v.nbytes]
    total = sum(v.nbytes for v in views)
    i = 0
    while i < len(views):
        n = os.writev(fd, views[i:i + _IOV_MAX])
        if n <= 0:
            raise OSError(f"writev wrote {n} bytes")
        i = _advance(views, i, n)
    return total


def _advance(views: list[memoryview], i: int, n: int) -> int:
    """Consume ``n`` bytes of ``views`` from index ``i``; return the next unfinished index."""
    while n:
        v = views[i]
        if n >= v.nbytes:
            n -= v.nbytes
            i += 1
        else:
            views[i] = v[n:]
            n = 0
    return i


def _read_all(fd: int, parts: Sequence[memoryview], path: str) -> None:
    views = [p for p in parts if p.nbytes]
    i = 0
    while i < len(views):
        n = os.readv(fd, views[i:i + _IOV_MAX])
        if n == 0:
            raise SpillCorruptedError(f"spill file {path!r}: ended early: truncated", path)
        i = _advance(views, i, n)


def _read_exact(fd: int, n: int, path: str) -> bytes:
    data = os.read(fd, n)
    while len(data) < n:
        more = os.read(fd, n - len(data))
        if not more:
            raise SpillCorruptedError(f"spill file {path!r}: ended early: truncated", path)
        data += more
    return data


def discard(path: str | os.PathLike[str]) -> None:
    """Remove ``path`` if it can be removed; a spill file already gone is no error."""
    try:
        os.unlink(path)
    except OSError:
        pass

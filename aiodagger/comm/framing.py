"""Frames on a byte stream: a msgpack header plus zero or more raw buffers.

On the wire, one frame is::

    prefix   "!2sHI": magic b"AG", number of buffers, header length      (8 bytes)
    lengths  "!Q" per buffer                                              (8 bytes each)
    header   msgpack, header length bytes
    buffers  raw bytes, back to back

Reading uses ``asyncio.BufferedProtocol``: small parts are parsed out of one staging
buffer (many small frames per ``recv``), and a large buffer is allocated once at its
full size and the socket reads straight into it, never by concatenating ``bytes``.
Writing hands the prefix, the header and each buffer to the transport without joining
them; a large buffer goes out in slices, waiting for the transport to drain between
slices, so at most one slice is ever copied into the transport's own buffer.

Anything malformed (bad magic, absurd lengths, a header that is not msgpack or not a
map) raises ``ProtocolError``: the connection is closed, the rest of the cluster runs on.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import logging
import struct
import sys
from collections.abc import Sequence
from typing import Any

import msgpack

from ..errors import FrameTooLargeError, ProtocolError

__all__ = ["DEFAULT_MAX_FRAME", "MIN_MAX_FRAME", "Comm", "FrameParser", "check_max_frame", "encode_frame"]

logger = logging.getLogger(__name__)

MAGIC = b"AG"
PREFIX = struct.Struct("!2sHI")
LENGTH = struct.Struct("!Q")
DEFAULT_MAX_FRAME = 4 << 30  # 4 GiB of buffers in one frame
# Below this, ordinary traffic would not fit: a completion carries results of up to
# 64 KiB inline, and a batch of small tasks' arguments takes a few hundred KiB.
MIN_MAX_FRAME = 1 << 20
MAX_HEADER = 64 << 20
HANDSHAKE_MAX_HEADER = 4096
MAX_BUFFERS = 4096
STAGING_SIZE = 256 << 10
# Until the peer has authenticated: enough for any handshake frame (it grows once, to
# 8 KiB, for the largest header allowed). 2,000 idle connections cost 525 MiB here when
# each started with the full staging area (zeroed, so resident at once).
HANDSHAKE_STAGING_SIZE = 4 << 10
HANDSHAKE_MAX_FRAMES = 4
# Buffers at least this large are read in place into their own allocation.
DIRECT_READ = 64 << 10
WRITE_SLICE = 1 << 20
COALESCE_BELOW = 64 << 10

Frame = tuple[dict[str, Any], list[Any]]  # buffers: bytearray or numpy uint8 arrays


def check_max_frame(value: Any, option: str = "Cluster(max_frame=...)") -> int:
    """``value`` as a frame limit in bytes, or a ValueError that says what to write."""
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_MAX_FRAME:
        raise ValueError(
            f"{option} takes the largest frame a connection carries, an int of bytes of at least "
            f"{MIN_MAX_FRAME} (1 MiB), e.g. {256 << 20} for 256 MiB; got {value!r}")
    return value


def _frame_bytes(parts: list[Any]) -> int:
    """Bytes of buffers in a frame that encode_frame made (the prefix and header excluded)."""
    return sum(view.nbytes for view in parts[2:])


def encode_frame(header: dict[str, Any], buffers: Sequence[Any] = ()) -> list[Any]:
    """The parts of one frame, in order, ready for ``writelines`` (buffers are not copied)."""
    head = msgpack.packb(header, use_bin_type=True)
    views = [_bytes_view(b) for b in buffers]
    lengths = [v.nbytes for v in views]
    prefix = PREFIX.pack(MAGIC, len(views), len(head))
    if lengths:
        prefix += struct.pack(f"!{len(lengths)}Q", *lengths)
    return [prefix, head, *views]


def _bytes_view(buf: Any) -> memoryview:
    """A flat view of ``buf`` in bytes. A view of float64 items would be measured and
    sliced in items: asyncio resumes a partial write at ``view[sent:]``, which then
    skips 8 bytes for each one sent, and the peer waits forever for the rest."""
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class FrameParser:
    """Incremental frame decoder, independent of any transport (the fuzz tests drive it).

    ``get_buffer()`` says where the next bytes should be written; ``advance(n)`` says how
    many were; complete frames pile up in ``frames``.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, max_header: int = MAX_HEADER,
                 max_buffers: int = MAX_BUFFERS, staging_size: int = STAGING_SIZE) -> None:
        self.max_frame = max_frame
        self.max_header = max_header
        self.max_buffers = max_buffers
        self.frames: collections.deque[Frame] = collections.deque()
        self.bytes_received = 0
        self._staging = bytearray(staging_size)
        self._view = memoryview(self._staging)
        self._start = 0
        self._end = 0
        # frame in progress
        self._nbuf = -1
        self._hlen = 0
        self._lengths: list[int] | None = None
        self._header: dict[str, Any] | None = None
        self._buffers: list[Any] = []
        # direct read target
        self._target: memoryview | None = None
        self._filled = 0

    def get_buffer(self) -> memoryview:
        if self._target is not None:
            return self._target[self._filled:]
        if self._end == len(self._staging):
            self._compact()
            if self._end == len(self._staging):
                self._grow()  # one part (a big header) is larger than the staging area
        return self._view[self._end:]

    def advance(self, nbytes: int) -> None:
        self.bytes_received += nbytes
        if self._target is not None:
            self._filled += nbytes
            if self._filled < len(self._target):
                return
            self._target = None
        else:
            self._end += nbytes
        self._parse()

    def _compact(self) -> None:
        """Move unparsed bytes to the front (no resize: a reader may hold a view)."""
        pending = self._end - self._start
        if self._start:
            self._staging[:pending] = self._staging[self._start:self._end]
            self._start, self._end = 0, pending

    def _grow(self, size: int = 0) -> None:
        """Double the staging area (or make it ``size``); only from get_buffer() or
        between reads, when no view is out."""
        self._view.release()
        self._staging.extend(bytes(max(size, 2 * len(self._staging)) - len(self._staging)))
        self._view = memoryview(self._staging)

    def reserve(self, size: int) -> None:
        """Make the staging area at least ``size`` bytes (parsed state is kept)."""
        if len(self._staging) < size:
            self._grow(size)

    def _available(self) -> int:
        return self._end - self._start

    def _take(self, n: int) -> memoryview:
        part = self._view[self._start:self._start + n]
        self._start += n
        return part

    def _parse(self) -> None:
        while True:
            if self._nbuf < 0:
                if self._available() < PREFIX.size:
                    return
                magic, nbuf, hlen = PREFIX.unpack(self._take(PREFIX.size))
                if magic != MAGIC:
                    raise ProtocolError(f"bad frame magic {bytes(magic)!r}: not an aiodagger peer")
                if nbuf > self.max_buffers:
                    raise ProtocolError(f"frame announces {nbuf} buffers, more than {self.max_buffers}")
                if hlen > self.max_header:
                    raise ProtocolError(f"frame header of {hlen} bytes exceeds the {self.max_header}-byte limit")
                self._nbuf, self._hlen = nbuf, hlen
            if self._lengths is None:
                need = self._nbuf * LENGTH.size
                if self._available() < need:
                    return
                lengths = list(struct.unpack(f"!{self._nbuf}Q", self._take(need))) if need else []
                if sum(lengths) > self.max_frame:
                    raise ProtocolError(
                        f"frame of {sum(lengths)} bytes exceeds the {self.max_frame}-byte limit "
                        "(max_frame)")
                self._lengths = lengths
            if self._header is None:
                if self._available() < self._hlen:
                    if self._hlen > len(self._staging) - self._start:
                        self._compact()
                    return
                self._header = _decode_header(self._take(self._hlen))
            while len(self._buffers) < self._nbuf:
                size = self._lengths[len(self._buffers)]
                buf = _allocate(size)
                have = min(size, self._available())
                if have:
                    buf[:have] = self._take(have)
                self._buffers.append(buf)
                if have < size:
                    if size - have >= DIRECT_READ:
                        self._target = memoryview(buf)
                        self._filled = have
                        return
                    # a small remainder: gather it through staging like the rest
                    self._buffers.pop()
                    self._start -= have
                    if size > len(self._staging) - self._start:
                        self._compact()
                    return
            self.frames.append((self._header, self._buffers))
            self._nbuf, self._lengths, self._header, self._buffers = -1, None, None, []
            if self._start == self._end:
                self._start = self._end = 0


def _allocate(size: int) -> Any:
    """A writable buffer of ``size`` bytes for the socket to read into.

    Large ones are uninitialised numpy memory: ``bytearray(n)`` zero-fills every page
    first, which took 189 ms of a 344 ms 256 MiB transfer here (W5), while numpy's
    allocation is lazy and may use huge pages. In a process that keeps warm buffers
    (:func:`keep_warm_buffers`), one whose last value is gone is used again.
    """
    if size < DIRECT_READ:
        return bytearray(size)
    if _warm is not None and size >= WARM_MIN:
        return _warm.take(size)
    import numpy  # imported by the first big buffer, not at start-up

    return numpy.empty(size, dtype=numpy.uint8)


# Receive buffers of this size or more may be kept warm.
WARM_MIN = 1 << 20


class WarmBuffers:
    """Large receive buffers, used again once the values read into them are gone.

    A large frame part is read into memory of its own, which becomes the value's (a
    numpy array unpickled from it is a view of it). Fresh memory costs page faults: on
    the development machine, faulting 256 MiB in took 0.55 s when the kernel had no huge
    pages ready, against 0.09 s for a whole W5 (the copy through a loopback socket and
    the sum, ``tcp-socket`` at 2.92 GB/s), so W5 over TCP swung between 0.4 and 3.2 GB/s
    from one repeat to the next. This keeps every
    large buffer it handed out; one that nothing else refers to any more (its values
    were released) serves the next part of a size it fits without wasting a quarter of
    it. Idle buffers are bounded by ``idle_limit`` bytes (the oldest go first) and are
    all dropped by :meth:`drop_idle` (a worker's store does so under memory pressure).
    """

    def __init__(self, idle_limit: int) -> None:
        self.idle_limit = idle_limit
        self._buffers: list[Any] = []  # oldest first

    def _idle(self) -> list[tuple[int, Any]]:
        # Referred to by the list and by getrefcount's argument only: nobody else's.
        bufs = self._buffers
        idle = [i for i in range(len(bufs)) if sys.getrefcount(bufs[i]) <= 2]
        return [(i, bufs[i]) for i in idle]

    def take(self, size: int) -> Any:
        best = None
        idle = self._idle()
        for i, buf in idle:
            if size <= buf.nbytes <= size + size // 4 and (best is None or buf.nbytes < best[1].nbytes):
                best = (i, buf)
        del idle
        if best is not None:
            buf = best[1]
            del best
            return buf[:size]
        import numpy

        buf = numpy.empty(size, dtype=numpy.uint8)
        self._buffers.append(buf)
        self._bound()
        return buf[:size]

    def _bound(self) -> None:
        idle = self._idle()
        excess = sum(b.nbytes for _, b in idle) - self.idle_limit
        drop = set()
        for i, buf in idle:  # oldest first
            if excess <= 0:
                break
            drop.add(i)
            excess -= buf.nbytes
        del idle
        if drop:
            self._buffers = [b for i, b in enumerate(self._buffers) if i not in drop]

    def drop_idle(self) -> int:
        """Let go of every idle buffer; return the bytes let go."""
        idle = self._idle()
        freed = sum(b.nbytes for _, b in idle)
        keep = {i for i, _ in idle}
        del idle
        self._buffers = [b for i, b in enumerate(self._buffers) if i not in keep]
        return freed

    @property
    def idle_bytes(self) -> int:
        return sum(b.nbytes for _, b in self._idle())


_warm: WarmBuffers | None = None


def keep_warm_buffers(idle_limit: int) -> WarmBuffers:
    """Keep large receive buffers warm in this process (a worker's): see WarmBuffers."""
    global _warm
    _warm = WarmBuffers(idle_limit)
    return _warm


def drop_warm_buffers() -> int:
    """Let go of the idle warm buffers, if any are kept; the bytes let go."""
    return _warm.drop_idle() if _warm is not None else 0


def _decode_header(raw: memoryview) -> dict[str, Any]:
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"frame header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise ProtocolError(f"frame header must be a map with a string 'op', got {type(header).__name__}")
    return header


class _FrameProtocol(asyncio.BufferedProtocol):
    def __init__(self, comm: Comm) -> None:
        self._comm = comm

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._comm._connection_made(transport)  # type: ignore[arg-type]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._comm.parser.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        comm = self._comm
        try:
            comm.parser.advance(nbytes)
        except ProtocolError as exc:
            comm._abort(exc)
            return
        frames = comm.parser.frames
        if frames:
            if len(frames) > HANDSHAKE_MAX_FRAMES and not comm.is_authenticated:
                # A handshake has at most two frames in flight; more would pile up unread.
                comm._abort(ProtocolError(f"{len(frames)} frames sent during the handshake"))
                frames.clear()
                return
            comm._wake_reader()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._comm._connection_lost(exc)

    def pause_writing(self) -> None:
        self._comm._writable.clear()

    def resume_writing(self) -> None:
        self._comm._writable.set()


class Comm:
    """One connection carrying frames both ways.

    It starts with the handshake's limits (a small header, no buffers) from the very
    first byte, on both sides: bytes can arrive with the connection itself, and a peer
    that never authenticates must not make us allocate a frame's worth of memory.
    :meth:`authenticated` lifts them once the handshake has succeeded.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, name: str = "") -> None:
        self.max_frame = max_frame
        # What the peer takes, as it said in the handshake (until then: as much as we do).
        self.peer_max_frame = max_frame
        self.parser = FrameParser(0, HANDSHAKE_MAX_HEADER, 0, HANDSHAKE_STAGING_SIZE)
        self.name = name
        self.is_authenticated = False
        self.transport: asyncio.Transport | None = None
        self.peer: str = "?"
        self.bytes_sent = 0
        self._closed = False
        self._error: BaseException | None = None
        self._reader: asyncio.Future[None] | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._send_lock = asyncio.Lock()
        # True while send() is between the slices of a big frame: a small frame written
        # then would land inside it. Such frames wait in the backlog, in order.
        self._midframe = False
        self._backlog: collections.deque[list[Any]] = collections.deque()
        self._drainer: asyncio.Task[None] | None = None
        self.closed_event = asyncio.Event()

    def authenticated(self) -> None:
        """The peer proved it knows the token: accept frames up to the full limits."""
        parser = self.parser
        parser.max_frame, parser.max_header, parser.max_buffers = self.max_frame, MAX_HEADER, MAX_BUFFERS
        parser.reserve(STAGING_SIZE)
        self.is_authenticated = True

    @property
    def limit(self) -> int:
        """The largest frame (bytes of buffers) this connection carries either way: the
        smaller of the two ends' ``max_frame``."""
        return min(self.max_frame, self.peer_max_frame)

    def _encode(self, header: dict[str, Any], buffers: Sequence[Any]) -> list[Any]:
        parts = encode_frame(header, buffers)
        if len(parts) > 2 and (size := _frame_bytes(parts)) > self.limit:
            # Refused here, whole: the peer would close the connection at its first bytes,
            # taking every other message on it along.
            raise FrameTooLargeError.of(f"a {header.get('op')!r} frame to {self.peer}", size, self.limit)
        return parts

    def protocol(self) -> asyncio.BufferedProtocol:
        return _FrameProtocol(self)

    # -- transport callbacks -------------------------------------------------------------
    def _connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        if transport.get_extra_info("sslcontext") is None:
            # Pause as soon as anything is left in the transport's own buffer: a big
            # frame's next slice then waits for the socket instead of being copied there
            # (W5). TLS transports buffer encrypted data on their own: usual limits there.
            transport.set_write_buffer_limits(high=0)
        else:
            transport.set_write_buffer_limits(high=16 << 20, low=4 << 20)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    def _connection_lost(self, exc: BaseException | None) -> None:
        self._closed = True
        if self._error is None:
            self._error = exc or ConnectionResetError(f"connection to {self.peer} closed")
        self._writable.set()
        self._wake_reader()
        self.closed_event.set()

    def _abort(self, exc: ProtocolError) -> None:
        # Before authentication the error goes to whoever runs the handshake (a listener
        # reports it, rate-limited): a flood of garbage must not log a line per connection.
        logger.log(logging.WARNING if self.is_authenticated else logging.DEBUG,
                   "closing connection from %s: %s", self.peer, exc)
        self._error = exc
        self.abort()

    def _wake_reader(self) -> None:
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_result(None)

    # -- API -----------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    async def recv(self) -> Frame:
        """The next frame; raises ``ProtocolError`` or ``ConnectionError`` once the connection is gone."""
        frames = self.parser.frames
        while not frames:
            if self._closed:
                raise self._fresh_error()
            self._reader = asyncio.get_running_loop().create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        return frames.popleft()

    def _fresh_error(self) -> BaseException:
        """Why the connection is gone, as a new exception each time it is raised: the
        stored one would keep the traceback of its first raise, whose frames hold this
        Comm, a cycle only the cyclic GC frees (2,000 connections dropped during their
        handshakes still held 20 MiB here until it ran)."""
        assert self._error is not None
        return copy.copy(self._error)

    def closed_error(self) -> Exception:
        """Why sending is impossible: the peer's bad frame if that is what closed it."""
        if isinstance(self._error, ProtocolError):
            return copy.copy(self._error)
        return ConnectionResetError(f"connection to {self.peer} is closed")

    def send_nowait(self, header: dict[str, Any], buffers: Sequence[Any] = ()) -> None:
        """Queue a small frame without waiting for the transport to drain.

        Written at once, unless a big frame is being sent in slices: then after it, in
        the order of the calls.
        """
        if self._closed or self.transport is None:
            raise ConnectionResetError(f"connection to {self.peer} is closed")
        parts = self._encode(header, buffers)
        self.bytes_sent += sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
        if self._midframe or self._backlog:
            self._backlog.append(parts)
            if self._drainer is None:
                self._drainer = asyncio.get_running_loop().create_task(self._drain_backlog())
            return
        self.transport.writelines(parts)

    async def _drain_backlog(self) -> None:
        try:
            async with self._send_lock:  # the frame being sliced holds it until it is whole
                while self._backlog and not self._closed and self.transport is not None:
                    self.transport.writelines(self._backlog.popleft())
        finally:
            self._backlog.clear()
            self._drainer = None

    async def send(self, header: dict[str, Any], buffers: Sequence[Any] = ()) -> None:
        """Send one frame; large buffers go out in slices as the transport drains."""
        async with self._send_lock:
            if self._closed or self.transport is None:
                raise ConnectionResetError(f"connection to {self.peer} is closed")
            parts = self._encode(header, buffers)
            self._midframe = True
            try:
                await self._write_parts(parts, self.transport)
            finally:
                self._midframe = False
            await self._writable.wait()
            if self._closed:
                raise ConnectionResetError(f"connection to {self.peer} closed while sending")

    async def _write_parts(self, parts: list[Any], transport: asyncio.Transport) -> None:
        # Small parts go out together (one syscall for a batch of a thousand tasks,
        # where a write() each cost a send() each); big ones alone and unjoined.
        small: list[Any] = []
        for part in parts:
            size = len(part) if isinstance(part, bytes) else part.nbytes
            self.bytes_sent += size
            if size < COALESCE_BELOW:
                small.append(part)
                continue
            if small:
                transport.writelines(small)
                small = []
            if size <= WRITE_SLICE:
                transport.write(part)
                continue
            view = part if isinstance(part, memoryview) else memoryview(part)
            for offset in range(0, size, WRITE_SLICE):
                await self._writable.wait()
                if self._closed:
                    raise ConnectionResetError(f"connection to {self.peer} closed while sending")
                transport.write(view[offset:offset + WRITE_SLICE])
        if small:
            transport.writelines(small)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self._closed = True
        if self._error is None:
            self._error = ConnectionResetError(f"connection to {self.peer} closed")
        self._wake_reader()

    def abort(self) -> None:
        """Close at once, dropping what is not yet sent: for a peer taken for dead.

        ``close()`` waits for the transport to flush first, and a peer that reads
        nothing (a half-open link) keeps the socket, and the frames stuck for it, for as
        long as TCP keeps the link open: minutes.
        """
        self._closed = True
        if self._error is None:
            self._error = ConnectionResetError(f"connection to {self.peer} aborted")
        if self.transport is not None:
            self.transport.abort()
        self._writable.set()  # a send waiting for room sees the end now
        self._wake_reader()

    async def wait_closed(self) -> None:
        if self.transport is not None:
            await self.closed_event.wait()


async def open_comm(host: str, port: int, *, ssl: Any = None, max_frame: int = DEFAULT_MAX_FRAME,
                    timeout: float = 10.0, server_hostname: str | None = None) -> Comm:
    """Connect to ``host:port`` and return the Comm (before any handshake)."""
    loop = asyncio.get_running_loop()
    comm = Comm(max_frame)
    kwargs: dict[str, Any] = {}
    if ssl is not None:
        kwargs["ssl"] = ssl
        kwargs["server_hostname"] = server_hostname or host
    await asyncio.wait_for(loop.create_connection(comm.protocol, host, port, **kwargs), timeout)
    return comm

"""Listening for authenticated connections, and parsing and checking tcp:// addresses.

A listener faces the network before anyone has proved anything, so what an
unauthenticated peer can hold is bounded. At most ``max_pending`` handshakes run at once:
a newcomer past that drops one, the oldest of those that have not even sent their hello
(a client sends it at once, so slow connections piling up cannot keep it out), else the
oldest. At most ``max_pending_per_host`` come from one remote host: more are closed at
once, before anything is allocated for them. Each has a few KiB of buffer and
``HANDSHAKE_TIMEOUT`` to finish (and as long again for TLS, before it counts). What goes
wrong before authentication is logged at most once per ``LOG_INTERVAL``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import AuthenticationError, ProtocolError
from .framing import DEFAULT_MAX_FRAME, Comm
from .handshake import HANDSHAKE_TIMEOUT, ServerKey, server_handshake
from .tokens import weak_token_message

__all__ = ["Listener", "check_listen", "is_loopback", "parse_address"]

logger = logging.getLogger(__name__)

Handler = Callable[[Comm, dict[str, Any]], Awaitable[None]]

MAX_PENDING = 128
MAX_PENDING_PER_HOST = 8
LOG_INTERVAL = 10.0


def parse_address(address: str) -> tuple[str, int]:
    """``tcp://host:port`` (or ``host:port``) -> (host, port)."""
    rest = address[len("tcp://"):] if address.startswith("tcp://") else address
    if "://" in rest:
        raise ValueError(f"unsupported address {address!r}: only tcp://HOST:PORT is supported")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} needs a port: tcp://HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def check_listen(listen: str, token: str | None) -> None:
    """Refuse to accept workers from the network without a strong token (ValueError)."""
    host, _ = parse_address(listen)
    if is_loopback(host):
        return
    if not token:
        raise ValueError(
            f"Cluster(listen={listen!r}) accepts workers from the network, so it needs "
            "token=... (a shared secret workers prove they know); pass one, or listen on "
            "127.0.0.1")
    weak = weak_token_message(token, f"Cluster(listen={listen!r})")
    if weak is not None:
        raise ValueError(f"{weak} (or listen on 127.0.0.1)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback
                       for info in socket.getaddrinfo(host, None))
        except OSError:
            return False


def _host_key(peername: Any) -> str:
    """Who counts as one remote host: an IPv4 address, or an IPv6 /64 (one machine's
    share of addresses is usually a whole /64)."""
    if isinstance(peername, tuple) and len(peername) == 2:
        return str(peername[0])  # IPv4, as the kernel wrote it: no parsing on the accept path
    host = peername[0] if isinstance(peername, tuple) else str(peername)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{host}/64", strict=False))
    return str(address)


class RateLimitedLog:
    """Logs at most one line per ``interval``; the next line says how many were left out."""

    def __init__(self, log: logging.Logger, interval: float = LOG_INTERVAL) -> None:
        self._log = log
        self._interval = interval
        self._last = -interval
        self._left_out = 0

    def warning(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last < self._interval:
            self._left_out += 1
            return
        if self._left_out:
            msg += " (%d more like it in the last %.0f s not logged)"
            args = (*args, self._left_out, now - self._last)
        self._last, self._left_out = now, 0
        self._log.warning(msg, *args)


class _AcceptErrorFilter(logging.Filter):
    """Out of file descriptors, asyncio's loop logs "socket.accept() out of system
    resource" with a traceback for each failed accept: up to 100 a listening socket a
    second (1,548 records in 3.5 s here). While a listener is open, this lets one line
    through per LOG_INTERVAL, without the traceback, counting those left out. A filter on
    the "asyncio" logger, so that a loop exception handler the user set stays theirs."""

    MESSAGE = "socket.accept() out of system resource"

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._users = 0
        self._last = -LOG_INTERVAL
        self._left_out = 0

    def acquire(self) -> None:
        with self._lock:
            self._users += 1
            if self._users == 1:
                logging.getLogger("asyncio").addFilter(self)

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                logging.getLogger("asyncio").removeFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str) or not record.msg.startswith(self.MESSAGE):
            return True
        with self._lock:
            now = time.monotonic()
            if now - self._last < LOG_INTERVAL:
                self._left_out += 1
                return False
            left_out, self._last, self._left_out = self._left_out, now, 0
        error = record.exc_info[1] if record.exc_info else None
        record.msg = "%s: %s; %d more in the last %.0f s not logged"
        record.args = (self.MESSAGE, error, left_out, LOG_INTERVAL)
        record.exc_info = record.exc_text = None
        return True


_accept_errors = _AcceptErrorFilter()


@dataclasses.dataclass(slots=True, eq=False)
class _Handshake:
    host: str
    transport: asyncio.Transport
    greeted: bool = False
    dropped: bool = False


class _Pending(asyncio.Protocol):
    """A new connection's protocol until the listener has let it in (Listener._admit):
    one that is refused has nothing allocated for it."""

    def __init__(self, listener: Listener) -> None:
        self._listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._listener._admit(transport)  # type: ignore[arg-type]


class Listener:
    """Accepts connections, runs the handshake, then hands each Comm to ``handler``.

    A connection that fails the handshake or sends garbage is closed (and logged, at
    most once per LOG_INTERVAL); the listener and every other connection go on.
    """

    def __init__(self, handler: Handler, token: str | ServerKey, *, ssl: Any = None,
                 max_frame: int = DEFAULT_MAX_FRAME, welcome: dict[str, Any] | None = None,
                 max_pending: int = MAX_PENDING, max_pending_per_host: int = MAX_PENDING_PER_HOST,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self._handler = handler
        self.key = token if isinstance(token, ServerKey) else ServerKey(token)
        self._ssl = ssl
        self._max_frame = max_frame
        self._welcome = welcome or {}
        self.max_pending = max_pending
        self.max_pending_per_host = max_pending_per_host
        self.handshake_timeout = handshake_timeout
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: dict[_Handshake, None] = {}  # an ordered set: oldest first
        self._pending_per_host: collections.Counter[str] = collections.Counter()
        self._log = RateLimitedLog(logger)
        self.comms: set[Comm] = set()
        self.host = ""
        self.port = 0
        self.accepted = 0
        self.rejected = 0  # failed or timed out in the handshake
        self.refused = 0  # closed at once: too many handshakes from their host
        self.dropped = 0  # handshakes cut short for newer connections

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def pending(self) -> int:
        """Connections that have not finished the handshake."""
        return len(self._pending)

    def pending_from(self, host: str) -> int:
        """Handshakes under way from ``host`` (an IPv6 address counts with its /64)."""
        return self._pending_per_host[_host_key((host,))]

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        # A TLS handshake is under way before _admit counts the connection: bounded in
        # time like ours (asyncio's default gives it 60 s).
        tls = {"ssl": self._ssl, "ssl_handshake_timeout": self.handshake_timeout} if self._ssl else {}
        self._server = await loop.create_server(lambda: _Pending(self), host, port, **tls)
        _accept_errors.acquire()
        sockname = self._server.sockets[0].getsockname()
        self.host, self.port = host, sockname[1]

    def _admit(self, transport: asyncio.Transport) -> None:
        """A new connection (past TLS, if any): refuse it, or give it a Comm and a handshake."""
        self.accepted += 1
        peername = transport.get_extra_info("peername")
        host = _host_key(peername)
        # Every local process shares the loopback address, the cluster's own workers
        # first among them (16 starting at once, or fetching from one peer): there, the
        # host is the whole machine, and the global cap is its cap.
        if (self._pending_per_host[host] >= self.max_pending_per_host
                and not (isinstance(peername, tuple) and is_loopback(peername[0]))):
            self.refused += 1
            self._log.warning("refused a connection from %s: %d handshakes from there under way",
                              host, self._pending_per_host[host])
            transport.abort()
            return
        if len(self._pending) >= self.max_pending:
            self._drop_one()
        # Switched now, inside connection_made: bytes that came with the connection are
        # read (uvloop reads them in the same iteration) into the Comm's small pre-auth buffer.
        comm = Comm(self._max_frame)
        protocol = comm.protocol()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        handshake = _Handshake(host, transport)
        task = asyncio.get_running_loop().create_task(self._serve(comm, handshake))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._pending[handshake] = None
        self._pending_per_host[host] += 1

    def _drop_one(self) -> None:
        """Make room: cut the oldest handshake whose hello has not arrived (a client
        sends it at once; one that trickles in bytes is who fills the room), else the
        oldest of all."""
        victim = next((h for h in self._pending if not h.greeted), None)
        if victim is None:
            victim = next(iter(self._pending))
        self.dropped += 1
        self._log.warning("dropped a handshake from %s for a new connection: %d under way",
                          victim.host, len(self._pending))
        # Its handshake then fails like any cut connection; cancelling its task instead
        # would leave a cycle (the task, its CancelledError, the frames that hold the task).
        victim.dropped = True
        victim.transport.abort()
        self._release(victim)

    def _release(self, handshake: _Handshake) -> None:
        """Its handshake is over (or dropped): its room is free. Idempotent."""
        if handshake in self._pending:
            del self._pending[handshake]
            self._pending_per_host[handshake.host] -= 1
            if not self._pending_per_host[handshake.host]:
                del self._pending_per_host[handshake.host]

    async def _serve(self, comm: Comm, handshake: _Handshake) -> None:
        try:
            info = await server_handshake(comm, self.key, self._welcome, timeout=self.handshake_timeout,
                                          on_hello=functools.partial(setattr, handshake, "greeted", True))
        except (AuthenticationError, ProtocolError, OSError) as exc:  # OSError: timeouts, resets
            if not handshake.dropped:
                self.rejected += 1
                reason = (f"no handshake within {self.handshake_timeout:g} s" if isinstance(exc, TimeoutError)
                          else str(exc) or type(exc).__name__)
                self._log.warning("rejected connection from %s: %s", comm.peer, reason)
            return
        finally:
            self._release(handshake)
            if not comm.is_authenticated:
                comm.close()
        self.comms.add(comm)
        try:
            await self._handler(comm, info)
        except (ProtocolError, ConnectionError) as exc:
            logger.info("connection from %s ended: %s", comm.peer, exc)
        except Exception:
            logger.exception("error serving %s", comm.peer)
        finally:
            self.comms.discard(comm)
            comm.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            _accept_errors.release()
        for comm in list(self.comms):
            comm.close()
        for handshake in self._pending:
            handshake.transport.abort()  # a task cancelled before it ran cannot close its own
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

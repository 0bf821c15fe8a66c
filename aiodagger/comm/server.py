"""Listening for authenticated connections, and parsing and checking tcp:// addresses."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import AuthenticationError, ProtocolError
from .framing import DEFAULT_MAX_FRAME, Comm
from .handshake import ServerKey, server_handshake
from .tokens import weak_token_message

__all__ = ["Listener", "check_listen", "is_loopback", "parse_address"]

logger = logging.getLogger(__name__)

Handler = Callable[[Comm, dict[str, Any]], Awaitable[None]]


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


class Listener:
    """Accepts connections, runs the handshake, then hands each Comm to ``handler``.

    A connection that fails the handshake or sends garbage is logged and closed; the
    listener and every other connection go on.
    """

    def __init__(self, handler: Handler, token: str | ServerKey, *, ssl: Any = None,
                 max_frame: int = DEFAULT_MAX_FRAME, welcome: dict[str, Any] | None = None) -> None:
        self._handler = handler
        self.key = token if isinstance(token, ServerKey) else ServerKey(token)
        self._ssl = ssl
        self._max_frame = max_frame
        self._welcome = welcome or {}
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.comms: set[Comm] = set()
        self.host = ""
        self.port = 0
        self.rejected = 0

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_protocol, host, port, ssl=self._ssl)
        sockname = self._server.sockets[0].getsockname()
        self.host, self.port = host, sockname[1]

    def _new_protocol(self) -> asyncio.BufferedProtocol:
        # A Comm starts with the handshake's limits: bytes that come with the connection
        # are parsed before _serve() first runs (uvloop reads them in the same iteration
        # as the accept), and must not make us allocate a frame's worth of memory.
        comm = Comm(self._max_frame)
        protocol = comm.protocol()
        task = asyncio.get_running_loop().create_task(self._serve(comm))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return protocol

    async def _serve(self, comm: Comm) -> None:
        await asyncio.sleep(0)  # let connection_made run
        try:
            info = await server_handshake(comm, self.key, self._welcome)
        except (AuthenticationError, ProtocolError, TimeoutError, ConnectionError) as exc:
            self.rejected += 1
            logger.warning("rejected connection from %s: %s", comm.peer, exc)
            comm.close()
            return
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
        for comm in list(self.comms):
            comm.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

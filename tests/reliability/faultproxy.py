"""A TCP proxy that can turn a live link into a black hole, for half-open connections.

Workers connect to the proxy instead of the cluster; each connection is forwarded to
the cluster by two pumps, one per direction. ``black_hole(...)`` makes the links open
now stop forwarding in one or both directions without closing either socket, as a
partition does, where not even a FIN gets through: bytes are read and dropped
(``read=True``), or no longer read at all (``read=False``, so the sender's buffers fill
up). Connections made afterwards are forwarded as usual, so a worker that gives up on
its dead link and reconnects gets through.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal

__all__ = ["FaultProxy"]

Direction = Literal["to-cluster", "to-worker"]


class _Link:
    """One proxied connection: the worker's socket, the cluster's, and what is cut."""

    def __init__(self, worker: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 cluster: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.worker = worker
        self.cluster = cluster
        self.cut: dict[str, bool] = {}  # direction -> keep reading (True) or stall (False)
        self.pumps: list[asyncio.Task[None]] = []

    async def pump(self, direction: Direction) -> None:
        reader, _ = self.worker if direction == "to-cluster" else self.cluster
        _, writer = self.cluster if direction == "to-cluster" else self.worker
        while True:
            data = await reader.read(1 << 16)
            keep_reading = self.cut.get(direction)
            if keep_reading is False:
                await asyncio.Event().wait()  # stalled: read nothing more, close nothing
            if keep_reading:
                if not data:  # the FIN is lost too: keep the other side open
                    await asyncio.Event().wait()
                continue
            if not data:  # a healthy link ends as TCP ends it
                writer.close()
                return
            writer.write(data)
            await writer.drain()

    def abort(self) -> None:
        for task in self.pumps:
            task.cancel()
        for _, writer in (self.worker, self.cluster):
            writer.transport.abort()


class FaultProxy:
    """Forwards connections from ``listen`` (any free port) to the cluster's address."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.links: list[_Link] = []
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"tcp://{host}:{port}"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            cluster = await asyncio.wait_for(asyncio.open_connection(*self.target), 10)
        except OSError:
            writer.transport.abort()
            return
        link = _Link((reader, writer), cluster)
        self.links.append(link)
        link.pumps = [asyncio.ensure_future(link.pump("to-cluster")),
                      asyncio.ensure_future(link.pump("to-worker"))]
        # The pumps end only when the link ends (or the proxy closes): errors are the
        # peers going away, nothing to report.
        await asyncio.gather(*link.pumps, return_exceptions=True)

    def black_hole(self, *directions: Direction, read: bool = True) -> int:
        """Stop forwarding ``directions`` on every link open now; return how many."""
        for link in self.links:
            for direction in directions:
                link.cut[direction] = read
        return len(self.links)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in self.links:
            link.abort()
        pumps = [t for link in self.links for t in link.pumps]
        await asyncio.gather(*pumps, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 10)

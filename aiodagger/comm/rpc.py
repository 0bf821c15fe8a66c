"""Requests and replies over one Comm, both ways, next to one-way messages.

A request carries ``req`` (a number); its reply carries ``reply_to``. Every other
frame goes to the handler, in order. A handler that returns a coroutine runs it as
a task, so a slow reply (a big chunk being sent) never holds up the frames after it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .framing import Comm

__all__ = ["Rpc"]

logger = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any], list[bytearray]], Awaitable[None] | None]


class Rpc:
    def __init__(self, comm: Comm, handler: Handler) -> None:
        self.comm = comm
        self._handler = handler
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[dict[str, Any], list[bytearray]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        """Read frames until the connection ends (then raise what ended it)."""
        comm = self.comm
        try:
            while True:
                header, buffers = await comm.recv()
                reply_to = header.get("reply_to")
                if reply_to is not None:
                    fut = self._pending.pop(reply_to, None)
                    if fut is not None and not fut.done():
                        fut.set_result((header, buffers))
                    continue
                result = self._handler(header, buffers)
                if result is not None:
                    task = asyncio.ensure_future(result)
                    self._tasks.add(task)
                    task.add_done_callback(self._task_done)
        finally:
            err = ConnectionResetError(f"connection to {comm.peer} lost")
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(err)
            self._pending.clear()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, ConnectionError):
                logger.info("request handler on %s: %s", self.comm.peer, exc)
            else:
                logger.error("request handler on %s failed", self.comm.peer, exc_info=exc)

    async def request(self, header: dict[str, Any], buffers: Sequence[Any] = (),
                      timeout: float | None = None) -> tuple[dict[str, Any], list[bytearray]]:
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self.comm.send({**header, "req": rid}, buffers)
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)

    async def reply(self, request: dict[str, Any], header: dict[str, Any], buffers: Sequence[Any] = ()) -> None:
        await self.comm.send({**header, "op": "reply", "reply_to": request["req"]}, buffers)

    def send_nowait(self, header: dict[str, Any], buffers: Sequence[Any] = ()) -> None:
        self.comm.send_nowait(header, buffers)

    async def close(self) -> None:
        self.comm.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

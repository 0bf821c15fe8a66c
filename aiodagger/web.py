"""Cancel a web request's tasks when its client goes away: ASGI and aiohttp middleware.

    app.add_middleware(CancelOnDisconnect)                        # FastAPI, Starlette
    web.Application(middlewares=[aiohttp_middleware()])           # aiohttp

Every task that ``dagger.spawn`` (and ``options(...).spawn``, ``TaskGroup.spawn``,
``spawn_streaming``, ``dagger.array``) makes while a request is handled joins that
request's :class:`RequestTasks`, through one ContextVar that the spawn reads and that
follows the request into every asyncio task it starts. When the client disconnects,
the unfinished ones are cancelled, with their not-yet-started dependents; so is what
is left of them once the request is done: no work outlives the request that asked
for it. Work meant to outlive its request is spawned outside any (in the lifespan, or
a task the app starts at startup).

Nothing here imports a web framework, and ``import aiodagger`` does not import this.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from types import TracebackType
from typing import Any

from ._context import spawn_collector_var
from .task import DTask

__all__ = ["CancelOnDisconnect", "RequestTasks", "aiohttp_middleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestTasks:
    """The tasks spawned in one context (a web request's), to cancel together.

    ``with RequestTasks() as tasks:`` makes every task spawned in the block, and in the
    asyncio tasks it starts, join ``tasks``; leaving the block cancels those still
    unfinished. ``on_cancel(cancelled)`` is told of every batch that :meth:`cancel`
    cancels. The middleware below make one per request; a handler finds it with
    :meth:`current`.
    """

    # Finished tasks are dropped whenever the list has doubled since the last sweep, so
    # that a long request (a stream of server-sent events) keeps no more than about
    # twice its unfinished tasks, and no finished task's value, alive.
    _SWEEP_AT = 64

    def __init__(self, on_cancel: Callable[[list[DTask[Any]]], object] | None = None) -> None:
        self._tasks: list[DTask[Any]] = []
        self._sweep_at = self._SWEEP_AT
        self._lock = threading.Lock()  # a spawn from a thread the context was copied to
        self._on_cancel = on_cancel
        self._tokens: list[Any] = []

    @staticmethod
    def current() -> RequestTasks | None:
        """The RequestTasks that a spawn here joins, if any."""
        collector = spawn_collector_var.get()
        return collector if isinstance(collector, RequestTasks) else None

    def add(self, task: DTask[Any]) -> None:
        with self._lock:
            tasks = self._tasks
            tasks.append(task)
            if len(tasks) >= self._sweep_at:
                self._tasks = tasks = [t for t in tasks if not t.done()]
                self._sweep_at = max(self._SWEEP_AT, 2 * len(tasks))

    def __iter__(self) -> Iterator[DTask[Any]]:
        """The tasks not yet swept away (every unfinished one among them)."""
        return iter(list(self._tasks))

    def __len__(self) -> int:
        return len(self._tasks)

    def cancel(self) -> list[DTask[Any]]:
        """Cancel the unfinished tasks; return those that this cancelled."""
        with self._lock:
            pending = [t for t in self._tasks if not t.done()]
        for t in pending:
            t.cancel()  # its dependents among `pending` may be cancelled with it already
        cancelled = [t for t in pending if t.cancelled()]
        if cancelled and self._on_cancel is not None:
            self._on_cancel(cancelled)
        return cancelled

    def __enter__(self) -> RequestTasks:
        self._tokens.append(spawn_collector_var.set(self))
        return self

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        spawn_collector_var.reset(self._tokens.pop())
        self.cancel()

    def __repr__(self) -> str:
        return f"<RequestTasks {len(self._tasks)} task(s)>"


class CancelOnDisconnect:
    """ASGI middleware: each HTTP request's tasks are cancelled when its client
    disconnects, and whatever of them is unfinished when the response is done.

    ``app.add_middleware(CancelOnDisconnect)`` in FastAPI or Starlette, or
    ``CancelOnDisconnect(app)`` around any ASGI app served on asyncio (uvicorn,
    hypercorn's asyncio worker). ``on_cancel(scope, cancelled)`` is told of the tasks
    cancelled, with the request's ASGI scope (``scope["app"]`` is the Starlette app).

    A server tells of a disconnect through ``receive()``, which an app awaiting its
    tasks does not call: a reader takes that over for the request, at most one message
    ahead of the app (so a large upload keeps its flow control), and passes every
    message on, the disconnect too.
    """

    def __init__(self, app: ASGIApp, *,
                 on_cancel: Callable[[Scope, list[DTask[Any]]], object] | None = None) -> None:
        self.app = app
        self.on_cancel = on_cancel

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        on_cancel = self.on_cancel
        tasks = RequestTasks(None if on_cancel is None else lambda ts: on_cancel(scope, ts))
        # The server's messages, or what its receive() raised, for the app's receive().
        messages: asyncio.Queue[Message | Exception] = asyncio.Queue(maxsize=1)
        disconnect: Message | None = None

        async def read() -> None:
            nonlocal disconnect
            while True:
                try:
                    message = await receive()
                except Exception as exc:  # noqa: BLE001 - the app's receive() raises it
                    await messages.put(exc)
                    return
                if message["type"] == "http.disconnect":
                    disconnect = message
                    tasks.cancel()
                    await messages.put(message)
                    return
                await messages.put(message)

        async def app_receive() -> Message:
            if disconnect is not None and messages.empty():
                return disconnect  # and again: ASGI repeats it to every later receive()
            message = await messages.get()
            if isinstance(message, Exception):
                raise message
            return message

        try:
            reader = asyncio.get_running_loop().create_task(read())
        except RuntimeError:
            raise RuntimeError("CancelOnDisconnect serves ASGI apps on asyncio servers "
                               "(uvicorn, hypercorn's asyncio worker)") from None
        try:
            with tasks:
                await self.app(scope, app_receive, send)
        finally:
            reader.cancel()


def aiohttp_middleware(*, on_cancel: Callable[[Any, list[DTask[Any]]], object] | None = None,
                       ) -> Callable[[Any, Callable[[Any], Awaitable[Any]]], Awaitable[Any]]:
    """An aiohttp middleware: each request's tasks are cancelled when its handler ends,
    unfinished, whether it returned, raised, or was cancelled.

    ``web.Application(middlewares=[aiohttp_middleware()])``. aiohttp cancels the handler
    of a client that disconnects when it serves with ``handler_cancellation=True``
    (``web.run_app(app, handler_cancellation=True)``, ``web.AppRunner(app,
    handler_cancellation=True)``; aiohttp's ``TestServer`` does); without it, a handler
    learns of a disconnect only when it writes. ``on_cancel(request, cancelled)`` is
    told of the tasks cancelled. ``with RequestTasks():`` in a handler does the same
    for that handler alone.
    """

    async def cancel_on_disconnect(request: Any, handler: Callable[[Any], Awaitable[Any]]) -> Any:
        with RequestTasks(None if on_cancel is None else lambda ts: on_cancel(request, ts)):
            return await handler(request)

    # What aiohttp's @web.middleware marks, set here so as not to import aiohttp.
    cancel_on_disconnect.__middleware_version__ = 1  # type: ignore[attr-defined]
    return cancel_on_disconnect

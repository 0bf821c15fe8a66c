"""An aiohttp service whose handlers run their work as aiodagger tasks.

    python examples/aiohttp_app.py                       # serves on 127.0.0.1:8080
    AIODAGGER_PROCESSES=2 python examples/aiohttp_app.py # with two subprocess workers

    curl localhost:8080/squares/10                # {"n": 10, "sum": 285}
    curl -N localhost:8080/progress/10            # server-sent events, one per finished task
    curl localhost:8080/status                    # tasks and requests in flight, cancellations

The cluster starts through the application's ``cleanup_ctx``, on the server's loop,
and closes at cleanup; ``make_app(cluster)`` serves on a cluster you already have
instead (tests do). ``AIODAGGER_PROCESSES`` sets its number of subprocess workers
(default 0: every task runs in this process).

A client that disconnects gets its tasks cancelled: the server runs with
``handler_cancellation=True`` (as ``main()`` below and aiohttp's ``TestServer`` do), so
its handler is cancelled, and ``aiodagger.web.aiohttp_middleware()`` cancels the tasks
that the request spawned and left unfinished.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

import aiodagger as dagger
from aiodagger.web import aiohttp_middleware

PROCESSES = int(os.environ.get("AIODAGGER_PROCESSES", "0"))


# -- the work: plain functions, at module level so that subprocess workers can import them
async def square(x: int, delay: float) -> int:
    await asyncio.sleep(delay)  # stands in for I/O: a query, a call to another service
    return x * x


def add_up(values: list[int]) -> int:  # sync: runs on a worker's thread pool
    return sum(values)


# -- bookkeeping shown by /status -----------------------------------------------------------
@dataclass
class Stats:
    requests_in_flight: int = 0
    peak_requests_in_flight: int = 0
    requests_done: int = 0
    tasks_cancelled: int = 0  # tasks cancelled because their client went away

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        self.requests_in_flight += 1
        self.peak_requests_in_flight = max(self.peak_requests_in_flight, self.requests_in_flight)
        try:
            yield
        finally:
            self.requests_in_flight -= 1
            self.requests_done += 1


CLUSTER = web.AppKey("cluster", dagger.Cluster)
STATS = web.AppKey("stats", Stats)
routes = web.RouteTableDef()


def spawn_squares(n: int, delay: float, stagger: bool) -> tuple[list[dagger.DTask[int]], dagger.DTask[int]]:
    squares = [dagger.spawn(square, i, delay * (i + 1) if stagger else delay) for i in range(n)]
    return squares, dagger.spawn(add_up, squares)  # a list of DTasks: all are dependencies


def query_float(request: web.Request, name: str, default: float) -> float:
    try:
        return float(request.query.get(name, default))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be a number") from None


@routes.get(r"/squares/{n:\d+}")
async def squares(request: web.Request) -> web.Response:
    """The sum of squares of 0..n-1, each square a task, as JSON."""
    n, delay = int(request.match_info["n"]), query_float(request, "delay", 0.0)
    stats = request.app[STATS]
    with stats.request():
        _, total = spawn_squares(n, delay, stagger=False)
        return web.json_response({"n": n, "sum": await total})


def sse(event: str, data: object) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


@routes.get(r"/progress/{n:\d+}")
async def progress(request: web.Request) -> web.StreamResponse:
    """The same sum as server-sent events: one per finished task, then the result.

    Task i takes ``delay * (i + 1)`` seconds, so the events arrive one by one.
    """
    n, delay = int(request.match_info["n"]), query_float(request, "delay", 0.05)
    stats = request.app[STATS]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    with stats.request():
        parts, total = spawn_squares(n, delay, stagger=True)
        await response.write(sse("start", {"tasks": n}))
        done = 0
        async for t in dagger.progress(parts, bar=False):
            done += 1
            await response.write(sse("progress", {"done": done, "of": n, "task": t.name,
                                                  "value": t.result()}))
        await response.write(sse("result", {"sum": await total}))
    await response.write_eof()
    return response


@routes.get("/status")
async def status(request: web.Request) -> web.Response:
    cluster = request.app[CLUSTER]
    loop = asyncio.get_running_loop()
    return web.json_response({
        "tasks_in_flight": cluster.tasks_in_flight,
        "workers": len(cluster.workers),
        "processes": PROCESSES,
        "loop": f"{type(loop).__module__}.{type(loop).__qualname__}",
        **asdict(request.app[STATS]),
    })


async def run_cluster(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the cluster lives from the app's startup to its cleanup."""
    async with dagger.Cluster(processes=PROCESSES) as cluster:
        app[CLUSTER] = cluster
        yield


def count_cancelled(request: web.Request, cancelled: list[dagger.DTask[Any]]) -> None:
    request.app[STATS].tasks_cancelled += len(cancelled)


def make_app(cluster: dagger.Cluster | None = None) -> web.Application:
    """The application; it starts a cluster of its own unless given one."""
    # The tasks a request spawns are cancelled when its handler ends: cancelled because
    # the client left, or an error.
    app = web.Application(middlewares=[aiohttp_middleware(on_cancel=count_cancelled)])
    app[STATS] = Stats()
    if cluster is None:
        app.cleanup_ctx.append(run_cluster)
    else:
        app[CLUSTER] = cluster
    app.add_routes(routes)
    return app


def main() -> None:
    web.run_app(make_app(), host="127.0.0.1", port=int(os.environ.get("PORT", "8080")),
                handler_cancellation=True)


if __name__ == "__main__":
    main()

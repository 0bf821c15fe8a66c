"""A FastAPI service whose endpoints run their work as aiodagger tasks.

    uvicorn examples.fastapi_app:app                     # or: python examples/fastapi_app.py
    AIODAGGER_PROCESSES=2 uvicorn examples.fastapi_app:app   # with two subprocess workers

    curl localhost:8000/squares/10                # {"n": 10, "sum": 285}
    curl -N localhost:8000/progress/10            # server-sent events, one per finished task
    curl localhost:8000/status                    # tasks and requests in flight, cancellations

The cluster starts in the app's lifespan, on the server's own event loop (asyncio or
uvloop), and closes at shutdown. ``AIODAGGER_PROCESSES`` sets its number of subprocess
workers (default 0: every task runs in this process, coroutines on the loop and sync
functions on a thread pool). A client that disconnects gets its tasks cancelled:
``aiodagger.web.CancelOnDisconnect`` ties the tasks spawned while a request is handled
to that request.

Several server processes share one cluster instead of starting one each: run a
scheduler, and point the app at it with ``AIODAGGER_SCHEDULER`` (each uvicorn worker
process then attaches with ``dagger.connect``, in its lifespan)::

    python -c "import secrets; print(secrets.token_urlsafe(32))" > token
    python -m aiodagger scheduler --listen tcp://127.0.0.1:8786 --token-file token --processes 4 &
    AIODAGGER_SCHEDULER=tcp://127.0.0.1:8786 AIODAGGER_TOKEN_FILE=token \
        uvicorn examples.fastapi_app:app --workers 4

The scheduler imports the task functions by name, as its workers do: start it where
``examples.fastapi_app`` imports (``python -m`` from the repository root does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Iterator, MutableMapping
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse

import aiodagger as dagger
from aiodagger.web import CancelOnDisconnect

PROCESSES = int(os.environ.get("AIODAGGER_PROCESSES", "0"))
SCHEDULER = os.environ.get("AIODAGGER_SCHEDULER")  # a shared cluster: dagger.connect()


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


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    cluster_here = dagger.connect(SCHEDULER) if SCHEDULER else dagger.Cluster(processes=PROCESSES)
    async with cluster_here as cluster:
        app.state.cluster = cluster
        app.state.stats = Stats()
        yield


def count_cancelled(scope: MutableMapping[str, Any], cancelled: list[dagger.DTask[Any]]) -> None:
    stats: Stats = scope["app"].state.stats
    stats.tasks_cancelled += len(cancelled)


app = FastAPI(title="aiodagger example", lifespan=lifespan)
# The tasks a request spawns are cancelled when its client disconnects (and whatever of
# them is left when it is done: an error, or the server shutting down).
app.add_middleware(CancelOnDisconnect, on_cancel=count_cancelled)


def spawn_squares(n: int, delay: float, stagger: bool) -> tuple[list[dagger.DTask[int]], dagger.DTask[int]]:
    squares = [dagger.spawn(square, i, delay * (i + 1) if stagger else delay) for i in range(n)]
    return squares, dagger.spawn(add_up, squares)  # a list of DTasks: all are dependencies


@app.get("/squares/{n}")
async def squares(n: int, request: Request, delay: float = 0.0) -> Response:
    """The sum of squares of 0..n-1, each square a task, as JSON."""
    stats: Stats = request.app.state.stats
    with stats.request():
        _, total = spawn_squares(n, delay, stagger=False)
        try:
            value = await total
        except dagger.TaskCancelledError:
            return Response(status_code=499)  # the client has gone; nobody reads this
        return Response(json.dumps({"n": n, "sum": value}), media_type="application/json")


def sse(event: str, data: object) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


@app.get("/progress/{n}")
async def progress(n: int, request: Request, delay: float = 0.05) -> StreamingResponse:
    """The same sum as server-sent events: one per finished task, then the result.

    Task i takes ``delay * (i + 1)`` seconds, so the events arrive one by one.
    """
    stats: Stats = request.app.state.stats

    async def events() -> AsyncIterator[str]:
        with stats.request():
            parts, total = spawn_squares(n, delay, stagger=True)
            yield sse("start", {"tasks": n})
            done = 0
            async for t in dagger.progress(parts, bar=False):
                if t.cancelled():
                    return  # the client has gone
                done += 1
                yield sse("progress", {"done": done, "of": n, "task": t.name, "value": t.result()})
            try:
                yield sse("result", {"sum": await total})
            except dagger.TaskCancelledError:
                return

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


@app.get("/status")
async def status(request: Request) -> dict[str, object]:
    cluster = request.app.state.cluster
    loop = asyncio.get_running_loop()
    return {
        "tasks_in_flight": cluster.tasks_in_flight,  # a shared cluster's: this process's
        "workers": len(cluster.workers) if not SCHEDULER else None,
        "processes": PROCESSES,
        "shared_cluster": SCHEDULER,
        "pid": os.getpid(),
        "loop": f"{type(loop).__module__}.{type(loop).__qualname__}",
        **asdict(request.app.state.stats),
    }


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))

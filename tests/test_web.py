"""aiodagger.web: a request's tasks are cancelled when its client disconnects.

RequestTasks on its own; CancelOnDisconnect in a real uvicorn (on a thread of the
test's, so that the test sees the tasks themselves); aiohttp_middleware in aiohttp's
test server and in a plain AppRunner, over real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from typing import Any

import httpx
import pytest
import uvicorn
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient, TestServer
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import aiodagger as dagger
from aiodagger.web import CancelOnDisconnect, RequestTasks, aiohttp_middleware
from tests.helpers import ainc, asleep_forever, inc

TIMEOUT = 10.0


def wait_until(predicate, timeout: float = TIMEOUT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not hold within {timeout} s")
        time.sleep(0.01)


async def async_wait_until(predicate, timeout: float = TIMEOUT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not hold within {timeout} s")
        await asyncio.sleep(0.01)


# -- RequestTasks --------------------------------------------------------------------------


async def test_what_a_block_spawns_joins_and_its_leftovers_are_cancelled(cluster):
    seen: list[dagger.DTask[Any]] = []
    outside = dagger.spawn(asleep_forever)

    async def spawns_in_a_task_of_its_own():
        return dagger.spawn(asleep_forever)

    with RequestTasks(on_cancel=seen.extend) as tasks:
        assert RequestTasks.current() is tasks
        done = dagger.spawn(inc, 1)
        sleeper = dagger.options(name="sleeper").spawn(asleep_forever)
        dependent = dagger.spawn(inc, sleeper)
        in_task = await asyncio.create_task(spawns_in_a_task_of_its_own())
        assert await done == 2
    assert RequestTasks.current() is None
    assert set(tasks) == {done, sleeper, dependent, in_task}
    assert sleeper.cancelled() and dependent.cancelled() and in_task.cancelled()
    assert set(seen) == {sleeper, dependent, in_task}
    assert done.state == "finished" and not outside.done()
    outside.cancel()


async def test_a_taskgroup_and_a_stream_spawned_in_the_block_join(cluster):
    def numbers():
        yield from range(3)

    with RequestTasks() as tasks:
        stream = dagger.spawn_streaming(numbers)
        async with dagger.TaskGroup() as tg:
            member = tg.spawn(ainc, 1)
    assert stream in set(tasks) and member in set(tasks)


async def test_finished_tasks_are_swept_away(cluster):
    with RequestTasks() as tasks:
        for _ in range(20):
            await dagger.gather(*[dagger.spawn(inc, i) for i in range(50)])
            assert len(tasks) <= 2 * RequestTasks._SWEEP_AT
        assert list(tasks) == [] or all(t.done() for t in tasks)


# -- CancelOnDisconnect in uvicorn -----------------------------------------------------------


def make_starlette_app(cancelled: list[dagger.DTask[Any]]) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with dagger.Cluster(threads=2) as cluster:
            app.state.cluster = cluster
            app.state.spawned = []
            yield

    async def work(request: Request) -> Response:
        parts = [dagger.spawn(asyncio.sleep, 60) for _ in range(3)]
        total = dagger.spawn(len, parts)
        request.app.state.spawned.extend([*parts, total])
        return PlainTextResponse(str(await total))

    async def leftover(request: Request) -> Response:
        request.app.state.spawned.append(dagger.spawn(asleep_forever))  # never awaited
        return PlainTextResponse(str(await dagger.spawn(inc, 1)))

    async def echo(request: Request) -> Response:
        return Response(await request.body())

    async def stream(request: Request) -> Response:
        async def events():
            tasks = [dagger.spawn(asyncio.sleep, 0.05 * i, i) for i in range(1, 21)]
            request.app.state.spawned.extend(tasks)
            async for t in dagger.progress(tasks, bar=False):
                if t.cancelled():
                    return
                yield f"data: {t.result()}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(
        routes=[Route("/work", work), Route("/leftover", leftover),
                Route("/echo", echo, methods=["POST"]), Route("/stream", stream)],
        lifespan=lifespan,
        middleware=[Middleware(CancelOnDisconnect, on_cancel=lambda scope, ts: cancelled.extend(ts))],
    )


class UvicornThread:
    """uvicorn serving ``app`` on a socket of ours, on a thread of its own."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, lifespan="on", log_config=None, log_level="warning",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="uvicorn-under-test")

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), what="uvicorn started")
        assert self.server.started
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(TIMEOUT)
        self.sock.close()
        assert not self.thread.is_alive(), "uvicorn did not stop"

    @property
    def cluster(self) -> dagger.Cluster:
        return self.app.state.cluster


@pytest.fixture
def cancelled() -> list[dagger.DTask[Any]]:
    return []


@pytest.fixture
def uvicorn_server(cancelled):
    with UvicornThread(make_starlette_app(cancelled)) as server:
        yield server


def test_asgi_client_gone_mid_request_cancels_its_tasks(uvicorn_server, cancelled):
    with socket.create_connection(uvicorn_server.sock.getsockname(), timeout=TIMEOUT) as client:
        client.sendall(b"GET /work HTTP/1.1\r\nHost: test\r\n\r\n")
        wait_until(lambda: uvicorn_server.cluster.tasks_in_flight == 4, what="4 tasks in flight")
    # the client has hung up
    wait_until(lambda: uvicorn_server.cluster.tasks_in_flight == 0, what="no task in flight")
    spawned = uvicorn_server.app.state.spawned
    assert len(spawned) == 4 and all(t.cancelled() for t in spawned)
    assert set(cancelled) == set(spawned)


def test_asgi_client_gone_mid_stream_cancels_what_is_left(uvicorn_server, cancelled):
    with httpx.Client(base_url=uvicorn_server.url, timeout=TIMEOUT) as client, \
            client.stream("GET", "/stream") as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
    assert first == "data: 1"
    wait_until(lambda: uvicorn_server.cluster.tasks_in_flight == 0, what="no task in flight")
    spawned = uvicorn_server.app.state.spawned
    assert spawned[0].state == "finished" and spawned[-1].cancelled()
    assert 10 <= len(cancelled) <= 19 and set(cancelled) <= set(spawned[1:])


def test_asgi_tasks_left_when_the_response_is_done_are_cancelled(uvicorn_server, cancelled):
    with httpx.Client(base_url=uvicorn_server.url, timeout=TIMEOUT) as client:
        assert client.get("/leftover").text == "2"
        body = bytes(range(256)) * 8192  # 2 MiB: many receive() messages, in order
        assert client.post("/echo", content=body).content == body
    wait_until(lambda: uvicorn_server.cluster.tasks_in_flight == 0, what="no task in flight")
    [left] = uvicorn_server.app.state.spawned
    assert left.cancelled() and cancelled == [left]


# -- aiohttp_middleware -------------------------------------------------------------------------


def make_aiohttp_app(spawned: list, cancelled: list) -> web.Application:
    async def work(request: web.Request) -> web.Response:
        parts = [dagger.spawn(asyncio.sleep, 60) for _ in range(3)]
        total = dagger.spawn(len, parts)
        spawned.extend([*parts, total])
        return web.Response(text=str(await total))

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        tasks = [dagger.spawn(asyncio.sleep, 0.05 * i, i) for i in range(1, 21)]
        spawned.extend(tasks)
        async for t in dagger.progress(tasks, bar=False):
            await response.write(f"data: {t.result()}\n\n".encode())
        return response

    app = web.Application(middlewares=[aiohttp_middleware(on_cancel=lambda r, ts: cancelled.extend(ts))])
    app.add_routes([web.get("/work", work), web.get("/stream", stream)])
    return app


async def test_aiohttp_client_gone_mid_request_cancels_its_tasks(cluster):
    spawned: list[dagger.DTask[Any]] = []
    cancelled: list[dagger.DTask[Any]] = []
    # TestServer serves with handler_cancellation=True: a disconnect cancels the handler
    async with TestClient(TestServer(make_aiohttp_app(spawned, cancelled))) as client:
        request = asyncio.create_task(client.get("/work"))
        await async_wait_until(lambda: cluster.tasks_in_flight == 4, what="4 tasks in flight")
        request.cancel()  # the client gives up: its connection is closed
        with pytest.raises(asyncio.CancelledError):
            await request
        await async_wait_until(lambda: cluster.tasks_in_flight == 0, what="no task in flight")
    assert all(t.cancelled() for t in spawned) and set(cancelled) == set(spawned)


async def test_aiohttp_without_handler_cancellation_a_failed_write_ends_it(cluster):
    spawned: list[dagger.DTask[Any]] = []
    cancelled: list[dagger.DTask[Any]] = []
    runner = web.AppRunner(make_aiohttp_app(spawned, cancelled))  # handler_cancellation=False
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with ClientSession() as session, session.get(f"http://127.0.0.1:{port}/stream") as r:
            async for line in r.content:
                if line.startswith(b"data: "):
                    break  # the first task has finished: hang up
            r.close()
        await async_wait_until(lambda: cluster.tasks_in_flight == 0, what="no task in flight")
    finally:
        await asyncio.wait_for(runner.cleanup(), TIMEOUT)
    assert spawned[0].state == "finished" and spawned[-1].cancelled()
    assert 10 <= len(cancelled) <= 19

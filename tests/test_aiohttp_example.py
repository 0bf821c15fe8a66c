"""examples/aiohttp_app.py through aiohttp's own test server and client (real sockets)."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer

from examples.aiohttp_app import CLUSTER, make_app

CONCURRENT = 60


async def status(client: TestClient) -> dict:
    async with client.get("/status") as r:
        assert r.status == 200
        return await r.json()


async def until(client: TestClient, predicate, timeout: float = 10.0) -> dict:
    """Poll /status until ``predicate(status)`` holds (a test's wait, bounded in time)."""
    deadline = time.monotonic() + timeout
    while True:
        st = await status(client)
        if predicate(st):
            return st
        if time.monotonic() > deadline:
            pytest.fail(f"status never matched: {st}")
        await asyncio.sleep(0.02)


@pytest.fixture(autouse=True)
def nothing_logged(caplog):
    """A disconnect or shutdown must not surface as a logged error or warning."""
    yield
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not noisy, [r.getMessage() for r in noisy]


@pytest.fixture
async def client():
    app = make_app()  # its cluster starts in cleanup_ctx, on this test's loop
    async with TestClient(TestServer(app)) as client:
        yield client
    assert app[CLUSTER].state == "closed"  # cleanup closed it


async def test_runs_on_the_servers_loop(client):
    st = await status(client)
    loop = asyncio.get_running_loop()
    assert st["loop"] == f"{type(loop).__module__}.{type(loop).__qualname__}"
    assert client.app[CLUSTER].loop is loop
    assert st["workers"] == 1 and st["processes"] == 0


async def test_many_concurrent_requests_get_correct_answers(client):
    async def one(n):
        async with client.get(f"/squares/{n}", params={"delay": "0.5"}) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    ns = list(range(1, CONCURRENT + 1))
    answers = await asyncio.wait_for(asyncio.gather(*[one(n) for n in ns]), 60)
    assert answers == [{"n": n, "sum": sum(i * i for i in range(n))} for n in ns]
    st = await status(client)
    assert st["peak_requests_in_flight"] >= 50 and st["requests_done"] == CONCURRENT
    assert st["tasks_in_flight"] == 0 and st["tasks_cancelled"] == 0


async def test_progress_is_streamed_as_server_sent_events(client):
    events = []
    async with client.get("/progress/5", params={"delay": "0.02"}) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        async for raw in r.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((kind, json.loads(line.removeprefix("data: "))))
    assert events[0] == ("start", {"tasks": 5})
    assert [e[1]["done"] for e in events[1:-1]] == [1, 2, 3, 4, 5]
    assert events[-1] == ("result", {"sum": 30})


async def test_client_gone_mid_request_cancels_its_tasks(client):
    request = asyncio.create_task(client.get("/squares/20", params={"delay": "60"}))
    await until(client, lambda st: st["tasks_in_flight"] == 21)  # 20 squares and their sum
    request.cancel()  # the client gives up: its connection is closed
    with pytest.raises(asyncio.CancelledError):
        await request
    st = await until(client, lambda st: st["requests_in_flight"] == 0)
    assert st["tasks_in_flight"] == 0 and st["tasks_cancelled"] == 21


async def test_client_gone_mid_stream_cancels_its_tasks(client):
    async with client.get("/progress/10", params={"delay": "0.2"}) as r:
        async for raw in r.content:
            if raw.startswith(b'data: {"done": 1'):
                break  # the first task has finished: hang up
        r.close()
    st = await until(client, lambda st: st["requests_in_flight"] == 0)
    assert st["tasks_in_flight"] == 0
    assert 5 <= st["tasks_cancelled"] <= 10  # tasks 5..9 take 1.2 s or more


async def test_serving_on_a_given_cluster(dagger_cluster):
    app = make_app(dagger_cluster)
    async with TestClient(TestServer(app)) as client:
        request = asyncio.create_task(client.get("/squares/4", params={"delay": "60"}))
        await until(client, lambda st: st["tasks_in_flight"] == 5)
        assert dagger_cluster.tasks_in_flight == 5
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await until(client, lambda st: st["tasks_in_flight"] == 0)
        async with client.get("/squares/4") as r:
            assert await r.json() == {"n": 4, "sum": 14}
    assert dagger_cluster.state == "running"  # the app does not close a cluster it was given
    assert dagger_cluster.tasks_in_flight == 0


async def test_with_two_subprocess_workers(dagger_process_cluster):
    """The same app on a cluster whose tasks run in two worker processes."""
    app = make_app(dagger_process_cluster)
    async with TestClient(TestServer(app)) as client:
        async def one(n):
            async with client.get(f"/squares/{n}", params={"delay": "0.2"}) as r:
                assert r.status == 200
                return await r.json()

        ns = list(range(1, 51))
        answers = await asyncio.wait_for(asyncio.gather(*[one(n) for n in ns]), 60)
        assert [a["sum"] for a in answers] == [sum(i * i for i in range(n)) for n in ns]
        request = asyncio.create_task(client.get("/squares/20", params={"delay": "60"}))
        await until(client, lambda st: st["tasks_in_flight"] >= 20)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await until(client, lambda st: st["tasks_in_flight"] == 0 and st["tasks_cancelled"] >= 20)

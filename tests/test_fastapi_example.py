"""examples/fastapi_app.py in a real uvicorn server (uvloop), driven by httpx."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

ROOT = pathlib.Path(__file__).parent.parent
CONCURRENT = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp: pathlib.Path, processes: int = 0, env: dict[str, str] | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_path = tmp / "uvicorn.err"
        self._stderr = open(self.stderr_path, "w")  # a file, not a pipe: it can never fill up
        env = {**os.environ, "AIODAGGER_PROCESSES": str(processes), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-W", "error", "-m", "uvicorn", "examples.fastapi_app:app",
             "--host", "127.0.0.1", "--port", str(self.port), "--loop", "uvloop",
             "--log-level", "warning", "--timeout-graceful-shutdown", "10", *extra],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=self._stderr,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"uvicorn exited with {self.proc.returncode}: {self.stderr()}")
            try:
                httpx.get(self.url + "/status", timeout=1.0).raise_for_status()
                return
            except httpx.TransportError:
                time.sleep(0.05)
        pytest.fail(f"uvicorn did not answer within {timeout} s: {self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                pytest.fail(f"uvicorn did not stop within {timeout} s of signal {sig}")
        self._stderr.close()
        return self.proc.returncode


@pytest.fixture(scope="module", params=[0, 2], ids=["in-process", "processes=2"])
def server(request, tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("fastapi"), processes=request.param)
    try:
        srv.wait_ready()
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()  # only if a test left it running; test_shutdown stops it cleanly
            srv.proc.wait(10)
        srv._stderr.close()


async def status(client: httpx.AsyncClient) -> dict:
    r = await client.get("/status")
    r.raise_for_status()
    return r.json()


async def until(client: httpx.AsyncClient, predicate, timeout: float = 10.0) -> dict:
    """Poll /status until ``predicate(status)`` holds (a test's wait, bounded in time)."""
    deadline = time.monotonic() + timeout
    while True:
        st = await status(client)
        if predicate(st):
            return st
        if time.monotonic() > deadline:
            pytest.fail(f"status never matched: {st}")
        await asyncio.sleep(0.05)


def client_for(server: Server, **kwargs) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=CONCURRENT + 10)
    return httpx.AsyncClient(base_url=server.url, timeout=30.0, limits=limits, **kwargs)


async def test_runs_on_uvicorns_uvloop(server):
    async with client_for(server) as client:
        st = await status(client)
    assert st["loop"] == "uvloop.Loop"
    assert st["workers"] == 1 + st["processes"]


async def test_many_concurrent_requests_get_correct_answers(server):
    async with client_for(server) as client:
        before = await status(client)
        # Each request's tasks sleep 1 s, so every request is in flight at once.
        ns = list(range(1, CONCURRENT + 1))
        responses = await asyncio.wait_for(
            asyncio.gather(*[client.get(f"/squares/{n}", params={"delay": 1.0}) for n in ns]), 60)
        for n, r in zip(ns, responses, strict=True):
            assert r.status_code == 200, r.text
            assert r.json() == {"n": n, "sum": sum(i * i for i in range(n))}
        after = await until(client, lambda st: st["requests_in_flight"] == 0)
    assert after["peak_requests_in_flight"] >= 50
    assert after["requests_done"] - before["requests_done"] == CONCURRENT
    assert after["tasks_in_flight"] == 0 and after["tasks_cancelled"] == before["tasks_cancelled"]


async def test_progress_is_streamed_as_server_sent_events(server):
    async with client_for(server) as client, client.stream(
            "GET", "/progress/5", params={"delay": 0.02}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = []
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((kind, json.loads(line.removeprefix("data: "))))
    assert events[0] == ("start", {"tasks": 5})
    assert [e[1]["done"] for e in events[1:-1]] == [1, 2, 3, 4, 5]
    assert sorted(e[1]["value"] for e in events[1:-1]) == [0, 1, 4, 9, 16]
    assert events[-1] == ("result", {"sum": 30})


async def test_client_gone_mid_request_cancels_its_tasks(server):
    async with client_for(server) as client:
        before = await until(client, lambda st: st["tasks_in_flight"] == 0)
        request = asyncio.create_task(client.get("/squares/20", params={"delay": 60}))
        await until(client, lambda st: st["tasks_in_flight"] == 21)  # 20 squares and their sum
        request.cancel()  # the client gives up: httpx closes that connection
        with pytest.raises(asyncio.CancelledError):
            await request
        after = await until(client, lambda st: st["tasks_in_flight"] == 0
                            and st["requests_in_flight"] == 0)
    assert after["tasks_cancelled"] - before["tasks_cancelled"] == 21


async def test_client_gone_mid_stream_cancels_its_tasks(server):
    async with client_for(server) as client:
        before = await until(client, lambda st: st["tasks_in_flight"] == 0)
        async with client.stream("GET", "/progress/10", params={"delay": 0.2}) as r:
            lines = r.aiter_lines()
            while not (await anext(lines)).startswith('data: {"done": 1'):
                pass  # read until the first task has finished, then hang up
        after = await until(client, lambda st: st["tasks_in_flight"] == 0
                            and st["requests_in_flight"] == 0)
    cancelled = after["tasks_cancelled"] - before["tasks_cancelled"]
    assert 1 <= cancelled <= 10  # the unfinished squares and their sum; task 0 had finished
    assert cancelled >= 5  # tasks 5..9 take 1.2 s or more: they cannot have finished


def test_shutdown_is_clean(server):
    # Stop the server as an operator would, by PID: the lifespan closes the cluster.
    with httpx.Client(base_url=server.url, timeout=10.0) as client:
        client.get("/squares/3").raise_for_status()
    assert server.stop(signal.SIGINT) == 0
    assert server.stderr() == ""


def test_sigterm_with_requests_in_flight(tmp_path):
    srv = Server(tmp_path)
    try:
        srv.wait_ready()

        async def main():
            async with client_for(srv) as client:
                pending = [asyncio.create_task(client.get("/squares/5", params={"delay": 1.0}))
                           for _ in range(3)]
                await until(client, lambda st: st["requests_in_flight"] == 3)
                srv.proc.send_signal(signal.SIGTERM)
                return await asyncio.wait_for(asyncio.gather(*pending), 30)

        # uvicorn stops accepting, lets the requests in flight finish, then closes the cluster
        responses = asyncio.run(main())
        assert [r.json() for r in responses] == [{"n": 5, "sum": 30}] * 3
        # uvicorn re-raises the signal it handled once it has shut down, so a SIGTERM'd
        # server ends as killed by SIGTERM; what matters is that it said nothing
        assert srv.proc.wait(30) in (0, -signal.SIGTERM)
        assert srv.stderr() == ""
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait(10)
        srv._stderr.close()


def test_four_server_processes_share_one_cluster(tmp_path):
    """`uvicorn --workers 4` against one `aiodagger scheduler`: each server process is a
    client of the same cluster, and every request is answered right."""
    from tests.test_connect import TOKEN, end, start_scheduler

    sched, address = start_scheduler(tmp_path, processes=2, extra=("--dashboard", "127.0.0.1:0"))
    srv = Server(tmp_path, env={"AIODAGGER_SCHEDULER": address, "AIODAGGER_TOKEN": TOKEN},
                 extra=("--workers", "4"))
    try:
        srv.wait_ready(60)

        async def main():
            # A connection per request, so that the kernel spreads them over the four.
            limits = httpx.Limits(max_connections=CONCURRENT + 10, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=srv.url, timeout=30.0, limits=limits) as client:
                ns = [1 + i % 30 for i in range(4 * CONCURRENT)]
                responses = await asyncio.wait_for(asyncio.gather(
                    *[client.get(f"/squares/{n}", params={"delay": 0.2}) for n in ns]), 120)
                for n, r in zip(ns, responses, strict=True):
                    assert r.status_code == 200, r.text
                    assert r.json() == {"n": n, "sum": sum(i * i for i in range(n))}
                seen = {}
                deadline = time.monotonic() + 30
                while len(seen) < 4:  # every server process answers, attached to the cluster
                    st = (await client.get("/status")).json()
                    seen[st["pid"]] = st
                    assert time.monotonic() < deadline, seen
                return seen

        seen = asyncio.run(main())
        assert all(st["shared_cluster"] == address for st in seen.values())
        assert sum(st["requests_done"] for st in seen.values()) >= 4 * CONCURRENT
        assert srv.stop(signal.SIGINT) == 0
        # uvicorn's supervisor (0.54) never closes its listening socket; with -W error it
        # says so at exit, with any app (a bare ASGI callable too): that, and only that
        unclosed = f"socket.socket fd=3, family=2, type=1, proto=0, laddr=('127.0.0.1', {srv.port})>"
        assert [line for line in srv.stderr().splitlines() if not line.endswith(unclosed)] == []
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait(10)
        srv._stderr.close()
        end(sched)

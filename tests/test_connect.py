"""Clients of a shared cluster (``dagger.connect``), against a real ``aiodagger scheduler``
process with worker processes of its own, over real sockets."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import aiodagger as dagger
from aiodagger.cluster import current_cluster
from tests.helpers import boom, eventually, inc
from tests.workers import ROOT, pid_of, read_line, write_token

TOKEN = secrets.token_urlsafe(32)


def start_scheduler(tmp_path, *, processes: int = 2, port: int = 0, extra=()) -> tuple[subprocess.Popen, str]:
    """`aiodagger scheduler` as a user runs it; (process, address)."""
    token_file = write_token(tmp_path, TOKEN)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1")
    env.pop("AIODAGGER_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "aiodagger", "scheduler", "--listen", f"tcp://127.0.0.1:{port}",
         "--token-file", str(token_file), "--processes", str(processes), "--threads", "2", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    try:
        line = read_line(proc, timeout=60).decode()
    except BaseException:
        end(proc)
        raise
    prefix = "aiodagger scheduler: workers join at "
    assert line.startswith(prefix), line
    return proc, line[len(prefix):].strip()


def end(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    proc, address = start_scheduler(tmp_path_factory.mktemp("sched"))
    yield address
    end(proc)
    assert proc.returncode == 0


def run_client(script: str, address: str, timeout: float = 60) -> str:
    """Run ``script`` as another client process; what it printed."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), AIODAGGER_SCHEDULER=address, AIODAGGER_TOKEN=TOKEN)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def make_block(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64)


def total(x) -> float:
    return float(np.sum(x))


async def put_then_sum(n: int) -> float:
    """In a worker process: put a value there, and have another task read it."""
    chunk = await dagger.put(np.ones(n))
    return await dagger.spawn(total, chunk)


async def test_a_task_in_a_worker_process_can_put(scheduler):
    async with dagger.connect(scheduler, token=TOKEN):
        assert await asyncio.wait_for(dagger.spawn(put_then_sum, 1000), 30) == 1000.0


async def test_a_client_spawns_awaits_puts_and_gathers_as_on_a_local_cluster(scheduler):
    async with dagger.connect(scheduler, token=TOKEN) as cluster:
        assert cluster.connected and current_cluster() is cluster
        # tasks run in the scheduler's worker processes, not here
        pids = await dagger.gather(*[dagger.spawn(pid_of) for _ in range(8)])
        assert os.getpid() not in pids
        # a chain: each task takes the last one's handle
        t = dagger.spawn(inc, 0)
        for _ in range(20):
            t = dagger.spawn(inc, t)
        assert await t == 21
        assert sum(await dagger.gather(*[dagger.spawn(inc, i) for i in range(500)])) == sum(range(1, 501))
        # a value put once, read by several tasks
        chunk = await dagger.put(np.ones(1000))
        assert type(chunk) is dagger.Chunk and (await chunk).shape == (1000,)
        assert await dagger.gather(*[dagger.spawn(total, chunk) for _ in range(4)]) == [1000.0] * 4
        # a result held by a worker process (8 MB) comes here from that worker
        block = dagger.spawn(make_block, 1_000_000)
        value = await block
        assert value.shape == (1_000_000,) and value[-1] == 999_999.0
        assert await dagger.spawn(total, block) == float(np.sum(value))
        # errors come through with their type
        with pytest.raises(ValueError, match="boom"):
            await dagger.spawn(boom)
        # TaskGroup and progress
        async with dagger.TaskGroup() as tg:
            group = [tg.spawn(inc, i) for i in range(10)]
        assert [g.result() for g in group] == list(range(1, 11))
        finished = [t async for t in dagger.progress([dagger.spawn(inc, i) for i in range(10)], bar=False)]
        assert sorted(t.result() for t in finished) == list(range(1, 11))
        # admission counts this client's tasks in flight
        await dagger.admit(limit=1)
    assert cluster.state == "closed" and not cluster.connected


def test_a_sync_client_spawns_and_fetches(scheduler):
    with dagger.connect(scheduler, token=TOKEN) as cluster:
        t = dagger.spawn(inc, dagger.spawn(inc, 1))
        assert t.fetch(timeout=30) == 3
        assert dagger.fetch(dagger.spawn(make_block, 500_000), timeout=30)[-1] == 499_999.0
    assert cluster.state == "closed"
    assert not [th for th in threading.enumerate() if th.name == "aiodagger-client"]


async def test_await_connect_then_close(scheduler):
    cluster = await dagger.connect(scheduler, token=TOKEN)
    try:
        assert await dagger.spawn(inc, 41) == 42
    finally:
        await cluster.close()
    assert cluster.state == "closed"


async def test_clients_share_published_results(scheduler):
    out = run_client("""
        import asyncio, aiodagger as dagger
        from tests.test_connect import make_block
        async def main():
            async with dagger.connect() as cluster:
                t = dagger.spawn(make_block, 300_000)
                await t
                await cluster.publish("block", t)
                c = await dagger.put({"answer": 42})
                await cluster.publish("config", c)
                try:
                    await cluster.publish("block", dagger.spawn(make_block, 3))
                except ValueError as exc:
                    print("refused:", exc)
        asyncio.run(main())
    """, scheduler)
    assert "refused: 'block' is already published" in out
    # that client has gone: what it published outlives it
    async with dagger.connect(scheduler, token=TOKEN) as cluster:
        block = await cluster.get_published("block")
        value = await block
        assert value.shape == (300_000,) and value[-1] == 299_999.0
        assert await dagger.spawn(total, block) == float(np.sum(value))
        config = await cluster.get_published("config")
        assert await config == {"answer": 42}
        with pytest.raises(KeyError, match=r"nothing is published as 'nope'; published: \['block', 'config'\]"):
            await cluster.get_published("nope")
        await cluster.unpublish("block")
        await cluster.unpublish("config")
        with pytest.raises(KeyError, match="published: nothing"):
            await cluster.get_published("block")
        with pytest.raises(ValueError, match="nothing is published as 'block'"):
            await cluster.unpublish("block")


async def test_a_clients_tasks_are_released_when_it_disconnects(tmp_path):
    """Against a cluster in this process, to see its books: what a client held goes
    with it, what it published stays."""
    async with dagger.Cluster(processes=1, listen="tcp://127.0.0.1:0", token=TOKEN) as cluster:
        dist = cluster._scheduler.dist
        await asyncio.to_thread(run_client, """
            import asyncio, aiodagger as dagger
            from tests.test_connect import make_block
            async def main():
                async with dagger.connect() as cluster:
                    kept = dagger.spawn(make_block, 4_000_000)      # 32 MB, published
                    dropped = dagger.spawn(make_block, 4_000_001)   # 32 MB, not
                    await dagger.gather(kept, dropped)
                    await cluster.publish("kept", kept)
            asyncio.run(main())
        """, cluster.address)
        await eventually(lambda: not dist.clients, 30, "the client detached")
        # the unpublished result is freed on the worker; the published one is kept
        async def used() -> int:
            return sum(s["memory_used"] for wid, s in (await cluster.worker_stats()).items() if wid)
        deadline = time.monotonic() + 30
        while (in_use := await used()) > 40e6:
            assert time.monotonic() < deadline, in_use
            await asyncio.sleep(0.1)
        assert in_use >= 32e6
        assert list(dist.spawned.published) == ["kept"]


async def test_a_client_that_loses_its_scheduler_gets_a_typed_error_and_reconnects(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc, address = start_scheduler(tmp_path, processes=1, port=port)
    try:
        async with dagger.connect(address, token=TOKEN, heartbeat_interval=0.2,
                                  heartbeat_timeout=2) as cluster:
            chunk = await dagger.put(np.arange(5))
            slow = dagger.spawn(time.sleep, 60)
            assert await dagger.spawn(inc, 1) == 2
            end(proc, signal.SIGKILL)
            with pytest.raises(dagger.SchedulerLostError, match="lost with the connection"):
                await asyncio.wait_for(slow, 30)
            await eventually(lambda: not cluster.connected, 10, "the client saw the loss")
            with pytest.raises(dagger.SchedulerLostError, match="reconnecting"):
                dagger.spawn(inc, 1)
            proc, _ = start_scheduler(tmp_path, processes=1, port=port)
            await eventually(lambda: cluster.connected, 30, "the client reconnected")
            assert await asyncio.wait_for(dagger.spawn(inc, 5), 30) == 6
            # the chunk put before the loss was put again
            assert await asyncio.wait_for(dagger.spawn(total, chunk), 30) == 10.0
    finally:
        end(proc)


# -- bad input -------------------------------------------------------------------------------

async def test_a_wrong_token_is_refused(scheduler):
    start = time.monotonic()
    with pytest.raises(dagger.AuthenticationError, match="wrong token"):
        async with dagger.connect(scheduler, token=secrets.token_urlsafe(32)):
            pass
    assert time.monotonic() - start < 10


async def test_nothing_listening_is_a_connect_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(dagger.ConnectError, match=f"cannot reach the scheduler at tcp://127.0.0.1:{port}"):
        async with dagger.connect(f"tcp://127.0.0.1:{port}", token=TOKEN):
            pass


async def test_something_that_is_not_a_scheduler_is_a_connect_error():
    """An HTTP server (it waits for a request, then answers one that is no frame)."""
    from aiohttp import web

    app = web.Application()
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        start = time.monotonic()
        with pytest.raises(dagger.ConnectError, match="did not answer as an aiodagger scheduler"):
            async with dagger.connect(f"tcp://127.0.0.1:{port}", token=TOKEN, timeout=3):
                pass
        assert time.monotonic() - start < 10
    finally:
        await runner.cleanup()


async def test_a_workers_data_port_is_not_a_scheduler():
    async with dagger.Cluster(processes=1, listen="tcp://127.0.0.1:0", token=TOKEN) as cluster:
        worker = cluster.workers[1]
        with pytest.raises(dagger.ConnectError, match="does not take clients"):
            async with dagger.connect(worker.address, token=TOKEN, timeout=5):
                pass


def test_connect_needs_an_address_and_a_token(monkeypatch):
    monkeypatch.delenv("AIODAGGER_SCHEDULER", raising=False)
    monkeypatch.delenv("AIODAGGER_TOKEN", raising=False)
    monkeypatch.delenv("AIODAGGER_TOKEN_FILE", raising=False)
    with pytest.raises(ValueError, match="needs the scheduler's address"):
        dagger.connect()
    with pytest.raises(ValueError, match="needs the cluster's token"):
        dagger.connect("tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="only tcp://HOST:PORT"):
        dagger.connect("http://127.0.0.1:1", token=TOKEN)

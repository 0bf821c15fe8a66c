"""``dagger.admit()``: a producer's brake. A producer that would outrun the cluster
(a web handler taking work in) waits while the cluster holds ``limit`` tasks in flight."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import pytest

import aiodagger as dagger
from tests.helpers import sleep_then

pytestmark = pytest.mark.timeout(120)


async def test_a_fast_producer_never_holds_more_than_the_limit(cluster):
    tasks, peak = [], 0
    for i in range(300):
        await asyncio.wait_for(dagger.admit(limit=40), 30)
        tasks.append(dagger.spawn(sleep_then, 0.002, i))
        peak = max(peak, cluster.tasks_in_flight)
    assert await asyncio.wait_for(dagger.gather(*tasks), 60) == list(range(300))
    assert peak <= 40
    assert cluster.tasks_in_flight == 0


async def test_a_waiting_producer_resumes_below_90_percent_and_a_cancelled_one_is_forgotten(cluster):
    gate = asyncio.Event()

    async def held(i):
        await gate.wait()
        return i

    tasks = [dagger.spawn(held, i) for i in range(20)]
    waiting = asyncio.ensure_future(dagger.admit(limit=20))
    cancelled = asyncio.ensure_future(dagger.admit(limit=20))
    await asyncio.sleep(0.05)
    assert not waiting.done() and not cancelled.done()
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    assert len(cluster._scheduler._admitting) == 1
    gate.set()
    await asyncio.wait_for(waiting, 10)
    assert cluster.tasks_in_flight <= 18  # resumed at 90 % of 20
    await dagger.gather(*tasks)
    assert cluster._scheduler._admitting == []


async def test_closing_the_cluster_wakes_waiting_producers():
    async with dagger.Cluster(threads=1) as cluster:
        blockers = [dagger.spawn(asyncio.sleep, 30) for _ in range(5)]
        waiting = asyncio.ensure_future(dagger.admit(limit=5))
        await asyncio.sleep(0.05)
        assert not waiting.done()
    await asyncio.wait_for(waiting, 10)  # returned: the spawn it goes on to says the cluster closed
    assert all(t.cancelled() for t in blockers) and cluster.state == "closed"


async def test_admit_limit_is_checked(cluster):
    for bad in (0, -1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="admit\\(limit=...\\) takes a number of tasks >= 1"):
            await dagger.admit(limit=bad)


# -- a FastAPI service under a burst --------------------------------------------------------------
def test_a_fastapi_service_under_a_burst_slows_its_intake_instead_of_piling_up():
    """300 requests, 30 at a time, each taking in a job that takes 0.05 s on a 2-thread
    cluster (40 jobs a second): without the brake the cluster held most of them at once;
    with it, never more than the limit plus the requests inside the handler at once."""
    import httpx
    import uvicorn
    from fastapi import FastAPI

    limit, concurrency = 40, 30
    jobs: list[dagger.DTask[int]] = []

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with dagger.Cluster(threads=2) as cluster:
            app.state.cluster = cluster
            yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/jobs/{n}")
    async def take(n: int) -> dict[str, int]:
        await dagger.admit(limit=limit)
        jobs.append(dagger.spawn(sleep_then, 0.05, n))
        return {"accepted": n}

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_config=None, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-under-test")
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        peak = 0
        done = threading.Event()

        def sample():
            nonlocal peak
            while not done.is_set():
                peak = max(peak, app.state.cluster.tasks_in_flight)
                time.sleep(0.002)

        sampler = threading.Thread(target=sample)
        sampler.start()

        async def burst():
            sem = asyncio.Semaphore(concurrency)
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                async def one(n):
                    async with sem:
                        r = await client.post(f"/jobs/{n}")
                        assert r.status_code == 200 and r.json() == {"accepted": n}
                await asyncio.gather(*[one(n) for n in range(300)])

        asyncio.run(asyncio.wait_for(burst(), 90))
        while app.state.cluster.tasks_in_flight and time.monotonic() < deadline + 60:
            time.sleep(0.02)
        done.set()
        sampler.join(10)
        assert sorted(t.result() for t in jobs) == list(range(300))  # every job taken in ran
        assert limit <= peak <= limit + concurrency, peak
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
    assert not thread.is_alive()

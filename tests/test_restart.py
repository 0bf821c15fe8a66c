"""Worker processes the cluster started are restarted when they die, and the caller's
own process (worker 0) never runs a task that does not name it while the cluster has
worker processes: a task that kills its worker cannot take the application down."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

import aiodagger as dagger

pytestmark = pytest.mark.timeout(120)


def die():
    os._exit(1)


def pid():
    return os.getpid()


async def wait_for_workers(cluster, n, timeout=30):
    async def joined():
        while len([w for w in cluster.workers if w.id != 0]) < n:
            await asyncio.sleep(0.05)
    await asyncio.wait_for(joined(), timeout)


async def test_a_task_that_kills_its_worker_fails_after_its_retries_and_the_caller_lives():
    async with dagger.Cluster(processes=1) as cluster:
        task = dagger.options(retries=1).spawn(die)
        with pytest.raises(dagger.WorkerLostError, match=r"retries \(1\) are spent"):
            await asyncio.wait_for(task, 60)
        await wait_for_workers(cluster, 1)
        assert await asyncio.wait_for(dagger.spawn(pid), 30) != os.getpid()


async def test_a_killed_worker_is_replaced_and_work_waits_for_it():
    """With its only worker process dead, a new task waits for the replacement instead
    of running in the caller's process."""
    async with dagger.Cluster(processes=1) as cluster:
        (first,) = [w for w in cluster.workers if w.id != 0]
        os.kill(first.pid, signal.SIGKILL)
        for _ in range(200):
            if first.id not in [w.id for w in cluster.workers]:
                break
            await asyncio.sleep(0.02)
        ran_in = await asyncio.wait_for(dagger.spawn(pid), 30)
        assert ran_in not in (os.getpid(), first.pid)
        assert [w.id for w in cluster.workers if w.id != 0] != [first.id]


async def test_restarts_are_limited_and_then_tasks_fail_saying_why(monkeypatch):
    import aiodagger.launcher

    monkeypatch.setattr(aiodagger.launcher, "MAX_RESTARTS", 1)
    async with dagger.Cluster(processes=1):
        task = dagger.options(retries=5).spawn(die)
        with pytest.raises(dagger.NoProcessorError, match="kept dying"):
            await asyncio.wait_for(task, 60)
        with pytest.raises(dagger.NoProcessorError, match="kept dying"):
            await asyncio.wait_for(dagger.spawn(pid), 30)  # never in this process
        assert await asyncio.wait_for(
            dagger.options(scope=dagger.scope(worker=0)).spawn(pid), 30) == os.getpid()

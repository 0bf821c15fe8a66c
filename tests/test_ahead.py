"""Tasks sent ahead to worker processes: a dependent whose unfinished inputs all run on
one worker is held there and starts as they finish, on the finishing thread when it can
(aiodagger/scheduler/registry.py send_ahead, aiodagger/worker/process.py _hold).

Each test also checks that what it tests went through holding: without it, the scheduler
sends every task once its inputs are done, and the count of held tasks stays 0."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

import aiodagger as dagger
from aiodagger.scheduler import registry

MOD = 1_000_003


def step(a, b):
    return (a + b) % MOD


def slow_value(seconds, value, marker=None):
    if marker is not None:
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
    time.sleep(seconds)
    return value


def fail_after(seconds, marker=None):
    time.sleep(seconds)
    if marker is not None and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write("failed once")
        raise ValueError("first attempt fails")
    if marker is None:
        raise ValueError("always fails")
    return 1


def busy_link(prev, seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return prev + 1


def wall_clock():
    return time.time()


def expected_chain(x, y, n):
    for _ in range(n):
        x, y = y, (x + y) % MOD
    return y


@pytest.fixture
def held(monkeypatch):
    """How many tasks the scheduler sent ahead of their inputs (held on a worker)."""
    count = [0]
    dispatch = registry.WorkerRegistry.dispatch

    def counted(self, task, worker, waits=None):
        if waits:
            count[0] += 1
        return dispatch(self, task, worker, waits) if waits else dispatch(self, task, worker)

    monkeypatch.setattr(registry.WorkerRegistry, "dispatch", counted)
    return count


def chain(a, b, n):
    tasks = []
    for _ in range(n):
        a, b = b, dagger.spawn(step, a, b)
        tasks.append(b)
    return tasks


async def test_a_two_input_chain_on_worker_processes_is_exact_and_held(held):
    async with dagger.Cluster(processes=2) as c:
        a, b = dagger.spawn(int, 0), dagger.spawn(int, 1)
        tasks = chain(a, b, 5000)
        assert await asyncio.wait_for(tasks[-1], 60) == expected_chain(0, 1, 5000)
        # every value, not only the last (each was computed once, from the right inputs)
        got = await asyncio.wait_for(dagger.gather(*tasks[::97]), 60)
        assert list(got) == [expected_chain(0, 1, i + 1) for i in range(0, 5000, 97)]
        # Nearly every node went ahead of its inputs (not one round trip per node)
        assert held[0] > 4000
        for worker in c._scheduler.dist.workers.values():
            assert not worker.ahead and not worker.running


async def test_a_failing_input_fails_its_held_dependents_as_before(held):
    async with dagger.Cluster(processes=2, threads=1):
        bad = dagger.spawn(fail_after, 0.5)
        one = dagger.spawn(step, bad, bad)
        tasks = chain(bad, one, 50)
        with pytest.raises(ValueError, match="always fails"):
            await asyncio.wait_for(bad, 30)
        for t in [one, *tasks]:
            with pytest.raises(dagger.UpstreamError, match="ValueError: always fails") as info:
                await asyncio.wait_for(t, 30)
            assert isinstance(info.value.__cause__, ValueError)
            assert info.value.origin is bad
        assert held[0] >= 40
        # the worker forgot them: a new chain there runs
        c = dagger.spawn(slow_value, 0.2, 3)
        assert await asyncio.wait_for(chain(c, c, 20)[-1], 30) == expected_chain(3, 3, 20)


async def test_an_input_retried_after_an_error_gives_held_dependents_its_new_value(held, tmp_path):
    marker = str(tmp_path / "failed")
    async with dagger.Cluster(processes=2, threads=1):
        flaky = dagger.options(retries=1).spawn(fail_after, 0.5, marker)
        tasks = chain(flaky, flaky, 50)
        assert await asyncio.wait_for(tasks[-1], 30) == expected_chain(1, 1, 50)
        assert os.path.exists(marker)  # the first attempt did fail
        assert held[0] >= 40


async def test_cancelling_a_held_task(held):
    async with dagger.Cluster(processes=2, threads=1):
        head = dagger.spawn(slow_value, 1.0, 5)
        victim = dagger.spawn(step, head, head)
        after = dagger.spawn(step, victim, head)
        other = dagger.spawn(step, head, 1)
        await asyncio.sleep(0.3)  # sent ahead while the head runs
        assert held[0] >= 3
        assert victim.cancel()
        with pytest.raises(dagger.TaskCancelledError):
            await asyncio.wait_for(after, 10)
        with pytest.raises((asyncio.CancelledError, dagger.TaskCancelledError)):
            await asyncio.wait_for(victim, 10)
        # the head and its other held dependent are unaffected; nothing hangs
        assert await asyncio.wait_for(other, 10) == 6
        assert await asyncio.wait_for(head, 10) == 5
        assert await asyncio.wait_for(dagger.spawn(step, head, head), 10) == 10


async def test_kill_9_of_the_worker_holding_tasks(held, tmp_path):
    marker = tmp_path / "started"
    async with dagger.Cluster(processes=2, threads=1) as c:
        head = dagger.options(retries=1).spawn(slow_value, 2.0, 7, str(marker))
        one = dagger.spawn(step, head, head)
        tasks = chain(head, one, 300)
        deadline = time.monotonic() + 20
        while not marker.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        victim = int(marker.read_text())
        dist = c._scheduler.dist
        holding = [w for w in dist.workers.values() if w.pid == victim]
        assert holding and len(holding[0].ahead) > 100
        os.kill(victim, signal.SIGKILL)
        assert await asyncio.wait_for(tasks[-1], 60) == expected_chain(7, 14, 300)
        assert await asyncio.wait_for(one, 10) == 14


async def test_a_task_of_higher_priority_is_not_delayed_behind_a_held_chain(held):
    async with dagger.Cluster(processes=1, threads=1):
        gate = dagger.spawn(slow_value, 0.5, 0)
        t = gate
        for _ in range(1500):  # 3 s of links, each 2 ms
            t = dagger.spawn(busy_link, t, 0.002)
        await asyncio.wait_for(gate, 10)
        await asyncio.sleep(0.2)  # the chain runs on the worker's one thread
        assert held[0] > 500
        spawned = time.time()
        urgent = dagger.options(priority=10).spawn(wall_clock)
        started = await asyncio.wait_for(urgent, 10)
        # Without yielding, it would wait for the chain (or MAX_CONTINUATIONS links: 0.5 s)
        assert started - spawned < 0.25
        assert await asyncio.wait_for(t, 30) == 1500

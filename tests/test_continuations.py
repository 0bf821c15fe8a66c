"""Continuations: a pool thread runs a dependent that its task just made ready, whatever
its number of inputs, without starving other work (aiodagger/worker/threads.py)."""

from __future__ import annotations

import threading
import time

import pytest

import aiodagger as dagger
from aiodagger.worker import threads


def step(a, b):
    return (a + b) % 1_000_003


def busy(seconds, log, name):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    log.append(name)
    return name


def link(prev, log, i):
    log.append(i)
    return i


@pytest.fixture
def submissions(monkeypatch):
    """How many tasks the loop handed to the pool (continuations are not handed)."""
    count = [0]
    submit = threads.ThreadProc.submit

    def counted(self, task):
        count[0] += 1
        submit(self, task)

    monkeypatch.setattr(threads.ThreadProc, "submit", counted)
    return count


async def test_a_two_input_chain_runs_as_continuations(submissions):
    async with dagger.Cluster(threads=1):
        a, b = dagger.spawn(int, 0), dagger.spawn(int, 1)
        for _ in range(3000):
            a, b = b, dagger.spawn(step, a, b)
        got = await b
    x, y = 0, 1
    for _ in range(3000):
        x, y = y, (x + y) % 1_000_003
    assert got == y
    # Each node once through the loop would be 3,002 hand-offs; a chain yields to the
    # loop every MAX_CONTINUATIONS links.
    assert submissions[0] < 3000 / threads.MAX_CONTINUATIONS + 20


async def test_a_long_chain_yields_to_a_task_of_higher_priority():
    log: list = []
    async with dagger.Cluster(threads=1):
        gate = threading.Event()
        first = dagger.spawn(gate.wait, 10)
        t = first
        for i in range(2000):
            t = dagger.spawn(link, t, log, i)
        urgent = dagger.options(priority=10).spawn(busy, 0, log, "urgent")
        gate.set()
        await t
        await urgent
    assert log.index("urgent") < 2000 // 2  # not behind the whole chain


async def test_a_long_chain_yields_to_ready_tasks_of_its_own_priority():
    log: list = []
    async with dagger.Cluster(threads=1):
        gate = threading.Event()
        t = dagger.spawn(gate.wait, 10)
        for i in range(2000):
            t = dagger.spawn(link, t, log, i)
        other = dagger.spawn(busy, 0, log, "other")
        gate.set()
        await t
        await other
    assert log.index("other") <= threads.MAX_CONTINUATIONS + 1

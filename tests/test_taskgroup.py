"""TaskGroup: structured concurrency, failures cancel the rest."""

from __future__ import annotations

import asyncio

import pytest

import aiodagger as dagger
from tests.helpers import asleep_forever, boom, inc


async def test_exit_waits_for_every_task(cluster):
    async with dagger.TaskGroup() as tg:
        tasks = [tg.spawn(inc, i) for i in range(10)]
        slow = tg.spawn(asyncio.sleep, 0.05, "late")
    assert all(t.done() for t in tasks) and slow.result() == "late"
    assert [t.result() for t in tasks] == list(range(1, 11))


async def test_first_failure_cancels_the_rest_and_raises_group(cluster):
    with pytest.raises(ExceptionGroup) as info:
        async with dagger.TaskGroup() as tg:
            sleeper = tg.spawn(asleep_forever)
            failing = tg.spawn(boom)
            downstream = tg.spawn(inc, failing)
    group = info.value
    assert [type(e) for e in group.exceptions] == [ValueError]  # the upstream error is not repeated
    assert sleeper.cancelled()
    assert downstream.state == "failed"


async def test_body_exception_cancels_tasks(cluster):
    with pytest.raises(ExceptionGroup) as info:
        async with dagger.TaskGroup() as tg:
            sleeper = tg.spawn(asleep_forever)
            raise KeyError("body")
    assert isinstance(info.value.exceptions[0], KeyError)
    assert sleeper.cancelled()


async def test_cancelling_the_waiting_coroutine_cancels_group(cluster):
    spawned = []

    async def body():
        async with dagger.TaskGroup() as tg:
            spawned.append(tg.spawn(asleep_forever))

    runner = asyncio.ensure_future(body())
    await asyncio.sleep(0.02)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    assert spawned[0].cancelled()


async def test_spawn_after_exit_is_refused(cluster):
    async with dagger.TaskGroup() as tg:
        tg.spawn(inc, 1)
    with pytest.raises(RuntimeError, match="exited"):
        tg.spawn(inc, 1)

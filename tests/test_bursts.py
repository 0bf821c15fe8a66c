"""Bursts through worker processes: batches larger than one frame are split, every task
gets its own value, and nothing waits forever."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import aiodagger as dagger

pytestmark = pytest.mark.timeout(180)


async def echo(i):
    await asyncio.sleep(0)
    return i


async def small_array(i):
    return np.full(3, i)


def inc(x):
    return x + 1


def many_arrays(arrays):
    return [a + 1 for a in arrays]


def blob(i):
    return np.full(70_000 // 8, float(i))  # past the 64 KiB inline limit: stays on the worker


@pytest.fixture
async def one_worker():
    async with dagger.Cluster(processes=1) as cluster:
        yield cluster


async def test_five_thousand_coroutines_on_one_worker(one_worker):
    """More run records than a frame's 4,096 buffers: the batch goes as several frames."""
    values = await asyncio.wait_for(dagger.gather(*[dagger.spawn(echo, i) for i in range(5000)]), 120)
    assert values == list(range(5000))


async def test_three_thousand_small_array_results(one_worker):
    """6,000 completion buffers: the done batch is split too."""
    values = await asyncio.wait_for(
        dagger.gather(*[dagger.spawn(small_array, i) for i in range(3000)]), 120)
    assert all(int(v[0]) == i for i, v in enumerate(values))


async def test_seventy_thousand_tasks_in_one_burst(one_worker):
    """Past 65,535 buffers the frame's count field would overflow: nothing may hang."""
    values = await asyncio.wait_for(dagger.gather(*[dagger.spawn(inc, i) for i in range(70_000)]), 150)
    assert sum(values) == sum(range(1, 70_001))


async def test_arguments_and_result_of_five_thousand_arrays(one_worker):
    """One task whose arguments and result hold more arrays than a frame has buffers."""
    arrays = [np.full(2, i) for i in range(5000)]
    out = await asyncio.wait_for(dagger.spawn(many_arrays, arrays), 60)
    assert len(out) == 5000 and all(int(a[0]) == i + 1 for i, a in enumerate(out))


async def test_gathering_more_values_than_one_reply_carries(one_worker):
    """2,100 results of 70 kB from one worker: the get reply names what did not fit, and
    the caller asks again."""
    tasks = [dagger.spawn(blob, i) for i in range(2100)]
    await asyncio.wait_for(dagger.wait(tasks), 120)
    values = await asyncio.wait_for(dagger.gather(*tasks), 120)
    assert [float(v[0]) for v in values] == [float(i) for i in range(2100)]


def named(i):
    return i


async def test_a_record_that_does_not_encode_fails_its_task_only(one_worker):
    """A task name that is not valid UTF-8 makes its run record unencodable: that task
    fails with SerializationError saying so, the 999 others in its batch run."""
    bad = dagger.options(name="bad\udcff").spawn(named, -1)
    good = [dagger.spawn(named, i) for i in range(999)]
    with pytest.raises(dagger.SerializationError, match="did not encode.*valid UTF-8"):
        await asyncio.wait_for(bad, 30)
    assert await asyncio.wait_for(dagger.gather(*good), 60) == list(range(999))
    assert await asyncio.wait_for(dagger.spawn(named, 7), 30) == 7


async def test_a_nested_spawn_that_does_not_encode_fails_with_a_clear_error(one_worker):
    """The same from a task on the worker process: its spawn record goes to the cluster."""
    async def parent():
        child = dagger.options(name="bad\udcff").spawn(named, 1)
        try:
            await child
        except Exception as exc:
            return type(exc).__name__
        return "no error"

    assert await asyncio.wait_for(dagger.spawn(parent), 30) == "SerializationError"

"""Cancellation: t.cancel() cancels the task and its dependents; cancelling an awaiter does not."""

from __future__ import annotations

import asyncio
import threading

import pytest

import aiodagger as dagger
from tests.helpers import asleep_forever, block_on, inc


async def test_cancel_pending_task_and_dependents(cluster):
    gate = threading.Event()
    root = dagger.spawn(block_on, gate)
    child = dagger.spawn(inc, root)
    grandchild = dagger.spawn(inc, child)
    assert child.state == "pending"
    assert child.cancel() is True
    assert child.cancelled() and grandchild.cancelled()
    with pytest.raises(dagger.TaskCancelledError, match="was cancelled"):
        await child
    with pytest.raises(dagger.TaskCancelledError, match="dependency"):
        await grandchild
    gate.set()
    assert await root == "released"
    assert child.cancel() is False


async def test_cancel_running_coroutine(cluster):
    started = asyncio.Event()
    cancelled = []

    async def worker():
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    t = dagger.spawn(worker)
    await asyncio.wait_for(started.wait(), 5)
    assert t.state == "running"
    assert t.cancel()
    await asyncio.sleep(0.01)
    assert cancelled == [True]
    assert t.state == "cancelled"
    with pytest.raises(dagger.TaskCancelledError):
        t.result()


async def test_cancelling_awaiter_does_not_cancel_shared_task(cluster):
    t = dagger.spawn(asleep_forever)

    async def awaiter():
        return await t

    waiter = asyncio.ensure_future(awaiter())
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not t.done()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.02):  # times out the awaiting coroutine only
            await t
    assert not t.done()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(t), 0.02)
    assert not t.done()
    assert t.cancel()


async def test_asyncio_helpers_never_cancel_the_task(cluster):
    # wait_for / gather wrap a DTask in a Task of their own: their timeouts and
    # cancellations stop the wrapper, never the shared DTask.
    t = dagger.spawn(asleep_forever)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(t, 0.02)
    g = asyncio.ensure_future(asyncio.gather(t))
    await asyncio.sleep(0.01)
    g.cancel()
    with pytest.raises(asyncio.CancelledError):
        await g
    assert not t.done()
    assert t.cancel() and t.cancelled()


async def test_cancel_running_thread_task_discards_result(cluster):
    gate = threading.Event()
    t = dagger.spawn(block_on, gate)
    await asyncio.sleep(0.02)
    assert t.cancel()
    gate.set()
    await asyncio.sleep(0.05)
    assert t.state == "cancelled"


async def test_spawn_on_cancelled_dependency_is_cancelled(cluster):
    t = dagger.spawn(asleep_forever)
    t.cancel()
    u = dagger.spawn(inc, t)
    assert u.cancelled()


async def test_cancel_from_another_thread(cluster):
    t = dagger.spawn(asleep_forever)
    result = await asyncio.to_thread(t.cancel)
    assert result is True and t.cancelled()


async def test_cluster_exit_cancels_unfinished_tasks():
    async with dagger.Cluster(threads=1):
        t = dagger.spawn(asleep_forever)
        await asyncio.sleep(0)
    assert t.cancelled()


def _block(seconds):
    import time

    time.sleep(seconds)
    return seconds


async def test_a_cancelled_sync_task_keeps_its_slot_until_its_thread_is_free():
    """A running sync task cannot be stopped: after cancel() its worker's thread stays busy
    until the function returns, so new work goes to a free worker instead of queueing
    behind it."""
    async with dagger.Cluster(processes=2, threads=1) as cluster:
        first, second = sorted(w.id for w in cluster.workers if w.id != 0)
        await dagger.spawn(_block, 0.3)  # learn that _block takes a while
        blocked = dagger.options(scope=dagger.scope(worker=first)).spawn(_block, 3.0)
        await asyncio.sleep(0.3)
        blocked.cancel()
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(dagger.spawn(_block, 0.01), 10) == 0.01
        assert asyncio.get_running_loop().time() - started < 1.5, "it queued behind the cancelled run"

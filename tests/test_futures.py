"""DTask states and results, gather / wait / as_completed, and asyncio's own helpers."""

from __future__ import annotations

import asyncio
import threading

import pytest

import aiodagger as dagger
from tests.helpers import ainc, asleep_forever, block_on, boom, inc, sleep_then


async def test_states_through_a_lifetime(cluster):
    gate = threading.Event()
    first = dagger.spawn(block_on, gate)
    second = dagger.spawn(inc, dagger.spawn(len, "ab"))
    dependent = dagger.spawn(lambda x: x, first)
    await asyncio.sleep(0.02)
    assert first.state == "running"
    assert dependent.state == "pending"
    assert not dependent.done()
    with pytest.raises(asyncio.InvalidStateError):
        dependent.result()
    with pytest.raises(asyncio.InvalidStateError):
        dependent.exception()
    gate.set()
    assert await dependent == "released"
    assert (first.state, dependent.state) == ("finished", "finished")
    assert await second == 3
    assert second.result() == 3 and second.exception() is None
    assert isinstance(first.id, int) and first.id < dependent.id
    assert "finished" in repr(first)


async def test_ready_state_while_waiting_for_a_thread():
    gate = threading.Event()
    async with dagger.Cluster(threads=1):
        busy = dagger.spawn(block_on, gate)
        await asyncio.sleep(0.02)
        queued = [dagger.spawn(inc, i) for i in range(20)]
        await asyncio.sleep(0.02)
        assert "ready" in {t.state for t in queued}
        gate.set()
        await dagger.gather(busy, *queued)


async def test_gather_returns_in_order_and_raises_first_failure(cluster):
    slow = dagger.spawn(sleep_then, 0.05, "slow")
    fast = dagger.spawn(inc, 1)
    assert await dagger.gather(slow, fast) == ["slow", 2]
    bad = dagger.spawn(boom)
    with pytest.raises(ValueError):
        await dagger.gather(dagger.spawn(sleep_then, 0.05, 1), bad)
    results = await dagger.gather(fast, bad, return_exceptions=True)
    assert results[0] == 2 and isinstance(results[1], ValueError)
    assert await dagger.gather() == []


async def test_gather_cancelled_caller_leaves_tasks_running(cluster):
    t = dagger.spawn(asleep_forever)
    g = asyncio.ensure_future(dagger.gather(t))
    await asyncio.sleep(0.01)
    g.cancel()
    with pytest.raises(asyncio.CancelledError):
        await g
    assert not t.done()
    t.cancel()


async def test_wait_modes(cluster):
    fast = dagger.spawn(inc, 1)
    slow = dagger.spawn(asleep_forever)
    done, pending = await dagger.wait([fast, slow], return_when="FIRST_COMPLETED")
    assert done == {fast} and pending == {slow}
    done, pending = await dagger.wait([fast, slow], timeout=0.05)
    assert done == {fast} and pending == {slow}
    bad = dagger.spawn(boom)
    done, pending = await dagger.wait([bad, slow], return_when="FIRST_EXCEPTION")
    assert done == {bad}
    slow.cancel()
    done, pending = await dagger.wait([fast, slow, bad])
    assert pending == set()
    with pytest.raises(ValueError):
        await dagger.wait([fast], return_when="SOMETIMES")


async def test_as_completed_yields_in_finish_order(cluster):
    tasks = [dagger.spawn(sleep_then, d, d) for d in (0.15, 0.0, 0.07)]
    order = [t.result() async for t in dagger.as_completed(tasks)]
    assert order == [0.0, 0.07, 0.15]


async def test_as_completed_timeout(cluster):
    t = dagger.spawn(asleep_forever)
    with pytest.raises(TimeoutError):
        async for _ in dagger.as_completed([t], timeout=0.05):
            pass
    t.cancel()


async def test_asyncio_gather_wait_and_as_completed_accept_dtasks(cluster):
    a, b = dagger.spawn(inc, 1), dagger.spawn(inc, 2)
    assert await asyncio.gather(a, b) == [2, 3]
    done, pending = await asyncio.wait([dagger.spawn(inc, 3)], timeout=5)
    assert [d.result() for d in done] == [4] and not pending
    values = [await f for f in asyncio.as_completed([dagger.spawn(inc, 4), dagger.spawn(inc, 5)])]
    assert sorted(values) == [5, 6]
    async with asyncio.TaskGroup() as tg:
        wrapped = tg.create_task(_await(dagger.spawn(inc, 9)))
    assert wrapped.result() == 10


async def _await(t):
    return await t


async def test_a_task_factory_set_on_the_loop_makes_the_coroutine_tasks():
    # Coroutine tasks skip loop.create_task on asyncio's loops only while no factory is
    # set; one set while the cluster runs is honoured from then on.
    loop = asyncio.get_running_loop()
    made: list[str] = []

    def factory(loop, coro, **kwargs):
        made.append(coro.__qualname__)
        return asyncio.Task(coro, loop=loop, **kwargs)

    async with dagger.Cluster():
        assert await asyncio.wait_for(dagger.spawn(ainc, 0), 10) == 1
        loop.set_task_factory(factory)
        try:
            got = await asyncio.wait_for(dagger.gather(*[dagger.spawn(ainc, i) for i in range(5)]), 10)
            assert got == [1, 2, 3, 4, 5]
            assert await asyncio.wait_for(dagger.options(timeout=10).spawn(ainc, 9), 10) == 10
        finally:
            loop.set_task_factory(None)
    assert sum(name.endswith("_run_plain") for name in made) == 5, made
    assert sum(name.endswith("_run") for name in made) == 1, made


async def test_add_done_callback_runs_on_callers_loop(cluster):
    loop = asyncio.get_running_loop()
    seen = asyncio.Event()
    calls = []

    def cb(task):
        calls.append((task.result(), asyncio.get_running_loop() is loop))
        seen.set()

    t = dagger.spawn(inc, 1)
    t.add_done_callback(cb)
    await asyncio.wait_for(seen.wait(), 5)
    assert calls == [(2, True)]
    t.add_done_callback(cb)  # already done: still called, once
    await asyncio.sleep(0.01)
    assert len(calls) == 2


async def test_remove_done_callback(cluster):
    t = dagger.spawn(asleep_forever)
    calls = []
    t.add_done_callback(calls.append)
    assert t.remove_done_callback(calls.append) == 1
    t.cancel()
    await asyncio.sleep(0.01)
    assert calls == []


async def test_await_finished_task_many_times(cluster):
    t = dagger.spawn(inc, 1)
    assert [await t for _ in range(3)] == [2, 2, 2]
    bad = dagger.spawn(boom)
    for _ in range(2):
        with pytest.raises(ValueError):
            await bad


async def test_fetch_with_timeout_from_thread(cluster):
    t = dagger.spawn(asleep_forever)
    with pytest.raises(TimeoutError, match="keeps running"):
        await asyncio.to_thread(t.fetch, 0.05)
    assert not t.done()
    t.cancel()
    with pytest.raises(dagger.TaskCancelledError):
        await asyncio.to_thread(t.fetch, 5)


async def test_task_wait_does_not_raise(cluster):
    bad = dagger.spawn(boom)
    assert await bad.wait() is None
    assert bad.state == "failed"
    ok = dagger.spawn(sleep_then, 0.01, 1)
    await ok.wait()
    assert ok.done()


def test_gather_and_wait_from_another_loop_under_contention():
    # The cluster runs on its own loop thread (sync `with`); this thread's loop gathers,
    # so completions race with registrations. A lost wake-up here is a hang.
    async def rounds(n):
        for _ in range(n):
            tasks = [dagger.spawn(inc, i) for i in range(3000)]
            assert await asyncio.wait_for(dagger.gather(*tasks), 20) == [i + 1 for i in range(3000)]
            more = [dagger.spawn(inc, i) for i in range(500)]
            done, pending = await asyncio.wait_for(dagger.wait(more), 20)
            assert len(done) == 500 and not pending

    with dagger.Cluster(threads=2):
        asyncio.run(rounds(15))


async def test_waiters_of_the_loop_and_of_threads_run_once_in_registration_order(cluster):
    # The first waiter registered on the cluster's loop takes a slot of its own; the
    # others, and any from another thread, go to a list made at the first of them.
    loop = asyncio.get_running_loop()
    gate = asyncio.Event()

    async def held():
        await gate.wait()
        return 7

    t = dagger.spawn(held)
    order: list[str] = []
    t._on_done_in(loop, lambda _t: order.append("loop 1"))
    other = threading.Thread(target=t._on_done, args=(lambda _t: order.append("thread"),))
    other.start()
    other.join(10)
    t._on_done_in(loop, lambda _t: order.append("loop 2"))
    t.add_done_callback(lambda _t: order.append("callback"))  # through call_soon
    both = [asyncio.ensure_future(dagger.gather(t, t)), asyncio.ensure_future(dagger.gather(t))]
    assert order == []
    gate.set()
    assert await asyncio.wait_for(t, 10) == 7
    assert await asyncio.wait_for(asyncio.gather(*both), 10) == [[7, 7], [7]]
    assert order == ["loop 1", "thread", "loop 2", "callback"]
    assert t._waiter is None and t._waiters is None  # nothing kept once delivered

    late = dagger.spawn(held)  # the gate is open: it finishes at its first step
    thread_first: list[str] = []
    other = threading.Thread(target=late._on_done, args=(lambda _t: thread_first.append("thread"),))
    other.start()
    other.join(10)
    late._on_done_in(loop, lambda _t: thread_first.append("loop"))  # after the list's waiter
    assert await asyncio.wait_for(late, 10) == 7
    assert thread_first == ["thread", "loop"]


async def test_gather_that_raises_leaves_no_waiter_behind_that_misfires(cluster):
    gate = asyncio.Event()

    async def held():
        await gate.wait()
        return 1

    pending = [dagger.spawn(held) for _ in range(3)]
    failed = dagger.spawn(boom)
    with pytest.raises(ValueError):
        await asyncio.wait_for(failed, 10)
    # Registered on the pending tasks before it reaches the failure: it raises at once,
    # and their completions later find its future done.
    with pytest.raises(ValueError):
        await asyncio.wait_for(dagger.gather(*pending, failed), 10)
    with pytest.raises(TypeError, match="takes DTasks"):
        await dagger.gather(*pending, "not a task")
    gate.set()
    assert await asyncio.wait_for(dagger.gather(*pending), 10) == [1, 1, 1]


def test_waiters_registered_from_other_threads_run_exactly_once():
    counts: dict[int, int] = {}
    lock = threading.Lock()

    def count(t):
        with lock:
            counts[t.id] = counts.get(t.id, 0) + 1

    with dagger.Cluster(threads=2):
        for _ in range(20):
            tasks = [dagger.spawn(inc, i) for i in range(500)]
            for t in tasks:  # registered while the tasks complete on the cluster's threads
                t._on_done(count)
            for t in tasks:
                t.fetch(timeout=10)
    assert len(counts) == 20 * 500
    assert set(counts.values()) == {1}

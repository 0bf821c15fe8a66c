"""DTasks awaited from trio code, and from anyio's code on both of its backends.

These are sync tests that start their own run (``trio.run`` / ``anyio.run``), each
under a deadline, so pytest-asyncio leaves them alone. The cluster is the default one
(its own asyncio loop thread) unless a test enters one with ``async with``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
import trio

import aiodagger as dagger
from aiodagger.cluster import running_cluster
from tests.helpers import ainc, asleep_forever, boom, inc

DEADLINE = 20.0


def run_trio(main: Callable[[], Awaitable[Any]]) -> Any:
    async def bounded() -> Any:
        with trio.fail_after(DEADLINE):
            return await main()

    return trio.run(bounded)


def run_anyio(main: Callable[[], Awaitable[Any]], backend: str) -> Any:
    async def bounded() -> Any:
        with anyio.fail_after(DEADLINE):
            return await main()

    return anyio.run(bounded, backend=backend)


@pytest.fixture(autouse=True)
def nothing_logged(caplog):
    """A waiter crossing into trio must never fail on the cluster's thread, where it
    would only be logged."""
    yield
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not noisy, [r.getMessage() for r in noisy]


# -- trio ---------------------------------------------------------------------------------


def test_values_of_sync_async_and_dependent_tasks():
    async def main():
        a = dagger.spawn(inc, 1)
        b = dagger.spawn(ainc, a)
        return await a, await b, await dagger.spawn(inc, b)

    assert run_trio(main) == (2, 3, 4)


def test_the_default_cluster_runs_on_a_loop_thread_of_its_own():
    async def main():
        assert running_cluster() is None
        t = dagger.spawn(asyncio.sleep, 0.01, "slept")  # an asyncio coroutine: on the cluster's loop
        cluster = running_cluster()
        return await t, cluster.loop, cluster._loop_thread.thread_id

    value, loop, thread_id = run_trio(main)
    assert value == "slept"
    assert thread_id != threading.get_ident()
    assert loop.is_running()  # still: the default cluster outlives the trio run


def test_errors_keep_their_type():
    async def main():
        failing = dagger.spawn(boom)
        with pytest.raises(ValueError, match="boom"):
            await failing
        with pytest.raises(dagger.UpstreamError) as info:
            await dagger.spawn(inc, failing)
        assert info.value.origin.id == failing.id
        sleeper = dagger.spawn(asleep_forever)
        sleeper.cancel()
        with pytest.raises(dagger.TaskCancelledError):
            await sleeper

    run_trio(main)


def test_many_awaiters_in_a_nursery():
    async def main():
        tasks = [dagger.spawn(ainc, i) for i in range(200)]
        results = [None] * len(tasks)

        async def one(i):
            results[i] = await tasks[i]

        async with trio.open_nursery() as nursery:
            for i in range(len(tasks)):
                nursery.start_soon(one, i)
        return results, await dagger.gather(*tasks)

    results, gathered = run_trio(main)
    assert results == gathered == list(range(1, 201))


def test_gather_raises_a_failure_already_known_and_a_non_task():
    async def main():
        failed = dagger.spawn(boom)
        with pytest.raises(ValueError, match="boom"):
            await failed
        pending = dagger.spawn(ainc, 1)
        with pytest.raises(ValueError, match="boom"):
            await dagger.gather(pending, failed)
        with pytest.raises(TypeError, match="takes DTasks"):
            await dagger.gather(pending, "not a task")
        return await dagger.gather(pending)

    assert run_trio(main) == [2]


def test_a_failure_in_a_nursery_ends_the_other_waits_not_their_tasks():
    async def main():
        slow = dagger.spawn(asyncio.sleep, 0.3, "slow")

        async def wait_for(t):
            await t

        with pytest.raises(BaseExceptionGroup) as info:
            async with trio.open_nursery(strict_exception_groups=True) as nursery:
                nursery.start_soon(wait_for, slow)
                nursery.start_soon(wait_for, dagger.spawn(boom))
        return info.value, slow, await slow

    group, slow, value = run_trio(main)
    assert group.subgroup(ValueError) is not None
    assert value == "slow" and slow.state == "finished"


def test_a_cancel_scope_ends_the_wait_not_the_task():
    async def main():
        t = dagger.spawn(asyncio.sleep, 0.3, "late")
        with trio.move_on_after(0.02) as scope:
            await t
        assert scope.cancelled_caught
        assert t.state == "running"
        with pytest.raises(trio.TooSlowError):
            with trio.fail_after(0.02):
                await t.wait()
        return await t

    assert run_trio(main) == "late"


def test_a_wait_abandoned_by_a_run_that_ended_is_harmless():
    # The waiter of the cancelled wait fires after trio.run has returned: it finds the
    # run gone (trio.RunFinishedError) and does nothing, on the cluster's thread.
    async def main():
        t = dagger.spawn(asyncio.sleep, 0.1, "late")
        with trio.move_on_after(0.01):
            await t
        return t

    t = run_trio(main)
    assert t.fetch(timeout=10) == "late"


def test_done_callbacks_run_in_the_trio_thread():
    async def main():
        seen = trio.Event()
        threads = []

        def callback(t):
            threads.append(threading.get_ident())
            seen.set()  # a trio object: only safe to touch from the run's thread

        dagger.spawn(inc, 1).add_done_callback(callback)
        await seen.wait()
        return threads

    assert run_trio(main) == [threading.get_ident()]


def test_wait_as_completed_and_progress():
    async def main():
        fast, slow = dagger.spawn(inc, 1), dagger.spawn(asyncio.sleep, 0.2, "slow")
        done, pending = await dagger.wait([fast, slow], return_when="FIRST_COMPLETED")
        assert done == {fast} and pending == {slow}
        done, pending = await dagger.wait([slow], timeout=0.01)
        assert pending == {slow}
        order = [t async for t in dagger.as_completed([slow, fast])]
        assert order == [fast, slow]
        with pytest.raises(TimeoutError):
            async for _ in dagger.as_completed([dagger.spawn(asleep_forever)], timeout=0.02):
                pass
        assert await dagger.progress([fast, slow], bar=False) == [fast, slow]

    run_trio(main)


def test_a_cluster_entered_in_trio_runs_beside_it():
    async def main():
        async with dagger.Cluster(threads=2) as cluster:
            assert cluster._loop_thread.thread_id != threading.get_ident()
            assert running_cluster() is cluster
            value = await dagger.spawn(ainc, 1)
        return cluster, value

    cluster, value = run_trio(main)
    assert value == 2 and cluster.state == "closed"


def test_values_held_by_a_worker_process_come_to_trio():
    async def main():
        async with dagger.Cluster(processes=1) as cluster:
            t = dagger.spawn(divmod, 85, 2)  # a tuple: kept on worker 1, where it was made
            chunk = await dagger.put(list(range(3)))
            assert await t == (42, 1) and t._where == {1}  # brought from worker 1
            assert await dagger.spawn(len, chunk) == 3
            assert 1 in await cluster.worker_stats()

    run_trio(main)


def test_streams_logs_files_and_close(tmp_path):
    def numbers():
        yield from range(5)

    async def main():
        async with dagger.Cluster(threads=2) as cluster:
            dagger.enable_logging()
            try:
                stream = dagger.spawn_streaming(numbers)
                assert [v async for v in stream] == [0, 1, 2, 3, 4]
                logs = await dagger.fetch_logs()
                assert logs.tasks[stream.id].endswith("numbers")
            finally:
                dagger.disable_logging()
            here = await dagger.tofile({"a": 1}, tmp_path / "here.pkl")
            there = await dagger.tofile(dagger.spawn(inc, 1), tmp_path / "there.pkl")
            assert await dagger.spawn(lambda a, b: (a, b), here, there) == ({"a": 1}, 2)
            await cluster.close()
            assert cluster.state == "closed"

    run_trio(main)


# -- TaskGroup in trio ----------------------------------------------------------------------


def test_taskgroup_waits_and_a_failure_cancels_the_rest():
    async def main():
        async with dagger.TaskGroup() as tg:
            tasks = [tg.spawn(ainc, i) for i in range(10)]
        assert [t.result() for t in tasks] == list(range(1, 11))
        with pytest.raises(ExceptionGroup) as info:
            async with dagger.TaskGroup() as tg:
                sleeper = tg.spawn(asleep_forever)
                tg.spawn(boom)
        assert [type(e) for e in info.value.exceptions] == [ValueError]
        assert sleeper.cancelled()

    run_trio(main)


def test_a_cancel_scope_around_a_taskgroup_cancels_its_tasks():
    async def main():
        spawned = []
        with trio.move_on_after(0.05) as scope:
            async with dagger.TaskGroup() as tg:
                spawned.append(tg.spawn(asleep_forever))
                spawned.append(tg.spawn(asyncio.sleep, 3600))
        assert scope.cancelled_caught
        assert all(t.cancelled() for t in spawned)
        assert running_cluster().tasks_in_flight == 0

    run_trio(main)


# -- anyio, on either backend -----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_anyio(backend):
    async def main():
        assert await dagger.spawn(ainc, 1) == 2
        with pytest.raises(ValueError):
            await dagger.spawn(boom)
        tasks = [dagger.spawn(inc, i) for i in range(50)]
        results = {}

        async def one(i):
            results[i] = await tasks[i]

        async with anyio.create_task_group() as group:
            for i in range(len(tasks)):
                group.start_soon(one, i)
        assert [results[i] for i in range(50)] == await dagger.gather(*tasks)
        slow = dagger.spawn(asyncio.sleep, 0.2, "slow")
        with anyio.move_on_after(0.02):
            await slow
        assert not slow.done()
        with anyio.move_on_after(0.05):
            async with dagger.TaskGroup() as tg:
                sleeper = tg.spawn(asleep_forever)
        assert sleeper.cancelled()
        return await slow

    assert run_anyio(main, backend) == "slow"


# -- nothing to wait in ---------------------------------------------------------------------


def test_awaiting_outside_any_event_loop_says_what_to_do():
    t = dagger.spawn(asyncio.sleep, 0.05)

    async def waiter():
        await t

    coro = waiter()
    with pytest.raises(RuntimeError, match=r"no event loop is running.*t\.fetch\(\)"):
        coro.send(None)
    assert t.fetch(timeout=10) is None

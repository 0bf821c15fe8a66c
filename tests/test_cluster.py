"""Cluster lifecycle: async with, with, the default cluster, clean shutdown, workers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading

import pytest

import aiodagger as dagger
from tests.conftest import aiodagger_threads
from tests.helpers import asleep_forever, inc


async def test_async_with_binds_to_running_loop():
    async with dagger.Cluster(threads=3) as c:
        assert c.loop is asyncio.get_running_loop()
        assert c.state == "running"
        assert len(aiodagger_threads()) == 3
        assert await dagger.spawn(inc, 1) == 2
    assert c.state == "closed"
    assert aiodagger_threads() == []
    assert c.workers == []


async def test_close_waits_for_threads_that_signalled_but_have_not_ended(monkeypatch):
    # A pool thread tells the loop it is done from its ``finally`` and only then ends;
    # widen that gap, as a busy machine does, and close must still leave no thread behind.
    import time

    from aiodagger.worker import threads

    signal = threads.call_soon_quietly

    def signal_then_linger(loop, fn, *args):
        signal(loop, fn, *args)
        if threading.current_thread().name.startswith("aiodagger"):
            time.sleep(0.3)

    monkeypatch.setattr(threads, "call_soon_quietly", signal_then_linger)
    async with dagger.Cluster(threads=2):
        assert await dagger.spawn(inc, 1) == 2
    assert aiodagger_threads() == []


async def test_workers_lists_worker_zero(cluster):
    (w,) = cluster.workers
    assert isinstance(w, dagger.WorkerInfo)
    assert (w.id, w.pid, w.status) == (0, os.getpid(), "running")
    assert any("ThreadProc" in p for p in w.processors) and any("AsyncProc" in p for p in w.processors)
    assert w.memory_limit is None and w.spilled_bytes == 0


async def test_tasks_in_flight_counter_returns_to_zero(cluster):
    tasks = [dagger.spawn(inc, i) for i in range(100)]
    assert cluster.tasks_in_flight == 100
    await dagger.gather(*tasks)
    assert cluster.tasks_in_flight == 0


async def test_inner_cluster_takes_precedence_then_outer_returns():
    async with dagger.Cluster(threads=1) as outer:
        async with dagger.Cluster(threads=1) as inner:
            t = dagger.spawn(inc, 1)
            assert t._sched is inner._scheduler
            await t
        u = dagger.spawn(inc, 1)
        assert u._sched is outer._scheduler
        await u


async def test_close_is_idempotent_and_cluster_single_use():
    c = dagger.Cluster(threads=1)
    async with c:
        await c.close()
        await c.close()
    with pytest.raises(RuntimeError, match="started once"):
        async with c:
            pass


def test_sequential_asyncio_run_calls_share_default_cluster():
    async def one(i):
        return await dagger.spawn(inc, i)

    assert [asyncio.run(one(i)) for i in range(3)] == [1, 2, 3]


def test_clean_exit_of_script_with_pending_work(tmp_path):
    # Leaves a task running at exit: the interpreter must exit promptly and quietly.
    script = tmp_path / "exit.py"
    script.write_text(textwrap.dedent("""
        import asyncio
        import aiodagger as dagger

        async def forever():
            await asyncio.sleep(3600)

        dagger.spawn(forever)
        print(dagger.spawn(len, "abc").fetch(timeout=10))
    """))
    proc = subprocess.run([sys.executable, "-W", "error", "-X", "dev", str(script)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "3"
    assert proc.stderr == ""


def test_async_script_exits_without_warnings(tmp_path):
    script = tmp_path / "async_exit.py"
    script.write_text(textwrap.dedent("""
        import asyncio
        import aiodagger as dagger

        async def forever():
            await asyncio.sleep(3600)

        def blocking():
            import time
            time.sleep(0.2)

        async def main():
            async with dagger.Cluster(threads=2):
                dagger.spawn(forever)
                dagger.spawn(blocking)
                print(await dagger.spawn(len, "ab"))

        asyncio.run(main())
    """))
    proc = subprocess.run([sys.executable, "-W", "error", "-X", "dev", str(script)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "2"
    assert proc.stderr == ""


def test_import_touches_no_event_loop_policy():
    code = ("import asyncio; p = asyncio.get_event_loop_policy(); import aiodagger; "
            "assert asyncio.get_event_loop_policy() is p; "
            "import threading; assert threading.active_count() == 1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


async def test_shutdown_timeout_warns_about_stuck_thread(caplog):
    import threading

    gate = threading.Event()
    async with dagger.Cluster(threads=1, shutdown_timeout=0.05):
        dagger.spawn(gate.wait, 10)
        await asyncio.sleep(0.02)
    assert "still running user code" in caplog.text
    gate.set()  # the stuck thread now finishes and exits


async def test_cluster_argument_checks():
    with pytest.raises(ValueError, match="token"):
        dagger.Cluster(listen="tcp://0.0.0.0:0")
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        dagger.Cluster(listen="tcp://127.0.0.1")
    async with dagger.Cluster(threads=1) as c:
        await c.scale(0)
        with pytest.raises(ValueError):
            await c.scale(-1)


@pytest.mark.parametrize("bad", [0, -1, 1000, (1 << 20) - 1, True, 2.5e9, "256MiB", None])
def test_max_frame_must_be_an_int_of_at_least_one_mib(bad):
    with pytest.raises(ValueError, match=r"max_frame=.*at least 1048576.*got"):
        dagger.Cluster(max_frame=bad)
    assert dagger.Cluster(max_frame=1 << 20).max_frame == 1 << 20


async def test_cancel_on_exit_of_async_task(cluster):
    t = dagger.spawn(asleep_forever)
    await asyncio.sleep(0)
    assert t.state == "running"
    t.cancel()


async def test_exit_right_after_spawning_coroutines_does_not_hang():
    async with dagger.Cluster(threads=1) as c:
        tasks = [dagger.spawn(asleep_forever) for _ in range(100)]  # created, never started
    assert all(t.cancelled() for t in tasks)
    assert c.state == "closed"


def test_spawning_into_a_cluster_whose_loop_closed_raises():
    """From another thread, a spawn into a closed loop raises at once instead of handing
    back a task that never runs."""
    import asyncio
    import threading

    from aiodagger.scheduler.core import Scheduler
    from aiodagger.taskoptions import TaskOptions

    loop = asyncio.new_event_loop()
    loop.close()
    sched = Scheduler(loop, threading.get_ident() + 1)  # this thread is not its loop's
    with pytest.raises(RuntimeError, match="event loop has closed"):
        sched.spawn(TaskOptions(), int, (3,), {})


def _slow(i):
    import time

    time.sleep(0.5)
    return i


async def test_scaling_down_lets_the_retiring_worker_finish_its_tasks():
    """Tasks running on a worker that scale() retires finish there, and their results
    move to the workers that stay: nothing is left running forever."""
    async with dagger.Cluster(processes=2, threads=1) as cluster:
        second = max(w.id for w in cluster.workers)
        tasks = [dagger.options(scope=dagger.scope(worker=second)).spawn(_slow, i) for i in range(2)]
        await asyncio.sleep(0.2)
        await asyncio.wait_for(cluster.scale(1), 30)
        assert await asyncio.wait_for(dagger.gather(*tasks), 30) == [0, 1]
        assert second not in [w.id for w in cluster.workers]

"""Options: priority, retries, timeout, checkpoint/restore, names, scopes, contexts."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

import aiodagger as dagger
from aiodagger.worker.execute import callback_errors
from tests.helpers import asleep_forever, boom, inc, sleep_then


async def test_options_spawn_sets_name(cluster):
    t = dagger.options(name="first").spawn(inc, 1)
    assert t.name == "first"
    assert await t == 2
    assert dagger.spawn(inc, 1).name == "inc"


async def test_options_context_manager_applies_and_resets(cluster):
    with dagger.options(name="ctx", priority=3):
        a = dagger.spawn(inc, 1)
        with dagger.options(name="inner"):
            b = dagger.spawn(inc, 1)
    c = dagger.spawn(inc, 1)
    assert (a.name, b.name, c.name) == ("ctx", "inner", "inc")
    assert b._opts.priority == 3  # inner block inherits the outer options
    await dagger.gather(a, b, c)


async def test_options_do_not_leak_between_concurrent_coroutines(cluster):
    names = []

    async def request(i):
        with dagger.options(name=f"req{i}"):
            await asyncio.sleep(0)
            t = dagger.spawn(inc, i)
            names.append((i, t.name))
            await t

    await asyncio.gather(*(request(i) for i in range(5)))
    assert all(name == f"req{i}" for i, name in names)


async def test_higher_priority_runs_first():
    order = []
    gate = threading.Event()
    async with dagger.Cluster(threads=1):
        blocker = dagger.spawn(lambda: gate.wait(10))
        await asyncio.sleep(0.05)  # the single thread is now busy
        tasks = [dagger.options(priority=p).spawn(order.append, p) for p in (1, 5, 3, 5, 0)]
        gate.set()
        await dagger.gather(blocker, *tasks)
    assert order == [5, 5, 3, 1, 0]


async def test_ready_tasks_go_by_priority_then_those_an_input_freed_then_spawn_order():
    # Priority-0 tasks ready at spawn wait in a deque beside the ready heap; the two
    # must still give one order.
    order: list[str] = []
    gate = threading.Event()

    async def one() -> int:
        return 1

    async with dagger.Cluster(threads=1):
        blocker = dagger.spawn(lambda: gate.wait(10))
        await asyncio.sleep(0.05)  # the single thread is now busy
        tasks = [dagger.spawn(order.append, "0 a"),
                 dagger.options(priority=-1).spawn(order.append, "-1"),
                 dagger.options(priority=2).spawn(order.append, "2"),
                 dagger.spawn(order.append, "0 b")]
        freed = dagger.spawn(lambda _x: order.append("0 freed"), dagger.spawn(one))
        tasks += [freed, dagger.spawn(order.append, "0 c"), dagger.options(priority=2).spawn(order.append, "2 b")]
        await asyncio.sleep(0.05)  # `one` finished on the loop: `freed` is ready too
        assert order == []
        gate.set()
        await asyncio.wait_for(dagger.gather(blocker, *tasks), 10)
    assert order == ["2", "2 b", "0 freed", "0 a", "0 b", "0 c", "-1"]


async def test_retries_on_exception(cluster):
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise OSError("transient")
        return "ok"

    assert await dagger.options(retries=2).spawn(flaky) == "ok"
    assert len(attempts) == 3


async def test_retries_exhausted_raises_last_error(cluster):
    calls = []

    async def always():
        calls.append(1)
        raise KeyError("nope")

    with pytest.raises(KeyError):
        await dagger.options(retries=1).spawn(always)
    assert len(calls) == 2


async def test_timeout_async_task(cluster):
    t = dagger.options(timeout=0.05).spawn(asleep_forever)
    with pytest.raises(TimeoutError) as info:
        await asyncio.wait_for(t, 5)
    assert isinstance(info.value, dagger.TaskTimeoutError)
    assert t.state == "failed"


async def test_timeout_thread_task_result_discarded(cluster):
    t = dagger.options(timeout=0.05).spawn(sleep_then, 0.5, "late")
    with pytest.raises(dagger.TaskTimeoutError, match="timeout of 0.05"):
        await asyncio.wait_for(t, 5)
    await asyncio.sleep(0.6)
    assert t.state == "failed"


async def test_timeout_then_retry_succeeds(cluster):
    calls = []

    async def slow_then_fast():
        calls.append(1)
        if len(calls) == 1:
            await asyncio.sleep(10)
        return len(calls)

    assert await dagger.options(timeout=0.05, retries=1).spawn(slow_then_fast) == 2


async def test_checkpoint_and_restore(cluster, tmp_path):
    store = {}

    def checkpoint(task, value):
        store[task.name] = value

    def restore(task):
        return store.get(task.name, dagger.MISSING)

    runs = []

    def compute(x):
        runs.append(x)
        return x * 10

    opts = dagger.options(name="step", checkpoint=checkpoint, restore=restore)
    assert await opts.spawn(compute, 4) == 40
    assert store == {"step": 40}
    assert await opts.spawn(compute, 4) == 40  # restored: compute not called again
    assert runs == [4]


async def test_async_checkpoint_and_restore_to_disk(cluster, tmp_path):
    async def checkpoint(task, value):
        (tmp_path / task.name).write_text(str(value))

    async def restore(task):
        path = tmp_path / task.name
        return int(path.read_text()) if path.exists() else dagger.MISSING

    async def compute():
        return 7

    opts = dagger.options(name="a", checkpoint=checkpoint, restore=restore)
    assert await opts.spawn(compute) == 7
    (tmp_path / "a").write_text("99")
    assert await opts.spawn(compute) == 99


async def test_async_checkpoint_and_restore_of_a_task_on_a_thread(cluster, tmp_path):
    """``async def`` callbacks on a sync task are awaited on its thread (they were left
    unawaited coroutines: nothing saved, and a coroutine taken for the restored value)."""
    async def checkpoint(task, value):
        await asyncio.sleep(0)
        (tmp_path / task.name).write_text(str(value))

    async def restore(task):
        path = tmp_path / task.name
        return int(path.read_text()) if path.exists() else dagger.MISSING

    opts = dagger.options(name="b", checkpoint=checkpoint, restore=restore)
    assert await opts.spawn(times_ten, 3) == 30
    assert (tmp_path / "b").read_text() == "30"
    (tmp_path / "b").write_text("99")
    assert await opts.spawn(times_ten, 3) == 99


def disk_full(*_args):
    raise OSError("disk full")


async def adisk_full(*_args):
    await asyncio.sleep(0)
    raise OSError("disk full")


def times_ten(x):
    return x * 10


async def atimes_ten(x):
    await asyncio.sleep(0)
    return x * 10


def callback_warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == "aiodagger.worker.execute" and r.levelno == logging.WARNING]


# (task, callback): a thread task calls its callbacks on its thread; a coroutine task
# calls plain ones too, and awaits async ones.
CALLBACKS = [(times_ten, disk_full), (atimes_ten, disk_full), (atimes_ten, adisk_full)]
CALLBACK_IDS = ["thread", "async-task", "async-callback"]


@pytest.mark.parametrize(("fn", "failing"), CALLBACKS, ids=CALLBACK_IDS)
async def test_failing_checkpoint_keeps_the_value_and_warns(cluster, caplog, fn, failing):
    before = callback_errors()
    assert await dagger.options(name="saved", checkpoint=failing).spawn(fn, 4) == 40
    after = callback_errors()
    assert after["checkpoint_errors"] - before["checkpoint_errors"] == 1
    assert after["restore_errors"] == before["restore_errors"]
    [message] = callback_warnings(caplog)
    assert "'saved'" in message and "checkpoint" in message and failing.__name__ in message
    assert "disk full" in message


@pytest.mark.parametrize(("fn", "failing"), CALLBACKS, ids=CALLBACK_IDS)
async def test_failing_restore_runs_the_task_and_warns(cluster, caplog, fn, failing):
    saved = []
    before = callback_errors()
    t = dagger.options(name="restored", restore=failing, checkpoint=lambda _t, v: saved.append(v)).spawn(fn, 4)
    assert await t == 40
    assert saved == [40]  # ran as if nothing was saved, and checkpointed as usual
    after = callback_errors()
    assert after["restore_errors"] - before["restore_errors"] == 1
    assert after["checkpoint_errors"] == before["checkpoint_errors"]
    [message] = callback_warnings(caplog)
    assert "'restored'" in message and "restore" in message and failing.__name__ in message


async def test_failing_checkpoint_keeps_the_value_on_a_subprocess_worker():
    async with dagger.Cluster(processes=1, threads=1):
        on_worker = dagger.options(scope=dagger.scope(worker=1), checkpoint=disk_full)
        assert await on_worker.spawn(times_ten, 4) == 40
        assert await on_worker.spawn(atimes_ten, 5) == 50


async def test_scope_with_no_processor_fails_at_once(cluster):
    t = dagger.options(scope=dagger.scope(worker=3)).spawn(inc, 1)
    assert t.done()
    with pytest.raises(dagger.NoProcessorError, match=r"scope\(workers=\[3\]\).*worker 0.*ThreadProc"):
        await t
    g = dagger.options(scope=dagger.scope(gpu=True)).spawn(inc, 1)
    with pytest.raises(dagger.NoProcessorError):
        await g


@pytest.mark.parametrize("processes", [0, 1])
async def test_gpu_device_0_is_a_gpu_not_any_processor(processes):
    """scope(gpu=0) names device 0: with no GPU it fails saying what the cluster has; it
    never runs on a CPU thread (a truth test of gpu=0 read it as "no GPU")."""
    async with dagger.Cluster(processes=processes):
        for gpu in (0, 1, True):
            t = dagger.options(scope=dagger.scope(gpu=gpu)).spawn(inc, 1)
            with pytest.raises(dagger.NoProcessorError, match=rf"gpu={gpu!r}.*The cluster has: .*ThreadProc"):
                await asyncio.wait_for(t, 30)
        with pytest.raises(dagger.NoProcessorError):
            await dagger.put(1, scope=dagger.scope(gpu=0))
        assert await asyncio.wait_for(dagger.options(scope=dagger.scope(gpu=False)).spawn(inc, 1), 30) == 2


def test_a_negative_gpu_is_refused():
    with pytest.raises(ValueError, match=r"scope\(gpu=...\) takes True or a device number"):
        dagger.scope(gpu=-1)


async def test_scope_admitting_local_worker_runs(cluster):
    assert await dagger.options(scope=dagger.scope(worker=0)).spawn(inc, 1) == 2
    assert await dagger.options(scope=dagger.scope("any")).spawn(inc, 1) == 2


async def test_scope_thread_runs_coroutine_function_on_a_pool_thread(cluster):
    async def where():
        await asyncio.sleep(0)
        return threading.current_thread().name

    name = await dagger.options(scope=dagger.scope(thread=True)).spawn(where)
    assert name.startswith("aiodagger-w0-thread")
    assert await dagger.spawn(where) == threading.current_thread().name


def test_scope_repr_and_equality():
    assert repr(dagger.scope("any")) == 'scope("any")'
    assert dagger.scope(worker=1) == dagger.scope(workers=[1])
    assert hash(dagger.scope(worker=1)) == hash(dagger.scope(workers=[1]))
    assert repr(dagger.scope(workers=[2, 1], gpu=0)) == "scope(workers=[1, 2], gpu=0)"


async def test_after_orders_without_passing_values(cluster, tmp_path):
    """options(after=[...]): the task waits for those tasks but receives only its own
    arguments; a failed one fails it with UpstreamError."""
    marker = tmp_path / "written"

    def write():
        time.sleep(0.2)
        marker.write_text("done")
        return "a value nobody receives"

    def read(*args):
        return args, marker.read_text()

    writer = dagger.spawn(write)
    reader = dagger.options(after=[writer]).spawn(read, 1)
    assert await asyncio.wait_for(reader, 10) == ((1,), "done")

    failed = dagger.spawn(boom)
    with dagger.options(after=[failed, writer]):
        doomed = dagger.spawn(read)
    with pytest.raises(dagger.UpstreamError, match="boom"):
        await asyncio.wait_for(doomed, 10)
    assert await asyncio.wait_for(dagger.options(after=[writer]).spawn(read), 10) == ((), "done")


@pytest.mark.parametrize("after", [5, [1], "t", [None]])
def test_after_takes_tasks_only(after):
    with pytest.raises(TypeError, match="after= takes a list of tasks"):
        dagger.options(after=after)

"""Subprocess workers: tasks in other PIDs, data between workers, faults, scale."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import traceback

import msgpack
import numpy as np
import pytest

import aiodagger as dagger
from tests.helpers import inc


def pid(_=None):
    return os.getpid()


def make_array(nbytes, value):
    return np.full(nbytes // 8, value, dtype=np.float64)


def checksum(a):
    return float(a.sum()), a.nbytes


def slow_pid(seconds, marker=None):
    import time

    if marker is not None:
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


def on(worker_id):
    return dagger.options(scope=dagger.scope(worker=worker_id))


def raises_in_worker(x):
    raise KeyError(f"missing {x}")


@pytest.fixture
async def procs():
    async with dagger.Cluster(processes=2, threads=2) as c:
        yield c


async def _wait_for(predicate, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


async def test_tasks_run_in_other_pids(procs):
    workers = procs.workers
    assert [w.id for w in workers] == [0, 1, 2]
    assert workers[0].pid == os.getpid()
    worker_pids = {w.pid for w in workers[1:]}
    assert os.getpid() not in worker_pids and len(worker_pids) == 2
    pids = await dagger.gather(*[dagger.spawn(pid, i) for i in range(20)])
    assert set(pids) <= worker_pids
    assert await on(0).spawn(pid) == os.getpid()  # scoped to worker 0: this process


async def test_dependencies_and_async_tasks_across_workers(procs):
    async def aplus(x, y):
        await asyncio.sleep(0)
        return x + y

    a = on(1).spawn(inc, 1)
    b = on(2).spawn(aplus, a, 10)
    c = dagger.spawn(lambda xs: sum(xs), [a, b])  # a closure, pickled by value
    assert await c == 2 + 12


async def test_64mib_moves_worker_to_worker_not_through_scheduler(procs):
    dist = procs._scheduler.dist
    before = dist.received_bytes
    a = on(1).spawn(make_array, 64 << 20, 3.0)
    total = on(2).spawn(checksum, a)
    value, nbytes = await total
    assert nbytes == 64 << 20 and value == 3.0 * (64 << 20) / 8
    received = dist.received_bytes - before
    assert received < 1 << 20, f"the scheduler received {received} bytes"
    # only await brings the value here
    array = await a
    assert array.nbytes == 64 << 20 and float(array[0]) == 3.0
    assert dist.received_bytes - before >= 64 << 20


async def test_remote_error_keeps_type_notes_and_traceback(procs):
    t = on(1).spawn(raises_in_worker, "x")
    with pytest.raises(KeyError) as info:
        await t
    notes = "\n".join(info.value.__notes__)
    assert "worker 1" in notes and f"pid {procs.workers[1].pid}" in notes
    raised_by = [n for n in info.value.__notes__ if "raised by" in n]
    assert len(raised_by) == 1, raised_by  # said once, by the worker where it raised
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "raises_in_worker" in frames
    downstream = dagger.spawn(inc, t)
    with pytest.raises(dagger.UpstreamError) as up:
        await downstream
    assert up.value.origin is t and isinstance(up.value.__cause__, KeyError)


async def test_serialization_error_names_the_argument(procs):
    t = dagger.spawn(lambda a, b: None, 1, threading.Lock())
    with pytest.raises(dagger.SerializationError, match="argument 1 of task"):
        await t


async def test_scopes_across_processes_and_no_processor_error(procs):
    w2 = procs.workers[2]
    assert await on(2).spawn(pid) == w2.pid
    assert await dagger.options(scope=dagger.scope(process=w2.pid)).spawn(pid) == w2.pid
    assert await dagger.options(scope=dagger.scope(workers=[1, 2])).spawn(pid) in {w.pid for w in procs.workers[1:]}
    bad = on(9).spawn(pid)
    with pytest.raises(dagger.NoProcessorError, match=r"worker 1 .*worker 2"):
        await bad


async def test_kill_9_mid_task_with_and_without_retries(procs, tmp_path):
    victim = procs.workers[1]
    marker = tmp_path / "started"
    # retries=1: the task is retried on the surviving worker
    t = dagger.options(retries=1, scope=dagger.scope(workers=[1, 2])).spawn(slow_pid, 1.0, str(marker))
    await _wait_for(marker.exists)
    ran_on = int(marker.read_text())
    os.kill(ran_on, signal.SIGKILL)
    survivor = await asyncio.wait_for(t, 20)
    assert survivor != ran_on
    # retries=0 on the remaining worker: WorkerLostError
    marker.unlink()
    u = dagger.spawn(slow_pid, 5.0, str(marker))
    await _wait_for(marker.exists)
    os.kill(int(marker.read_text()), signal.SIGKILL)
    with pytest.raises(dagger.WorkerLostError, match="lost"):
        await asyncio.wait_for(u, 20)
    assert victim.pid in (ran_on, survivor) or True
    # the cluster keeps working, in replacement worker processes, never in this one
    assert await asyncio.wait_for(dagger.spawn(inc, 1), 30) == 2
    assert await asyncio.wait_for(dagger.spawn(pid), 30) not in (os.getpid(), ran_on, survivor)


async def test_result_whose_only_copy_died_is_recomputed(procs):
    a = dagger.spawn(make_array, 1 << 20, 2.0)  # above the inline limit: stays where it ran
    await a.wait()
    assert a.state == "finished"
    (holder,) = a._where
    os.kill(next(w.pid for w in procs.workers if w.id == holder), signal.SIGKILL)
    await _wait_for(lambda: holder not in [w.id for w in procs.workers])
    b = dagger.spawn(checksum, a)  # needs a, whose only copy is gone
    assert await asyncio.wait_for(b, 20) == (2.0 * (1 << 20) / 8, 1 << 20)


async def test_scale_up_and_down_keeps_results(procs):
    await procs.scale(3)
    assert len(procs.workers) == 4
    held = [on(w.id).spawn(make_array, 1 << 20, float(w.id)) for w in procs.workers[1:]]
    await dagger.wait(held)
    await procs.scale(1)
    assert len(procs.workers) == 2
    sums = await dagger.gather(*[dagger.spawn(checksum, h) for h in held])
    assert [s for s, _ in sums] == [float(i) * (1 << 20) / 8 for i in (1, 2, 3)]


async def test_cli_worker_joins_and_runs_tasks(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token")
    async with dagger.Cluster(listen="tcp://127.0.0.1:0", token="s3cret-token") as c:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aiodagger", "worker", c.address, "--token-file", str(token_file),
            "--threads", "1", "--name", "cli-worker")
        try:
            await _wait_for(lambda: len(c.workers) == 2, timeout=30)
            info = c.workers[1]
            assert info.pid == proc.pid
            assert await dagger.gather(*[dagger.spawn(pid) for _ in range(4)]) == [proc.pid] * 4
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)
        await _wait_for(lambda: len(c.workers) == 1)


def test_sync_cluster_with_processes():
    with dagger.Cluster(processes=2, threads=1) as c:
        assert dagger.spawn(pid).fetch(timeout=20) in {w.pid for w in c.workers[1:]}
        big = dagger.spawn(make_array, 1 << 20, 1.0)
        assert big.fetch(timeout=20).nbytes == 1 << 20


async def test_function_a_worker_cannot_load_fails_only_its_task(procs, tmp_path):
    # A function defined in a module only this process can import (pickled by reference).
    module = tmp_path / "only_here_mod.py"
    module.write_text("def f(x):\n    return x * 2\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import only_here_mod

        t = dagger.spawn(only_here_mod.f, 2)
        with pytest.raises(ModuleNotFoundError) as info:
            await t
        assert "could not be loaded on worker" in "\n".join(info.value.__notes__)
        assert await dagger.spawn(inc, 1) == 2  # the workers are still there
        assert len(procs.workers) == 3
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("only_here_mod", None)


def nested_sum(n):
    # runs in a worker process: spawns children into the same cluster and blocks on them
    kids = [dagger.spawn(inc, i) for i in range(n)]
    return sum(k.fetch(timeout=20) for k in kids), os.getpid()


async def nested_async(n):
    kids = [dagger.spawn(pid, i) for i in range(n)]
    big = dagger.spawn(make_array, 1 << 20, 1.0)  # stays on a worker: fetched from there
    pids = await dagger.gather(*kids)
    return sorted(set(pids)), float((await big).sum())


async def test_nested_spawn_inside_worker_processes(procs):
    total, where = await asyncio.wait_for(dagger.spawn(nested_sum, 10), 30)
    assert total == sum(range(1, 11))
    assert where in {w.pid for w in procs.workers[1:]}
    pids, big_sum = await asyncio.wait_for(dagger.spawn(nested_async, 6), 30)
    assert set(pids) <= {w.pid for w in procs.workers[1:]}
    assert big_sum == (1 << 20) / 8


def _describe(a):
    return "None!" if a is None else f"array of {a.nbytes} bytes"


async def test_a_task_never_overtakes_the_values_it_reads():
    """Batches for one worker go out whole and in order: a later batch's "run" frame
    waits for an earlier batch's "values" frames, which carry the inputs it reads."""
    async with dagger.Cluster(processes=1, threads=4):
        await dagger.spawn(_describe, np.ones(4))  # the function is on the worker already
        for delay in (0.001, 0.003, 0.006, 0.01):
            x = await dagger.put(np.ones(6_000_000))  # 48 MB each: sent in slices
            y = await dagger.put(np.ones(6_000_000))
            first = [dagger.spawn(_describe, x), dagger.spawn(_describe, y)]
            await asyncio.sleep(delay)  # while x is still going out
            late = dagger.spawn(_describe, y)
            assert await asyncio.wait_for(late, 60) == "array of 48000000 bytes", delay
            await asyncio.wait_for(dagger.gather(*first), 60)


async def test_a_spawned_task_whose_value_is_gone_is_reported_failed():
    """A nested task that finished but whose every copy is lost is reported to the
    spawning worker as failed with WorkerLostError (a "finished" report needs a holder)."""
    from aiodagger.comm import protocol as P
    from aiodagger.scheduler.registry import RemoteWorker, WorkerRegistry
    from aiodagger.task import FINISHED, REMOTE, DTask

    sent = []

    class Recording:
        async def send(self, msg, buffers=()):
            sent.append((msg, list(buffers)))

    class Owner:
        loop = asyncio.get_running_loop()

    registry = WorkerRegistry(Owner())  # type: ignore[arg-type]
    worker = RemoteWorker(1, Recording(), P.Register("w", 1, "h", 1, "tcp://127.0.0.1:9", None))
    registry.workers[1] = worker
    task = DTask(Owner(), 5, "made", None, (), {}, dagger.options().resolve())
    task._state, task._value, task._where = FINISHED, REMOTE, {7}  # worker 7 is gone
    registry._report(1, task)
    await asyncio.sleep(0.01)
    ((msg, buffers),) = sent
    assert msg.status == "failed" and len(buffers) == 1
    header = msgpack.unpackb(msgpack.packb(P.encode(msg)), strict_map_key=False)
    assert P.decode(header, len(buffers)) == msg  # what the spawning worker accepts
    assert isinstance(P.loads_error(buffers[0]), dagger.WorkerLostError)


def _big(i):
    return np.full(100_000, float(i))  # 800 kB: stays on its worker until asked for


async def test_a_holder_dying_during_a_fetch_means_the_value_is_computed_again():
    """The caller is fetching a result when its only holder dies: the result is computed
    again on another worker, never a raw ConnectionResetError."""
    async with dagger.Cluster(processes=2, threads=1) as cluster:
        task = dagger.spawn(_big, 7)
        await asyncio.wait_for(task.wait(), 30)
        (holder,) = task._where
        pid = next(w.pid for w in cluster.workers if w.id == holder)
        os.kill(pid, signal.SIGSTOP)  # the "get" request goes out, and waits
        fetching = asyncio.ensure_future(dagger.gather(task))
        await asyncio.sleep(0.3)
        assert not fetching.done()
        os.kill(pid, signal.SIGKILL)
        (value,) = await asyncio.wait_for(fetching, 30)
        assert value.shape == (100_000,) and float(value[0]) == 7.0
        assert holder not in task._where


async def test_workers_beat_as_often_as_the_cluster_asks():
    """A heartbeat timeout shorter than a worker's own rhythm (1 s) must not get healthy
    workers declared lost: they answer each of the cluster's heartbeats. (They were
    lost, restarted and lost again until the cluster gave up on starting them.)"""
    async with dagger.Cluster(processes=1, threads=1, heartbeat_interval=0.1,
                              heartbeat_timeout=0.5) as cluster:
        before = [(w.id, w.pid) for w in cluster.workers]
        await asyncio.sleep(2.5)  # idle: heartbeats are all the workers send
        assert [(w.id, w.pid) for w in cluster.workers] == before
        assert await asyncio.wait_for(dagger.spawn(pid), 30) == before[1][1]


def test_a_heartbeat_timeout_must_leave_room_for_heartbeats():
    with pytest.raises(ValueError, match=r"heartbeat_interval=1.0, heartbeat_timeout=0.5\): .* heartbeat_timeout=5"):
        dagger.Cluster(processes=1, heartbeat_interval=1.0, heartbeat_timeout=0.5)

"""Subprocess workers: tasks in other PIDs, data between workers, faults, scale."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import types

import msgpack
import numpy as np
import pytest

import aiodagger as dagger
from aiodagger.errors import SerializationError
from aiodagger.memory.shared import host_key as shm_key
from tests.helpers import inc, sleep_then
from tests.test_shared_memory import mapped_from_shm


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


def touch(path, i):
    with open(path, "a") as f:
        f.write(f"{i}\n")
    return i


async def test_a_graph_spawned_in_one_go_starts_while_it_is_being_spawned(procs, tmp_path):
    """The loop's next turn comes after the last spawn; the workers get the first tasks
    long before (early flush): here a task's file appears while this loop is blocked."""
    marker = tmp_path / "started"
    tasks = [dagger.spawn(touch, str(marker), i) for i in range(1000)]
    deadline = time.monotonic() + 20
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)  # blocks the cluster's loop: only tasks already sent can run
    started_while_blocked = marker.exists()
    assert await asyncio.wait_for(dagger.gather(*tasks), 60) == list(range(1000))
    assert started_while_blocked


def text(n):
    return "x" * n


def pair(i):
    return (i, i)


async def test_tiny_builtin_results_are_kept_by_the_scheduler_only(procs):
    """An int or a short str that nothing held on its worker waits for comes back with
    its record and is not stored there (status "value"): no holder, nothing to release.
    Tasks that need it, on that worker too, get it from the scheduler. Larger values,
    and values of other types, stay with their worker as before."""
    w1, w2 = (w.id for w in procs.workers[1:])
    small = on(w1).spawn(inc, 41)
    assert await asyncio.wait_for(small, 30) == 42
    assert small._where == set()
    assert await asyncio.wait_for(dagger.gather(on(w1).spawn(inc, small), on(w2).spawn(inc, small)), 30) == [43, 43]
    big = on(w1).spawn(text, 4096)
    other = on(w1).spawn(pair, 1)
    assert await asyncio.wait_for(dagger.gather(big, other), 30) == ["x" * 4096, (1, 1)]
    assert big._where == {w1} and other._where == {w1}
    assert await asyncio.wait_for(on(w2).spawn(len, big), 30) == 4096


def echo(*args, **kwargs):
    return args[0] if len(args) == 1 and not kwargs else (args, kwargs)


def fails(x):
    raise ValueError(f"no {x}")


async def test_tiny_tasks_and_their_small_results_travel_in_columns(procs, monkeypatch):
    """A thread task without inputs whose arguments are all small builtins goes to its
    worker in a RunPlain (its columns, all the batch's arguments in one pickle), and a
    small builtin result comes back in a DoneValues; everything else in the same burst
    keeps a record of its own. Every value arrives intact either way."""
    from aiodagger.comm import protocol as P

    sent: dict[type, int] = {}
    received: dict[type, int] = {}
    send_nowait, send, decode = P.Endpoint.send_nowait, P.Endpoint.send, P.decode

    def count(msg):
        n = len(msg.keys) if type(msg) is P.RunPlain else len(msg.tasks) if type(msg) is P.Run else 1
        sent[type(msg)] = sent.get(type(msg), 0) + n

    def counting_send(self, msg, buffers=()):
        count(msg)
        return send_nowait(self, msg, buffers)

    async def counting_send_async(self, msg, buffers=()):
        count(msg)
        return await send(self, msg, buffers)

    def counting_decode(header, nbuffers, cls=None):
        msg = decode(header, nbuffers, cls)
        n = len(msg.keys) if type(msg) is P.DoneValues else len(msg.results) if type(msg) is P.Done else 1
        received[type(msg)] = received.get(type(msg), 0) + n
        return msg

    monkeypatch.setattr(P.Endpoint, "send_nowait", counting_send)
    monkeypatch.setattr(P.Endpoint, "send", counting_send_async)
    monkeypatch.setattr(P, "decode", counting_decode)
    remote = dagger.scope(worker=1)
    plain_args = [(i,) for i in range(300)] + [
        (-(2**63),), (2**64 - 1,), (2.5,), (None,), (True,), (1 + 2j,), ("é" * 256,), (b"\x00" * 256,), ()]
    other_args = [(2**64,), ("x" * 257,), ((1, 2),), ([3],)]
    plain = [dagger.options(scope=remote).spawn(echo, *a) for a in plain_args]
    urgent = dagger.options(scope=remote, priority=5).spawn(echo, 7)
    other = [dagger.options(scope=remote).spawn(echo, *a) for a in other_args]
    keyword = dagger.options(scope=remote).spawn(echo, 1, k=2)
    big = dagger.options(scope=remote).spawn(text, 4096)  # a result that stays on its worker
    failed = dagger.options(scope=remote).spawn(fails, 3)
    got = await asyncio.wait_for(dagger.gather(*plain, urgent, *other, keyword, big), 60)
    assert got == [a[0] if len(a) == 1 else ((), {}) for a in plain_args] + [7] + [
        a[0] for a in other_args] + [((1,), {"k": 2}), "x" * 4096]
    with pytest.raises(ValueError, match="no 3"):
        await asyncio.wait_for(failed, 30)
    in_columns = len(plain) + 1 + 1 + 1  # with the urgent one, the one with a text arg, the failing one
    assert sent.get(P.RunPlain, 0) == in_columns
    assert sent.get(P.Run, 0) == len(other) + 1
    # small results in columns: all the plain ones but the empty call's tuple; the
    # others' (a 2**64 int, long texts, a tuple, a list, the keyword call's pair) and
    # the error with records of their own
    assert received.get(P.DoneValues, 0) == len(plain) - 1 + 1 + 0
    assert received.get(P.Done, 0) == len(other) + 1 + 1 + 1 + 1
    assert plain[0]._where == set() and big._where == {1}


async def test_a_run_of_tiny_tasks_skips_cancelled_ones_and_fails_an_unsendable_one_clearly(procs):
    """Tiny plain tasks leave the ready deque in runs (WorkerRegistry.dispatch_plain):
    one cancelled while it waits there is dropped, one whose function cannot be pickled
    fails saying so, and the rest of the run still goes."""

    def make(v):
        return lambda: v

    await asyncio.wait_for(dagger.gather(*[dagger.spawn(make(i)) for i in range(8)]), 30)  # learned: tiny
    first = [dagger.spawn(make(i)) for i in range(40)]
    unsendable = dagger.spawn(make(threading.Lock()))
    rest = [dagger.spawn(make(i)) for i in range(40, 80)]
    cancelled = [first[5], first[6], rest[0]]
    for t in cancelled:  # still in the deque: it is flushed at the loop's next turn
        assert t.state == "ready" and t.cancel()
    kept = [t for t in first + rest if t not in cancelled]
    assert await asyncio.wait_for(dagger.gather(*kept), 30) == [
        i for i in range(80) if i not in (5, 6, 40)]
    with pytest.raises(SerializationError, match="lock"):
        await asyncio.wait_for(unsendable, 30)
    assert all(t.cancelled() for t in cancelled)


async def test_tiny_tasks_are_placed_in_runs_and_others_one_by_one(procs, monkeypatch):
    """A function known to run in microseconds is placed up to TINY_STREAK tasks in a
    row on one worker; one of unknown run time is placed task by task, spread."""
    from aiodagger.scheduler.registry import TINY_STREAK

    dist = procs._scheduler.dist
    placed: list[int] = []
    place_any = dist.place_any

    def recording(task, est=None):
        worker = place_any(task, est)
        if worker is not None:
            placed.append(worker.id)
        return worker

    monkeypatch.setattr(dist, "place_any", recording)
    await asyncio.wait_for(dagger.gather(*[dagger.spawn(inc, i) for i in range(4)]), 30)  # learned
    placed.clear()
    await asyncio.wait_for(dagger.gather(*[dagger.spawn(inc, i) for i in range(64)]), 30)
    runs = [len(list(group)) for _, group in itertools.groupby(placed)]
    # a run ends only where a streak does (two may pick the same worker in a row)
    assert sum(runs) == 64 and all(r % TINY_STREAK == 0 for r in runs), placed
    placed.clear()
    await asyncio.wait_for(dagger.gather(*[dagger.spawn(sleep_then, 0.2, i) for i in range(4)]), 30)
    assert sorted(placed) == [1, 1, 2, 2], placed  # two threads each: one task per thread


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
    # only await brings the value here: over the socket, or (same machine) through a
    # shared segment that this process maps
    array = await a
    assert array.nbytes == 64 << 20 and float(array[0]) == 3.0
    received = dist.received_bytes - before
    if shm_key():
        assert received < 1 << 20 and mapped_from_shm(array), received
    else:
        assert received >= 64 << 20


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
    killed = int(marker.read_text())
    os.kill(killed, signal.SIGKILL)
    with pytest.raises(dagger.WorkerLostError, match="lost"):
        await asyncio.wait_for(u, 20)
    # the cluster keeps working, in live worker processes, never in this one
    assert await asyncio.wait_for(dagger.spawn(inc, 1), 30) == 2
    assert await asyncio.wait_for(dagger.spawn(pid), 30) not in (os.getpid(), ran_on, killed)


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
        comm = types.SimpleNamespace(transport=None)  # no connection behind it

        async def send(self, msg, buffers=()):
            sent.append((msg, list(buffers)))

    class Owner:
        loop = asyncio.get_running_loop()

    registry = WorkerRegistry(Owner())  # type: ignore[arg-type]
    worker = RemoteWorker(1, Recording(), P.Register("w", 1, "h", 1, "tcp://127.0.0.1:9", None))
    registry.workers[1] = worker
    task = DTask(Owner(), 5, "made", None, (), {}, dagger.options().resolve())
    task._state, task._value, task._where = FINISHED, REMOTE, {7}  # worker 7 is gone
    registry.spawned.report(worker, task)
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


def _logged_array(log, i):
    with open(log, "a") as f:
        f.write(f"{i}\n")
    return np.full(16384, i, dtype=np.float64)  # 128 KiB: stays on its worker


async def test_a_worker_that_reconnects_offers_what_it_still_holds(tmp_path):
    """Stopped past the heartbeat timeout, a remote worker is declared lost; woken, it
    reconnects as a new worker, and the values it kept are used, not computed again."""
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token")
    log = str(tmp_path / "runs")
    async with dagger.Cluster(listen="tcp://127.0.0.1:0", token="s3cret-token",
                              heartbeat_interval=0.1, heartbeat_timeout=0.6) as c:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aiodagger", "worker", c.address, "--token-file", str(token_file),
            "--threads", "1", "--heartbeat-timeout", "0.6")
        try:
            await _wait_for(lambda: len(c.workers) == 2, timeout=30)
            first_id = c.workers[1].id
            kept = [dagger.spawn(_logged_array, log, i) for i in range(4)]
            await asyncio.wait_for(dagger.wait(kept), 20)
            os.kill(proc.pid, signal.SIGSTOP)
            await _wait_for(lambda: len(c.workers) == 1, timeout=10)
            os.kill(proc.pid, signal.SIGCONT)
            await _wait_for(lambda: [w.pid for w in c.workers[1:]] == [proc.pid], timeout=20)
            assert c.workers[1].id != first_id
            sums = await asyncio.wait_for(dagger.gather(*[dagger.spawn(checksum, t) for t in kept]), 20)
            assert [s for s, _ in sums] == [16384.0 * i for i in range(4)]
            with open(log) as f:
                assert sorted(f.read().split()) == ["0", "1", "2", "3"], "kept values were computed again"
        finally:
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)


async def test_tasks_waiting_on_tasks_they_spawned_do_not_starve_the_cluster(procs):
    """More tasks blocked in fetch() than the workers have threads: each wait hands its
    slot back to the scheduler, so the children they wait for still get to run."""
    await asyncio.wait_for(dagger.spawn(nested_sum, 3), 30)  # its run time is known now
    parents = [dagger.spawn(nested_sum, 3) for _ in range(12)]
    results = await asyncio.wait_for(dagger.gather(*parents), 60)
    assert [total for total, _ in results] == [6] * 12


def _slow_array(seconds):
    import time

    time.sleep(seconds)
    return np.ones(1 << 17)  # 1 MiB: stays on its worker


async def test_a_ready_task_waits_for_an_input_being_computed_again():
    """A task is ready (its input finished) but waits for room; the input's only copy is
    lost and its recomputation starts: the task must wait for that run, not be sent off
    with the empty value the input has meanwhile."""
    async with dagger.Cluster(processes=2, threads=1) as c:
        w1, w2 = c.workers[1:]
        with on(w2.id):
            await asyncio.wait_for(dagger.spawn(slow_pid, 0.2), 20)  # its run time is known now
            blocker = dagger.spawn(slow_pid, 2.5)
        await asyncio.sleep(0.3)
        value = dagger.spawn(_slow_array, 1.0)  # worker 2 is busy: it runs on worker 1
        await asyncio.wait_for(dagger.wait([value]), 20)
        with on(w2.id), dagger.options(priority=1):
            gate = dagger.spawn(slow_pid, 0.1)  # first in line for worker 2: the line stops here
        with on(w2.id):
            reader = dagger.spawn(checksum, value)  # ready, in line behind it
        os.kill(w1.pid, signal.SIGKILL)
        await _wait_for(lambda: w1.pid not in {w.pid for w in c.workers}, 10)
        again = asyncio.ensure_future(_await(value))  # its value is computed again
        assert await asyncio.wait_for(reader, 30) == (float(1 << 17), 1 << 20)
        assert (await asyncio.wait_for(again, 30)).sum() == 1 << 17
        await asyncio.wait_for(dagger.gather(blocker, gate), 10)


async def _await(task):
    return await task


def _bytes_of(nbytes):
    return b"x" * nbytes


def _length(data):
    return len(data)


def _spawn_length(nbytes):
    return dagger.spawn(_length, b"n" * nbytes).fetch(timeout=20)


async def test_a_value_past_max_frame_fails_its_task_and_nothing_else():
    """Cluster(max_frame=1 MiB): a 2 MiB result cannot move worker to worker nor to the
    caller, and a 2 MiB argument cannot go to a worker (nor from one, spawned by a task
    there). Each fails its task at once with
    FrameTooLargeError naming the size and the option; no connection breaks, no worker
    is lost, and values under the limit still move."""
    limit = 1 << 20
    big = 2 << 20
    async with dagger.Cluster(processes=2, threads=1, max_frame=limit) as cluster:
        before = [(w.id, w.pid) for w in cluster.workers]
        made = on(1).spawn(_bytes_of, big)
        used = on(2).spawn(_length, made)
        with pytest.raises(dagger.FrameTooLargeError, match=rf"task id {made.id}, held by worker 1 .* "
                           rf"is \d+ bytes .* more than max_frame={limit}") as info:
            await asyncio.wait_for(used, 20)
        assert info.value.size > big and info.value.limit == limit
        assert "an input of task '_length'" in "\n".join(info.value.__notes__)
        with pytest.raises(dagger.FrameTooLargeError, match=r"the result of task '_bytes_of'.*max_frame="):
            await asyncio.wait_for(made, 20)
        with pytest.raises(dagger.FrameTooLargeError, match=r"the arguments of task '_length'.*max_frame="):
            await asyncio.wait_for(dagger.spawn(_length, b"y" * big), 20)
        with pytest.raises(dagger.FrameTooLargeError, match=r"an input of task '_length'"):
            await asyncio.wait_for(dagger.spawn(_length, await dagger.put(b"z" * big)), 20)
        with pytest.raises(dagger.FrameTooLargeError, match=r"task '_length'.* pickled.*max_frame="):
            await asyncio.wait_for(on(1).spawn(_spawn_length, big), 20)  # spawned in a worker

        fits = on(1).spawn(_bytes_of, limit - 4096)  # stays on worker 1: past the inline limit
        assert await asyncio.wait_for(on(2).spawn(_length, fits), 20) == limit - 4096
        assert len(await asyncio.wait_for(fits, 20)) == limit - 4096
        assert [(w.id, w.pid) for w in cluster.workers] == before


async def test_a_remote_worker_with_a_smaller_max_frame_is_sent_nothing_larger(tmp_path):
    """`aiodagger worker --max-frame` smaller than the cluster's: the handshake tells the
    cluster, which neither sends that worker a larger argument nor takes a larger result
    from it; both tasks fail with FrameTooLargeError and the worker stays."""
    from tests.workers import WorkerProcesses, write_token

    procs = WorkerProcesses(tmp_path)
    try:
        async with dagger.Cluster(threads=1, listen="tcp://127.0.0.1:0", token="t0ken") as cluster:
            worker = procs.start(cluster.address, write_token(tmp_path, "t0ken"), "--max-frame",
                                 str(1 << 20), threads=1)
            (info,) = await procs.wait_joined(cluster, [worker])
            made = dagger.spawn(_bytes_of, 2 << 20)
            with pytest.raises(dagger.FrameTooLargeError, match=r"max_frame=1048576"):
                await asyncio.wait_for(made, 20)
            with pytest.raises(dagger.FrameTooLargeError, match=r"the arguments of .*max_frame=1048576"):
                await asyncio.wait_for(dagger.spawn(_length, b"y" * (2 << 20)), 20)
            assert await asyncio.wait_for(dagger.spawn(_length, b"y" * 1000), 20) == 1000
            assert [w.pid for w in cluster.workers] == [os.getpid(), worker.pid]
    finally:
        procs.stop_all()


def test_worker_refuses_a_max_frame_below_the_minimum(tmp_path):
    import subprocess

    token = tmp_path / "token"
    token.write_text("t0ken")
    out = subprocess.run([sys.executable, "-m", "aiodagger", "worker", "tcp://127.0.0.1:9",
                          "--token-file", str(token), "--max-frame", "1000"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "--max-frame" in out.stderr and "1048576" in out.stderr


async def test_a_worker_signalled_while_it_stops_still_removes_its_spill_directory(tmp_path):
    """The cluster closes and tells its worker to stop; a SIGTERM comes while the worker
    waits for a task's thread (as a supervisor stopping everything sends one). The worker
    finishes stopping instead of being cut short, and its spill directory goes."""
    from tests.workers import WorkerProcesses, wait_for_file, write_token

    procs = WorkerProcesses(tmp_path)
    spill = tmp_path / "spill"
    try:
        async with dagger.Cluster(threads=1, listen="tcp://127.0.0.1:0", token="t0ken") as cluster:
            worker = procs.start(cluster.address, write_token(tmp_path, "t0ken"), "--spill-dir",
                                 str(spill), threads=1)
            await procs.wait_joined(cluster, [worker])
            dagger.spawn(wait_for_file, str(tmp_path / "never"), 1.5)  # its thread runs 1.5 s
            await _wait_for(lambda: cluster.workers[1].tasks_running == 1, timeout=20)
            (made,) = spill.iterdir()
            assert made.name.startswith(f"aiodagger-spill-{worker.pid}-{os.uname().nodename}-")
        await asyncio.sleep(0.3)  # the worker has been told to stop, and waits for the thread
        os.kill(worker.pid, signal.SIGTERM)
        assert await asyncio.to_thread(worker.wait, 20) == 0
        assert list(spill.iterdir()) == []
    finally:
        procs.stop_all()


async def test_a_fetch_from_a_frozen_holder_is_given_up_within_the_heartbeat_timeout():
    """A worker fetching an input from a holder that stops answering (SIGSTOP: its
    connections stay open, nothing comes) gives up once nothing has come for the
    heartbeat timeout; the input is computed again and the task gets it, instead of
    the fetch waiting for minutes."""
    async with dagger.Cluster(processes=2, threads=1, heartbeat_interval=0.2,
                              heartbeat_timeout=2.0) as cluster:
        made = dagger.options(scope=dagger.scope(workers=[1, 2])).spawn(_big, 5)
        await asyncio.wait_for(made.wait(), 30)
        (holder,) = made._where
        other = 3 - holder
        pid = next(w.pid for w in cluster.workers if w.id == holder)
        warm = on(other).spawn(checksum, on(holder).spawn(_big, 4))
        assert await asyncio.wait_for(warm, 30) == (4.0 * 100_000, 800_000)  # a connection is open
        os.kill(pid, signal.SIGSTOP)
        try:
            start = asyncio.get_running_loop().time()
            used = on(other).spawn(checksum, made)
            assert await asyncio.wait_for(used, 15) == (5.0 * 100_000, 800_000)
            assert asyncio.get_running_loop().time() - start < 2.0 + 2.0 + 3.0
        finally:
            os.kill(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGCONT)


def _slow_first_time(flag, a):
    import time

    if not os.path.exists(flag):
        open(flag, "w").close()
        time.sleep(1.5)  # past its timeout: its thread runs on beside the retry
    return float(a.sum())


async def test_a_retry_beside_its_timed_out_attempt_leaves_nothing_pinned(tmp_path):
    """A timed-out attempt's thread still runs when the retry starts on the same worker:
    each attempt releases its own pins when it ends (the retry used to release the first
    attempt's, and the first attempt's inputs stayed pinned, never to be spilled)."""
    async with dagger.Cluster(processes=1, threads=2, memory_limit="1GiB") as c:
        (worker,) = c.workers[1:]
        a = dagger.spawn(make_array, 1 << 20, 1.0)
        t = dagger.options(timeout=0.7, retries=1).spawn(_slow_first_time, str(tmp_path / "f"), a)
        assert await asyncio.wait_for(t, 20) == float(1 << 17)
        await asyncio.sleep(1.5)  # the first attempt's thread is over too
        assert (await c.worker_stats())[worker.id]["pinned"] == 0


async def test_a_timeout_holds_on_worker_0_for_a_task_with_remote_inputs(procs):
    """A task that worker 0 runs after bringing its inputs from other workers still has
    its timeout (it had none)."""
    a = dagger.spawn(make_array, 1 << 20, 1.0)  # made on a worker process, stays there
    await asyncio.wait_for(dagger.wait([a]), 20)
    late = dagger.options(scope=dagger.scope(worker=0), timeout=0.3).spawn(sleep_then, 3, a)
    started = asyncio.get_running_loop().time()
    with pytest.raises(dagger.TaskTimeoutError):
        await asyncio.wait_for(late, 10)
    assert asyncio.get_running_loop().time() - started < 2


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


async def test_tasks_spawned_inside_a_task_go_before_other_ready_work(procs):
    """A task waits on children it spawned while many other tasks are ready: the children
    go first, rather than after all of those (the parent held its slot meanwhile, and a
    worker lost in that time took it along, again and again)."""
    await asyncio.wait_for(dagger.spawn(nested_sum, 1), 30)
    parent = dagger.spawn(nested_sum, 2)
    others = [dagger.spawn(sleep_then, 0.02, i) for i in range(200)]
    await asyncio.wait_for(parent, 30)
    done_before = sum(t.done() for t in others)
    await asyncio.wait_for(dagger.wait(others), 60)
    assert done_before < 100, f"{done_before} of 200 other tasks ran before the children"


def _touch_after(path, seconds):
    import time

    time.sleep(seconds)
    with open(path, "w") as f:
        f.write("written")
    return np.ones(1 << 17)  # 1 MiB that the task run after it must not receive


def _read_marker(path, *args):
    with open(path) as f:
        return f.read(), len(args), os.getpid()


def _nested_after(path):
    first = dagger.spawn(_touch_after, path, 0.2)
    second = dagger.options(after=[first]).spawn(_read_marker, path)
    return second.fetch(timeout=20)[0]


async def test_after_across_worker_processes(procs, tmp_path):
    """options(after=...) with worker processes, also for tasks spawned inside one; the
    tasks run after are not given (nor sent) the others' values."""
    marker = str(tmp_path / "m")
    first = on(procs.workers[1].id).spawn(_touch_after, marker, 0.3)
    second = dagger.options(scope=dagger.scope(worker=procs.workers[2].id),
                            after=[first]).spawn(_read_marker, marker)
    text, nargs, pid = await asyncio.wait_for(second, 20)
    assert (text, nargs, pid) == ("written", 0, procs.workers[2].pid)
    stats = await procs.worker_stats()
    assert stats[procs.workers[2].id]["used"] < 1 << 20  # the 1 MiB never moved there
    assert await asyncio.wait_for(dagger.spawn(_nested_after, str(tmp_path / "n")), 30) == "written"


async def test_put_places_a_copy_on_each_worker_its_scope_names(procs):
    """put(obj, scope=...) with workers in other processes sends them a copy at once (one
    worker, or several: a broadcast); their tasks read it there, tasks elsewhere (this
    process included) still get it."""
    w1, w2 = procs.workers[1:]
    data = np.ones(1 << 18)  # 2 MiB
    one = await dagger.put(data, scope=dagger.scope(worker=w1.id))
    stats = await procs.worker_stats()
    assert stats[w1.id]["used"] >= data.nbytes > stats[w2.id]["used"]
    assert await asyncio.wait_for(on(w1.id).spawn(checksum, one), 20) == (float(1 << 18), data.nbytes)

    both = await dagger.put(data * 2, scope=dagger.scope(workers=[w1.id, w2.id]))
    stats = await procs.worker_stats()
    assert stats[w2.id]["used"] >= data.nbytes
    sums = await asyncio.wait_for(dagger.gather(on(w1.id).spawn(checksum, both),
                                                on(w2.id).spawn(checksum, both),
                                                on(0).spawn(checksum, both)), 20)
    assert sums == [(float(2 << 18), data.nbytes)] * 3
    assert (await both).sum() == 2 << 18

    with pytest.raises(dagger.NoProcessorError, match="put\\(\\) with"):
        await dagger.put(data, scope=dagger.scope(worker=99))


def test_functions_and_classes_of_main_reach_worker_processes(tmp_path):
    # A script's (or notebook's) own functions and classes, passed as arguments or put:
    # by name they exist only in the script, so they must travel by value.
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent("""
        import asyncio
        import aiodagger as dagger

        def double(x):
            return 2 * x

        class Box:
            def __init__(self, v):
                self.v = v

        def apply(fn, box):
            return fn(box.v)

        async def main():
            async with dagger.Cluster(processes=2):
                box = await dagger.put(Box(21), scope=dagger.scope(workers=[1, 2]))
                print(await dagger.spawn(apply, double, Box(4)), await dagger.spawn(apply, double, box))

        asyncio.run(main())
    """))
    proc = subprocess.run([sys.executable, "-W", "error", str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["8", "42"]

"""The scheduler's event stream, as observers (logs, progress) see it."""

from __future__ import annotations

import aiodagger as dagger
from aiodagger.scheduler.events import Instrument
from tests.helpers import ainc, boom, eventually, inc


class Recorder(Instrument):
    def __init__(self):
        self.events = []

    def task_spawned(self, task, dependencies):
        self.events.append(("spawned", task.id, [d.id for d in dependencies]))

    def task_ran(self, task, worker, processor, start, stop, ok):
        assert stop >= start > 0
        self.events.append(("ran", task.id, worker, processor.split("(")[0], ok))

    def task_done(self, task):
        self.events.append(("done", task.id, task.state))


async def test_events_for_a_small_graph(cluster):
    rec = Recorder()
    cluster._scheduler.instruments.append(rec)
    a = dagger.spawn(inc, 1)
    b = dagger.spawn(ainc, a)
    c = dagger.spawn(boom, b)
    await c.wait()
    ids = (a.id, b.id, c.id)
    assert ("spawned", a.id, []) in rec.events and ("spawned", b.id, [a.id]) in rec.events
    assert ("ran", a.id, 0, "ThreadProc", True) in rec.events
    assert ("ran", b.id, 0, "AsyncProc", True) in rec.events
    assert ("ran", c.id, 0, "ThreadProc", False) in rec.events
    assert [e for e in rec.events if e[0] == "done"] == [
        ("done", ids[0], "finished"), ("done", ids[1], "finished"), ("done", ids[2], "failed")]


# -- the whole vocabulary, from worker processes too ----------------------------------------
import asyncio  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


class Everything(Instrument):
    """Records every event with its arguments (ids and plain values only)."""

    def __init__(self):
        self.events = []

    def __getattribute__(self, name):
        if name.startswith(("task_", "worker_", "memory_", "data_", "chunk_")):
            events = object.__getattribute__(self, "events")

            def record(*args):
                events.append((name, *[a.id if isinstance(a, dagger.DTask) else a for a in args]))
            return record
        return object.__getattribute__(self, name)

    def of(self, kind):
        return [e for e in self.events if e[0] == kind]


def _make(n):
    return np.ones(n)


def _total(a):
    return float(a.sum())


async def _until(check, timeout=20.0):
    await eventually(check, timeout, "events")


async def test_worker_processes_report_threads_moves_spills_and_lifecycle():
    rec = Everything()
    async with dagger.Cluster(processes=2, threads=1, memory_limit="64MiB", heartbeat_interval=0.2,
                              heartbeat_timeout=5) as c:
        sched = c._scheduler
        sched.attach(rec)
        w1, w2 = sorted(w.id for w in c.workers if w.id != 0)
        t0 = time.perf_counter()
        big = dagger.options(scope=dagger.scope(worker=w1)).spawn(_make, 4 << 20)  # 32 MiB
        more = [dagger.options(scope=dagger.scope(worker=w1)).spawn(_make, 4 << 20) for _ in range(3)]
        total = dagger.options(scope=dagger.scope(worker=w2)).spawn(_total, big)
        assert await asyncio.wait_for(total, 60) == float(4 << 20)
        await asyncio.wait_for(dagger.wait(more), 60)
        t1 = time.perf_counter()
        # every task: spawned, ready, dispatched to its worker, ran there on a named thread, done
        for t, wid in [(big, w1), (total, w2), *[(m, w1) for m in more]]:
            assert [e[0] for e in rec.events if len(e) > 1 and e[1] == t.id and e[0].startswith("task_")] == [
                "task_spawned", "task_ready", "task_dispatched", "task_thread", "task_ran", "task_done"]
            (_, _, worker, at), = [e for e in rec.of("task_dispatched") if e[1] == t.id]
            assert worker == wid and t0 <= at <= t1
            (_, _, worker, thread), = [e for e in rec.of("task_thread") if e[1] == t.id]
            assert worker == wid and thread.startswith("aiodagger")
            (_, _, worker, proc, start, stop, ok), = [e for e in rec.of("task_ran") if e[1] == t.id]
            assert ok and t0 <= start <= stop <= t1  # worker times on this process's clock
        # the array went from w1 to w2, once, whole
        await _until(lambda: any(e[1] == big.id for e in rec.of("data_moved")))
        (_, key, nbytes, source, target, start, stop), = [e for e in rec.of("data_moved") if e[1] == big.id]
        assert (source, target) == (w1, w2) and nbytes >= 32 << 20 and t0 <= start <= stop <= t1
        # 4 x 32 MiB on a 64 MiB worker: some were spilled, on w1
        await _until(lambda: rec.of("chunk_stored"))
        assert {(e[1], e[4]) for e in rec.of("chunk_stored")} <= {(w1, "spilled"), (w1, "loaded"), (w1, "sent"),
                                                                   (w2, "spilled"), (w2, "loaded")}
        assert any(e[4] == "spilled" and e[3] >= 32 << 20 for e in rec.of("chunk_stored"))
        # memory samples from heartbeats
        await _until(lambda: {e[1] for e in rec.of("memory_sampled")} >= {w1, w2})
        assert all(e[3] == 64 << 20 for e in rec.of("memory_sampled"))
        # a worker killed: lost; its replacement joins
        pid = next(w.pid for w in c.workers if w.id == w2)
        os.kill(pid, signal.SIGKILL)
        await _until(lambda: rec.of("worker_left") and rec.of("worker_joined"), timeout=30)
        (_, wid, reason, lost, _), = rec.of("worker_left")
        assert wid == w2 and lost
        (_, new, name, address, processors, _), = rec.of("worker_joined")
        assert new not in (w1, w2) and address.startswith("tcp://") and any("ThreadProc" in p for p in processors)


async def test_no_events_from_workers_when_nobody_listens():
    rec = Everything()
    async with dagger.Cluster(processes=1, threads=1) as c:
        sched = c._scheduler
        sched.attach(rec)
        await asyncio.wait_for(dagger.spawn(inc, 1), 30)
        await _until(lambda: rec.of("task_thread"))
        sched.detach(rec)
        quiet = Recorder()
        sched.instruments.append(quiet)  # appended directly: workers were told nobody listens
        n = len(rec.events)
        await asyncio.wait_for(dagger.gather(*[dagger.spawn(inc, i) for i in range(20)]), 30)
        await asyncio.sleep(0.3)
        assert len(rec.events) == n
        assert not sched.dist.listening
        assert len([e for e in quiet.events if e[0] == "ran"]) == 20  # results still say when they ran


async def test_runs_here_name_their_thread(cluster):
    rec = Everything()
    cluster._scheduler.attach(rec)
    a = dagger.spawn(inc, 1)
    b = dagger.spawn(ainc, a)
    await asyncio.wait_for(b, 10)
    threads = {e[1]: (e[2], e[3]) for e in rec.of("task_thread")}
    assert threads[a.id][0] == 0 and threads[a.id][1].startswith("aiodagger")
    assert threads[b.id] == (0, "event loop")  # coroutines: the worker's loop
    assert [e[2] for e in rec.of("task_dispatched")] == [0, 0]
    cluster._scheduler.detach(rec)

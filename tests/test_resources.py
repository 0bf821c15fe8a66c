"""Resources (``Cluster(resources=)``, ``options(resources=)``) and occupancy
(``options(occupancy=)``): how many runs a worker holds at once, in this process and in
worker processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

import pytest

import aiodagger as dagger
from tests.helpers import boom
from tests.workers import ROOT, WorkerProcesses, write_token

_lock = threading.Lock()
_active = 0
_peak = 0


def counted(i: int, seconds: float = 0.05) -> int:
    """Counts how many run at once in this process (the peak)."""
    global _active, _peak
    with _lock:
        _active += 1
        _peak = max(_peak, _active)
    try:
        time.sleep(seconds)
    finally:
        with _lock:
            _active -= 1
    return i


def reset_peak() -> None:
    global _peak
    _peak = 0


def span(i: int, seconds: float = 0.1) -> tuple[int, float, float]:
    """(pid, start, end) of this run: runs in worker processes are compared by time."""
    start = time.time()
    time.sleep(seconds)
    return os.getpid(), start, time.time()


def most_at_once(spans) -> dict[int, int]:
    """The largest number of runs that overlapped, per process."""
    found: dict[int, int] = {}
    for pid in {p for p, _, _ in spans}:
        edges = sorted([(s, 1) for p, s, _ in spans if p == pid] + [(e, -1) for p, _, e in spans if p == pid],
                       key=lambda x: (x[0], x[1]))
        level = best = 0
        for _, step in edges:
            level += step
            best = max(best, level)
        found[pid] = best
    return found


async def test_a_resource_bounds_the_runs_at_once_in_this_process():
    reset_peak()
    async with dagger.Cluster(threads=8, resources={"db": 2}):
        with dagger.options(resources={"db": 1}):
            tasks = [dagger.spawn(counted, i) for i in range(20)]
        assert await dagger.gather(*tasks) == list(range(20))
    assert _peak == 2  # 8 threads, but 2 db


async def test_amounts_add_up_per_task():
    reset_peak()
    async with dagger.Cluster(threads=8, resources={"db": 3}):
        with dagger.options(resources={"db": 1.5}):  # two at once
            tasks = [dagger.spawn(counted, i) for i in range(8)]
        await dagger.gather(*tasks)
    assert _peak == 2


async def test_each_worker_process_holds_its_own_amounts():
    async with dagger.Cluster(processes=2, threads=4, resources={"db": 1}):
        with dagger.options(resources={"db": 1}):
            spans = await dagger.gather(*[dagger.spawn(span, i) for i in range(10)])
    per_worker = most_at_once(spans)
    assert len(per_worker) == 2 and os.getpid() not in per_worker
    assert set(per_worker.values()) == {1}  # each worker runs one at a time, 4 threads or not


async def test_occupancy_runs_more_tasks_than_threads():
    reset_peak()
    async with dagger.Cluster(threads=2):
        with dagger.options(occupancy=0.25):  # tasks that mostly wait: 4 per thread
            tasks = [dagger.spawn(counted, i, 0.1) for i in range(24)]
        assert await dagger.gather(*tasks) == list(range(24))
    assert _peak == 8


async def test_occupancy_in_a_worker_process():
    async with dagger.Cluster(processes=1, threads=1):
        with dagger.options(occupancy=0.5):
            spans = await dagger.gather(*[dagger.spawn(span, i, 0.2) for i in range(6)])
        # plain tasks still run one at a time there
        plain = await dagger.gather(*[dagger.spawn(span, i, 0.05) for i in range(3)])
    (light,) = most_at_once(spans).values()
    assert light == 2
    assert list(most_at_once(plain).values()) == [1]


async def test_tasks_waiting_for_a_resource_do_not_hold_up_others():
    """The first ready tasks wait for db; the rest of the heap runs meanwhile."""
    started = threading.Event()
    release = threading.Event()

    def hold_db():
        started.set()
        release.wait(30)
        return "db"

    async with dagger.Cluster(threads=4, resources={"db": 1}):
        with dagger.options(resources={"db": 1}, priority=5):
            holders = [dagger.spawn(hold_db) for _ in range(3)]
        others = [dagger.spawn(counted, i, 0.01) for i in range(20)]
        assert await asyncio.wait_for(dagger.gather(*others), 10) == list(range(20))
        assert sum(t.done() for t in holders) == 0
        release.set()
        assert await asyncio.wait_for(dagger.gather(*holders), 10) == ["db"] * 3


async def test_amounts_come_back_after_failures_and_cancellations():
    block = threading.Event()

    def wait_then(value):
        block.wait(30)
        return value

    async with dagger.Cluster(threads=4, resources={"db": 1}):
        with dagger.options(resources={"db": 1}):
            failed = [dagger.spawn(boom) for _ in range(3)]
            first = dagger.spawn(wait_then, 1)
            parked = dagger.spawn(wait_then, 2)
        for t in failed:
            with pytest.raises(ValueError):
                await t
        parked.cancel()
        block.set()
        assert await asyncio.wait_for(first, 10) == 1
        with dagger.options(resources={"db": 1}):
            assert await asyncio.wait_for(dagger.gather(*[dagger.spawn(counted, i) for i in range(3)]), 10) == [0, 1, 2]


async def test_a_resource_no_worker_has_fails_with_no_processor_error():
    async with dagger.Cluster(threads=2, resources={"db": 1}):
        with pytest.raises(dagger.NoProcessorError, match=r"needs \{'gpu': 1\}, which no worker of this cluster has"):
            await dagger.options(resources={"gpu": 1}).spawn(counted, 1)
        with pytest.raises(dagger.NoProcessorError, match="db=1"):
            await dagger.options(resources={"db": 2}).spawn(counted, 1)


async def test_a_task_waits_for_a_worker_with_the_resource_to_join(tmp_path):
    token = "t" * 43
    procs = WorkerProcesses(tmp_path)
    try:
        async with dagger.Cluster(listen="tcp://127.0.0.1:0", token=token) as cluster:
            task = dagger.options(resources={"licence": 1}).spawn(os.getpid)
            await asyncio.sleep(0.3)
            assert not task.done()  # nothing has a licence yet: it waits
            worker = procs.start(cluster.address, write_token(tmp_path, token), "--resources", "licence=1")
            assert await asyncio.wait_for(task, 30) == worker.pid
    finally:
        procs.stop_all()


async def test_a_retired_workers_amounts_go_with_it():
    async with dagger.Cluster(processes=2, threads=1, resources={"db": 1}) as cluster:
        book = cluster._scheduler.book
        assert len(book.declared({"db": 1})) == 2
        await cluster.scale(1)
        assert len(book.declared({"db": 1})) == 1  # the retired one is not waited for
        with dagger.options(resources={"db": 1}):
            spans = await dagger.gather(*[dagger.spawn(span, i, 0.05) for i in range(4)])
        assert list(most_at_once(spans).values()) == [1]


def test_bad_resources_are_refused():
    with pytest.raises(ValueError, match="the amount of 'db' must be a number > 0"):
        dagger.options(resources={"db": 0})
    with pytest.raises(TypeError, match="takes a dict of resource names"):
        dagger.options(resources=["db"])
    with pytest.raises(ValueError, match="use occupancy="):
        dagger.options(resources={"occupancy": 1})
    with pytest.raises(ValueError, match=r"0 < occupancy <= 1"):
        dagger.options(occupancy=1.5)
    with pytest.raises(ValueError, match=r"0 < occupancy <= 1"):
        dagger.options(occupancy=0)
    with pytest.raises(TypeError, match=r"Cluster\(resources=...\) takes a dict"):
        dagger.Cluster(resources="db=1")
    proc = subprocess.run([sys.executable, "-m", "aiodagger", "worker", "tcp://127.0.0.1:9", "--resources", "db"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env=dict(os.environ, AIODAGGER_TOKEN="x" * 43))
    assert proc.returncode != 0 and "--resources 'db': 'db' is not NAME=AMOUNT" in proc.stderr

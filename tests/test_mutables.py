"""mutable and shard: objects created on a worker, changed in place there, freed with their handle."""

from __future__ import annotations

import asyncio
import gc
import os
import threading

import numpy as np
import pytest

import aiodagger as dagger
from aiodagger import placed


class Counter:
    """Unpicklable on purpose (a lock): it can only ever be used where it was made."""

    def __init__(self, start=0):
        self.n = start
        self.lock = threading.Lock()
        self.pid = os.getpid()


def bump(c, by=1):
    with c.lock:
        c.n += by
        return c.n, c.pid, os.getpid()


async def abump(c):
    await asyncio.sleep(0)
    c.n += 1
    return c.n


async def make_counter_async(start):
    await asyncio.sleep(0)
    return Counter(start)


def table_size():
    return len(placed._TABLE)


def a_list():
    return [os.getpid()]


def append(piece, value):
    piece.append(value)
    return list(piece), os.getpid()


def fails():
    raise ValueError("no object today")


def both(a, b):
    return a.n + b.n


def append_in_order(lst, i):
    lst.append(i)


def fill_row(row, v):
    row[...] = v


@pytest.fixture(params=[0, 2], ids=["in-process", "processes=2"])
async def anycluster(request):
    async with dagger.Cluster(processes=request.param, threads=2) as c:
        yield c


async def test_tasks_change_a_mutable_in_place_where_it_lives(anycluster):
    m = await dagger.mutable(Counter, 10)
    results = [await asyncio.wait_for(dagger.spawn(bump, m), 30) for _ in range(5)]
    assert [n for n, _, _ in results] == [11, 12, 13, 14, 15]
    made_in = {pid for _, pid, _ in results} | {pid for _, _, pid in results}
    assert len(made_in) == 1  # made and used in one process, never copied elsewhere
    if anycluster.workers[1:]:
        assert m.worker != 0 and os.getpid() not in made_in
    assert await dagger.spawn(abump, m) == 16  # coroutine tasks too


async def test_async_creator_and_keyword_arguments(anycluster):
    m = dagger.mutable(make_counter_async, 5)  # usable before it is awaited
    assert (await dagger.spawn(bump, m, by=2))[0] == 7
    assert (await dagger.spawn(bump, c=m))[0] == 8


async def test_a_shard_gives_each_task_the_piece_where_it_runs(anycluster):
    s = await dagger.shard(a_list)
    assert s.workers == sorted(w.id for w in anycluster.workers if w.id != 0) or s.workers == [0]
    for worker in s.workers:
        for i in range(3):
            piece, pid = await dagger.options(scope=dagger.scope(worker=worker)).spawn(append, s, i)
            assert piece[0] == pid  # made in the process that runs the task
            assert piece[1:] == list(range(i + 1))  # one piece per worker, kept between tasks


async def test_the_object_is_freed_when_its_last_handle_goes(anycluster):
    m = await dagger.mutable(Counter)
    where = dagger.scope(worker=m.worker)
    before = await dagger.options(scope=where).spawn(table_size)
    assert await dagger.spawn(bump, m)
    del m
    gc.collect()
    for _ in range(200):
        if await dagger.options(scope=where).spawn(table_size) == before - 1:
            break
        await asyncio.sleep(0.05)
        gc.collect()
    else:
        pytest.fail("the mutable's object outlived its last handle")


async def test_misuse_fails_at_once_naming_the_workers(anycluster):
    m = await dagger.mutable(Counter)
    elsewhere = next((w.id for w in anycluster.workers if w.id not in (0, m.worker)), None)
    if elsewhere is not None:
        with pytest.raises(dagger.NoProcessorError, match=rf"worker\(s\) \[{m.worker}\]"):
            dagger.options(scope=dagger.scope(worker=elsewhere)).spawn(bump, m)
        other = await dagger.mutable(Counter, scope=dagger.scope(worker=elsewhere))
        with pytest.raises(dagger.NoProcessorError, match="live on different workers"):
            dagger.spawn(both, m, other)
    with pytest.raises(TypeError, match="direct argument"):
        dagger.spawn(len, [m])
    with pytest.raises(ValueError, match="no object today"):
        await dagger.mutable(fails)
    with pytest.raises(dagger.NoProcessorError, match="satisfies"):
        dagger.mutable(Counter, scope=dagger.scope(worker=99))
    with pytest.raises(TypeError, match="scope="):
        dagger.mutable(Counter, scope=3)


async def test_a_handle_from_a_closed_cluster_is_refused():
    async with dagger.Cluster(threads=1):
        m = await dagger.mutable(Counter)
    async with dagger.Cluster(threads=1):
        with pytest.raises(RuntimeError, match="cluster that has closed"):
            dagger.spawn(bump, m)


def test_sync_use():
    with dagger.Cluster(processes=1, threads=1):
        m = dagger.mutable(Counter).fetch(timeout=30)
        assert dagger.spawn(bump, m).fetch(timeout=30)[0] == 1
        assert dagger.spawn(bump, m).fetch(timeout=30)[0] == 2


async def test_in_datadeps_a_mutable_is_ordered_like_any_argument(anycluster):
    log = await dagger.mutable(list)
    rows = np.zeros((3, 2))
    async with dagger.datadeps() as dd:
        for i in range(20):
            dd.spawn(append_in_order, dagger.InOut(log), i)
        for j in range(3):
            dd.spawn(fill_row, dagger.Out(rows[j]), j)  # copied back if it ran elsewhere
        length = dd.spawn(len, log)
    assert await length == 20
    assert await dagger.spawn(list, log) == list(range(20))
    assert rows.tolist() == [[0, 0], [1, 1], [2, 2]]


def add_into(x, y):
    x += y


def fill_all(x, v):
    x[...] = v


async def test_in_datadeps_a_task_reads_mutables_of_other_workers_as_copies(procs2):
    one, two = (w.id for w in procs2.workers if w.id != 0)
    a = await dagger.mutable(np.ones, 3, scope=dagger.scope(worker=one))
    b = await dagger.mutable(np.full, 3, 5.0, scope=dagger.scope(worker=two))
    async with dagger.datadeps() as dd:
        dd.spawn(add_into, dagger.InOut(a), dagger.In(b))   # runs on `one`, b comes as a copy
        dd.spawn(fill_all, dagger.Out(b), -1.0)             # after that copy was taken
        dd.spawn(add_into, dagger.InOut(a), b)              # reads b's new value
    assert (await dagger.spawn(list, a)) == [5.0, 5.0, 5.0]
    assert (await dagger.spawn(list, b)) == [-1.0, -1.0, -1.0]
    c = await dagger.mutable(np.zeros, 3, scope=dagger.scope(worker=one))
    async with dagger.datadeps() as dd:
        dd.spawn(add_into, dagger.InOut(a), b)
        dd.spawn(add_into, dagger.InOut(c), b)  # b unchanged since: the same copy serves
        assert len(dd._tasks) == 3
        dd.spawn(fill_all, dagger.Out(b), 2.0)
        dd.spawn(add_into, dagger.InOut(c), b)  # a new version: a new copy
        assert len(dd._tasks) == 6
    assert (await dagger.spawn(list, c)) == [1.0, 1.0, 1.0]
    with pytest.raises(dagger.NoProcessorError, match="different workers"):
        async with dagger.datadeps() as dd:
            dd.spawn(add_into, dagger.InOut(a), dagger.InOut(b))


@pytest.fixture
async def procs2():
    async with dagger.Cluster(processes=2, threads=2) as c:
        yield c


def make_a_mutable_inside():
    return dagger.mutable(list)


async def test_inside_a_worker_process_task_a_clear_error(procs2):
    with pytest.raises(RuntimeError, match="cannot do yet"):
        await asyncio.wait_for(dagger.spawn(make_a_mutable_inside), 30)

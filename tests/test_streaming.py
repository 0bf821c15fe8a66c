"""Streaming tasks (aiodagger/streaming.py, scheduler/streams.py, worker/streams.py):
values in order to every reader, as they come; a bounded lead of the producer over its
slowest reader; errors and cancellation from either end; on worker 0 and across
worker processes alike."""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import pickle
import struct
import time

import pytest

import aiodagger as dagger
from aiodagger.errors import TaskCancelledError
from aiodagger.streaming import AsyncReader, Reader, Stream

T = 30  # seconds any one await of a test may take


# -- generators and consumers (module level: worker processes import them) ---------------
async def count_to(n):
    for i in range(n):
        yield i


def count_to_sync(n):
    yield from range(n)


async def collect(src):
    return [v async for v in src]


def collect_sync(src):
    assert not hasattr(src, "__anext__") and iter(src) is src
    return list(src)


def counter(path):
    """An int64 in a file, shared by processes: how far the producer got."""
    with open(path, "r+b") as f:
        return mmap.mmap(f.fileno(), 8)


async def counted(path, n):
    m = counter(path)
    try:
        for i in range(n):
            struct.pack_into("q", m, 0, i + 1)  # value i is being made
            yield i
    finally:
        m.close()


async def slow_reader(src, path, delay):
    """Reads with a pause per value; returns the values and the producer's largest lead:
    values made beyond those this reader has taken, counting the one in its hand (the
    reader counts a value as taken when it hands it over, and may tell the producer
    so before this line reads the counter)."""
    m = counter(path)
    got, lead = [], 0
    async for v in src:
        got.append(v)
        lead = max(lead, struct.unpack_from("q", m, 0)[0] - len(got))
        await asyncio.sleep(delay)
    m.close()
    return got, lead


async def fails_at(n, exc):
    for i in range(n):
        yield i
    raise exc


@contextlib.contextmanager
def marked(marker):
    """Writes ``marker``.started on entry and ``marker`` on the way out: in a generator,
    once it runs, and once it is closed (one closed before it started runs neither)."""
    with open(marker + ".started", "w"):
        pass
    try:
        yield
    finally:
        with open(marker, "w") as f:
            f.write("closed")


async def endless(marker):
    with marked(marker):
        i = 0
        while True:
            yield i
            i += 1
            await asyncio.sleep(0.001)


def endless_sync(marker):
    with marked(marker):
        i = 0
        while True:
            yield i
            i += 1
            time.sleep(0.001)


async def read_some(src, n):
    out = []
    async for v in src:
        out.append(v)
        if len(out) == n:
            break
    return out


async def read_forever(src):
    async for _ in src:
        await asyncio.sleep(0.001)


def read_forever_sync(src):
    for _ in src:
        time.sleep(0.001)


async def pid_then(n):
    yield os.getpid()
    for i in range(n):
        yield i


async def collect_with_pid(src):
    return os.getpid(), [v async for v in src]


async def doubled(src):
    async for v in src:
        yield 2 * v


# -- fixtures -----------------------------------------------------------------------------
@pytest.fixture(params=["worker0", "processes"])
async def cluster(request):
    """An in-process cluster, and one with two worker processes."""
    if request.param == "worker0":
        async with dagger.Cluster(threads=2) as c:
            yield c
    else:
        async with dagger.Cluster(processes=2, threads=2) as c:
            yield c


def on(cluster, i):
    """Place on worker ``i`` where there are worker processes, on worker 0 otherwise."""
    return dagger.options(scope=dagger.scope(worker=i if len(cluster.workers) > 1 else 0))


def pipeline(cluster, gen, *args, readers, buffer=4):
    """A stream on worker 1, and a task on worker 2 for each reader function."""
    with on(cluster, 1):
        s = dagger.spawn_streaming(gen, *args, buffer=buffer)
    with on(cluster, 2):
        return s, [dagger.spawn(read, s) for read in readers]


async def settled(cluster):
    """Nothing left in flight, and the hub has forgotten every stream."""
    deadline = time.monotonic() + T
    hub = cluster._scheduler.stream_hub
    while cluster.tasks_in_flight or (hub is not None and hub._feeds):
        assert time.monotonic() < deadline, (cluster.tasks_in_flight, hub and hub._feeds)
        await asyncio.sleep(0.01)


async def wait_for_file(path):
    deadline = time.monotonic() + T
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never written"
        await asyncio.sleep(0.01)


# -- the acceptance cases, on worker 0 and across processes ------------------------------
async def test_slow_reader_bounds_the_producers_lead(cluster, tmp_path):
    path = tmp_path / "produced"
    path.write_bytes(bytes(8))
    buffer = 8
    with on(cluster, 1):
        s = dagger.spawn_streaming(counted, str(path), 1000, buffer=buffer)
    reader = on(cluster, 2).spawn(slow_reader, s, str(path), 0.0005)
    got, lead = await asyncio.wait_for(reader, T)
    assert got == list(range(1000))
    # Never more than the window ahead: credit counts what is in flight, so no allowance
    # is needed across processes. And it does run ahead, up to the window.
    assert buffer // 2 <= lead <= buffer, lead
    assert await asyncio.wait_for(s, T) == 1000
    await settled(cluster)


async def test_two_readers_each_get_every_value_in_order(cluster):
    s = dagger.spawn_streaming(count_to, 1000, buffer=4)
    a = on(cluster, 1).spawn(collect, s)
    b = on(cluster, 2).spawn(collect_sync, s)
    assert await asyncio.wait_for(dagger.gather(a, b), T) == [list(range(1000))] * 2
    assert await asyncio.wait_for(s, T) == 1000
    await settled(cluster)


async def test_producer_error_reaches_every_reader_as_its_own_type(cluster):
    s = dagger.spawn_streaming(fails_at, 500, KeyError("boom"), buffer=16)
    a = dagger.spawn(collect, s)
    b = dagger.spawn(collect_sync, s)
    for t in (a, b, s):
        with pytest.raises(KeyError, match="boom"):
            await asyncio.wait_for(t, T)
    await settled(cluster)


async def test_values_before_the_error_arrive_before_it(cluster):
    async def reader(src):
        got = []
        try:
            async for v in src:
                got.append(v)
        except ZeroDivisionError:
            return got
        return None

    s = dagger.spawn_streaming(fails_at, 300, ZeroDivisionError(), buffer=1000)
    assert await asyncio.wait_for(dagger.spawn(reader, s), T) == list(range(300))
    await settled(cluster)


@pytest.mark.parametrize("gen", [endless, endless_sync])
async def test_cancelling_the_producer_ends_its_readers(cluster, tmp_path, gen):
    marker = tmp_path / "closed"
    s, (a, b) = pipeline(cluster, gen, str(marker), readers=[read_forever, read_forever_sync])
    await wait_for_file(f"{marker}.started")
    assert not a.done() and not b.done()
    assert s.cancel()
    for t in (a, b):
        with pytest.raises(TaskCancelledError):
            await asyncio.wait_for(t, T)
    with pytest.raises(TaskCancelledError):
        await asyncio.wait_for(s, T)
    await wait_for_file(marker)  # the generator was closed, not left suspended
    await settled(cluster)


@pytest.mark.parametrize("consumer", [read_forever, read_forever_sync])
async def test_cancelling_the_only_reader_stops_the_producer(cluster, tmp_path, consumer):
    marker = tmp_path / "closed"
    s, (c,) = pipeline(cluster, endless, str(marker), readers=[consumer])
    await wait_for_file(f"{marker}.started")
    assert not s.done()
    assert c.cancel()
    with pytest.raises(TaskCancelledError):
        await asyncio.wait_for(s, T)
    await wait_for_file(marker)
    await asyncio.wait_for(c.wait(), T)
    await settled(cluster)


async def test_cancelling_one_of_two_readers_leaves_the_other_reading(cluster):
    s = dagger.spawn_streaming(count_to, 300, buffer=4)
    stuck = on(cluster, 1).spawn(read_forever, s)
    reader = on(cluster, 2).spawn(collect, s)
    await asyncio.sleep(0.05)
    stuck.cancel()
    assert await asyncio.wait_for(reader, T) == list(range(300))
    assert await asyncio.wait_for(s, T) == 300
    await settled(cluster)


async def test_a_reader_that_stops_early_lets_the_stream_go(cluster, tmp_path):
    marker = tmp_path / "closed"
    s = dagger.spawn_streaming(endless, str(marker), buffer=4)
    assert await asyncio.wait_for(dagger.spawn(read_some, s, 10), T) == list(range(10))
    with pytest.raises(TaskCancelledError):  # its only reader left: nobody takes the rest
        await asyncio.wait_for(s, T)
    await wait_for_file(marker)
    await settled(cluster)


async def test_sync_generator_on_a_thread_and_sync_reader(cluster):
    s = dagger.spawn_streaming(count_to_sync, 1000, buffer=8)
    assert await asyncio.wait_for(dagger.spawn(collect_sync, s), T) == list(range(1000))
    assert await asyncio.wait_for(s, T) == 1000
    await settled(cluster)


async def test_the_caller_reads_with_async_for(cluster):
    s = dagger.spawn_streaming(count_to, 100, buffer=3)
    got = []
    async with asyncio.timeout(T):
        async for v in s:
            got.append(v)
    assert got == list(range(100))
    assert await asyncio.wait_for(s, T) == 100
    await settled(cluster)


async def test_a_stream_of_a_stream(cluster):
    s = dagger.spawn_streaming(count_to, 200, buffer=8)
    with on(cluster, 1):
        d = dagger.spawn_streaming(doubled, s, buffer=8)
    r = on(cluster, 2).spawn(collect, d)
    assert await asyncio.wait_for(r, T) == [2 * i for i in range(200)]
    assert await asyncio.wait_for(dagger.gather(s, d), T) == [200, 200]
    await settled(cluster)


async def test_a_reader_that_joins_after_the_end_reads_nothing(cluster):
    s = dagger.spawn_streaming(count_to, 10)
    assert await asyncio.wait_for(dagger.spawn(collect, s), T) == list(range(10))
    assert await asyncio.wait_for(s, T) == 10
    assert await asyncio.wait_for(dagger.spawn(collect, s), T) == []
    await settled(cluster)


# -- across worker processes ------------------------------------------------------------
@pytest.fixture
async def procs():
    async with dagger.Cluster(processes=2, threads=2) as c:
        yield c


async def test_producer_and_reader_on_different_worker_processes(procs):
    pids = {w.id: w.pid for w in procs.workers}
    assert sorted(pids) == [0, 1, 2]
    with on(procs, 1):
        s = dagger.spawn_streaming(pid_then, 500, buffer=16)
    r = on(procs, 2).spawn(collect_with_pid, s)
    reader_pid, values = await asyncio.wait_for(r, T)
    assert values[0] == pids[1] and reader_pid == pids[2]
    assert values[1:] == list(range(500))
    await settled(procs)


async def test_readers_on_worker_0_and_on_a_worker_process(procs):
    with on(procs, 1):
        s = dagger.spawn_streaming(count_to_sync, 300, buffer=16)
    here = dagger.options(scope=dagger.scope(worker=0)).spawn(collect, s)
    there = on(procs, 2).spawn(collect, s)
    got = [v async for v in s]
    assert await asyncio.wait_for(dagger.gather(here, there), T) == [list(range(300))] * 2
    assert got == list(range(300))
    await settled(procs)


# -- misuse and the pieces ----------------------------------------------------------------
def plain(x):
    return x


async def coroutine_fn():
    return 1


def test_spawn_streaming_needs_a_generator_function():
    with pytest.raises(TypeError, match=r"generator function .*got function .*plain.*dagger\.spawn\(\)"):
        dagger.spawn_streaming(plain, 1)
    with pytest.raises(TypeError, match="got the coroutine function coroutine_fn"):
        dagger.spawn_streaming(coroutine_fn)
    gen = count_to(3)
    with pytest.raises(TypeError, match=r"generator object .*dagger\.spawn_streaming\(count_to, \*args\)"):
        dagger.spawn_streaming(gen)
    with pytest.raises(TypeError, match="got int 3"):
        dagger.spawn_streaming(3)


def test_buffer_must_be_a_positive_int():
    with pytest.raises(ValueError, match="buffer=0"):
        dagger.spawn_streaming(count_to, 3, buffer=0)
    with pytest.raises(ValueError, match="buffer=-2"):
        dagger.spawn_streaming(count_to, 3, buffer=-2)
    with pytest.raises(TypeError, match="int >= 1"):
        dagger.spawn_streaming(count_to, 3, buffer=2.5)
    with pytest.raises(TypeError, match="int >= 1"):
        dagger.spawn_streaming(count_to, 3, buffer=True)


async def test_a_stream_is_a_dtask_whose_value_is_the_count(cluster):
    s = dagger.spawn_streaming(count_to, 5, buffer=2)
    assert isinstance(s, dagger.DTask) and isinstance(s, Stream)
    assert s.name == "count_to" and "buffer=2" in repr(s)
    r = dagger.spawn(collect, s)
    done, _ = await dagger.wait([s, r], timeout=T)
    assert done == {s, r} and s.result() == 5


def test_readers_pickle_as_their_stream_and_place():
    for cls in (AsyncReader, Reader):
        reader = pickle.loads(pickle.dumps(cls(7, 3, 16, port=object())))
        assert type(reader) is cls and (reader._key, reader._id, reader._buffer) == (7, 3, 16)
        assert reader._port is None  # found where it is read


def test_sync_caller_reads_with_for():
    with dagger.Cluster(threads=2):
        s = dagger.spawn_streaming(count_to_sync, 50, buffer=4)
        assert list(s) == list(range(50))
        assert s.fetch(timeout=T) == 50


def test_a_caller_on_another_loop_reads_with_async_for():
    """The cluster on its own loop thread, the caller on a loop of its own."""
    async def read(s):
        async with asyncio.timeout(T):
            return [v async for v in s]

    with dagger.Cluster(threads=2):
        s = dagger.spawn_streaming(count_to, 200, buffer=4)
        assert asyncio.run(read(s)) == list(range(200))
        assert s.fetch(timeout=T) == 200


async def spawns_a_stream():
    dagger.spawn_streaming(count_to, 3)


async def test_spawn_streaming_in_a_worker_process_says_where_to_spawn_it(procs):
    with pytest.raises(RuntimeError, match="spawn the stream where the cluster runs"):
        await asyncio.wait_for(dagger.spawn(spawns_a_stream), T)


async def test_a_stream_of_another_cluster_is_refused_before_anything_joins(cluster):
    theirs = dagger.spawn_streaming(count_to, 5, buffer=2)
    async with dagger.Cluster(threads=1) as other:
        ours = dagger.spawn_streaming(count_to, 5, buffer=2)  # other's, entered last
        with pytest.raises(ValueError, match="belongs to another cluster"):
            dagger.spawn(collect, [ours, theirs])
        assert other._scheduler.stream_hub._feeds[ours.id].readers == {}  # ours not joined
        assert await asyncio.wait_for(dagger.spawn(collect, ours), T) == list(range(5))
    assert await asyncio.wait_for(dagger.spawn(collect, theirs), T) == list(range(5))

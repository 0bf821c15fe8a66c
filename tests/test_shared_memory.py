"""Same-host shared memory: worker processes on one machine hand values of 16 MiB and
more through segments in /dev/shm (memory.shared) instead of the socket. Each segment
lives as long as its value on the holder: gone after release, after kill -9 of the
holder, after the cluster closes; a reader never sees a partial one."""

from __future__ import annotations

import asyncio
import fcntl
import gc
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

import aiodagger as dagger
from aiodagger.comm import serialize
from aiodagger.memory import SpillCorruptedError, shared, spilldir, spillfile

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(shared.host_key() == "", reason="no writable /dev/shm on this machine")]

MiB = 1 << 20
BIG = shared.MIN_BYTES // 8  # float64 values in the smallest value a segment carries


def make(n: int, fill: float = 1.0) -> np.ndarray:
    return np.full(n, fill)


def total(a: np.ndarray) -> float:
    return float(a.sum())


def bump_and_total(a: np.ndarray) -> float:
    a += 1.0  # a private mapping: this reader's pages only
    return float(a.sum())


def mapped_from_shm(a: np.ndarray) -> bool:
    """Whether ``a``'s memory is a mapping of a file in /dev/shm (what this reader got)."""
    address = a.__array_interface__["data"][0]
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return len(fields) > 5 and fields[5].startswith("/dev/shm/aiodagger-shm-")
    return False


def segments_of(pids: list[int]) -> list[Path]:
    """The segment files of these worker processes (other test runs may have theirs)."""
    out: list[Path] = []
    for d in Path("/dev/shm").glob("aiodagger-shm-*"):
        if any(d.name.startswith(f"aiodagger-shm-{pid}-") for pid in pids):
            out.extend(p for p in d.iterdir() if p.name != spilldir.OWNER)
    return out


def dirs_of(pids: list[int]) -> list[Path]:
    return [d for d in Path("/dev/shm").glob("aiodagger-shm-*")
            if any(d.name.startswith(f"aiodagger-shm-{pid}-") for pid in pids)]


async def eventually(check, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(0.05)


def on(worker: int) -> dagger.Options:
    return dagger.options(scope=dagger.scope(worker=worker))


@pytest.fixture
async def two_workers():
    async with dagger.Cluster(processes=2) as cluster:
        yield cluster, [w for w in cluster.workers if w.id != 0]


async def test_a_large_value_crosses_through_a_segment_that_goes_with_it(two_workers):
    cluster, (w1, w2) = two_workers
    a = on(w1.id).spawn(make, BIG, 2.0)
    assert await asyncio.wait_for(on(w2.id).spawn(total, a), 30) == BIG * 2.0
    assert await asyncio.wait_for(on(w2.id).spawn(mapped_from_shm, a), 30)
    assert [p.name for p in segments_of([w1.pid])] == [f"v{a.id}"]
    del a
    gc.collect()
    # Released: no reader can name it any more; its pages wait, free, for the next value.
    await eventually(lambda: [p.name for p in segments_of([w1.pid])] == ["free1"])


async def test_once_read_here_large_results_are_shared_as_they_are_made(two_workers):
    cluster, (w1, w2) = two_workers
    first = on(w1.id).spawn(make, BIG)
    assert await asyncio.wait_for(on(w2.id).spawn(total, first), 30) == BIG
    small = on(w1.id).spawn(make, BIG // 2)  # below the threshold: never in a segment
    big = on(w1.id).spawn(make, shared.EAGER_BYTES // 8, 5.0)
    await asyncio.wait_for(dagger.wait([small, big]), 30)
    names = [p.name for p in segments_of([w1.pid])]
    assert f"v{big.id}" in names and f"v{small.id}" not in names  # nobody asked for it yet
    # The holder keeps the segment's mapping in place of its own copy: the data is in RAM once.
    assert await asyncio.wait_for(on(w1.id).spawn(mapped_from_shm, big), 30)
    assert await asyncio.wait_for(on(w2.id).spawn(total, big), 30) == 5.0 * shared.EAGER_BYTES // 8


async def test_small_values_and_readers_that_opt_out_use_the_socket(two_workers):
    cluster, (w1, w2) = two_workers
    small = on(w1.id).spawn(make, BIG // 2)
    assert await asyncio.wait_for(on(w2.id).spawn(mapped_from_shm, small), 30) is False
    assert segments_of([w1.pid]) == []


async def test_with_shm_off_values_go_over_tcp(monkeypatch):
    monkeypatch.setenv("AIODAGGER_SHM", "0")  # the workers inherit it
    async with dagger.Cluster(processes=2) as cluster:
        w1, w2 = [w for w in cluster.workers if w.id != 0]
        a = on(w1.id).spawn(make, BIG)
        assert await asyncio.wait_for(on(w2.id).spawn(mapped_from_shm, a), 30) is False
        assert await asyncio.wait_for(on(w2.id).spawn(total, a), 30) == BIG
        assert dirs_of([w1.pid, w2.pid]) == []


async def test_a_reader_may_write_its_input_without_touching_the_holders(two_workers):
    cluster, (w1, w2) = two_workers
    n = BIG
    a = on(w1.id).spawn(make, n, 1.0)
    assert await asyncio.wait_for(on(w2.id).spawn(bump_and_total, a), 30) == 2.0 * n
    assert await asyncio.wait_for(on(w1.id).spawn(total, a), 30) == 1.0 * n
    assert float((await asyncio.wait_for(a, 30))[0]) == 1.0  # and the caller, through it too


async def test_the_caller_reads_a_large_result_through_a_segment(two_workers):
    cluster, (w1, _) = two_workers
    a = on(w1.id).spawn(make, BIG, 3.0)
    value = await asyncio.wait_for(a, 30)
    assert mapped_from_shm(value) and float(value.sum()) == 3.0 * BIG


async def test_kill_9_of_the_holder_leaves_nothing_in_dev_shm(two_workers):
    cluster, (w1, w2) = two_workers
    a = on(w1.id).spawn(make, BIG)
    assert await asyncio.wait_for(on(w2.id).spawn(total, a), 30) == BIG
    assert dirs_of([w1.pid])
    os.kill(w1.pid, signal.SIGKILL)
    await eventually(lambda: not dirs_of([w1.pid]))


async def test_closing_the_cluster_leaves_nothing_in_dev_shm():
    async with dagger.Cluster(processes=2) as cluster:
        w1, w2 = [w for w in cluster.workers if w.id != 0]
        pids = [w1.pid, w2.pid]
        values = [on(w1.id).spawn(make, BIG, float(i)) for i in range(3)]
        assert await asyncio.wait_for(dagger.gather(*[on(w2.id).spawn(total, v) for v in values]), 30) \
            == [float(i) * BIG for i in range(3)]
        assert len(segments_of(pids)) == 3
    assert dirs_of(pids) == []


async def test_a_cluster_removes_stale_segment_directories_at_start(tmp_path):
    """A directory left by a process that died (its owner lock free) goes at the next start."""
    import subprocess
    import sys

    script = (
        "import os, sys; from aiodagger.memory import shared\n"
        "seg = shared.Segments('stale')\n"
        "import asyncio\n"
        "asyncio.run(seg.offer(1, b'p', [bytes(2 << 20)]))\n"
        "print(seg.directory, flush=True); os._exit(0)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    stale = Path(out.stdout.strip())
    assert stale.is_dir() and (stale / "v1").exists()
    async with dagger.Cluster(processes=1):
        assert not stale.exists()


async def test_readers_waiting_for_a_segment_being_written_get_it_whole(tmp_path):
    segments = shared.Segments("readers")
    try:
        payload, buffers = serialize.dumps(np.arange(16 * MiB // 8, dtype=np.float64))
        results = await asyncio.gather(*(segments.offer(7, payload, list(buffers)) for _ in range(5)))
        assert len({r for r in results}) == 1
        value = shared.load(results[0][0])
        assert np.array_equal(value, np.arange(16 * MiB // 8, dtype=np.float64))
        # Released while being written: the writer's readers are told it is gone.
        writing = asyncio.ensure_future(segments.offer(8, payload, list(buffers)))
        await asyncio.sleep(0)
        segments.drop(8)
        with pytest.raises(KeyError):
            await writing
        assert not (segments.directory / "v8").exists()
    finally:
        segments.close()
    assert segments.directory is None


def test_a_partial_or_foreign_segment_is_refused(tmp_path):
    segments = shared.Segments("partial")
    try:
        payload, buffers = serialize.dumps(np.ones(MiB // 8))
        path, size = asyncio.run(segments.offer(3, payload, list(buffers)))
        os.truncate(path, size - 1)
        with pytest.raises(SpillCorruptedError, match="truncated"):
            shared.load(path)
        os.unlink(path)
        with pytest.raises(FileNotFoundError):
            shared.load(path)
        with pytest.raises(ValueError, match="not a shared segment"):
            shared.load("/etc/passwd")
        other = tmp_path / "v1"
        spillfile.write_parts(other, payload, buffers, spillfile.ALIGNED)
        with pytest.raises(ValueError, match="not a shared segment"):
            shared.load(str(other))
    finally:
        segments.close()


def test_segment_parts_are_aligned_for_numpy(tmp_path):
    segments = shared.Segments("aligned")
    try:
        payload, buffers = serialize.dumps([np.arange(3, dtype=np.int8), np.arange(MiB // 8.0)])
        path, _ = asyncio.run(segments.offer(1, payload, list(buffers)))
        small, big = shared.load(path)
        assert big.ctypes.data % 64 == 0 and small.ctypes.data % 64 == 0
        assert list(small) == [0, 1, 2] and np.array_equal(big, np.arange(MiB // 8.0))
        copy = tmp_path / "v1"
        spillfile.write_parts(copy, payload, buffers, spillfile.ALIGNED | spillfile.UNCHECKED)
        assert spillfile.load(copy)[1].sum() == np.arange(MiB // 8.0).sum()  # read_parts too
    finally:
        segments.close()


def inode(path: str) -> int:
    return os.stat(path).st_ino


async def test_a_released_segment_serves_the_next_value_once_no_view_of_it_lives():
    """A free segment is written into again only when no reader holds a view of its
    last value (its shared lock); a reader's kept mapping then shows the new value."""
    segments = shared.Segments("reuse")
    try:
        first, second, third = (serialize.dumps(np.full(BIG, float(i))) for i in (1, 2, 3))
        path1, size = await segments.offer(1, first[0], list(first[1]))
        view = shared.load(path1)
        segments.drop(1)
        assert not os.path.exists(path1) and segments.free_bytes == size
        with pytest.raises(FileNotFoundError):  # released: nobody can name it any more
            shared.load(path1)
        # A view of value 1 lives: value 2 goes to a fresh file, value 1 stays whole.
        path2, _ = await segments.offer(2, second[0], list(second[1]))
        assert float(view[0]) == 1.0 and float(view[-1]) == 1.0
        assert segments.free_bytes == size  # the busy one waits for a later value
        address = view.ctypes.data
        del view
        gc.collect()
        # No view of it lives: value 3 goes into value 1's file, and this process's
        # mapping of it (kept) shows value 3.
        free_ino = os.stat(segments.directory / "free1").st_ino
        path3, _ = await segments.offer(3, third[0], list(third[1]))
        assert inode(path3) == free_ino and segments.free_bytes == 0
        value = shared.load(path3)
        assert value.ctypes.data == address  # the kept mapping
        assert float(value.min()) == float(value.max()) == 3.0
        assert float(shared.load(path2).max()) == 2.0
    finally:
        segments.close()


async def test_a_mapping_a_task_wrote_into_is_not_kept():
    """A reader that wrote into its input has pages of its own in its mapping: they would
    hide the next value written into that file, so the mapping is let go."""
    segments = shared.Segments("written")
    try:
        first, second = (serialize.dumps(np.full(BIG, float(i))) for i in (1, 2))
        path1, _ = await segments.offer(1, first[0], list(first[1]))
        view = shared.load(path1)
        view[len(view) // 2] = 7.0  # one page of this process's own
        del view
        gc.collect()
        segments.drop(1)
        path2, _ = await segments.offer(2, second[0], list(second[1]))
        value = shared.load(path2)
        assert float(value[len(value) // 2]) == 2.0 and float(value.min()) == 2.0
    finally:
        segments.close()


async def test_free_segments_are_bounded_expire_and_go_under_pressure(monkeypatch):
    monkeypatch.setattr(shared, "FREE_SECONDS", 0.3)
    parts = [serialize.dumps(np.full(BIG, float(i))) for i in range(5)]
    size = spillfile.size_of(parts[0][0], parts[0][1], spillfile.ALIGNED)
    segments = shared.Segments("bounded", free_limit=3 * size)
    try:
        for i, (payload, buffers) in enumerate(parts):
            assert (await segments.offer(i, payload, list(buffers)))[1] == size
        for i in range(5):
            segments.drop(i)
        free = sorted(p.name for p in segments.directory.iterdir() if p.name.startswith("free"))
        assert free == ["free3", "free4", "free5"]  # the oldest went over the bound
        await eventually(lambda: segments.free_bytes == 0, timeout=10)
        assert [p.name for p in segments.directory.iterdir() if p.name != spilldir.OWNER] == []
        await segments.offer(9, *parts[0][:1], list(parts[0][1]))
        segments.drop(9)
        assert segments.free_bytes > 0
        assert shared.drop_idle() > 0 and segments.free_bytes == 0  # memory pressure
        assert segments.bytes == 0
    finally:
        segments.close()


def shm_mappings(pids: list[int] | None = None) -> list[str]:
    """This process's mappings of segment files (of these holders' pids, if given)."""
    found = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 5 and fields[5].startswith("/dev/shm/aiodagger-shm-"):
                if pids is None or any(fields[5].startswith(f"/dev/shm/aiodagger-shm-{p}-") for p in pids):
                    found.append(fields[5])
    return found


async def test_the_caller_lets_go_of_its_mappings_when_the_cluster_closes():
    async with dagger.Cluster(processes=1) as cluster:
        (w1,) = cluster.workers[1:]
        a = on(w1.id).spawn(make, BIG, 2.0)
        assert float((await asyncio.wait_for(a, 30)).sum()) == 2.0 * BIG
        del a
        gc.collect()
        assert shm_mappings([w1.pid])  # kept, idle, for the next value written there
    assert shm_mappings([w1.pid]) == []  # its file is gone with the worker: so is the mapping


async def test_a_process_under_a_memory_limit_keeps_no_idle_mapping():
    segments = shared.Segments("limited")
    async with dagger.Cluster(memory_limit="1GiB"):  # on worker 0, this process
        payload, buffers = serialize.dumps(np.full(BIG, 1.0))
        path, _ = await segments.offer(1, payload, list(buffers))
        value = shared.load(path)
        del value
        gc.collect()
        assert shm_mappings([os.getpid()]) == []
    value = shared.load(path)  # the limit ended with its cluster
    del value
    gc.collect()
    assert shm_mappings([os.getpid()])
    shared.keep_mappings(False)
    try:
        payload, buffers = serialize.dumps(np.full(BIG, 1.0))
        path, _ = await segments.offer(1, payload, list(buffers))
        value = shared.load(path)
        assert float(value.sum()) == BIG and shm_mappings([os.getpid()])
        del value
        gc.collect()
        assert shm_mappings([os.getpid()]) == []  # its RSS would count against the limit
    finally:
        shared.keep_mappings(True)
        segments.close()


def hold(a: np.ndarray) -> int:
    """Keep ``a`` alive in this worker process; its data's address."""
    sys.modules["builtins"].__dict__.setdefault("_aiodagger_test_held", []).append(a)
    return int(a.ctypes.data)


def address(a: np.ndarray) -> int:
    return int(a.ctypes.data)


async def test_readers_in_other_processes_pin_and_reuse_segments(two_workers):
    """Across processes: a reader's live view keeps the holder off that segment; once the
    reader's views are gone, the next value of that size goes into it and the reader
    reads it through the mapping it kept."""
    cluster, (w1, w2) = two_workers

    async def one(fill: float, fn=address) -> tuple[int, float, int]:
        a = on(w1.id).spawn(make, BIG, fill)
        where = await asyncio.wait_for(on(w2.id).spawn(fn, a), 30)
        total_ = await asyncio.wait_for(on(w2.id).spawn(total, a), 30)
        ino = inode(str(next(p for p in segments_of([w1.pid]) if p.name == f"v{a.id}")))
        del a
        gc.collect()
        await eventually(lambda: all(p.name.startswith("free") for p in segments_of([w1.pid])))
        return where, total_, ino

    where1, total1, ino1 = await one(1.0)
    where2, total2, ino2 = await one(2.0)
    assert (total1, total2) == (BIG * 1.0, BIG * 2.0)
    assert ino2 == ino1 and where2 == where1  # the same file, through the same mapping
    held, total3, ino3 = await one(3.0, hold)  # w2 keeps a view of this one
    where4, total4, ino4 = await one(4.0)
    assert (total3, total4) == (BIG * 3.0, BIG * 4.0)
    assert ino4 != ino3  # not written under the live view
    assert await asyncio.wait_for(on(w2.id).spawn(held_total), 30) == BIG * 3.0


def held_total() -> float:
    return float(sum(a.sum() for a in sys.modules["builtins"].__dict__["_aiodagger_test_held"]))


def test_the_owner_lock_is_held_while_segments_live():
    segments = shared.Segments("locked")
    try:
        asyncio.run(segments.offer(1, b"x", [bytes(MiB)]))
        fd = os.open(segments.directory / spilldir.OWNER, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        assert shared.remove_stale() == [] or segments.directory.exists()
        assert segments.directory.exists()
    finally:
        segments.close()


async def test_first_offers_of_two_values_at_once_share_one_directory():
    """Two readers asking a fresh holder for two values at once: the directory is made
    once (the second making of it failed, and with it the read)."""
    segments = shared.Segments("two-at-once")
    try:
        payload, buffers = serialize.dumps(np.ones(1024))
        made = await asyncio.gather(*(segments.offer(k, payload, list(buffers)) for k in range(1, 6)))
        assert len({os.path.dirname(path) for path, _ in made}) == 1 and len(made) == 5
        for path, _ in made:
            assert np.array_equal(shared.load(path), np.ones(1024))
    finally:
        segments.close()

"""ChunkStore: chunks kept under a memory limit by spilling to real disks."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest

from aiodagger.memory import ChunkStore, SpillCorruptedError, StoreState, spilldir
from tests.memory_disks import private_dir, tmpfs

MiB = 2**20


@pytest.fixture
def base():
    """The parent of the spill directories; the stores must leave nothing of theirs in it."""
    with private_dir() as path:
        yield path
        left = [p.name for p in path.iterdir() if p.name.startswith("aiodagger-spill-")]
        assert not left, f"spill directories left behind: {left}"


async def until(condition, timeout: float = 10.0, what: str = "condition") -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


def chunk(i: int, nbytes: int) -> np.ndarray:
    return np.arange(nbytes // 8, dtype=np.int64) + i * 1_000_003


def spill_files(store: ChunkStore) -> list[Path]:
    return sorted(store.directory.glob("*.spill"))


def quiet_store(limit, base: Path, **kwargs) -> ChunkStore:
    """A store that counts its chunks only: thresholds independent of this process's RSS."""
    return ChunkStore(limit, spill_dir=base, monitor_interval=None, **kwargs)


async def test_a_gigabyte_through_256_mib(base):
    n, size = 64, 16 * MiB
    sums = {}
    started = time.perf_counter()
    async with ChunkStore("256MiB", spill_dir=base) as store:
        assert store.directory.parent == base and store.directory.is_dir()
        for i in range(n):
            async with asyncio.timeout(30):
                await store.wait_admitted()
            value = chunk(i, size)
            sums[i] = zlib.crc32(value)
            store.put(("x", i), value)
            del value
        assert store.spilled_bytes > 0
        assert spill_files(store)
        for i in range(n):
            assert zlib.crc32(await store.get(("x", i))) == sums[i]
        stats = store.stats()
        assert stats["spilled_bytes"] == store.spilled_bytes > 512 * MiB
        assert stats["chunks"] == n and stats["spill_errors"] == 0
        assert stats["process_memory"] > 0
        # Seconds with a write in flight: no faster than 10 GiB/s, no longer than the test.
        assert stats["spilled_bytes"] / (10 * 2**30) < stats["spill_seconds"]
        assert stats["spill_seconds"] < time.perf_counter() - started
        directory = store.directory
    assert not directory.exists()
    assert store.state is StoreState.CLOSED


async def test_spill_seconds_count_the_write_in_flight(base, monkeypatch):
    from aiodagger.memory import spillfile

    disk_answers = threading.Event()  # a disk that takes its time with the first write
    dump_many = spillfile.dump_many

    def slow_dump_many(jobs):
        disk_answers.wait(10)
        return dump_many(jobs)

    monkeypatch.setattr(spillfile, "dump_many", slow_dump_many)
    async with quiet_store(10 * MiB, base) as store:
        store.put("k", chunk(0, 8 * MiB))
        try:
            await until(lambda: store.stats()["writing"])
            await asyncio.sleep(0.2)
            assert store.stats()["spill_seconds"] >= 0.2
        finally:
            disk_answers.set()
        await until(lambda: store.peek_in_memory("k") is None)
        assert store.stats()["spill_seconds"] >= 0.2


async def test_default_directory_is_under_tempdir():
    async with ChunkStore("64MiB", worker_name="w-default") as store:
        assert store.directory == Path(tempfile.gettempdir()) / f"aiodagger-spill-{os.getpid()}-w-default@{spilldir.host_tag()}"
        assert store.directory.is_dir()
        assert store.directory.stat().st_mode & 0o777 == 0o700
    assert not store.directory.exists()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)  # reaped: the PID names no process now
    assert not psutil.pid_exists(proc.pid)
    return proc.pid


async def test_stale_directories_of_dead_processes_are_removed_at_start(base):
    # Without owner files (their makers died before writing them): the PIDs, of this
    # host, decide. tests/test_memory_spilldir.py has the owners' locks.
    dead = base / f"aiodagger-spill-{dead_pid()}-w3@{spilldir.host_tag()}"
    (dead / "sub").mkdir(parents=True)
    (dead / "1.spill").write_bytes(b"left by a crash")
    live = base / f"aiodagger-spill-{os.getppid()}-w3@{spilldir.host_tag()}"
    live.mkdir()
    (live / "1.spill").write_bytes(b"still in use")
    unrelated = [base / "aiodagger-spill-notapid", base / "other"]
    for path in unrelated:
        path.mkdir()
    not_a_dir = base / f"aiodagger-spill-{dead_pid()}-file@{spilldir.host_tag()}"
    not_a_dir.write_bytes(b"")
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_bytes(b"not ours")
    link = base / f"aiodagger-spill-{dead_pid()}-link@{spilldir.host_tag()}"
    link.symlink_to(elsewhere, target_is_directory=True)

    async with quiet_store("64MiB", base):
        assert not dead.exists()
        assert (live / "1.spill").read_bytes() == b"still in use"
        assert all(p.exists() for p in [*unrelated, not_a_dir])
        assert (elsewhere / "precious").read_bytes() == b"not ours"  # a link is not followed
    for path in [live, elsewhere, *unrelated]:
        shutil.rmtree(path)
    not_a_dir.unlink()
    link.unlink()


async def test_own_pid_directory_left_by_an_earlier_process_is_replaced(base):
    # PIDs are reused: the name is ours but no store here made it.
    stale = base / f"aiodagger-spill-{os.getpid()}-w0@{spilldir.host_tag()}"
    stale.mkdir()
    (stale / "7.spill").write_bytes(b"old")
    async with quiet_store("64MiB", base) as store:
        assert store.directory == stale
        assert [p.name for p in stale.iterdir()] == [".owner"]


async def test_two_stores_with_one_name_are_refused(base):
    async with quiet_store("64MiB", base, worker_name="same"):
        other = quiet_store("64MiB", base, worker_name="same")
        with pytest.raises(RuntimeError, match="worker_name"):
            await other.start()
        async with quiet_store("64MiB", base, worker_name="other"):
            pass


async def test_pause_blocks_admission_until_a_delete(base):
    async with quiet_store(100 * MiB, base) as store:
        for i in range(9):  # 90 MiB, pinned: nothing can be spilled yet
            store.put(i, b"", nbytes=10 * MiB)
            store.pin(i)
        assert store.paused and not store.overrun
        waiter = asyncio.create_task(store.wait_admitted())
        await asyncio.sleep(0.1)
        assert not waiter.done()
        store.delete(0)
        store.delete(1)  # 70 MiB: under the pause threshold (80 MiB)
        async with asyncio.timeout(5):
            await waiter
        assert not store.paused
        assert store.spilled_bytes == 0


async def test_pause_blocks_admission_until_a_spill(base):
    async with quiet_store(100 * MiB, base) as store:
        for i in range(9):
            store.put(i, np.full(10 * MiB // 8, i))
            store.pin(i)
        waiter = asyncio.create_task(store.wait_admitted())
        await asyncio.sleep(0.1)
        assert not waiter.done() and store.spilled_bytes == 0
        for i in range(9):
            store.unpin(i)
        async with asyncio.timeout(10):
            await waiter
        await until(lambda: store.used <= 60 * MiB)
        assert store.spilled_bytes >= 30 * MiB
        for i in range(9):
            assert (await store.get(i))[-1] == i


async def test_a_fast_producer_cannot_outrun_the_disk(base):
    limit = 64 * MiB
    async with quiet_store(limit, base) as store:
        peak = 0
        for i in range(24):
            async with asyncio.timeout(30):
                await store.wait_admitted()
            store.put(i, chunk(i, 8 * MiB))
            peak = max(peak, store.used)
        # admitted only under the pause threshold: at most one chunk above it
        assert peak <= 0.8 * limit + 8 * MiB
        for i in range(24):
            assert (await store.get(i))[0] == i * 1_000_003


async def test_reading_back_is_throttled_while_the_store_makes_room(base):
    limit, size, n = 64 * MiB, 8 * MiB, 16
    async with quiet_store(limit, base) as store:
        for i in range(n):
            async with asyncio.timeout(30):
                await store.wait_admitted()
            store.put(i, chunk(i, size))
        peak = 0
        done = False

        async def watch():
            nonlocal peak
            while not done:
                peak = max(peak, store.used)
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        async with asyncio.timeout(30):
            values = await asyncio.gather(*(store.get(i) for i in range(n)))
        done = True
        await watcher
        assert [v[0] for v in values] == [i * 1_000_003 for i in range(n)]
        # 16 loads at once, yet each waits while memory is over the pause threshold
        assert peak <= 0.8 * limit + size, peak / MiB


async def test_a_tiny_full_disk_keeps_every_value_and_does_not_deadlock(caplog):
    caplog.set_level(logging.WARNING, logger="aiodagger.memory")
    with tmpfs("16m") as disk:
        sums = {}
        async with quiet_store(64 * MiB, disk) as store:
            for i in range(20):  # 80 MiB through a 16 MiB disk
                async with asyncio.timeout(20):
                    await store.wait_admitted()
                value = chunk(i, 4 * MiB)
                sums[i] = zlib.crc32(value)
                store.put(i, value)
            await until(lambda: store.spill_disabled)
            async with asyncio.timeout(5):
                await store.wait_admitted()  # over the limit, nothing to do about it: go on
            stats = store.stats()
            for i in range(20):
                assert zlib.crc32(await store.get(i)) == sums[i]
            assert stats["spill_errors"] >= 1 and stats["spill_disabled"]
            assert isinstance(store.last_error, OSError) and store.last_error.errno == errno.ENOSPC
            assert "No space left" in stats["last_error"]
            assert stats["overrun"] and not stats["paused"]
            assert stats["over_limit"] > 0 and stats["memory"] > 64 * MiB
            assert 0 < stats["spilled_now"] <= 16 * MiB
            assert len(spill_files(store)) == stats["spilled_now"] // (4 * MiB)
            store.put("more", chunk(99, 4 * MiB))  # no retry storm, no new error
            await asyncio.sleep(0.05)
            assert store.spill_errors == stats["spill_errors"]
        assert list(disk.iterdir()) == []
    messages = [r.getMessage() for r in caplog.records]
    assert sum("no more spilling" in m for m in messages) == 1, messages
    assert sum("running tasks anyway" in m for m in messages) == 1, messages


async def test_unspillable_chunks_stay_and_admission_goes_on(base, caplog):
    caplog.set_level(logging.WARNING, logger="aiodagger.memory")
    async with quiet_store(100 * MiB, base) as store:
        lock = threading.Lock()
        store.put("lock", lock, nbytes=90 * MiB)
        async with asyncio.timeout(5):
            await store.wait_admitted()
        assert store.peek_in_memory("lock") is lock
        assert store.overrun and store.spill_errors == 1 and not store.spill_disabled
        assert "cannot pickle a lock" in repr(store.last_error)
        store.put("array", np.ones(MiB))  # spilling still works for everything else
        await until(lambda: store.peek_in_memory("array") is None)
        assert (await store.get("array")).sum() == MiB
    assert any("cannot be spilled" in r.getMessage() for r in caplog.records)


def flip_a_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(data)


@pytest.mark.parametrize("read", ["get", "read_spilled"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
async def test_a_damaged_spill_file_is_detected_and_the_entry_dropped(base, damage, read):
    async with quiet_store(10 * MiB, base) as store:
        store.put("victim", np.arange(8 * MiB // 8))
        await until(lambda: store.peek_in_memory("victim") is None)
        [path] = spill_files(store)
        if damage == "flip":
            flip_a_byte(path, path.stat().st_size // 2)
        elif damage == "truncate":
            os.truncate(path, path.stat().st_size - 1000)
        else:
            path.unlink()
        with pytest.raises(SpillCorruptedError) as info:
            await getattr(store, read)("victim")
        assert info.value.key == "victim"
        assert "recompute" in "".join(getattr(info.value, "__notes__", [])) + str(info.value)
        assert "victim" not in store and len(store) == 0
        assert store.spilled_now == 0
        await until(lambda: not path.exists())
        store.put("victim", np.arange(10))  # recomputed and put back
        assert (await store.get("victim"))[-1] == 9


async def test_read_spilled_hands_out_the_files_parts_and_keeps_the_chunk_on_disk(base):
    async with quiet_store(10 * MiB, base) as store:
        store.put("hot", np.arange(10))
        assert await store.read_spilled("hot") is None  # in RAM: serialize the value instead
        store.put("cold", chunk(3, 8 * MiB))
        await until(lambda: store.peek_in_memory("cold") is None)
        payload, buffers = await store.read_spilled("cold")
        assert np.array_equal(pickle.loads(payload, buffers=buffers), chunk(3, 8 * MiB))
        assert store.peek_in_memory("cold") is None and store.used < MiB  # still only on disk
        stats = store.stats()
        assert stats["sent_from_disk"] == 1 and stats["loads"] == 0
        with pytest.raises(KeyError):
            await store.read_spilled("absent")


async def test_least_recently_used_chunks_go_first(base):
    async with quiet_store(100 * MiB, base) as store:
        for key in "abc":
            store.put(key, np.full(25 * MiB // 8, ord(key)))
        await store.get("a")  # b is now the least recently used; 75 MiB > 60 MiB
        await until(lambda: store.used <= 60 * MiB)
        assert store.peek_in_memory("b") is None
        assert store.peek_in_memory("a") is not None and store.peek_in_memory("c") is not None


async def test_a_chunk_read_back_keeps_its_file_and_leaves_again_without_a_write(base):
    async with quiet_store(100 * MiB, base) as store:
        store.put("a", np.full(30 * MiB // 8, 1))
        store.put("b", np.full(40 * MiB // 8, 2))  # 70 MiB > 60: "a" goes
        await until(lambda: store.peek_in_memory("a") is None)
        a_file = store.spilled_now
        assert (await store.get("a"))[0] == 1  # 70 MiB again: now "b" goes, written
        await until(lambda: store.peek_in_memory("b") is None)
        assert store.peek_in_memory("a") is not None
        writes = store.stats()["spill_writes"]
        assert writes == 2 and store.spilled_now > a_file
        store.delete("b")
        store.put("c", np.full(40 * MiB // 8, 3))  # "a" is the oldest: dropped, not rewritten
        await until(lambda: store.peek_in_memory("a") is None)
        assert store.stats()["spill_writes"] == writes
        assert (await store.get("a"))[-1] == 1


async def test_pinned_chunks_are_not_spilled(base):
    async with quiet_store(10 * MiB, base) as store:
        store.put("p", np.ones(8 * MiB // 8))
        store.pin("p")
        store.put("q", np.ones(8 * MiB // 8))
        await until(lambda: store.peek_in_memory("q") is None)
        await asyncio.sleep(0.05)
        assert store.peek_in_memory("p") is not None and store.stats()["pinned"] == 1
        store.unpin("p")
        await until(lambda: store.peek_in_memory("p") is None)
        with pytest.raises(RuntimeError, match="without a matching pin"):
            store.unpin("p")


async def test_pinned_context_loads_and_holds_a_spilled_chunk(base):
    async with quiet_store(10 * MiB, base) as store:
        store.put("k", np.full(8 * MiB // 8, 5))
        await until(lambda: store.peek_in_memory("k") is None)
        async with store.pinned("k") as value:
            assert value[0] == 5
            store.put("other", b"", nbytes=9 * MiB)  # pressure: only "other" may go
            await asyncio.sleep(0.1)
            assert store.peek_in_memory("k") is value
        assert store.stats()["pinned"] == 0


async def test_concurrent_gets_share_one_load(base):
    async with quiet_store(10 * MiB, base) as store:
        store.put("k", np.full(8 * MiB // 8, 3))
        await until(lambda: store.peek_in_memory("k") is None)
        values = await asyncio.gather(*(store.get("k") for _ in range(5)))
        assert all(v is values[0] for v in values)
        assert store.stats()["loads"] == 1


async def test_a_cancelled_get_does_not_fail_the_others(base):
    async with quiet_store(10 * MiB, base) as store:
        store.put("k", np.full(8 * MiB // 8, 3))
        await until(lambda: store.peek_in_memory("k") is None)
        first = asyncio.create_task(store.get("k"))
        second = asyncio.create_task(store.get("k"))
        await asyncio.sleep(0)
        first.cancel()
        assert (await second)[0] == 3
        with pytest.raises(asyncio.CancelledError):
            await first


async def test_delete_removes_the_file(base):
    async with quiet_store(10 * MiB, base) as store:
        store.put("k", np.ones(8 * MiB // 8))
        await until(lambda: store.peek_in_memory("k") is None)
        [path] = spill_files(store)
        assert store.delete("k") and not store.delete("k")
        assert "k" not in store and store.spilled_now == 0
        await until(lambda: not path.exists())
        with pytest.raises(KeyError):
            await store.get("k")


async def test_put_replaces_and_delete_in_memory(base):
    async with quiet_store("1GiB", base) as store:
        store.put("k", b"abc")
        store.put("k", b"defg")
        assert len(store) == 1 and store.used == 4
        assert await store.get("k") == b"defg"
        assert store.peek_in_memory("missing", "default") == "default"
        store.delete("k")
        assert store.used == 0 and len(store) == 0


async def test_unmanaged_memory_drives_spilling():
    with private_dir() as base:
        rss = psutil.Process().memory_info().rss
        limit = int((rss + 100 * MiB) / 0.6)  # the chunks below stay under the spill threshold
        async with ChunkStore(limit, spill_dir=base, monitor_interval=0.02) as store:
            for i in range(4):
                store.put(i, chunk(i, 8 * MiB))
            await asyncio.sleep(0.1)
            assert store.spilled_bytes == 0
            outside = np.ones(200 * MiB // 8)  # memory the store does not hold, pages touched
            await until(lambda: store.stats()["unmanaged"] >= 190 * MiB)
            await until(lambda: store.spilled_bytes > 0)
            assert store.stats()["memory"] > store.used
            del outside
            for i in range(4):
                assert (await store.get(i))[0] == i * 1_000_003


async def test_no_limit_never_spills_or_pauses(base):
    async with quiet_store(None, base) as store:
        store.put("big", b"", nbytes=10**15)
        await store.wait_admitted()
        await asyncio.sleep(0.02)
        stats = store.stats()
        assert stats["memory_limit"] is None and stats["spilled_bytes"] == 0
        assert not stats["paused"] and not stats["overrun"]


async def test_lifecycle_errors_say_what_to_do(base):
    store = quiet_store("64MiB", base)
    with pytest.raises(RuntimeError, match="await store.start"):
        store.put("k", 1)
    await store.start()
    with pytest.raises(RuntimeError, match="start it once"):
        await store.start()
    store.put("k", 1)
    await store.close()
    await store.close()
    with pytest.raises(RuntimeError, match="closed"):
        await store.get("k")
    with pytest.raises(RuntimeError, match="closed"):
        await store.wait_admitted()
    await quiet_store("64MiB", base).close()  # never started: nothing to do


async def test_a_cancelled_close_still_cleans_up(base):
    store = quiet_store(10 * MiB, base)
    await store.start()
    for i in range(4):
        store.put(i, np.ones(4 * MiB // 8))
    closing = asyncio.create_task(store.close())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    async with asyncio.timeout(10):
        await store.close()
    assert store.state is StoreState.CLOSED and not store.directory.exists()


async def test_waiters_are_released_by_close(base):
    store = quiet_store(10 * MiB, base)
    await store.start()
    store.put("k", b"", nbytes=9 * MiB)
    store.pin("k")
    waiter = asyncio.create_task(store.wait_admitted())
    await asyncio.sleep(0.02)
    assert not waiter.done()
    await store.close()
    async with asyncio.timeout(5):
        await waiter


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"spill_fraction": 0.9, "pause_fraction": 0.8}, "spill_fraction <= pause_fraction"),
    ({"pause_fraction": 1.5}, "pause_fraction"),
    ({"worker_name": "tcp://host:1"}, "worker_name"),
    ({"worker_name": ".."}, "worker_name"),
    ({"monitor_interval": 0}, "monitor_interval"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ChunkStore("1GiB", **kwargs)


async def test_stats_and_repr(base):
    async with quiet_store("100MiB", base, worker_name="w7") as store:
        store.put("a", b"x" * 100)
        stats = store.stats()
        assert stats["worker"] == "w7" and stats["used"] == 100 and stats["chunks"] == 1
        assert stats["spill_threshold"] == int(100 * MiB * 0.6)
        assert stats["pause_threshold"] == int(100 * MiB * 0.8)
        assert stats["process_memory"] is None  # not monitored
        assert "w7" in repr(store) and "running" in repr(store)


async def test_a_spill_dir_that_cannot_be_made_means_no_spilling(base, caplog):
    caplog.set_level(logging.WARNING, logger="aiodagger.memory")
    not_a_dir = base / "a-file"
    not_a_dir.write_bytes(b"")
    async with quiet_store(10 * MiB, not_a_dir) as store:
        store.put("k", np.ones(9 * MiB // 8))
        async with asyncio.timeout(5):
            await store.wait_admitted()
        assert store.spill_disabled and store.spill_errors == 1 and store.overrun
        assert isinstance(store.last_error, OSError)
        assert (await store.get("k")).sum() == 9 * MiB // 8
    assert any("no more spilling" in r.getMessage() for r in caplog.records)


async def test_a_read_only_disk_keeps_every_value():
    with tmpfs("64m") as disk:
        async with quiet_store(40 * MiB, disk) as store:
            store.put(0, chunk(0, 30 * MiB))  # over 24 MiB: spilled while writable
            await until(lambda: store.peek_in_memory(0) is None)
            remount = subprocess.run(["mount", "-o", "remount,ro", str(disk)],
                                     capture_output=True, text=True, timeout=30)
            if remount.returncode != 0:
                pytest.skip(f"remounting read-only was refused: {remount.stderr.strip()}")
            try:
                for i in range(1, 5):  # 32 MiB
                    store.put(i, chunk(i, 8 * MiB))
                await until(lambda: store.spill_disabled)
                assert store.last_error.errno == errno.EROFS
                for i in range(5):  # the file written before still reads back
                    assert (await store.get(i))[1] == 1 + i * 1_000_003
            finally:
                subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True, timeout=30)


async def test_a_chunk_deleted_while_it_waits_to_load_is_a_key_error(base):
    async with quiet_store(10 * MiB, base) as store:
        store.put("k", np.ones(8 * MiB // 8))
        await until(lambda: store.peek_in_memory("k") is None)
        getter = asyncio.create_task(store.get("k"))
        await asyncio.sleep(0)
        store.delete("k")
        with pytest.raises(KeyError):
            async with asyncio.timeout(5):
                await getter
        assert store.used == 0


async def test_a_chunk_deleted_while_it_is_written_leaves_no_file(base):
    async with quiet_store(10 * MiB, base) as store:
        store.put("k", np.ones(64 * MiB // 8))
        await until(lambda: store.stats()["writing"] == 1, timeout=10)
        store.delete("k")
        await until(lambda: store.stats()["writing"] == 0, timeout=10)
        await until(lambda: not spill_files(store))
        assert store.spilled_now == 0 and store.used == 0 and len(store) == 0


async def test_a_chunk_read_while_it_is_written_stays_in_memory(base):
    async with quiet_store(100 * MiB, base) as store:
        store.put("a", np.full(50 * MiB // 8, 1))
        store.put("b", np.full(20 * MiB // 8, 2))  # 70 MiB: "a", the oldest, is written
        await until(lambda: store.stats()["writing"] == 1, timeout=10)
        assert (await store.get("a"))[0] == 1  # in use: keep it once written
        await until(lambda: store.peek_in_memory("b") is None)
        assert store.peek_in_memory("a") is not None
        assert store.stats()["chunks_in_memory"] == 1 and store.spilled_now > 70 * MiB


class HeldPickle:
    """A value whose pickling waits until ``release`` is set: a write held in flight."""

    def __init__(self, started: threading.Semaphore, release: threading.Event) -> None:
        self.started, self.release = started, release

    def __reduce__(self):
        self.started.release()
        if not self.release.wait(timeout=30):
            raise RuntimeError("never released")
        return (int, (7,))


async def test_two_writes_are_in_flight_at_once(base):
    started, release = threading.Semaphore(0), threading.Event()
    try:
        async with quiet_store(10 * MiB, base) as store:
            store.put("a", HeldPickle(started, release), nbytes=64 * MiB)
            store.put("b", HeldPickle(started, release), nbytes=64 * MiB)
            # Both are needed to get under 6 MiB: the second is not queued behind the first.
            await until(lambda: store.stats()["writing"] == 2, timeout=10)
            for _ in range(2):
                assert await asyncio.to_thread(started.acquire, timeout=10)
            release.set()
            await until(lambda: store.stats()["writing"] == 0, timeout=10)
            assert len(spill_files(store)) == 2 and store.used == 0
            async with asyncio.timeout(10):
                assert await store.get("a") == 7 and await store.get("b") == 7
    finally:
        release.set()


async def test_a_chunk_replaced_while_pinned_keeps_its_pins_apart(base):
    """A task pinned a chunk; the chunk is put again (a recomputed value), or deleted and
    put again, while the task runs: the task's unpin at its end is the old chunk's, never
    an error, and the new chunk counts as pinned only by its own pins."""
    async with quiet_store("64MiB", base) as store:
        store.put("k", np.zeros(1000), nbytes=8000)
        first, unavailable = await store.pin_and_load(["k"])
        assert not unavailable
        store.put("k", np.ones(1000), nbytes=8000)  # replaced under the running task
        assert store.stats()["pinned"] == 0
        second, _ = await store.pin_and_load(["k"])  # a second task pins the new chunk
        assert store.stats()["pinned"] == 1
        store.unpin_all(first)
        store.unpin_all(second)
        assert store.stats()["pinned"] == 0

        store.pin("k")
        store.delete("k")  # released while pinned
        store.put("k", np.ones(10), nbytes=80)
        store.unpin("k")  # the deleted chunk's pin
        assert store.stats()["pinned"] == 0
        assert (await store.get("k")).sum() == 10


async def test_a_chunk_put_as_unspillable_stays_in_ram(base):
    async with quiet_store(4 * MiB, base) as store:
        kept = chunk(99, 1 * MiB)  # the oldest: first to go, were it spillable
        store.put("kept", kept, spillable=False)
        for i in range(8):
            store.put(i, chunk(i, 1 * MiB))
        await until(lambda: len(spill_files(store)) >= 4, what="the others spilled")
        assert await store.get("kept") is kept  # never written out and read back as a copy

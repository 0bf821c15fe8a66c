"""Out-of-core through a cluster: workers spill past their memory limit and lose nothing."""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import aiodagger as dagger
from aiodagger.memory import spilldir
from tests.memory_disks import private_dir, tmpfs

CHUNK = 16 << 20


def make(i, nbytes=CHUNK):
    return np.full(nbytes // 8, float(i))


def total(a):
    return float(a.sum())


def first_values(a):
    return a[:2].copy()


def expected(i, nbytes=CHUNK):
    return float(i) * (nbytes // 8)


def damage(paths) -> None:
    """Flip a byte in the middle of every file."""
    for path in paths:
        with open(path, "r+b") as f:
            f.seek(path.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))


def spill_dirs(base: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in base.iterdir() if p.name.startswith("aiodagger-spill-"))


async def test_a_gigabyte_of_results_through_256_mib_workers():
    with private_dir() as base:
        async with dagger.Cluster(processes=1, memory_limit="256MiB", spill_dir=base) as c:
            chunks = [dagger.spawn(make, i) for i in range(64)]  # 1 GiB, all kept referenced
            sums = await asyncio.wait_for(dagger.gather(*[dagger.spawn(total, a) for a in chunks]), 120)
            assert sums == [expected(i) for i in range(64)]
            await c.worker_stats()  # fresh counters (else: as of the last heartbeat)
            (worker,) = c.workers[1:]
            assert worker.memory_limit == 256 << 20
            assert worker.spilled_bytes > 0
            assert worker.spill_errors == 0
            assert len(spill_dirs(base)) == 1
            again = await chunks[3]  # read back from disk, to the caller
            assert again.nbytes == CHUNK and float(again[0]) == 3.0
        assert spill_dirs(base) == []  # removed on clean shutdown


async def test_a_spilled_chunk_goes_to_another_worker_from_its_file():
    with private_dir() as base:
        async with dagger.Cluster(processes=2, memory_limit="256MiB", spill_dir=base) as c:
            first, second = sorted(w.id for w in c.workers if w.id != 0)
            on_first = dagger.options(scope=dagger.scope(worker=first))
            chunks = [on_first.spawn(make, i) for i in range(24)]  # 384 MiB: the oldest spill
            await asyncio.wait_for(dagger.wait(chunks), 60)
            before = (await c.worker_stats())[first]
            assert before["spilled_bytes"] >= 3 * CHUNK and before["sent_from_disk"] == 0
            on_second = dagger.options(scope=dagger.scope(worker=second))
            sums = [on_second.spawn(total, chunks[i]) for i in range(3)]
            assert await asyncio.wait_for(dagger.gather(*sums), 60) == [expected(i) for i in range(3)]
            after = (await c.worker_stats())[first]
            # Sent as the files' parts: not read back into the first worker's store.
            assert after["sent_from_disk"] == 3
            assert after["loads"] == before["loads"]
            again = await asyncio.wait_for(chunks[1], 60)  # to the caller, from the file too
            assert float(again[0]) == 1.0 and again.nbytes == CHUNK
            assert (await c.worker_stats())[first]["sent_from_disk"] == 4


async def test_stale_spill_directory_of_a_dead_process_is_removed_at_start():
    with private_dir() as base:
        done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, timeout=30, check=True)
        dead_pid = int(done.stdout)  # reaped: that PID is no longer alive
        stale = base / f"aiodagger-spill-{dead_pid}-proc-1@{spilldir.host_tag()}"
        stale.mkdir()
        (stale / "chunk-1.spill").write_bytes(b"left over by a crash")
        live = base / f"aiodagger-spill-{os.getpid()}-someone-else@{spilldir.host_tag()}"
        live.mkdir()
        async with dagger.Cluster(processes=1, memory_limit="256MiB", spill_dir=base):
            assert await dagger.spawn(total, dagger.spawn(make, 1, 1 << 20)) == expected(1, 1 << 20)
            assert not stale.exists()
            assert live.exists()  # its owner (this test process) is alive


async def test_a_full_spill_disk_loses_nothing_and_is_reported():
    with tmpfs("48m") as disk:
        async with dagger.Cluster(processes=1, memory_limit="128MiB", spill_dir=disk) as c:
            chunks = [dagger.spawn(make, i) for i in range(24)]  # 384 MiB through a 48 MiB disk
            sums = await asyncio.wait_for(dagger.gather(*[dagger.spawn(total, a) for a in chunks]), 120)
            assert sums == [expected(i) for i in range(24)]
            await c.worker_stats()  # fresh counters (else: as of the last heartbeat)
            (worker,) = c.workers[1:]
            assert worker.spill_errors > 0


async def test_a_corrupted_spill_file_is_detected_and_the_value_recomputed():
    with private_dir() as base:
        async with dagger.Cluster(processes=1, memory_limit="128MiB", spill_dir=base):
            chunks = [dagger.spawn(make, i) for i in range(16)]  # 256 MiB: most of it spills
            await dagger.wait(chunks)
            await asyncio.sleep(1.0)  # let the spiller write
            files = sorted((spill_dirs(base)[0]).glob("*"))
            assert files, "nothing was spilled"
            damage(files)
            sums = await asyncio.wait_for(dagger.gather(*[dagger.spawn(total, a) for a in chunks]), 120)
            assert sums == [expected(i) for i in range(16)]  # recomputed, never wrong


async def amake(i):
    return make(i)


async def test_worker_0_spills_too_in_an_in_process_cluster():
    with private_dir() as base:
        async with dagger.Cluster(memory_limit="160MiB", spill_dir=base, threads=2) as c:
            # 640 MiB kept referenced, four times the limit; some made by coroutines
            chunks = [dagger.spawn(make, i) for i in range(30)] + [dagger.spawn(amake, i) for i in range(30, 40)]
            sums = await asyncio.wait_for(dagger.gather(*[dagger.spawn(total, a) for a in chunks]), 120)
            assert sums == [expected(i) for i in range(40)]
            (w0,) = c.workers
            assert w0.memory_limit == 160 << 20 and w0.spilled_bytes > 0 and w0.spill_errors == 0
            assert w0.memory_used <= 160 << 20
            value = await chunks[7]  # handed to the caller, read back from disk
            assert float(value[0]) == 7.0 and chunks[7].result() is value
            del chunks, value
            # damage every spill file: values are recomputed, never wrong
            more = [dagger.spawn(make, i) for i in range(16)]
            await dagger.wait(more)
            await asyncio.sleep(1.0)
            damage(spill_dirs(base)[0].glob("*"))
            sums = await asyncio.wait_for(dagger.gather(*[dagger.spawn(total, a) for a in more]), 120)
            assert sums == [expected(i) for i in range(16)]
        assert spill_dirs(base) == []


def test_memory_limit_arguments_say_what_to_write():
    with pytest.raises(ValueError, match="--memory-limit"):
        dagger.Cluster(memory_limit="1GiB", listen="tcp://127.0.0.1:0")
    with pytest.raises(ValueError, match="not understood"):
        dagger.Cluster(processes=1, memory_limit="lots")


async def test_cluster_workers_is_current_as_of_the_last_completion():
    """Completions carry the worker's memory counters: no heartbeat (and no worker_stats()
    call) is needed for cluster.workers to show what a graph spilled."""
    with private_dir() as base:
        async with dagger.Cluster(processes=1, memory_limit="64MiB", spill_dir=base,
                                  heartbeat_interval=30, heartbeat_timeout=60) as c:
            chunks = [dagger.spawn(make, i) for i in range(8)]  # 128 MiB, all kept referenced
            await asyncio.wait_for(dagger.wait(chunks), 60)
            # Completes after the writes above; its result (an array: kept where it was
            # made, where a float would come back with its record) is in that worker's RAM.
            marker = dagger.spawn(first_values, chunks[1])
            assert list(await asyncio.wait_for(marker, 60)) == [1.0, 1.0]
            (worker,) = c.workers[1:]
            assert worker.spilled_bytes >= CHUNK
            assert 0 < worker.memory_used <= 64 << 20


async def test_a_timeout_on_worker_0_runs_from_when_the_inputs_are_loaded(monkeypatch):
    """With a memory limit on worker 0, a task's timeout starts once its inputs are loaded
    (as everywhere else): a slow read-back neither times it out nor runs it twice, and
    every pin is released."""
    from aiodagger.memory.store import ChunkStore

    runs = []
    original_get = ChunkStore.get
    slow = {"first": True}

    async def slow_get(self, key):
        if slow["first"]:
            slow["first"] = False
            await asyncio.sleep(0.5)  # e.g. read back from a busy disk
        return await original_get(self, key)

    def consume(x):
        runs.append(1)
        return sum(x)

    monkeypatch.setattr(ChunkStore, "get", slow_get)
    async with dagger.Cluster(memory_limit="1GiB", threads=2) as c:
        a = dagger.spawn(list, range(10))
        await a.wait()
        b = dagger.options(timeout=0.3, retries=1).spawn(consume, a)
        assert await asyncio.wait_for(b, 30) == 45
        await asyncio.sleep(0.1)
        assert len(runs) == 1
        assert all(entry.pins == 0 for entry in c._local.store._entries.values())


async def test_a_deleted_spill_directory_means_the_values_are_computed_again():
    """The spill files of a worker process vanish (the directory was deleted): awaiting a
    spilled result computes it again from lineage instead of failing forever."""
    import shutil

    with private_dir() as base:
        async with dagger.Cluster(processes=1, memory_limit="64MiB", spill_dir=base) as c:
            chunks = [dagger.spawn(make, i) for i in range(8)]  # 128 MiB: most are spilled
            await asyncio.wait_for(dagger.wait(chunks), 60)
            await asyncio.sleep(0.3)
            assert (await c.worker_stats())[c.workers[1].id]["spilled_bytes"] >= CHUNK
            for directory in spill_dirs(base):
                shutil.rmtree(directory)
            values = await asyncio.wait_for(dagger.gather(*chunks[:3]), 60)
            assert [float(v[0]) for v in values] == [0.0, 1.0, 2.0]

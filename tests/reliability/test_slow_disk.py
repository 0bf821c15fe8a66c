"""A slow spill disk: a real, slow filesystem (FUSE, tests/reliability/slowfs.py) under a
cluster past its memory limit, while tasks keep the event loop busy.

Spill writes and reads go through an executor, never the loop: a disk that answers
each 128 KiB request in milliseconds, and stalls a quarter of a second now and then,
must slow the spilling only. The loop that spills is timed by a ticker coroutine on it
(5 ms sleeps; lag = how late each wakes up), and every chunk, read back from that disk
by a task and by the caller, must be exactly what was made.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import statistics
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import aiodagger as dagger
from tests.memory_disks import private_dir
from tests.reliability.slowfs import mounted

pytestmark = pytest.mark.timeout(300)

MiB = 1 << 20
CHUNK = 4 * MiB
CHUNKS = 48  # 192 MiB through a store that keeps about 40 MiB in RAM
HOPS = 400  # tiny coroutines per chunk batch: the loop is never idle
TICK = 0.005
LAG_P99_LIMIT = 0.020


def make(seed: int, i: int) -> np.ndarray:
    """A chunk whose every byte depends on the seed and its index."""
    return np.arange(CHUNK // 8, dtype=np.int64) * (seed | 1) + i


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(a).hexdigest()


async def hop(i: int) -> int:
    await asyncio.sleep(0)
    return i * i


async def tick_until(stop: Path) -> list[float]:
    """How late each 5 ms sleep on this loop woke up, until ``stop`` exists."""
    lags = []
    while not os.path.exists(stop):
        before = time.perf_counter()  # not loop.time(): uvloop's counts whole milliseconds
        await asyncio.sleep(TICK)
        lags.append(time.perf_counter() - before - TICK)
    return lags


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


async def workload(seed: int, expected: list[str], on: dagger.options) -> list[dagger.DTask]:
    """Chunks made in batches (spilled as they pile up) while coroutines hop on the loop,
    then every chunk read back by a task; the chunks stay referenced, on disk."""
    chunks = []
    for start in range(0, CHUNKS, 8):
        batch = [on.spawn(make, seed, i) for i in range(start, start + 8)]
        hops = [on.spawn(hop, i) for i in range(HOPS)]
        assert await dagger.gather(*hops) == [i * i for i in range(HOPS)]
        await dagger.wait(batch)
        chunks += batch
    digests = await dagger.gather(*[on.spawn(digest, c) for c in chunks])
    assert digests == expected, "a chunk read back from the slow disk is not what was made"
    return chunks


def report(where: str, lags: list[float], stats: dict, seconds: float) -> None:
    print(f"\nslow disk, {where}: {len(lags)} ticks in {seconds:.1f} s, loop lag "
          f"p50 {statistics.median(lags) * 1e3:.2f} ms, p99 {p99(lags) * 1e3:.2f} ms, "
          f"max {max(lags) * 1e3:.1f} ms; spilled {stats['spilled_bytes'] / MiB:.0f} MiB in "
          f"{stats['spill_seconds']:.1f} s of writes, {stats['loads']} loads, "
          f"{stats['sent_from_disk']} sent from disk")


@pytest.mark.parametrize("where", ["worker 0", "worker process"])
async def test_a_slow_spill_disk_slows_spilling_only(where, no_leaks, seed):
    expected = [digest(make(seed, i)) for i in range(CHUNKS)]
    with private_dir() as scratch, mounted(scratch, seed) as disk:
        stop = scratch / "stop"
        if where == "worker 0":
            # The limit counts this process's RSS (pytest, numpy...): chunks start to
            # spill about 40 MiB above what it holds now.
            rss = psutil.Process().memory_info().rss
            cluster = dagger.Cluster(memory_limit=int((rss + 40 * MiB) / 0.6), spill_dir=disk, threads=2)
        else:
            cluster = dagger.Cluster(processes=1, memory_limit="160MiB", spill_dir=disk, threads=2)
        async with cluster:
            wid = cluster.workers[-1].id
            on = dagger.options(scope=dagger.scope(worker=wid))
            # The ticker runs on the loop of the worker that spills: this one, or the
            # worker process's.
            ticker = on.spawn(tick_until, str(stop))
            started = time.perf_counter()
            try:
                chunks = await asyncio.wait_for(workload(seed, expected, on), 240)
            finally:
                stop.touch()
            lags = await asyncio.wait_for(ticker, 30)
            seconds = time.perf_counter() - started
            stats = (await cluster.worker_stats())[wid]
            report(where, lags, stats, seconds)
            assert stats["spilled_bytes"] >= (CHUNKS * CHUNK) // 2 and stats["spill_errors"] == 0
            assert stats["spill_seconds"] > 1.0  # a slow disk shows in the worker's status
            assert stats["loads"] + stats["sent_from_disk"] > 0  # read back from the slow disk
            for i in (0, CHUNKS // 2, CHUNKS - 1):  # and to the caller, as they were made
                assert digest(await asyncio.wait_for(chunks[i], 60)) == expected[i]
            assert p99(lags) < LAG_P99_LIMIT, f"loop lag p99 {p99(lags) * 1e3:.1f} ms"

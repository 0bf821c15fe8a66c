"""Large receive buffers are used again once the values read into them are gone
(comm.framing.WarmBuffers, kept by worker processes): a value that comes over TCP
again and again is read into the same warm memory, not freshly faulted-in pages."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import aiodagger as dagger
from aiodagger.comm.framing import WarmBuffers

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


def test_a_buffer_is_used_again_only_once_nothing_refers_to_it():
    warm = WarmBuffers(idle_limit=64 * MiB)
    first = warm.take(8 * MiB)
    value = np.frombuffer(memoryview(first), dtype=np.float64)  # what unpickling makes of it
    del first
    assert warm.idle_bytes == 0 and warm.take(8 * MiB).base is not value.base  # in use: a new one
    del value
    again = warm.take(8 * MiB)
    assert again.base is warm._buffers[0] and len(warm._buffers) == 2


def test_a_buffer_serves_sizes_it_fits_without_wasting_a_quarter():
    warm = WarmBuffers(idle_limit=64 * MiB)
    warm.take(8 * MiB)  # dropped at once: idle
    assert warm.take(7 * MiB).base is warm._buffers[0]
    assert warm.take(4 * MiB).base is not warm._buffers[0]  # would waste half of it
    assert warm.take(9 * MiB).nbytes == 9 * MiB  # too small for it


def test_idle_buffers_are_bounded_and_dropped_on_demand():
    warm = WarmBuffers(idle_limit=20 * MiB)
    held = [warm.take(8 * MiB) for _ in range(4)]
    del held  # 32 MiB idle now; the next new buffer brings them under the bound
    kept = warm.take(16 * MiB)
    assert warm.idle_bytes <= 20 * MiB
    assert warm.drop_idle() > 0 and warm.idle_bytes == 0
    assert kept.base is warm._buffers[0]  # in use: kept


def make(n: int) -> np.ndarray:
    return np.full(n, 1.0)


def total(a: np.ndarray) -> float:
    return float(a.sum())


def receive_buffers() -> list[int]:
    from aiodagger.comm import framing

    assert framing._warm is not None, "a worker process keeps warm buffers"
    return [b.nbytes for b in framing._warm._buffers]


async def test_repeated_transfers_over_tcp_reuse_one_buffer(monkeypatch):
    """Each repeat's value is released before the next comes; the worker reads them all
    into one buffer. Before, the connection's read loop kept the last message's buffers
    until the next message, and a copy reported after its handle died was never
    released: the worker took a new buffer (and kept the old value) every few repeats."""
    monkeypatch.setenv("AIODAGGER_SHM", "0")
    async with dagger.Cluster(processes=2) as cluster:
        w1, w2 = sorted(w.id for w in cluster.workers if w.id != 0)
        for _ in range(12):
            a = dagger.options(scope=dagger.scope(worker=w1)).spawn(make, 8 * MiB // 8)
            await asyncio.wait_for(dagger.wait([a]), 30)
            assert await asyncio.wait_for(dagger.options(scope=dagger.scope(worker=w2)).spawn(total, a), 30) \
                == 8 * MiB // 8
            del a
        await asyncio.sleep(0.5)  # the last release on its way
        sizes = await asyncio.wait_for(dagger.options(scope=dagger.scope(worker=w2)).spawn(receive_buffers), 30)
    assert len([s for s in sizes if s >= 8 * MiB]) == 1, sizes

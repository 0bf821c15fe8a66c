"""No per-task leak: a 200,000-task graph runs, and memory comes back once handles go."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
import weakref

import psutil

import aiodagger as dagger
from tests.helpers import add, inc


def _settled_rss(process: psutil.Process) -> int:
    """RSS once garbage is collected and the C heap's free pages are given back."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):  # glibc: return free heap pages to the OS
            libc.malloc_trim(0)
    return process.memory_info().rss


async def _run_graph(n: int) -> int:
    # n/2 independent tasks, then a binary reduction over them: n - 1 tasks in all
    layer = [dagger.spawn(inc, i) for i in range(n // 2)]
    while len(layer) > 1:
        pairs = [dagger.spawn(add, layer[i], layer[i + 1]) for i in range(0, len(layer) - 1, 2)]
        if len(layer) % 2:
            pairs.append(layer[-1])
        layer = pairs
    return await layer[0]


async def test_200k_task_graph_frees_its_memory():
    process = psutil.Process()
    async with dagger.Cluster(threads=2) as cluster:
        # Warm up with a graph of the same size: the allocator keeps freed arenas for
        # reuse, so "where it started" is measured once it has reached steady state.
        await _run_graph(200_001)
        rss_before = _settled_rss(process)
        blocks_before = sys.getallocatedblocks()

        for _ in range(2):  # a leak of even a few bytes per task would grow RSS here
            total = await _run_graph(200_001)
            assert total == sum(range(1, 100_001))
        assert cluster.tasks_in_flight == 0

        rss_after = _settled_rss(process)
        blocks_after = sys.getallocatedblocks()
    # Python objects: nothing of the 200k tasks stays (a few thousand blocks of slack).
    assert blocks_after - blocks_before < 0.10 * blocks_before, (blocks_before, blocks_after)
    # Process memory: back within 10 % of where it started.
    assert rss_after < rss_before * 1.10, (rss_before, rss_after)
    print(f"rss {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB, blocks {blocks_before} -> {blocks_after}")


async def test_results_freed_when_handles_dropped(cluster):
    class Big:
        pass

    def make():
        return Big()

    t = dagger.spawn(make)
    dependent = dagger.spawn(lambda b: 1, t)
    await dependent
    ref = weakref.ref(t.result())
    del t
    gc.collect()
    assert ref() is None  # neither the scheduler nor the finished dependent keeps it
    assert dependent.result() == 1

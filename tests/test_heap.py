"""Worker processes keep freed heap blocks for the next results (memory.process.tune_heap,
and a store without a memory limit that does not trim the heap): a tree of additions over
1 MiB arrays, run again, reuses pages instead of faulting fresh ones in."""

from __future__ import annotations

import asyncio
import sys

import numpy as np
import psutil
import pytest

import aiodagger as dagger

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and /proc: Linux only")]

LEAVES = 128
VALUES = 1 << 17  # 1 MiB of float64
PAGES = (2 * LEAVES - 1) * (VALUES * 8 // 4096)  # every array of a run, in 4 KiB pages


def _minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def leaf(i: int) -> np.ndarray:
    return np.full(VALUES, float(i))


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


async def tree() -> float:
    level = [dagger.spawn(leaf, i) for i in range(LEAVES)]
    while len(level) > 1:
        level = [dagger.spawn(add, a, b) for a, b in zip(level[::2], level[1::2], strict=True)]
    return float((await level[0])[0])


async def test_a_worker_process_reuses_the_memory_of_freed_results():
    async with dagger.Cluster(processes=1):
        (worker,) = psutil.Process().children()
        faults = []
        for _ in range(4):
            before = _minor_faults(worker.pid)
            assert await asyncio.wait_for(tree(), 60) == LEAVES * (LEAVES - 1) / 2
            faults.append(_minor_faults(worker.pid) - before)
    # The first run faults its pages in; a warm one, reusing them, takes a fraction
    # (with glibc's defaults every run took about as many as the first).
    print(faults, PAGES)
    assert min(faults[1:]) < PAGES // 4, (faults, PAGES)

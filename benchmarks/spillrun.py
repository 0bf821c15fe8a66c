"""What W6 measures besides its wall time: a worker's peak RSS and the raw disk bandwidth."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

MiB = 2**20
GiB = 2**30


@contextlib.asynccontextmanager
async def peak_rss(pid: int, interval: float = 0.01) -> AsyncIterator[list[int]]:
    """Sample process ``pid``'s RSS every ``interval`` seconds; yields [peak bytes]."""
    import psutil

    process = psutil.Process(pid)
    peak = [process.memory_info().rss]

    async def sample() -> None:
        while True:
            try:
                peak[0] = max(peak[0], process.memory_info().rss)
            except psutil.Error:
                return
            await asyncio.sleep(interval)

    task = asyncio.ensure_future(sample())
    try:
        yield peak
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def raw_disk_gb_s(directory: Path) -> float:
    """GB/s (decimal) of 1 GiB written in 64 MiB blocks then fsynced, in ``directory``."""
    from benchmarks.spill import raw_write_bandwidth

    mib_s = await asyncio.to_thread(raw_write_bandwidth, directory)
    return mib_s * MiB / 1e9

"""Spill throughput and peak memory of a ChunkStore, against the raw disk, in one run.

    python -m benchmarks.spill [--dir DIR] [--chunks 24] [--chunk-mib 128] [--limit 1GiB]
    python -m benchmarks.spill --compare-aiofiles [--dir DIR]

A producer puts ``--chunks`` chunks of ``--chunk-mib`` MiB into a store limited to
``--limit``, calling ``wait_admitted()`` before making each one, as a worker does before
each task; the store keeps them all. Then every chunk is read back and summed, and each
sum is checked. Printed: wall times, bytes spilled, spill throughput, peak RSS (sampled
every 10 ms by a thread), and the raw write bandwidth of the same directory measured in
the same run (1 GiB in 64 MiB writes, then fsync). Goals: spill throughput >= 60 % of
the raw bandwidth, peak RSS under limit + one chunk + 200 MiB.

``--compare-aiofiles`` times the spill file format written and read back through
aiofiles (one executor hop per call) against one executor call per file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from aiodagger.comm import serialize
from aiodagger.memory import ChunkStore, parse_memory_limit, spillfile

MiB = 1 << 20


class RssSampler:
    """Peak RSS of this process, sampled from a thread so that a busy loop cannot hide it."""

    def __init__(self, interval: float = 0.01) -> None:
        self.peak = 0
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss-sampler", daemon=True)

    def _run(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def raw_write_bandwidth(directory: Path, nbytes: int = 1 << 30, block: int = 64 * MiB) -> float:
    """MiB/s writing ``nbytes`` to a new file in ``directory`` in large writes, then fsync."""
    buf = np.random.default_rng(1).integers(0, 255, block, dtype=np.uint8).data
    path = directory / f"raw-bandwidth-{os.getpid()}.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        started = time.perf_counter()
        written = 0
        while written < nbytes:
            written += os.write(fd, buf[: min(block, nbytes - written)])
        os.fsync(fd)
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
        os.unlink(path)
    return nbytes / MiB / elapsed


def make_chunk(i: int, nbytes: int) -> np.ndarray:
    return np.arange(nbytes // 8, dtype=np.int64) + i


def expected_sum(i: int, nbytes: int) -> int:
    n = nbytes // 8
    return n * (n - 1) // 2 + i * n


def fsync_all(directory: Path) -> None:
    for entry in os.scandir(directory):
        fd = os.open(entry.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


async def spill_run(args: argparse.Namespace) -> None:
    chunk_bytes = args.chunk_mib * MiB
    limit = parse_memory_limit(args.limit)
    assert limit is not None
    base_rss = psutil.Process().memory_info().rss
    with RssSampler() as rss:
        async with ChunkStore(limit, spill_dir=args.dir, worker_name="bench") as store:
            started = time.perf_counter()
            for i in range(args.chunks):
                await store.wait_admitted()
                store.put(i, make_chunk(i, chunk_bytes))
            produced = time.perf_counter() - started
            # Every chunk but the last few has been written once the producer is done;
            # fsync them all to count the time the disk itself needed.
            spilled_after_produce = store.spilled_bytes
            await asyncio.to_thread(fsync_all, store.directory)
            produced_synced = time.perf_counter() - started
            peak_produce = rss.peak

            started = time.perf_counter()
            wrong = []
            for i in range(args.chunks):
                value = await store.get(i)
                if int(value.sum()) != expected_sum(i, chunk_bytes):
                    wrong.append(i)
                del value
            read_back = time.perf_counter() - started
            stats = store.stats()
        peak = rss.peak
    raw = raw_write_bandwidth(Path(args.dir))

    total = args.chunks * chunk_bytes
    io_rate = stats["spilled_bytes"] / MiB / stats["spill_seconds"] if stats["spill_seconds"] else 0.0
    synced_rate = spilled_after_produce / MiB / produced_synced
    rss_goal = limit + chunk_bytes + 200 * MiB
    print(f"command        : {' '.join([os.path.basename(sys.executable), '-m', 'benchmarks.spill', *sys.argv[1:]])}")
    print(f"directory      : {args.dir} ({psutil.disk_usage(args.dir).total / 2**30:.0f} GiB disk)")
    print(f"workload       : {args.chunks} chunks x {args.chunk_mib} MiB = {total / 2**30:.2f} GiB, "
          f"limit {limit / 2**30:.2f} GiB (spill at 60 %, pause at 80 %)")
    print(f"produce        : {produced:.2f} s ({total / MiB / produced:.0f} MiB/s offered), "
          f"{produced_synced:.2f} s with the spilled files fsynced")
    print(f"read back + sum: {read_back:.2f} s, {stats['loads']} loads, "
          f"{'all sums correct' if not wrong else f'WRONG sums for chunks {wrong}'}")
    print(f"spilled        : {stats['spilled_bytes'] / MiB:.0f} MiB in {stats['spill_writes']} files "
          f"({spilled_after_produce / MiB:.0f} MiB while producing), errors {stats['spill_errors']}")
    print(f"spill rate     : {io_rate:.0f} MiB/s in the I/O thread (page cache), "
          f"{synced_rate:.0f} MiB/s producing incl. fsync")
    print(f"raw disk       : {raw:.0f} MiB/s (1 GiB, 64 MiB writes + fsync)")
    print(f"  ratio        : {io_rate / raw:.0%} (I/O thread), {synced_rate / raw:.0%} (incl. fsync); "
          "goal >= 60 %")
    print(f"peak RSS       : {peak / MiB:.0f} MiB (start {base_rss / MiB:.0f} MiB, "
          f"{peak_produce / MiB:.0f} MiB while producing); goal < {rss_goal / MiB:.0f} MiB "
          f"(limit + one chunk + 200 MiB): {'met' if peak < rss_goal else 'MISSED'}")
    if wrong:
        raise SystemExit(1)


# -- aiofiles against one executor call per file --------------------------------------

async def aiofiles_write(path: Path, obj: Any) -> None:
    import aiofiles

    payload, buffers = serialize.dumps(obj)
    async with aiofiles.open(path, "wb") as f:
        await f.write(spillfile.header([payload, *buffers]))
        await f.write(payload)
        for b in buffers:
            await f.write(b)


async def aiofiles_read(path: Path) -> Any:
    import aiofiles

    async with aiofiles.open(path, "rb") as f:
        prefix = await f.read(spillfile._PREFIX.size)
        nparts = spillfile._PREFIX.unpack(prefix)[3]
        trailer = spillfile._CHECKSUM.size
        table = await f.read(nparts * spillfile._PART.size + trailer)
        entries = list(spillfile._PART.iter_unpack(table[:-trailer]))
        parts = []
        for n, expected in entries:
            part = np.empty(n, dtype=np.uint8)
            await f.readinto(part)
            if spillfile.checksum(part) != expected:
                raise spillfile.SpillCorruptedError(str(path))
            parts.append(part)
    return serialize.loads(parts[0], parts[1:])


async def compare_aiofiles(args: argparse.Namespace, repeats: int = 5) -> None:
    """Median of ``repeats`` runs, the two ways taking turns to go first."""
    ways = {"aiofiles": (aiofiles_write, aiofiles_read),
            "one call": (spillfile.write, spillfile.read)}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp)
        for count, size in ((2000, 4096), (16, 32 * MiB)):
            values = [np.full(size // 8, i, dtype=np.int64) for i in range(count)]
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
            for rep in range(repeats):
                for name in sorted(ways, reverse=bool(rep % 2)):
                    write, read = ways[name]
                    paths = [directory / f"{i}.spill" for i in range(count)]
                    started = time.perf_counter()
                    for path, value in zip(paths, values, strict=True):
                        await write(path, value)
                    wrote = time.perf_counter() - started
                    started = time.perf_counter()
                    for path, value in zip(paths, values, strict=True):
                        assert np.array_equal(await read(path), value)
                    times[name].append((wrote, time.perf_counter() - started))
                    for path in paths:
                        path.unlink()
            for name, samples in times.items():
                w = statistics.median(t[0] for t in samples)
                r = statistics.median(t[1] for t in samples)
                print(f"{count:5d} chunks of {size // 1024:6d} KiB  {name:8s}  "
                      f"{w:.3f} s write  {r:.3f} s read  (median of {repeats})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="spill directory's parent")
    parser.add_argument("--chunks", type=int, default=24)
    parser.add_argument("--chunk-mib", type=int, default=128)
    parser.add_argument("--limit", default="1GiB")
    parser.add_argument("--compare-aiofiles", action="store_true")
    args = parser.parse_args()
    asyncio.run(compare_aiofiles(args) if args.compare_aiofiles else spill_run(args))


if __name__ == "__main__":
    main()

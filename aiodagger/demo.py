"""``aiodagger demo``: a realistic workload on the default cluster, with its check and timings.

Part 1, a blocked matrix product: C = A @ B computed block by block (block products in
parallel on the thread pool, numpy releasing the GIL), summed per output block, and
checked against numpy's own A @ B.

Part 2, an I/O-shaped pipeline: many coroutines that wait on (simulated) network
latency, each feeding a CPU task that parses what it "downloaded", then one reduction.
The latencies overlap on the loop while the parsing runs on threads.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import numpy as np

from ._version import __version__
from .api import gather, put, spawn
from .cluster import Cluster

__all__ = ["main", "run_demo"]


def _block_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a @ b


def _sum_blocks(*blocks: np.ndarray) -> np.ndarray:
    out = blocks[0].copy()
    for blk in blocks[1:]:
        out += blk
    return out


async def blocked_matmul(n: int, block: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n))
    b = rng.standard_normal((n, n))
    k = n // block
    start = time.perf_counter()
    a_blocks = [[await put(a[i * block:(i + 1) * block, j * block:(j + 1) * block])
                 for j in range(k)] for i in range(k)]
    b_blocks = [[await put(b[i * block:(i + 1) * block, j * block:(j + 1) * block])
                 for j in range(k)] for i in range(k)]
    c_blocks = []
    for i in range(k):
        row = []
        for j in range(k):
            products = [spawn(_block_product, a_blocks[i][m], b_blocks[m][j]) for m in range(k)]
            row.append(spawn(_sum_blocks, *products))
        c_blocks.append(row)
    rows = await gather(*[spawn(np.hstack, row) for row in c_blocks])
    c = np.vstack(rows)
    elapsed = time.perf_counter() - start
    start = time.perf_counter()
    expected = a @ b
    direct = time.perf_counter() - start
    return {
        "tasks": k * k * k + k * k + k,
        "seconds": elapsed,
        "numpy_seconds": direct,
        "max_error": float(np.max(np.abs(c - expected))),
        "ok": bool(np.allclose(c, expected)),
    }


async def _download(i: int, latency: float) -> bytes:
    await asyncio.sleep(latency)  # stands in for a network round trip
    rng = random.Random(i)
    return ",".join(str(rng.randint(0, 1000)) for _ in range(2000)).encode()


def _parse(payload: bytes) -> int:
    return sum(int(x) for x in payload.split(b","))


async def io_pipeline(requests: int, seed: int = 1) -> dict[str, Any]:
    rng = random.Random(seed)
    latencies = [rng.uniform(0.01, 0.05) for _ in range(requests)]
    start = time.perf_counter()
    parsed = [spawn(_parse, spawn(_download, i, lat)) for i, lat in enumerate(latencies)]
    total = await spawn(lambda *xs: sum(xs), *parsed)
    elapsed = time.perf_counter() - start
    expected = 0
    for i in range(requests):
        r = random.Random(i)
        expected += sum(r.randint(0, 1000) for _ in range(2000))
    return {
        "tasks": 2 * requests + 1,
        "seconds": elapsed,
        "serial_latency": sum(latencies),
        "ok": total == expected,
    }


def _random_chunk(i: int, nbytes: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(nbytes // 8)


def _moments(a: np.ndarray) -> tuple[float, float, int]:
    return float(a.sum()), float(np.square(a).sum()), a.size


def _combine(*moments: tuple[float, float, int]) -> tuple[float, float]:
    s = sum(m[0] for m in moments)
    sq = sum(m[1] for m in moments)
    n = sum(m[2] for m in moments)
    mean = s / n
    return mean, (sq / n - mean * mean) ** 0.5


async def out_of_core(chunks: int, chunk_mib: int, limit: str) -> dict[str, Any]:
    """Mean and std over ``chunks`` random chunks, every chunk kept referenced, on a
    worker whose memory limit is a fraction of that: it spills and loses nothing."""
    nbytes = chunk_mib << 20
    start = time.perf_counter()
    async with Cluster(processes=1, threads=2, memory_limit=limit) as cluster:
        data = [spawn(_random_chunk, i, nbytes) for i in range(chunks)]
        stats = spawn(_combine, *[spawn(_moments, d) for d in data])
        mean, std = await stats
        again = await data[0]  # every chunk is still there (on disk): bring one back
        elapsed = time.perf_counter() - start
        (worker,) = (await cluster.worker_stats()).values()
    expected = _combine(*[_moments(_random_chunk(i, nbytes)) for i in range(chunks)])
    return {
        "total_mib": chunks * chunk_mib, "limit": limit, "seconds": elapsed,
        "spilled": worker["spilled_bytes"], "spill_seconds": worker["spill_seconds"],
        "ok": bool(np.allclose((mean, std), expected)
                   and np.array_equal(again, _random_chunk(0, nbytes))),
    }


async def run_demo(n: int = 1024, block: int = 256, requests: int = 200,
                   ooc_chunks: int = 48, ooc_chunk_mib: int = 16, ooc_limit: str = "192MiB") -> bool:
    print(f"aiodagger {__version__} demo: default cluster, "
          f"{spawn(lambda: len(__import__('os').sched_getaffinity(0))).fetch()} CPUs usable")
    mm = await blocked_matmul(n, block)
    print(f"[1] blocked matmul {n}x{n}, blocks of {block}: {mm['tasks']} tasks in {mm['seconds']:.3f} s "
          f"(numpy in one call: {mm['numpy_seconds']:.3f} s); max |error| {mm['max_error']:.2e} -> "
          f"{'OK' if mm['ok'] else 'WRONG'}")
    io = await io_pipeline(requests)
    print(f"[2] I/O pipeline: {io['tasks']} tasks ({requests} downloads + parses + 1 sum) in "
          f"{io['seconds']:.3f} s; the latencies alone add up to {io['serial_latency']:.2f} s -> "
          f"{'OK' if io['ok'] else 'WRONG'}")
    start = time.perf_counter()
    await gather(*[spawn(int, i) for i in range(10_000)])
    per_task = (time.perf_counter() - start) / 10_000 * 1e6
    print(f"[3] 10,000 tiny tasks spawned and gathered: {per_task:.1f} us per task")
    ooc = await out_of_core(ooc_chunks, ooc_chunk_mib, ooc_limit)
    rate = ooc["spilled"] / ooc["spill_seconds"] / 2**20 if ooc["spill_seconds"] else 0.0
    print(f"[4] out of core: {ooc['total_mib']} MiB of chunks, all kept, on a worker limited to "
          f"{ooc['limit']}: {ooc['seconds']:.2f} s; {ooc['spilled'] / 2**20:.0f} MiB spilled at "
          f"{rate:.0f} MiB/s -> {'OK' if ooc['ok'] else 'WRONG'}")
    ok = mm["ok"] and io["ok"] and ooc["ok"]
    print("all checks passed" if ok else "CHECK FAILED")
    return ok


def main(argv: list[str] | None = None) -> int:
    return 0 if asyncio.run(run_demo()) else 1

"""The GPU card: aiodagger's GPU processors against one shared stream and plain cupy.

Run on a machine with a CUDA device and ``pip install -e '.[gpu]'``:

    python -m benchmarks.gpu [--rounds 3] [--markdown FILE]

Each figure is the median over its rounds, all measured in this one run:

* **G1 small kernels**: 2,000 independent GPU tasks, each an elementwise kernel on
  65,536 float32 (launch-bound work): aiodagger with its stream pool (4 streams per
  device), aiodagger with one stream (``AIODAGGER_GPU_STREAMS=1``: Dagger.jl's design,
  one shared stream per device), and plain cupy in one thread (the floor: no tasks).
* **G2 copy/compute overlap**: 32 tasks, each copying 32 MiB of host data to the device
  then running 20 kernels on it; the pool overlaps one task's copy with another's
  kernels, one stream cannot. The figure is the ratio pool / one stream.
* **G3 device → host spill**: 1 GiB of device results moved to host by the worker's
  store (``ChunkStore.free_device``), in GB/s.
* **G4 await latency**: from a kernel's completion event firing to the coroutine that
  awaited it resuming: a kernel spinning 2 ms, awaited through the waiter pool, against
  the same kernel waited with a host ``Event.synchronize()`` in the calling thread;
  goal ≤ 100 µs.

Without a device it prints why and exits with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from typing import Any

SMALL_TASKS = 2_000
SMALL_N = 1 << 16
OVERLAP_TASKS = 32
OVERLAP_BYTES = 32 << 20
SPILL_BYTES = 1 << 30
SPIN_NS = 2_000_000

_SPIN = r'''
extern "C" __global__ void spin(long long ns) {
    long long start = clock64();
    // clock64 counts SM cycles: the spin lasts about a millisecond at ~1-2 GHz
    while (clock64() - start < ns) { }
}
'''


def small_kernel(a: Any) -> Any:
    return a * 2.0 + 1.0


def copy_then_compute(host: Any) -> Any:
    import cupy

    a = cupy.asarray(host)  # on the task's stream: the processor made it current
    for _ in range(20):
        a = cupy.sqrt(a * a + 1.0)
    return a


async def _aiodagger_small(streams: int) -> float:
    os.environ["AIODAGGER_GPU_STREAMS"] = str(streams)
    import cupy

    import aiodagger as dagger

    inputs = [cupy.full(SMALL_N, i, dtype=cupy.float32) for i in range(8)]
    async with dagger.Cluster(threads=2):
        gpu = dagger.options(scope=dagger.scope(gpu=0))
        await dagger.gather(*[gpu.spawn(small_kernel, inputs[i % 8]) for i in range(50)])  # warm
        t0 = time.perf_counter()
        await dagger.gather(*[gpu.spawn(small_kernel, inputs[i % 8]) for i in range(SMALL_TASKS)])
        return time.perf_counter() - t0


def _plain_small() -> float:
    import cupy

    inputs = [cupy.full(SMALL_N, i, dtype=cupy.float32) for i in range(8)]
    for i in range(50):
        small_kernel(inputs[i % 8])
    cupy.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for i in range(SMALL_TASKS):
        small_kernel(inputs[i % 8])
    cupy.cuda.Device().synchronize()
    return time.perf_counter() - t0


async def _overlap(streams: int) -> float:
    os.environ["AIODAGGER_GPU_STREAMS"] = str(streams)
    import numpy as np

    import aiodagger as dagger

    host = [np.random.default_rng(i).random(OVERLAP_BYTES // 8) for i in range(4)]
    async with dagger.Cluster(threads=2):
        gpu = dagger.options(scope=dagger.scope(gpu=0))
        await gpu.spawn(copy_then_compute, host[0])
        t0 = time.perf_counter()
        await dagger.gather(*[gpu.spawn(copy_then_compute, host[i % 4]) for i in range(OVERLAP_TASKS)])
        return time.perf_counter() - t0


async def _spill() -> float:
    import cupy

    from aiodagger.memory import ChunkStore

    store = ChunkStore(None, None, worker_name="gpu-bench", device_limit=2 * SPILL_BYTES)
    await store.start()
    try:
        n = 16
        for i in range(n):
            store.put(i, cupy.ones(SPILL_BYTES // n // 8, dtype=cupy.float64))
        cupy.cuda.Device().synchronize()
        t0 = time.perf_counter()
        freed = await store.free_device(0, SPILL_BYTES)
        seconds = time.perf_counter() - t0
        return freed / seconds / 1e9
    finally:
        await store.close()


async def _await_latency(rounds: int = 50) -> float:
    """The median µs from the event firing to the coroutine resuming: the time to await
    a kernel of SPIN_NS cycles less the time to wait for it with a host synchronize."""
    import cupy

    from aiodagger.gpu.waiters import WaiterPool

    spin = cupy.RawKernel(_SPIN, "spin")
    stream = cupy.cuda.Stream(non_blocking=True)
    pool = WaiterPool()

    def launch() -> Any:
        with stream:
            spin((1,), (1,), (cupy.int64(SPIN_NS),))
        ev = cupy.cuda.Event(block=True, disable_timing=True)
        ev.record(stream)
        return ev

    blocking, awaited = [], []
    try:
        for _ in range(5):
            launch().synchronize()
        for _ in range(rounds):
            t0 = time.perf_counter()
            launch().synchronize()
            blocking.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await pool.wait(launch())
            awaited.append(time.perf_counter() - t0)
    finally:
        pool.close()
    base = statistics.median(blocking)
    return (statistics.median(awaited) - base) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--markdown", default=None, help="append the table to this file")
    parser.add_argument("--quick", action="store_true",
                        help="every size divided by 64: a check that the card runs, not a measurement")
    args = parser.parse_args(argv)
    if args.quick:
        global SMALL_TASKS, OVERLAP_TASKS, OVERLAP_BYTES, SPILL_BYTES
        SMALL_TASKS, OVERLAP_TASKS = SMALL_TASKS // 64, OVERLAP_TASKS // 8
        OVERLAP_BYTES, SPILL_BYTES = OVERLAP_BYTES // 64, SPILL_BYTES // 64
    from aiodagger.gpu.discovery import missing_reason

    why = missing_reason()
    if why is not None:
        print(f"the GPU card needs a CUDA device: {why}", file=sys.stderr)
        return 2
    rows: dict[str, list[float]] = {k: [] for k in ("pool", "one", "plain", "ov-pool", "ov-one", "spill", "lat")}
    for _ in range(args.rounds):
        rows["pool"].append(asyncio.run(_aiodagger_small(4)) / SMALL_TASKS * 1e6)
        rows["one"].append(asyncio.run(_aiodagger_small(1)) / SMALL_TASKS * 1e6)
        rows["plain"].append(_plain_small() / SMALL_TASKS * 1e6)
        rows["ov-pool"].append(asyncio.run(_overlap(4)))
        rows["ov-one"].append(asyncio.run(_overlap(1)))
        rows["spill"].append(asyncio.run(_spill()))
        rows["lat"].append(asyncio.run(_await_latency(5 if args.quick else 50)))
    med = {k: statistics.median(v) for k, v in rows.items()}
    table = "\n".join([
        "| GPU card | figure (median of rounds) |",
        "|---|---|",
        f"| G1 small kernels, stream pool | {med['pool']:.1f} µs/task |",
        f"| G1 small kernels, one shared stream (Dagger.jl's design) | {med['one']:.1f} µs/task |",
        f"| G1 small kernels, plain cupy in one thread (floor) | {med['plain']:.1f} µs/kernel |",
        f"| G2 copy/compute, stream pool / one stream | {med['ov-pool']:.3f} s / {med['ov-one']:.3f} s "
        f"({med['ov-pool'] / med['ov-one']:.2f}x) |",
        f"| G3 device → host spill | {med['spill']:.2f} GB/s |",
        f"| G4 await latency, event fired → coroutine resumed | {med['lat']:.0f} µs (goal ≤ 100) |",
    ])
    print(table)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write("\n" + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

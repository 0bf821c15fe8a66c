"""Dagger.jl's streaming tasks and file references in aiodagger.

    python examples/streaming_files.py

A generator runs as a task on one worker process and a reader on the other takes its
values as they come, the producer kept at most `buffer` values ahead; then a result is
written to a file where it was computed, and read back by the task that needs it.
"""

import asyncio
import pathlib
import tempfile

import numpy as np

import aiodagger as dagger


async def readings(n):  # Dagger.jl's `Dagger.spawn_streaming() do ... end` producer
    for i in range(n):
        await asyncio.sleep(0)
        yield float(i % 10)


async def running_mean(stream):  # a reader: an async iterator over the values
    total = count = 0
    async for value in stream:
        total, count = total + value, count + 1
    return total / count


def make_grid(n):
    return np.arange(n * n, dtype=float).reshape(n, n)


def trace(grid):
    return float(np.trace(grid))


async def main():
    async with dagger.Cluster(processes=2):
        one, two = (dagger.scope(worker=w) for w in (1, 2))
        with dagger.options(scope=one):
            stream = dagger.spawn_streaming(readings, 1_000, buffer=32)
        mean = dagger.options(scope=two).spawn(running_mean, stream)
        print("values streamed:", await stream, "mean:", await mean)

        with tempfile.TemporaryDirectory() as tmp:
            grid = dagger.spawn(make_grid, 4)
            f = await dagger.tofile(grid, pathlib.Path(tmp) / "grid.npy")  # written where it lives
            print("file:", pathlib.Path(f.path).name, "trace:", await dagger.spawn(trace, f))


if __name__ == "__main__":
    asyncio.run(main())

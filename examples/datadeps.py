"""Dagger.jl's programming models in aiodagger: datadeps, mutable and shard.

    python examples/datadeps.py

The examples of Dagger.jl's documentation, on two worker processes: the tasks run
there, and what they write comes back to this process's arrays.
"""

import asyncio
import random

import numpy as np

import aiodagger as dagger


def add_into(x, y):  # Dagger.jl's `add!(X, Y) = X .+= Y`
    x += y


def copy_into(dst, src):
    dst[...] = src


def block_update(c, a, b):  # one tile of C += A @ B
    c += a @ b


def bin_it(hist, value):  # Dagger.jl's distributed histogram
    hist[min(int(value * 10), 9)] += 1


def copy_of(piece):
    return piece.copy()


async def main():
    async with dagger.Cluster(processes=2):
        # Datadeps: the second task waits for the first, which writes what it reads.
        a, b, c = np.arange(1000.0), np.ones(1000), np.zeros(1000)
        async with dagger.datadeps() as dd:
            dd.spawn(add_into, dagger.InOut(b), dagger.In(a))
            dd.spawn(copy_into, dagger.Out(c), dagger.In(b))
        print("datadeps: c[:3] =", c[:3].tolist())

        # A tiled C += A @ B: tiles of C that differ are updated in parallel, the
        # updates of one tile one after the other; aliasing is by the bytes of each view.
        n, t = 6, 3
        x, y = np.arange(n * n, dtype=float).reshape(n, n), np.eye(n)
        z = np.zeros((n, n))
        tile = [slice(i, i + t) for i in range(0, n, t)]
        async with dagger.datadeps() as dd:
            for i in tile:
                for j in tile:
                    for k in tile:
                        dd.spawn(block_update, dagger.InOut(z[i, j]), x[i, k], y[k, j])
        print("tiled matmul matches numpy:", bool((z == x @ y).all()))

        # A mutable: made on one worker, changed in place there, never copied back.
        m = await dagger.mutable(np.zeros, 4)
        for _ in range(3):
            await dagger.spawn(add_into, m, 1.0)
        print(f"mutable on worker {m.worker}:", (await dagger.spawn(copy_of, m)).tolist())

        # A shard: one histogram per worker, each task bins into the one where it runs.
        hist = await dagger.shard(np.zeros, 10, dtype=int)
        rng = random.Random(1)
        await dagger.gather(*[dagger.spawn(bin_it, hist, rng.random()) for _ in range(100)])
        pieces = [await dagger.options(scope=dagger.scope(worker=w)).spawn(copy_of, hist)
                  for w in hist.workers]
        print("histogram counts:", int(sum(pieces).sum()), "from", len(pieces), "pieces")


if __name__ == "__main__":
    asyncio.run(main())

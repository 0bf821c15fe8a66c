"""The distributed-array workloads (LA-mm, LA-chol, LA-solve, ST), one function per
system; the peers' methods call these.

Each run makes its inputs first (not timed: on the workers for the distributed
systems, in this process for numpy), then times the operation up to every result
block existing, and checks a sum of the result afterwards (not timed either): the
figure is the computation, not the trip of the result to the caller.
"""

from __future__ import annotations

import asyncio
import time
from functools import lru_cache
from typing import Any

from benchmarks.peers.base import Timed, run_blocking

__all__ = ["LA_BLOCK", "LA_N", "ST_BLOCK", "ST_N", "ST_STEPS", "expected_chol", "expected_matmul",
           "expected_solve", "expected_stencil"]

LA_N, LA_BLOCK = 4096, 512
ST_N, ST_BLOCK, ST_STEPS = 8192, 1024, 10
_BLOCKING_S = 1200.0


# -- the inputs and the kernels, shared by every system ------------------------------------
def spd_entries(i: Any, j: Any) -> Any:
    """A symmetric positive-definite matrix: n on the diagonal plus ones everywhere."""
    return (i == j) * float(LA_N) + 1.0


def stencil_start(i: Any, j: Any) -> Any:
    return ((i * 7 + j * 3) % 11).astype(float)


def laplace_step(u: Any) -> Any:
    """One explicit heat step on a block with a one-cell halo; the halo rows come back
    unchanged (and are trimmed off)."""
    out = u.copy()
    out[1:-1, 1:-1] += 0.1 * (u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:] - 4 * u[1:-1, 1:-1])
    return out


def expected_matmul(n: int) -> float:
    return _close(float(LA_N) ** 2)  # full(1/64) @ full(1/64): every entry 4096 / 4096 = 1


@lru_cache(maxsize=1)
def _numpy_la() -> tuple[float, float]:
    import numpy as np

    a = np.fromfunction(spd_entries, (LA_N, LA_N))
    return float(np.linalg.cholesky(a).sum()), float(np.linalg.solve(a, np.ones(LA_N)).sum())


def expected_chol(n: int) -> float:
    return _close(_numpy_la()[0])


def expected_solve(n: int) -> float:
    return _close(_numpy_la()[1])


@lru_cache(maxsize=1)
def expected_stencil(n: int) -> float:
    import numpy as np

    u = np.fromfunction(stencil_start, (ST_N, ST_N), dtype=int)
    for _ in range(ST_STEPS):
        u = laplace_step(np.pad(u, 1))[1:-1, 1:-1]
    return _close(float(u.sum()))


def _close(value: float) -> float:
    """Sums of float results differ in the last digits between summation orders."""
    return float(f"{value:.6e}")


# -- aiodagger --------------------------------------------------------------------------------
async def aiodagger_run(d: Any, key: str) -> Timed:
    arr = d.array
    if key == "LA-mm":
        a = arr.full((LA_N, LA_N), (LA_BLOCK, LA_BLOCK), 1 / 64)
        b = arr.full((LA_N, LA_N), (LA_BLOCK, LA_BLOCK), 1 / 64)
        inputs = [a, b]
    elif key == "ST":
        inputs = [arr.fromfunction(stencil_start, (ST_N, ST_N), (ST_BLOCK, ST_BLOCK), dtype=int)]
    else:
        inputs = [arr.fromfunction(spd_entries, (LA_N, LA_N), (LA_BLOCK, LA_BLOCK))]
    await d.wait([t for x in inputs for t in x._blocks.flat])
    t0 = time.perf_counter()
    if key == "LA-mm":
        out = inputs[0] @ inputs[1]
    elif key == "LA-chol":
        out = arr.cholesky(inputs[0])
    elif key == "LA-solve":
        out = arr.solve(inputs[0], arr.ones((LA_N,), (LA_BLOCK,)), assume_a="gen")
    else:
        out = inputs[0]
        for _ in range(ST_STEPS):
            out = arr.map_overlap(laplace_step, out, depth=1, boundary=0.0)
    await d.wait(list(out._blocks.flat))
    seconds = time.perf_counter() - t0
    return Timed(_close(float(await out.sum())), seconds)


# -- dask.array -------------------------------------------------------------------------------
def dask_graph(da: Any, key: str) -> tuple[Any, Any]:
    """(inputs to persist first, the operation on them)."""
    if key == "LA-mm":
        a = da.full((LA_N, LA_N), 1 / 64, chunks=LA_BLOCK)
        b = da.full((LA_N, LA_N), 1 / 64, chunks=LA_BLOCK)
        return [a, b], lambda a, b: a @ b
    if key == "ST":
        u = da.fromfunction(stencil_start, shape=(ST_N, ST_N), chunks=ST_BLOCK, dtype=int)

        def steps(u: Any) -> Any:
            for _ in range(ST_STEPS):
                u = u.map_overlap(laplace_step, depth=1, boundary=0.0)
            return u
        return [u], steps
    a = da.fromfunction(spd_entries, shape=(LA_N, LA_N), chunks=LA_BLOCK, dtype=float)
    if key == "LA-chol":
        return [a], lambda a: da.linalg.cholesky(a, lower=True)
    return [a], lambda a: da.linalg.solve(a, da.ones(LA_N, chunks=LA_BLOCK))


async def dask_threads_run(dask: Any, key: str) -> Timed:
    import dask.array as da

    inputs, op = dask_graph(da, key)
    inputs = await run_blocking(lambda: dask.persist(*inputs, scheduler="threads"), _BLOCKING_S)
    t0 = time.perf_counter()
    (out,) = await run_blocking(lambda: dask.persist(op(*inputs), scheduler="threads"), _BLOCKING_S)
    seconds = time.perf_counter() - t0
    total = await run_blocking(lambda: float(out.sum().compute(scheduler="threads")), _BLOCKING_S)
    return Timed(_close(total), seconds)


async def dask_distributed_run(client: Any, key: str) -> Timed:
    import dask.array as da
    from distributed import wait

    inputs, op = dask_graph(da, key)
    inputs = client.persist(inputs)
    await wait(inputs)
    t0 = time.perf_counter()
    out = client.persist(op(*inputs))
    await wait(out)
    seconds = time.perf_counter() - t0
    total = await client.compute(out.sum())
    return Timed(_close(float(total)), seconds)


# -- numpy, the floor: the whole matrix in this process ---------------------------------------
async def numpy_run(key: str) -> Timed:
    import numpy as np

    def run() -> Timed:
        if key == "LA-mm":
            a = np.full((LA_N, LA_N), 1 / 64)
            b = np.full((LA_N, LA_N), 1 / 64)
            t0 = time.perf_counter()
            out = a @ b
        elif key == "ST":
            u = np.fromfunction(stencil_start, (ST_N, ST_N), dtype=int)
            t0 = time.perf_counter()
            for _ in range(ST_STEPS):
                u = laplace_step(np.pad(u, 1))[1:-1, 1:-1]
            out = u
        else:
            a = np.fromfunction(spd_entries, (LA_N, LA_N))
            t0 = time.perf_counter()
            out = np.linalg.cholesky(a) if key == "LA-chol" else np.linalg.solve(a, np.ones(LA_N))
        seconds = time.perf_counter() - t0
        return Timed(_close(float(out.sum())), seconds)

    return await asyncio.wait_for(run_blocking(run, _BLOCKING_S), _BLOCKING_S)

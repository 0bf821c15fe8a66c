"""dagger.array on GPUs: DArrays under ``scope(gpu=True)`` keep cupy blocks on the GPU
and compute what numpy does; the block and tile kernels take cupy arrays; and a GPU
scope survives the pinning of blocks and tiles to workers.

The tests marked ``needs_gpu`` are skipped, with the reason, where cupy or a CUDA
device is missing. The kernel tests also run on numpy, which checks the test itself.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import aiodagger as dagger
from aiodagger import api
from aiodagger.access import Access, open_regions
from aiodagger.array import core, elementwise, linalg, reductions
from aiodagger.array.matmul import _panel_product
from aiodagger.gpu.arrays import device_of, is_device_array, to_host
from aiodagger.taskoptions import Scope
from tests.conftest import gpu_skip_reason

GPU_SKIP = gpu_skip_reason()
needs_gpu = pytest.mark.skipif(GPU_SKIP is not None, reason=f"needs a GPU: {GPU_SKIP}")
GPU = dagger.scope(gpu=True)


def spd(n: int, seed: int = 0) -> np.ndarray:
    m = np.random.default_rng(seed).standard_normal((n, n))
    return m @ m.T + n * np.eye(n)


async def device_values(arr: Any) -> list[Any]:
    """The blocks of ``arr``, each checked to be a cupy array on a GPU."""
    values = [await t for t in arr._blocks.flat]
    assert all(is_device_array(v) for v in values), [type(v).__name__ for v in values]
    assert all(device_of(v) is not None for v in values)
    return values


# -- DArrays under a GPU scope ------------------------------------------------------------
@needs_gpu
async def test_elementwise_and_creation_on_gpu(cluster):
    x = np.random.default_rng(1).standard_normal((256, 256))
    with dagger.options(scope=GPU):
        a = dagger.array.distribute(x, (64, 64))
        y = np.sin(a) * 2 + a.T
        zeros = dagger.array.zeros((100, 100), (64, 64))
        uniform = dagger.array.rand((100, 100), (64, 64), seed=3)
    for arr in (a, y, zeros, uniform):
        await device_values(arr)
    np.testing.assert_allclose(await y, np.sin(x) * 2 + x.T)
    np.testing.assert_array_equal(await zeros, np.zeros((100, 100)))
    values = await uniform
    assert values.shape == (100, 100) and 0 <= values.min() and values.max() < 1


@needs_gpu
async def test_reductions_on_gpu(cluster):
    x = np.random.default_rng(2).standard_normal((256, 200))
    with dagger.options(scope=GPU):
        a = dagger.array.distribute(x, (64, 64))
        results = {"sum0": a.sum(axis=0), "mean": a.mean(), "std1": a.std(axis=1), "argmax": a.argmax(),
                   "max1": a.max(axis=1, keepdims=True)}
    for arr in results.values():
        await device_values(arr)
    np.testing.assert_allclose(await results["sum0"], x.sum(axis=0))
    np.testing.assert_allclose(await results["mean"], x.mean())
    np.testing.assert_allclose(await results["std1"], x.std(axis=1))
    assert await results["argmax"] == x.argmax()
    np.testing.assert_array_equal(await results["max1"], x.max(axis=1, keepdims=True))


@needs_gpu
async def test_matmul_on_gpu(cluster):
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((256, 192)), rng.standard_normal((192, 128))
    with dagger.options(scope=GPU):
        product = dagger.array.distribute(x, (64, 64)) @ dagger.array.distribute(y, (64, 64))
    await device_values(product)
    np.testing.assert_allclose(await product, x @ y)


@needs_gpu
async def test_cholesky_on_gpu(cluster):
    x = spd(256)
    with dagger.options(scope=GPU):
        factor = dagger.array.cholesky(dagger.array.distribute(x, (64, 64)))
    await device_values(factor)
    np.testing.assert_allclose(await factor, np.linalg.cholesky(x), rtol=1e-10, atol=1e-10)


@needs_gpu
async def test_lu_and_solve_on_gpu(cluster):
    rng = np.random.default_rng(4)
    x, b = rng.standard_normal((256, 256)), rng.standard_normal(256)
    with dagger.options(scope=GPU):
        a = dagger.array.distribute(x, (64, 64))
        p, l_, u = dagger.array.lu(a)
        solution = dagger.array.solve(a, b)
    for arr in (p, l_, u, solution):
        await device_values(arr)
    np.testing.assert_allclose((await p) @ (await l_) @ (await u), x, atol=1e-10)
    np.testing.assert_allclose(await solution, np.linalg.solve(x, b), rtol=1e-8)


# -- the kernels, called on the blocks themselves ---------------------------------------------
@pytest.fixture(params=["numpy", pytest.param("cupy", marks=needs_gpu)])
def xp(request: Any) -> Any:
    if request.param == "numpy":
        return np
    import cupy

    return cupy


class SerialRegion:
    """A datadeps region that runs each task at once, in spawn order (an order the
    region allows): linalg's algorithms, on tiles with no cluster."""

    def __enter__(self) -> SerialRegion:
        self._token = open_regions.set(open_regions.get() + 1)  # In(...), InOut(...) are allowed
        return self

    def __exit__(self, *exc: object) -> None:
        open_regions.reset(self._token)

    def spawn(self, fn: Any, *args: Any) -> Any:
        return fn(*[a.value if isinstance(a, Access) else a for a in args])


def tiled(xp: Any, x: np.ndarray, size: int) -> list[list[Any]]:
    n = len(x) // size
    return [[xp.array(x[i * size:(i + 1) * size, j * size:(j + 1) * size]) for j in range(n)] for i in range(n)]


def untiled(tiles: list[list[Any]]) -> np.ndarray:
    return np.block([[to_host(t) for t in row] for row in tiles])


def test_cholesky_kernels(xp):
    x = spd(256)
    tiles = tiled(xp, x, 64)
    with SerialRegion() as dd:
        linalg._factor_cholesky(dd, tiles)
    assert all(type(t) is xp.ndarray for row in tiles for t in row)
    np.testing.assert_allclose(np.tril(untiled(tiles)), np.linalg.cholesky(x), rtol=1e-10, atol=1e-10)
    with pytest.raises(np.linalg.LinAlgError, match="not positive definite"):
        linalg._potrf(xp.array(-np.eye(4)))


def test_lu_kernels(xp):
    x = np.random.default_rng(5).standard_normal((256, 256))
    tiles = tiled(xp, x, 64)
    with SerialRegion() as dd:
        pivots = linalg._factor_lu(dd, SimpleNamespace(tile=tiles, n=4))
    perm = linalg._permutation((64,) * 4, *pivots)
    lu = untiled(tiles)
    np.testing.assert_allclose((np.tril(lu, -1) + np.eye(256)) @ np.triu(lu), x[perm], atol=1e-10)
    p_block = linalg._permutation_block(xp.asarray(perm), slice(64, 128), slice(0, 64), np.float64)
    np.testing.assert_array_equal(to_host(p_block), np.eye(256)[perm].T[64:128, :64])
    with pytest.raises(np.linalg.LinAlgError, match="Singular"):
        linalg._getrf_panel(xp.zeros((4, 4)), xp.zeros((4, 4)))


def test_triangular_solve_kernels(xp):
    x = spd(64)
    lower = np.linalg.cholesky(x)
    b = np.random.default_rng(6).standard_normal((64, 3))
    tile = xp.array(b)
    linalg._trsm_lower(xp.array(lower), tile, False)
    linalg._trsm_lower_h(xp.array(lower), tile)
    np.testing.assert_allclose(to_host(tile), np.linalg.solve(x, b))
    linalg._trsm_upper(xp.array(lower.T), tile)
    np.testing.assert_allclose(to_host(tile), np.linalg.solve(lower.T, np.linalg.solve(x, b)))


@pytest.mark.parametrize("kind", ["sum", "prod", "max", "any", "mean", "var", "std"])
def test_reduction_kernels(xp, kind):
    x = np.random.default_rng(7).standard_normal((6, 5))
    halves = [xp.array(x[:3]), xp.array(x[3:])]
    parts = [reductions._partial(kind, h, (0,), None) for h in halves]
    out_dtype = getattr(np, kind)(x, axis=0).dtype
    got = reductions._finish(kind, (0,), False, out_dtype, 0, reductions._combine(kind, *parts))
    assert type(got) is xp.ndarray and got.dtype == out_dtype
    np.testing.assert_allclose(to_host(got).astype(float), getattr(np, kind)(x, axis=0).astype(float))


def test_arg_reduction_kernels(xp):
    x = np.random.default_rng(8).standard_normal((6, 5))
    for axis in (None, 1):
        parts = [reductions._arg_partial("argmin", xp.array(x[:, c]), axis, (0, c.start), x.shape)
                 for c in (slice(0, 2), slice(2, 5))]
        got = reductions._arg_finish((0, 1) if axis is None else (1,), False,
                                     reductions._arg_combine("argmin", axis, *parts))
        np.testing.assert_array_equal(to_host(got), x.argmin(axis=axis))


def test_block_kernels(xp):
    x = np.arange(24.0).reshape(4, 6)
    pieces = [xp.array(x[r, c]) for r in (slice(0, 1), slice(1, 4)) for c in (slice(0, 2), slice(2, 6))]
    np.testing.assert_array_equal(to_host(core.join_grid((2, 2), pieces)), x)
    got = elementwise._call(np.add, {}, xp.array(x), 1.5)
    assert type(got) is xp.ndarray
    np.testing.assert_array_equal(to_host(got), x + 1.5)
    got = _panel_product(np.float64, 2, xp.array(x[:, :3]), xp.array(x[:, 3:]),
                         xp.array(x.T[:3]), xp.array(x.T[3:]))
    np.testing.assert_allclose(to_host(got), x @ x.T)
    made = core.new_block("full", (2, 3), np.float32, xp is not np, 7)
    assert type(made) is xp.ndarray and made.dtype == np.float32
    np.testing.assert_array_equal(to_host(made), np.full((2, 3), 7, np.float32))


# -- placement: the GPU part of the scope survives pinning to a worker ---------------------------
class _Workers:
    """The scheduler's answer for two workers with GPUs (this test needs none): which
    workers a scope admits, each scope asked about kept."""

    def __init__(self) -> None:
        self.asked: list[Scope] = []

    def placeable_workers(self, scope: Scope) -> list[int]:
        self.asked.append(scope)
        return [1, 2]


@pytest.mark.parametrize("gpu", [True, 0, None])
def test_blocks_and_tiles_keep_the_gpu_scope_when_pinned(monkeypatch, gpu):
    """Blocks of new arrays and linalg's tiles are pinned to workers in turn; the scope
    they get keeps the GPU wish of the scope in effect, and the workers come from that
    scope. Nothing runs: the spawns are recorded, not made."""
    workers = _Workers()
    spawned: list[tuple[Scope, Any, tuple[Any, ...]]] = []
    tiles: list[Scope] = []

    def spawn(opts: Any, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        spawned.append((opts.scope, fn, args))
        return object()

    monkeypatch.setattr(core, "_scheduler", lambda: workers)
    monkeypatch.setattr(linalg, "_scheduler", lambda: workers)
    monkeypatch.setattr(api, "spawn_with_options", spawn)
    monkeypatch.setattr(linalg, "mutable", lambda fn, *args, scope: tiles.append(scope))
    scope = dagger.scope("any") if gpu is None else dagger.scope(gpu=gpu)
    with dagger.options(scope=scope):
        a = dagger.array.zeros((6, 6), (2, 2))  # 9 blocks, one task each, no inputs
        linalg._Tiles(a, np.float64)  # 3x3 tiles, each exactly one block: no task cuts them

    assert workers.asked == [scope, scope]
    assert [s for s, _, _ in spawned] == [Scope(frozenset([w]), gpu=gpu) for w in [1, 2] * 4 + [1]]
    assert all(fn is core.new_block and args[3] is (gpu is not None) for _, fn, args in spawned)
    assert tiles == [Scope(frozenset([w]), gpu=gpu) for _ in range(3) for w in (1, 2, 1)]
    assert all(s.wants_gpu == (gpu is not None) for s in tiles)

"""dagger.array matmul: numpy's results, dtypes and errors, any block grids on either side."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import strategies as st

import aiodagger as dagger
from aiodagger.array import DArray
from tests.test_array import arrays, hypothesis_check, on_clusters

SHAPES = {  # (a's shape, b's shape) from sizes n, k, m and stack sizes p, q
    "matrix @ matrix": lambda n, k, m, p, q: ((n, k), (k, m)),
    "matrix @ vector": lambda n, k, m, p, q: ((n, k), (k,)),
    "vector @ matrix": lambda n, k, m, p, q: ((k,), (k, m)),
    "vector @ vector": lambda n, k, m, p, q: ((k,), (k,)),
    "stack @ matrix": lambda n, k, m, p, q: ((p, n, k), (k, m)),
    "stack @ stack": lambda n, k, m, p, q: ((p, 1, n, k), (q, k, m)),
    "vector @ stack": lambda n, k, m, p, q: ((k,), (p, k, m)),
}


def _check(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    if want.dtype.kind in "fc":
        rtol = 1e-4 if want.dtype in (np.float32, np.complex64) else 1e-10
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol)
    else:  # ints (wrapping as numpy's do) and bools: exact
        np.testing.assert_array_equal(got, want)


def matmul_case(data):
    n, k, m, p, q = (data.draw(st.integers(0, 6)) for _ in range(5))
    a_shape, b_shape = SHAPES[data.draw(st.sampled_from(sorted(SHAPES)))](n, k, m, p, q)
    transposed = len(a_shape) == 2 and data.draw(st.booleans())  # a given as x.T
    x, xb = data.draw(arrays(shape=a_shape[::-1] if transposed else a_shape))
    y, yb = data.draw(arrays(shape=b_shape))
    a = dagger.array.distribute(x, xb)
    if transposed:
        x, a = x.T, a.T
    b = dagger.array.distribute(y, yb)
    side = data.draw(st.sampled_from(["darrays", "numpy left", "numpy right"]))
    left, right = (x if side == "numpy left" else a), (y if side == "numpy right" else b)
    how = data.draw(st.sampled_from(["@", "np.matmul", "dagger.array.matmul"]))
    if how == "@":
        got = left @ right
    elif how == "np.matmul":
        got = np.matmul(left, right)
    else:
        got = dagger.array.matmul(left, right)
    assert isinstance(got, DArray)
    _check(got.fetch(timeout=30), x @ y)


@on_clusters(150, 20)
def test_matmul_matches_numpy(options, examples):
    with dagger.Cluster(**options):
        hypothesis_check(matmul_case, examples)()


async def test_output_blocks_follow_the_operands_and_mixed_dtypes(cluster):
    x = np.arange(35, dtype=np.int8).reshape(5, 7)
    y = np.linspace(0, 1, 21, dtype=np.float32).reshape(7, 3)
    a, b = dagger.array.distribute(x, (2, 3)), dagger.array.distribute(y, (4, 2))  # inner grids differ
    got = a @ b
    assert got.chunks == ((2, 2, 1), (2, 1)) and got.dtype == (x @ y).dtype == np.float32
    _check(await got, x @ y)
    assert (await np.matmul(a, b, dtype=np.float64)).dtype == np.float64
    _check(await (a.T @ a), x.T @ x)
    assert np.dot(a, b).chunks == got.chunks
    _check(await dagger.array.matmul(x, y), x @ y)  # numpy on both sides: distributed first


async def test_bad_shapes_raise_numpys_error_at_once(cluster):
    cases = [((3, 4), (5, 2)), ((4,), (3,)), ((2, 3), (2,)), ((), (3,)), ((3,), ()),
             ((2, 3, 4), (5, 4, 2)), ((2, 3, 4), (3, 3))]
    for a_shape, b_shape in cases:
        x, y = np.ones(a_shape), np.ones(b_shape)
        with pytest.raises(ValueError) as expected:
            np.matmul(x, y)
        a, b = dagger.array.distribute(x, (1,) * x.ndim), dagger.array.distribute(y, (1,) * y.ndim)
        for left, right in [(a, b), (x, b), (a, y)]:
            with pytest.raises(ValueError) as got:
                left @ right
            assert str(got.value) == str(expected.value), (a_shape, b_shape)
    a = dagger.array.distribute(np.ones((2, 2)), (1, 1))
    with pytest.raises(TypeError, match="not written in place"):
        np.matmul(a, a, out=np.empty((2, 2)))
    with pytest.raises(TypeError, match="only dtype="):
        np.matmul(a, a, axes=[(0, 1), (0, 1), (0, 1)])


async def test_only_the_blocks_an_output_block_needs_move():
    async with dagger.Cluster(processes=2, threads=1) as c:
        workers = {w.id for w in c.workers if w.id != 0}
        a = dagger.array.rand((512, 256), (128, 128), seed=1)  # grid 4 x 2
        b = dagger.array.rand((256, 192), (128, 64), seed=2)  # grid 2 x 3
        inputs = [*a._blocks.flat, *b._blocks.flat]
        await dagger.wait(inputs)
        held = {id(t): set(t._where) for t in inputs}
        assert set().union(*held.values()) == workers
        product = a @ b
        await dagger.wait(list(product._blocks.flat))
        users: dict[int, set[int]] = {id(t): set() for t in inputs}  # where the tasks that take it ran
        for (i, j), out in np.ndenumerate(product._blocks):
            needed = [*a._blocks[i, :], *b._blocks[:, j]]
            assert out._where & set().union(*(held[id(t)] for t in needed)), "ran where none of its inputs was"
            for t in needed:
                users[id(t)] |= out._where
        for t in inputs:  # a block is copied only to workers that ran a task needing it
            assert t._where <= held[id(t)] | users[id(t)]
        _check(await product, await a @ await b)

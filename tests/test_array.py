"""dagger.array: DArrays of numpy blocks give numpy's results, block grids of any shape."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aiodagger as dagger
from aiodagger.array import DArray

DTYPES = [np.int8, np.int32, np.int64, np.uint16, np.float32, np.float64, np.complex128, np.bool_]


@st.composite
def arrays(draw, max_ndim=3, dtypes=DTYPES, shape=None, nan=False):
    """A numpy array with a block shape for it: dims of 0..7, blocks of 1..dim+1 (ragged edges)."""
    if shape is None:
        ndim = draw(st.integers(0, max_ndim))
        shape = tuple(draw(st.integers(0, 7)) for _ in range(ndim))
    blocks = tuple(draw(st.integers(1, max(n, 1) + 1)) for n in shape)
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if dtype.kind == "b":
        x = rng.integers(0, 2, shape).astype(bool)
    elif dtype.kind in "iu":
        x = rng.integers(0, 4, shape).astype(dtype)  # few values: many ties for argmax
    elif dtype.kind == "c":
        x = (rng.integers(-3, 4, shape) + 1j * rng.integers(-3, 4, shape)).astype(dtype)
    else:
        x = rng.integers(-3, 4, shape).astype(dtype) / 2
        if nan and x.size and draw(st.booleans()):
            x.flat[draw(st.integers(0, x.size - 1))] = np.nan
    return x, blocks


def _same(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    np.testing.assert_array_equal(got, want)


BINARY = [np.add, np.subtract, np.multiply, np.maximum, np.equal, np.less]


def hypothesis_check(body, examples):
    """``body(data)`` as a hypothesis test of ``examples`` examples, to call inside a cluster."""
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])(given(data=st.data())(body))


def on_clusters(in_process, on_processes):
    """Runs a test taking (``options``, ``examples``) on a cluster in this process and on
    one of two worker processes, with ``in_process`` and ``on_processes`` examples."""
    return pytest.mark.parametrize(("options", "examples"),
                                   [({"threads": 2}, in_process), ({"processes": 2, "threads": 1}, on_processes)],
                                   ids=["in-process", "worker-processes"])


def elementwise_case(data):
    x, xb = data.draw(arrays(dtypes=[d for d in DTYPES if d is not np.bool_]))
    # a second operand broadcastable against x: a trailing part of its shape, some axes 1
    tail = x.shape[data.draw(st.integers(0, x.ndim)):]
    yshape = tuple(1 if data.draw(st.booleans()) else n for n in tail)
    y, yb = data.draw(arrays(shape=yshape, dtypes=[x.dtype.type]))
    ufunc = data.draw(st.sampled_from(BINARY))
    a, b = dagger.array.distribute(x, xb), dagger.array.distribute(y, yb)
    kind = data.draw(st.sampled_from(["darray", "numpy", "scalar", "reflected"]))
    if kind == "darray":
        got, want = ufunc(a, b), ufunc(x, y)
    elif kind == "numpy":
        got, want = ufunc(a, y), ufunc(x, y)
    elif kind == "scalar":
        got, want = ufunc(a, 2), ufunc(x, 2)
    else:
        got, want = ufunc(y, a), ufunc(y, x)
    assert isinstance(got, DArray) and got.shape == want.shape
    _same(got.fetch(timeout=30), want)


def test_elementwise_matches_numpy_in_process():
    with dagger.Cluster(threads=2):
        hypothesis_check(elementwise_case, 80)()


def test_elementwise_matches_numpy_on_worker_processes():
    with dagger.Cluster(processes=2, threads=1):
        hypothesis_check(elementwise_case, 15)()


REDUCTIONS = ["sum", "prod", "min", "max", "mean", "var", "std", "any", "all"]


def reduction_case(data):
    x, blocks = data.draw(arrays())
    kind = data.draw(st.sampled_from(REDUCTIONS))
    axis = data.draw(st.one_of(st.none(), st.sampled_from(range(-x.ndim, x.ndim)) if x.ndim else st.none(),
                               st.sets(st.integers(0, max(x.ndim - 1, 0)), max_size=x.ndim).map(tuple)))
    keepdims = data.draw(st.booleans())
    a = dagger.array.distribute(x, blocks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy's warnings for empty means (nan)
        try:
            want = getattr(x, kind)(axis=axis, keepdims=keepdims)
        except ValueError as exc:  # an empty min/max: the same error, at once
            with pytest.raises(ValueError, match=str(exc)):
                getattr(a, kind)(axis=axis, keepdims=keepdims)
            return
        got = np.asarray(getattr(a, kind)(axis=axis, keepdims=keepdims).fetch(timeout=30))
    want = np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype
    if x.dtype.kind in "biu" and kind not in ("mean", "var", "std"):
        np.testing.assert_array_equal(got, want)
    else:
        rtol = 1e-3 if x.dtype == np.float32 else 1e-9
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol, equal_nan=True)


def arg_reduction_case(data):
    x, blocks = data.draw(arrays(dtypes=[np.int8, np.float64, np.float32], nan=True))
    if x.size == 0:
        return
    kind = data.draw(st.sampled_from(["argmax", "argmin"]))
    axis = data.draw(st.none() | st.integers(-x.ndim, x.ndim - 1)) if x.ndim else None
    if axis is not None and x.shape[axis] == 0:
        return
    keepdims = data.draw(st.booleans())
    got = getattr(dagger.array.distribute(x, blocks), kind)(axis=axis, keepdims=keepdims).fetch(timeout=30)
    _same(got, getattr(x, kind)(axis=axis, keepdims=keepdims))


def test_reductions_match_numpy():
    with dagger.Cluster(threads=2):
        hypothesis_check(reduction_case, 120)()
        hypothesis_check(arg_reduction_case, 80)()


def test_reductions_on_worker_processes():
    with dagger.Cluster(processes=2, threads=1):
        hypothesis_check(reduction_case, 20)()
        hypothesis_check(arg_reduction_case, 15)()


# -- making arrays -------------------------------------------------------------------------
async def test_made_on_the_workers_and_spread_over_them():
    async with dagger.Cluster(processes=2, threads=1) as c:
        workers = {w.id for w in c.workers if w.id != 0}
        a = dagger.array.ones((1024, 1024), (512, 512))  # blocks of 2 MiB
        await dagger.wait(list(a._blocks.flat))  # made, and left where they are
        held = [t._where for t in a._blocks.flat]
        assert all(len(h) == 1 for h in held)
        assert set().union(*held) == workers  # round-robin over both
        b = -a  # each block computed where its input lives: nothing moves
        await dagger.wait(list(b._blocks.flat))
        assert [t._where for t in b._blocks.flat] == held
        assert float(await b.sum()) == -1024.0 * 1024


async def test_creation_functions(cluster):
    assert (await dagger.array.ones((3, 5), (2, 2), dtype=np.int16)).tolist() == [[1] * 5] * 3
    full = await dagger.array.full((2, 3), (1, 2), 7.5)
    assert full.dtype == np.float64 and (full == 7.5).all()
    r1 = await dagger.array.rand((9, 7), (4, 3), seed=3)
    r2 = await dagger.array.rand((9, 7), (4, 3), seed=3)
    assert (r1 == r2).all() and 0 <= r1.min() and r1.max() < 1 and len(np.unique(r1)) == 63
    n = await dagger.array.randn((300,), (70,), dtype=np.float32, seed=1)
    assert n.dtype == np.float32 and abs(n.mean()) < 0.3
    f = await dagger.array.fromfunction(lambda i, j: i * 10 + j, (4, 6), (3, 4), dtype=int)
    assert (f == np.fromfunction(lambda i, j: i * 10 + j, (4, 6), dtype=int)).all()
    a = dagger.array.distribute(np.arange(10), 3)
    assert (a.shape, a.blocks, a.chunks, a.ndim, a.nbytes, a.dtype) == ((10,), (3,), ((3, 3, 3, 1),), 1, 80,
                                                                         np.dtype(int))


async def test_the_input_is_copied_and_transpose(cluster):
    x = np.arange(12.0).reshape(3, 4)
    a = dagger.array.distribute(x, (2, 3))
    x[:] = -1
    assert (await a).tolist() == np.arange(12.0).reshape(3, 4).tolist()
    assert (await a.T).tolist() == np.arange(12.0).reshape(3, 4).T.tolist()
    assert (await np.transpose(a)).shape == (4, 3)
    cube = np.arange(24).reshape(2, 3, 4)
    assert (await dagger.array.distribute(cube, (1, 2, 3)).transpose(1, 2, 0) == cube.transpose(1, 2, 0)).all()
    assert float(await np.sum(a)) == 66.0


async def test_map_blocks(cluster):
    a = dagger.array.distribute(np.arange(10.0), 4)
    assert (await a.map_blocks(np.sqrt)).tolist() == np.sqrt(np.arange(10.0)).tolist()
    assert (await dagger.array.map_blocks(np.add, a, a, dtype=float)).tolist() == (2 * np.arange(10.0)).tolist()
    with pytest.raises(ValueError, match="different block grids"):
        dagger.array.map_blocks(np.add, a, dagger.array.distribute(np.arange(10.0), 5))


def test_sync_use_and_asarray():
    with dagger.Cluster(threads=2):
        a = dagger.array.distribute(np.eye(3), (2, 2))
        assert np.asarray(a).tolist() == np.eye(3).tolist()
        assert (a + 1).fetch(timeout=30).sum() == 12


# -- bad input -----------------------------------------------------------------------------
async def test_bad_input_raises_at_once_with_numpys_words(cluster):
    a = dagger.array.distribute(np.ones((3, 4)), (2, 2))
    with pytest.raises(ValueError, match="could not be broadcast|cannot be broadcast"):
        a + dagger.array.distribute(np.ones(5), 2)
    with pytest.raises(ValueError, match="at least 1"):
        dagger.array.zeros((4,), (0,))
    with pytest.raises(ValueError, match="at least 1"):
        dagger.array.distribute(np.ones(4), (-2,))
    with pytest.raises(ValueError, match="one block length per dimension"):
        dagger.array.distribute(np.ones((2, 2)), (2,))
    with pytest.raises(np.exceptions.AxisError, match="out of bounds"):
        a.sum(axis=2)
    with pytest.raises(ValueError, match="zero-size array"):
        dagger.array.distribute(np.ones((0, 3)), (1, 1)).max(axis=0)
    with pytest.raises(TypeError, match="not written in place"):
        np.add(a, 1, out=np.empty((3, 4)))
    with pytest.raises(TypeError, match="float32 or float64"):
        dagger.array.rand((3,), (1,), dtype=np.int32)


async def test_argmax_ties_go_to_the_first_in_flat_order_not_in_block_order(cluster):
    x = np.array([[0, 0, 3], [3, 0, 0]])
    a = dagger.array.distribute(x, (2, 2))  # block (0, 0) holds the later 3
    assert await a.argmax() == x.argmax() == 2
    y = np.array([[0.0, 0.0, np.nan], [np.nan, 0.0, 0.0]])
    assert await dagger.array.distribute(y, (2, 2)).argmin() == y.argmin() == 2


async def test_fromfunction_takes_the_dtype_the_function_makes(cluster):
    f = dagger.array.fromfunction(lambda i, j: (i + j) / 2, (3, 4), (2, 2), dtype=int)
    want = np.fromfunction(lambda i, j: (i + j) / 2, (3, 4), dtype=int)
    assert f.dtype == want.dtype == np.float64
    assert (await f).tolist() == want.tolist()

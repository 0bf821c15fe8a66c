"""dagger.array's tiled linear algebra (datadeps regions over tiles) against numpy/scipy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from hypothesis import strategies as st

import aiodagger as dagger
from tests.test_array import hypothesis_check


@st.composite
def matrices(draw, kind="spd"):
    n = draw(st.integers(1, 12))
    tile = draw(st.integers(1, n + 1))
    dtype = draw(st.sampled_from([np.float64, np.complex128, np.float32, np.complex64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    m = rng.standard_normal((n, n))
    if np.dtype(dtype).kind == "c":
        m = m + 1j * rng.standard_normal((n, n))
    if kind == "spd":
        m = m @ m.conj().T + n * np.eye(n)
    else:
        m = m + n * np.eye(n) * draw(st.sampled_from([0.0, 1.0]))  # some need pivoting
    return m.astype(dtype), tile


def _tol(dtype):
    return {"rtol": 1e-3, "atol": 1e-3} if np.dtype(dtype) in (np.float32, np.complex64) else {"rtol": 1e-7, "atol": 1e-8}


def cholesky_case(data):
    x, tile = data.draw(matrices("spd"))
    a = dagger.array.distribute(x, (tile, tile))
    got = dagger.array.cholesky(a).fetch(timeout=60)
    want = np.linalg.cholesky(x)
    assert got.dtype == want.dtype
    np.testing.assert_allclose(got, want, **_tol(x.dtype))
    np.testing.assert_array_equal(a.fetch(timeout=60), x)  # the input is left as it was


def lu_case(data):
    x, tile = data.draw(matrices("general"))
    if abs(np.linalg.det(x.astype(np.complex128))) < 1e-6:
        return
    p, l_, u = (m.fetch(timeout=60) for m in dagger.array.linalg.lu(dagger.array.distribute(x, (tile, tile))))
    np.testing.assert_allclose(p @ l_ @ u, x, **_tol(x.dtype))
    assert np.allclose(np.tril(l_), l_) and np.allclose(np.diag(l_), 1) and np.allclose(np.triu(u), u)
    assert sorted(np.abs(p).sum(axis=0).tolist()) == [1] * len(x)  # a permutation
    # partial pivoting, as LAPACK's getrf: |l| <= 1 (complex: it pivots on |re| + |im|)
    assert np.all(np.abs(l_) <= (np.sqrt(2) if np.iscomplexobj(x) else 1) + 1e-6)


def solve_case(data):
    kind = data.draw(st.sampled_from(["spd", "general"]))
    x, tile = data.draw(matrices(kind))
    if abs(np.linalg.det(x.astype(np.complex128))) < 1e-6:
        return
    rng = np.random.default_rng(0)
    b = rng.standard_normal((len(x), data.draw(st.integers(1, 3)))) if data.draw(st.booleans()) \
        else rng.standard_normal(len(x))
    b_tile = tuple(data.draw(st.integers(1, max(n, 1) + 1)) for n in b.shape)
    got = dagger.array.solve(dagger.array.distribute(x, (tile, tile)), dagger.array.distribute(b, b_tile),
                             assume_a="pos" if kind == "spd" else "gen").fetch(timeout=60)
    want = np.linalg.solve(x, b)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, **_tol(x.dtype))


def test_linear_algebra_matches_numpy_in_process():
    with dagger.Cluster(threads=2):
        hypothesis_check(cholesky_case, 40)()
        hypothesis_check(lu_case, 40)()
        hypothesis_check(solve_case, 40)()


def test_linear_algebra_on_worker_processes():
    with dagger.Cluster(processes=2, threads=1):
        hypothesis_check(cholesky_case, 6)()
        hypothesis_check(lu_case, 6)()
        hypothesis_check(solve_case, 6)()


async def test_tiles_spread_over_the_workers_and_results_stay_there():
    async with dagger.Cluster(processes=2, threads=1) as c:
        x = np.eye(8) * 4 + 1
        factor = dagger.array.cholesky(dagger.array.distribute(x, (2, 2)))
        await dagger.wait(list(factor._blocks.flat), timeout=60)
        held = set().union(*(t._where for t in factor._blocks.flat if t._where))
        assert held == {w.id for w in c.workers if w.id != 0}
        np.testing.assert_allclose(await factor, np.linalg.cholesky(x))


async def test_errors(cluster):
    with pytest.raises(np.linalg.LinAlgError, match="square"):
        dagger.array.cholesky(dagger.array.distribute(np.ones((3, 4)), (2, 2)))
    with pytest.raises(np.linalg.LinAlgError, match="two-dimensional"):
        dagger.array.cholesky(dagger.array.distribute(np.ones(3), 2))
    with pytest.raises(np.linalg.LinAlgError, match="not positive definite"):
        await dagger.array.cholesky(dagger.array.distribute(-np.eye(4), (2, 2)))
    singular = np.array([[1.0, 2.0], [2.0, 4.0]])
    with pytest.raises(np.linalg.LinAlgError, match="Singular"):
        await dagger.array.solve(singular, np.ones(2))
    with pytest.raises(ValueError, match="must have 3 rows"):
        dagger.array.solve(np.eye(3), np.ones(4))
    with pytest.raises(ValueError, match="assume_a"):
        dagger.array.solve(np.eye(3), np.ones(3), assume_a="sym")


async def test_numpy_inputs_and_the_linalg_namespace(cluster):
    x = np.array([[4.0, 2.0], [2.0, 3.0]])
    np.testing.assert_allclose(await dagger.array.linalg.cholesky(x), np.linalg.cholesky(x))
    p, l_, u = scipy.linalg.lu(x)
    got = [await m for m in dagger.array.lu(x)]
    np.testing.assert_allclose(got[0] @ got[1] @ got[2], x)
    np.testing.assert_allclose(await dagger.array.solve(x, [1.0, 2.0]), np.linalg.solve(x, [1.0, 2.0]))

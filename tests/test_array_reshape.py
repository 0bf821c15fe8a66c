"""dagger.array rechunk and reshape: numpy's values and errors, from any block grid."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import strategies as st

import aiodagger as dagger
from aiodagger.array import DArray
from tests.test_array import _same, arrays, hypothesis_check, on_clusters


def rechunk_case(data):
    x, blocks = data.draw(arrays(max_ndim=3))
    new = tuple(data.draw(st.integers(1, max(n, 1) + 1)) for n in x.shape)
    a = dagger.array.distribute(x, blocks).rechunk(new)
    assert a.chunks == dagger.array.distribute(x, new).chunks
    _same(a.fetch(timeout=30), x)


@st.composite
def shapes_of_size(draw, size):
    """A shape with ``size`` elements, of up to 4 axes, sizes 1 included."""
    ndim = draw(st.integers(0 if size == 1 else 1, 4))
    if size == 0:
        shape = [draw(st.integers(0, 4)) for _ in range(ndim)]
        shape[draw(st.integers(0, ndim - 1))] = 0
        return tuple(shape)
    shape, rest = [], size
    for _ in range(ndim - 1):
        n = draw(st.sampled_from([d for d in range(1, rest + 1) if rest % d == 0]))
        shape.append(n)
        rest //= n
    return tuple(draw(st.permutations([*shape, rest]))) if ndim else ()


def reshape_case(data):
    x, blocks = data.draw(arrays(max_ndim=3))
    shape = data.draw(shapes_of_size(x.size))
    if shape and x.size and data.draw(st.booleans()):
        unknown = data.draw(st.integers(0, len(shape) - 1))
        shape = tuple(-1 if i == unknown else n for i, n in enumerate(shape))
    a = dagger.array.distribute(x, blocks)
    got = a.reshape(shape) if data.draw(st.booleans()) else np.reshape(a, shape)
    assert isinstance(got, DArray)
    _same(got.fetch(timeout=30), x.reshape(shape))


@on_clusters(100, 15)
def test_rechunk_matches_numpy(options, examples):
    with dagger.Cluster(**options):
        hypothesis_check(rechunk_case, examples)()


@on_clusters(200, 20)
def test_reshape_matches_numpy(options, examples):
    with dagger.Cluster(**options):
        hypothesis_check(reshape_case, examples)()


async def test_reshape_keeps_blocks_that_line_up_and_rechunks_the_others(cluster):
    x = np.arange(24 * 5).reshape(24, 5)
    a = dagger.array.distribute(x, (6, 5))  # only the first axis cut
    flat = a.reshape(-1)
    assert flat.chunks == ((30, 30, 30, 30),)
    assert a.reshape(4, 6, 5).chunks == ((1, 1, 1, 1), (6,), (5,))
    assert a.reshape(2, 12, 1, 5).chunks == ((1, 1), (12,), (1,), (5,))  # blocks of 6 rows are not 12: rechunked
    back = flat.reshape(24, 5)
    assert back.chunks == ((6, 6, 6, 6), (5,))
    cut = dagger.array.distribute(x, (5, 2))  # the second axis cut: made whole first
    assert cut.reshape(-1).chunks == ((25, 25, 25, 25, 20),)
    assert (await cut.reshape(12, 10) == x.reshape(12, 10)).all()
    assert np.shape(a) == (24, 5) and np.ndim(a) == 2 and np.size(a) == 120


async def test_rechunk_keeps_the_blocks_it_can(cluster):
    a = dagger.array.distribute(np.arange(10), 4)
    assert a.rechunk(4) is a
    b = a.rechunk(8)
    assert b._blocks[1] is a._blocks[2] and b.chunks == ((8, 2),)
    assert (await b == np.arange(10)).all()


async def test_bad_reshape_and_rechunk_raise_at_once(cluster):
    x = np.arange(12).reshape(3, 4)
    a = dagger.array.distribute(x, (2, 2))
    for shape in [(5,), (-1, 5), (-1, -1), (4, 4)]:
        with pytest.raises(ValueError) as expected:
            x.reshape(shape)
        with pytest.raises(ValueError) as got:
            a.reshape(shape)
        assert str(got.value) == str(expected.value)
    with pytest.raises(ValueError, match="C order only"):
        a.reshape(12, order="F")
    with pytest.raises(ValueError, match="never views"):
        np.reshape(a, 12, copy=False)
    with pytest.raises(ValueError, match="at least 1"):
        a.rechunk((0, 2))
    with pytest.raises(ValueError, match="one block length per dimension"):
        a.rechunk((2,))

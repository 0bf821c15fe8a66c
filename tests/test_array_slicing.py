"""dagger.array basic indexing: numpy's results and errors; blocks follow the input's."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import strategies as st

import aiodagger as dagger
from aiodagger.array import DArray
from tests.test_array import _same, arrays, hypothesis_check, on_clusters


@st.composite
def basic_keys(draw, shape):
    """A basic index for ``shape``: ints, slices (any steps, bounds past the ends), with
    ``...`` in place of some axes and None inserted anywhere; a bare item sometimes."""
    items = []
    for n in shape:
        if n and draw(st.integers(0, 3)) == 0:
            items.append(draw(st.integers(-n, n - 1)))
        else:
            bound = st.none() | st.integers(-n - 2, n + 2)
            step = st.none() | st.integers(-3, 3).filter(bool)
            items.append(slice(draw(bound), draw(bound), draw(step)))
    if draw(st.booleans()):  # an ellipsis for a run of axes
        lo = draw(st.integers(0, len(items)))
        hi = draw(st.integers(lo, len(items)))
        items[lo:hi] = [Ellipsis]
    elif items and draw(st.booleans()):  # leave out trailing axes
        items = items[:draw(st.integers(0, len(items)))]
    for _ in range(draw(st.integers(0, 2))):
        items.insert(draw(st.integers(0, len(items))), None)
    if len(items) == 1 and draw(st.booleans()):
        return items[0]
    return tuple(items)


def slicing_case(data):
    x, blocks = data.draw(arrays(max_ndim=3))
    key = data.draw(basic_keys(x.shape))
    a = dagger.array.distribute(x, blocks)
    got = a[key]
    want = x[key]
    assert isinstance(got, DArray) and got.shape == np.shape(want)
    _same(got.fetch(timeout=30), want)
    again = data.draw(basic_keys(np.shape(want)))  # a slice of a slice
    _same(got[again].fetch(timeout=30), np.asarray(want)[again])


@on_clusters(200, 20)
def test_slicing_matches_numpy(options, examples):
    with dagger.Cluster(**options):
        hypothesis_check(slicing_case, examples)()


async def test_output_blocks_follow_the_inputs(cluster):
    x = np.arange(100).reshape(10, 10)
    a = dagger.array.distribute(x, (4, 3))  # chunks (4, 4, 2), (3, 3, 3, 1)
    part = a[1:9, ::2]
    assert part.chunks == ((3, 4, 1), (2, 1, 2))
    assert (await part == x[1:9, ::2]).all()
    assert a[:, 3:6]._blocks[0, 0] is a._blocks[0, 1]  # a whole block: no new task
    assert a[::-1].chunks == ((2, 4, 4), (3, 3, 3, 1))
    assert a[5, None, ...].chunks == ((1,), (3, 3, 3, 1))
    assert await a[-1, -1] == 99
    assert (await a[np.int64(2)] == x[2]).all()


async def test_bad_indices_raise_numpys_error_at_once(cluster):
    x = np.arange(12).reshape(3, 4)
    a = dagger.array.distribute(x, (2, 2))
    for key in [3, (0, -5), (slice(None), 4), (0, 0, 0), (..., 0, ...)]:
        with pytest.raises(IndexError) as expected:
            x[key]
        with pytest.raises(IndexError) as got:
            a[key]
        assert str(got.value) == str(expected.value)
    with pytest.raises(ValueError, match="slice step cannot be zero"):
        a[::0]
    for key in [[0, 1], np.array([0, 2]), x > 3, a > 3, True, (0, [1, 2]), "name", 1.5]:
        with pytest.raises(TypeError, match="basic indexing.*fancy and boolean indexing are not supported"):
            a[key]

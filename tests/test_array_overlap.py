"""dagger.array map_overlap: stencils give what numpy gives on the whole padded array."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import strategies as st

import aiodagger as dagger
from tests.test_array import _same, arrays, hypothesis_check, on_clusters

PAD_MODES = {"reflect": {"mode": "symmetric"}, "periodic": {"mode": "wrap"}, "nearest": {"mode": "edge"},
             7: {"mode": "constant", "constant_values": 7}}


def weighted_stencil(extended, depths):
    """Each cell whose whole neighbourhood is in ``extended``: the sum of its neighbours
    within ``depths``, each with its own weight (so that a halo flipped, shifted or from
    the wrong block shows); the other cells 0."""
    out = np.zeros(extended.shape, dtype=np.int64)
    core = tuple(slice(d, n - d) for d, n in zip(depths, extended.shape, strict=True))
    if any(s.stop <= s.start for s in core):
        return out
    for weight, offsets in enumerate(itertools.product(*(range(-d, d + 1) for d in depths)), start=1):
        shifted = tuple(slice(s.start + o, s.stop + o) for s, o in zip(core, offsets, strict=True))
        out[core] += weight * extended[shifted]
    return out


def reference(x, depths, boundary):
    if boundary == "none" or x.ndim == 0:  # no halo at the outer edges: the stencil on the whole array
        return weighted_stencil(x, depths)
    padded = np.pad(x, [(d, d) for d in depths], **PAD_MODES[boundary])
    return weighted_stencil(padded, depths)[tuple(slice(d, d + n) for d, n in zip(depths, x.shape, strict=True))]


def overlap_case(data):
    x, blocks = data.draw(arrays(max_ndim=3, dtypes=[np.int64, np.int16]))
    if data.draw(st.booleans()):
        depth = data.draw(st.integers(0, 3))
        depths = (depth,) * x.ndim
    else:  # per axis, often deeper than the blocks next to it
        depth = depths = tuple(data.draw(st.integers(0, 5)) for _ in x.shape)
    boundary = data.draw(st.sampled_from(["reflect", "periodic", "nearest", "none", 7]))
    a = dagger.array.distribute(x, blocks)
    if boundary not in ("none", 7) and any(n == 0 and d for n, d in zip(x.shape, depths, strict=True)):
        with pytest.raises(ValueError, match="cannot extend the empty axis"):
            dagger.array.map_overlap(weighted_stencil, a, depth=depth, boundary=boundary, depths=depths)
        return
    got = dagger.array.map_overlap(weighted_stencil, a, depth=depth, boundary=boundary, depths=depths)
    assert got.chunks == a.chunks
    _same(got.fetch(timeout=30), reference(x, depths, boundary))


@on_clusters(200, 20)
def test_map_overlap_matches_numpy_pad(options, examples):
    with dagger.Cluster(**options):
        hypothesis_check(overlap_case, examples)()


def laplacian(x):
    """The 5-point Laplacian of the inner cells (the outer ring is 0)."""
    out = np.zeros_like(x)
    out[1:-1, 1:-1] = x[:-2, 1:-1] + x[2:, 1:-1] + x[1:-1, :-2] + x[1:-1, 2:] - 4 * x[1:-1, 1:-1]
    return out


async def test_laplacian_on_ragged_blocks(cluster):
    x = np.random.default_rng(0).standard_normal((23, 17))
    a = dagger.array.distribute(x, (5, 4))
    for boundary, pad in [("periodic", {"mode": "wrap"}), ("nearest", {"mode": "edge"}), (0.0, {"mode": "constant"})]:
        got = await dagger.array.map_overlap(laplacian, a, depth=1, boundary=boundary)
        np.testing.assert_allclose(got, laplacian(np.pad(x, 1, **pad))[1:-1, 1:-1], rtol=1e-12, atol=1e-12)
    got = await a.map_overlap(laplacian, depth=1)  # boundary "none": the outer ring stays 0
    np.testing.assert_allclose(got, laplacian(x), rtol=1e-12, atol=1e-12)


async def test_only_the_halo_moves(cluster):
    a = dagger.array.distribute(np.arange(40.0).reshape(8, 5), (4, 5))
    out = dagger.array.map_overlap(lambda e: e * 2, a, depth=1, boundary="none")
    assert (await out == 2 * np.arange(40.0).reshape(8, 5)).all()
    # each block takes its own block whole and one row cut from its neighbour
    from aiodagger.array import overlap

    segments, trims = overlap._segments((4, 4), 0, 1, "none")
    assert segments == [("copy", 0, slice(0, 4), 4), ("copy", 1, slice(0, 1), 1)] and trims == (0, 1)


async def test_bad_arguments_raise_at_once(cluster):
    a = dagger.array.distribute(np.ones((4, 4)), (2, 2))
    with pytest.raises(ValueError, match="boundary is one of 'reflect', 'periodic', 'nearest', 'none' or a number"):
        dagger.array.map_overlap(laplacian, a, depth=1, boundary="mirror")
    with pytest.raises(ValueError, match="depths are ints >= 0"):
        dagger.array.map_overlap(laplacian, a, depth=-1)
    with pytest.raises(ValueError, match="one depth per axis"):
        dagger.array.map_overlap(laplacian, a, depth=(1, 1, 1))
    with pytest.raises(ValueError, match="must keep the shape"):
        dagger.array.map_overlap(lambda e: e[1:], a, depth=1)
    with pytest.raises(TypeError, match="pass dtype="):
        dagger.array.map_overlap(lambda e: e.reshape(-1, 7), a, depth=1)
    with pytest.raises(TypeError, match="takes a DArray"):
        dagger.array.map_overlap(laplacian, np.ones((4, 4)), depth=1)

"""Exact aliasing of task arguments: views conflict only when they share a byte."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from aiodagger.aliasing import footprint, overlaps


def _bytes_of(view: np.ndarray) -> set[int]:
    """Every byte address the view covers, the slow and obvious way."""
    if view.size == 0:
        return set()
    start = view.__array_interface__["data"][0]
    offsets = np.zeros(view.shape, dtype=np.int64)
    for axis, (n, stride) in enumerate(zip(view.shape, view.strides, strict=True)):
        shape = [1] * view.ndim
        shape[axis] = n
        offsets = offsets + (np.arange(n) * stride).reshape(shape)
    firsts = start + offsets.ravel()
    return {int(f) + k for f in firsts for k in range(view.itemsize)}


def test_the_cases_bounding_boxes_get_wrong():
    a = np.zeros((6, 8))
    assert not overlaps(footprint(a[:, 0]), footprint(a[:, 1]))  # disjoint columns
    assert not overlaps(footprint(a[:, ::2]), footprint(a[:, 1::2]))  # interleaved strides
    assert overlaps(footprint(a[1:4]), footprint(a[3:6]))  # overlapping slices
    assert overlaps(footprint(a), footprint(a[2:3, 5:6]))  # a view and its base
    assert overlaps(footprint(a.reshape(8, 6)[0]), footprint(a[0]))  # one buffer, two shapes
    assert overlaps(footprint(a.T), footprint(a[:, 3]))
    assert not overlaps(footprint(a), footprint(np.zeros((6, 8))))  # equal, not the same
    assert not overlaps(footprint(a[:0]), footprint(a))  # no byte: no conflict


def test_other_objects_alias_by_identity():
    x, y = [1, 2], [1, 2]
    assert overlaps(footprint(x), footprint(x))
    assert not overlaps(footprint(x), footprint(y))
    assert not overlaps(footprint(x), footprint(np.zeros(2)))


BASES = [np.zeros((6, 8)), np.zeros(24, dtype=np.int32), np.zeros((4, 3, 5), dtype=np.int16)]


@st.composite
def views(draw, base_index):
    view = BASES[base_index]
    if draw(st.booleans()):
        view = view.reshape(-1)
        size = view.shape[0]
        for cut in (2, 3, 4):
            if size % cut == 0 and draw(st.booleans()):
                view = view.reshape(cut, -1)
                break
    index = []
    for n in view.shape:
        start = draw(st.integers(0, n))
        stop = draw(st.integers(start, n))
        step = draw(st.integers(1, 3))
        index.append(slice(start, stop, step))
    view = view[tuple(index)]
    if view.ndim > 1 and draw(st.booleans()):
        view = view.T
    return view


@settings(max_examples=400, deadline=None)
@given(data=st.data(), first=st.integers(0, len(BASES) - 1), same=st.booleans())
def test_overlap_is_exactly_a_shared_byte(data, first, same):
    second = first if same else data.draw(st.integers(0, len(BASES) - 1))
    a = data.draw(views(first))
    b = data.draw(views(second))
    assert overlaps(footprint(a), footprint(b)) == bool(_bytes_of(a) & _bytes_of(b))

"""``a.reshape(shape)`` for DArrays, in C order, as numpy's, one task per output block.

A reshape maps groups of input axes onto groups of output axes with the same number of
elements: (6, 4) -> (24,) merges both axes into one; (24,) -> (2, 3, 4) splits one;
(4, 6) -> (3, 8) does both. Size-1 axes belong to no group. Each output block is one
input block reshaped when, in every group, only the first input axis is cut in
blocks and each of its blocks holds a whole number of rows of the output group
(a block's element count is a multiple of the product of the group's trailing output
axes). The output's first axis of the group then takes one block per input block,
the others are whole.

Where the blocks do not line up, the input is rechunked first, automatically and only
along the axes of the groups concerned: their trailing input axes become one block,
and the first gets the smallest blocks that hold whole output rows. This can make
much larger blocks (reshaping (n, m) with blocks (b, c) to (n * m,) makes blocks of
(b, m)); ``rechunk`` first to choose them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import grid
from .core import DArray, block_task, new_block, on_gpu, operation
from .rechunk import rechunk_to

__all__ = ["reshape"]


@operation("reshape")
def reshape(arr: DArray, shape: Any, order: str = "C") -> DArray:
    if order != "C":
        raise ValueError(f"reshape(order={order!r}): a DArray is reshaped in C order only (order='C')")
    # numpy's errors and its reading of -1, from a stand-in that holds no data
    shape = np.broadcast_to(np.int8(0), arr.shape).reshape(shape).shape
    if shape == arr.shape:
        return arr
    if arr.size == 0:
        blocks = np.empty((1,) * len(shape), dtype=object)
        blocks[(0,) * len(shape)] = block_task(new_block, "zeros", shape, arr.dtype, on_gpu(), name="reshape")
        return DArray(blocks, tuple((n,) for n in shape), arr.dtype)

    in_chunks: list[tuple[int, ...]] = [(1,)] * arr.ndim
    out_chunks: list[tuple[int, ...]] = [(1,)] * len(shape)
    leads: dict[int, int] = {}  # the first output axis of each group: the input axis it follows
    for ins, outs in _groups(arr.shape, shape):
        rest_in = math.prod(arr.shape[a] for a in ins[1:])
        rest_out = math.prod(shape[a] for a in outs[1:])
        first = arr.chunks[ins[0]]
        if any(c * rest_in % rest_out for c in first):
            step = rest_out // math.gcd(rest_out, rest_in)
            first = grid.chunks_of((arr.shape[ins[0]],), (-(-max(first) // step) * step,))[0]
        in_chunks[ins[0]] = first
        for a in ins[1:]:
            in_chunks[a] = (arr.shape[a],)
        out_chunks[outs[0]] = tuple(c * rest_in // rest_out for c in first)
        for a in outs[1:]:
            out_chunks[a] = (shape[a],)
        leads[outs[0]] = ins[0]
    arr = rechunk_to(arr, tuple(in_chunks))

    chunks = tuple(out_chunks)
    blocks = np.empty(tuple(len(c) for c in chunks), dtype=object)
    for index in grid.indices(chunks):
        source = [0] * arr.ndim
        for out_axis, in_axis in leads.items():
            source[in_axis] = index[out_axis]
        block_shape = tuple(c[i] for c, i in zip(chunks, index, strict=True))
        blocks[index] = block_task(_reshape_block, arr._blocks[tuple(source)], block_shape, name="reshape")
    return DArray(blocks, chunks, arr.dtype)


def _reshape_block(block: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return block.reshape(shape)


def _groups(before: tuple[int, ...], after: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """The smallest runs of axes of ``before`` and ``after`` (sizes above 1 only) with
    equal numbers of elements, in order: (input axes, output axes) for each."""
    ins = [a for a, n in enumerate(before) if n != 1]
    outs = [a for a, n in enumerate(after) if n != 1]
    groups = []
    i = j = 0
    while i < len(ins):
        group_in, group_out = [ins[i]], [outs[j]]
        size_in, size_out = before[ins[i]], after[outs[j]]
        i, j = i + 1, j + 1
        while size_in != size_out:
            if size_in < size_out:
                group_in.append(ins[i])
                size_in *= before[ins[i]]
                i += 1
            else:
                group_out.append(outs[j])
                size_out *= after[outs[j]]
                j += 1
        groups.append((group_in, group_out))
    return groups

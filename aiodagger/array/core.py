"""DArray: an n-dimensional array cut into numpy blocks, each the value of a task.

Operations spawn one task per output block and return a new DArray at once; the blocks
are computed on the workers (where their inputs live, as the scheduler places them)
and stay there until ``collect()`` / ``fetch()`` / ``np.asarray`` brings the whole array
to the caller. Nothing of a block passes through the caller before that.

Under a GPU scope (``with dagger.options(scope=dagger.scope(gpu=True)):``) the blocks
are made and kept on GPU processors, as cupy arrays: the functions the tasks run take
their array module from their blocks (``array_module``), and a block made from nothing
(``zeros``, ``rand``...) is told at spawn time whether its task goes to a GPU.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import numpy as np
from numpy.lib.array_utils import normalize_axis_tuple

from ..errors import UpstreamError
from ..gpu.arrays import array_module, cupy_module, to_host
from ..task import DTask
from ..taskoptions import Scope, current_options
from . import grid
from .grid import Chunks

__all__ = ["DArray", "block_task", "broadcast_region", "join_grid", "new_block", "new_block_module", "on_gpu",
           "operation", "pin", "placement", "region_of"]


# The operations, by name: their modules (elementwise, reductions, slicing...) register
# them when the package is imported, so that this module, which they all build on,
# imports none of them.
_operations: dict[str, Callable[..., Any]] = {}


def operation(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` as the operation DArray's methods call ``name``."""
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        _operations[name] = fn
        return fn
    return register


def _scheduler() -> Any:
    from ..cluster import current_cluster

    return current_cluster()._scheduler


def pin(scope: Scope, worker: int) -> Scope:
    """``scope`` narrowed to ``worker`` (:meth:`Scope.on_worker`)."""
    return scope.on_worker(worker)


def on_gpu() -> bool:
    """Whether tasks spawned now go to GPU processors (the scope in effect asks for one)."""
    return current_options().scope.wants_gpu


def new_block_module(gpu: bool) -> Any:
    """The array module for a block a task makes from nothing: cupy where the task was
    spawned for a GPU (``gpu``, from :func:`on_gpu` at spawn time; such a task has no
    input block to take its module from), else numpy."""
    if not gpu:
        return np
    cupy = cupy_module()
    if cupy is None:
        raise RuntimeError("making a block on a GPU needs cupy: pip install 'aiodagger[gpu]'")
    return cupy


def new_block(kind: str, shape: tuple[int, ...], dtype: Any, gpu: bool, fill_value: Any = None) -> Any:
    """A block of ``xp.zeros``, ``xp.ones`` or ``xp.full`` (``kind``), for a task spawned
    with ``gpu=on_gpu()``."""
    xp = new_block_module(gpu)
    return xp.full(shape, fill_value, dtype) if kind == "full" else getattr(xp, kind)(shape, dtype)


def block_task(fn: Callable[..., Any], *args: Any, name: str | None = None,
               worker: int | None = None, **kwargs: Any) -> DTask[Any]:
    """Spawn the task that makes one block (on ``worker`` if given), with the options
    in effect."""
    from ..api import spawn_with_options

    options = current_options()
    overrides: dict[str, Any] = {"name": name or getattr(fn, "__name__", type(fn).__name__)}
    if worker is not None:
        overrides["scope"] = pin(options.scope, worker)
    return spawn_with_options(options.merged(overrides), fn, args, kwargs)


def placement(nblocks: int) -> list[int | None]:
    """Where new blocks with no inputs go: round-robin over the workers the scope in
    effect admits (None, the scheduler's choice, when there is only one)."""
    workers = _scheduler().placeable_workers(current_options().scope)
    if len(workers) == 1:
        return [None] * nblocks
    cycle = itertools.cycle(workers)
    return [next(cycle) for _ in range(nblocks)]


@contextlib.contextmanager
def _origin_error() -> Iterator[None]:
    """A block failed because a task it was computed from did: raise what that task
    raised (numpy's LinAlgError, say), which is what an array's user asks about."""
    try:
        yield
    except UpstreamError as exc:
        cause = exc.__cause__
        if isinstance(cause, Exception):
            raise cause.with_traceback(cause.__traceback__) from exc
        raise


class DArray:
    """A distributed array of numpy blocks, cupy on GPUs (``dagger.array``)."""

    __slots__ = ("_blocks", "chunks", "dtype", "shape")
    __array_priority__ = 20  # numpy defers to our operators: `ndarray + DArray` is a DArray

    def __init__(self, blocks: np.ndarray, chunks: Chunks, dtype: Any) -> None:
        self._blocks = blocks  # object array, one DTask per block, in the grid's shape
        self.chunks = chunks
        self.dtype = np.dtype(dtype)
        self.shape = tuple(sum(c) for c in chunks)

    # -- description -------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def blocks(self) -> tuple[int, ...]:
        """The shape of one (full) block."""
        return tuple(max(c) for c in self.chunks)

    @property
    def grid(self) -> tuple[int, ...]:
        """How many blocks along each axis."""
        return self._blocks.shape

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d DArray")
        return self.shape[0]

    def __repr__(self) -> str:
        return f"DArray(shape={self.shape}, dtype={self.dtype}, blocks={self.blocks}, grid={self.grid})"

    # -- getting the values ------------------------------------------------------------
    async def collect(self) -> Any:
        """The whole array, as numpy, in this process (a numpy scalar for 0-d)."""
        from ..api import gather

        with _origin_error():
            values = await gather(*self._blocks.flat)
        return self._assemble(values)

    def fetch(self, timeout: float | None = None) -> Any:
        """:meth:`collect` from synchronous code."""
        with _origin_error():
            values = [t.fetch(timeout) for t in self._blocks.flat]
        return self._assemble(values)

    def __await__(self) -> Generator[Any, None, Any]:
        return self.collect().__await__()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.asarray(self.fetch())
        return out if dtype is None else out.astype(dtype, copy=False)

    def _assemble(self, values: list[Any]) -> Any:
        if self.ndim == 0:
            value = to_host(values[0])
            return value[()] if isinstance(value, np.ndarray) else value
        out = np.empty(self.shape, dtype=self.dtype)
        for index, value in zip(grid.indices(self.chunks), values, strict=True):
            out[grid.block_slices(self.chunks, index)] = to_host(value)  # cupy refuses a silent copy
        return out

    __hash__ = None  # type: ignore[assignment]  # == is elementwise, as numpy's

    # -- operators (elementwise, numpy semantics) -----------------------------------------
    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        return _operations["ufunc"](ufunc, method, inputs, kwargs)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        return _operations["function"](func, types, args, kwargs)

    def transpose(self, *axes: Any) -> DArray:
        """The array with its axes permuted (reversed by default), as numpy's."""
        if len(axes) == 1 and (axes[0] is None or isinstance(axes[0], (tuple, list))):
            axes = () if axes[0] is None else tuple(axes[0])
        order = tuple(reversed(range(self.ndim))) if not axes else normalize_axis_tuple(axes, self.ndim)
        if sorted(order) != list(range(self.ndim)):
            raise ValueError("axes don't match array")
        blocks = np.empty(tuple(self.grid[a] for a in order), dtype=object)
        for index in grid.indices(self.chunks):
            blocks[tuple(index[a] for a in order)] = block_task(_transpose, self._blocks[index], order,
                                                                name="transpose")
        return DArray(blocks, tuple(self.chunks[a] for a in order), self.dtype)

    @property
    def T(self) -> DArray:  # noqa: N802 - numpy's name
        return self.transpose()

    def map_blocks(self, fn: Callable[..., Any], *args: Any, dtype: Any = None, **kwargs: Any) -> DArray:
        return _operations["map_blocks"](fn, self, *args, dtype=dtype, **kwargs)

    def rechunk(self, blocks: Any) -> DArray:
        """The same values cut in blocks of shape ``blocks`` (as ``distribute``'s)."""
        return _operations["rechunk"](self, blocks)

    def reshape(self, *shape: Any, order: str = "C") -> DArray:
        """The values in a new shape (C order; one entry may be -1), as numpy's."""
        if len(shape) == 1 and not isinstance(shape[0], (int, np.integer)):
            shape = tuple(shape[0])
        return _operations["reshape"](self, shape, order)

    def __getitem__(self, key: Any) -> DArray:
        """Basic indexing (integers, slices, ``...``, None), as numpy's."""
        return _operations["getitem"](self, key)

    def __matmul__(self, other: Any) -> DArray:
        return _operations["matmul"](self, other)

    def __rmatmul__(self, other: Any) -> DArray:
        return _operations["matmul"](other, self)

    def map_overlap(self, fn: Callable[..., Any], depth: Any, boundary: Any = "none", dtype: Any = None,
                    **kwargs: Any) -> DArray:
        return _operations["map_overlap"](fn, self, depth, boundary, dtype, **kwargs)

    # reductions
    def sum(self, axis: Any = None, dtype: Any = None, keepdims: bool = False) -> DArray:
        return _operations["reduce"]("sum", self, axis, keepdims, dtype=dtype)

    def prod(self, axis: Any = None, dtype: Any = None, keepdims: bool = False) -> DArray:
        return _operations["reduce"]("prod", self, axis, keepdims, dtype=dtype)

    def min(self, axis: Any = None, keepdims: bool = False) -> DArray:
        return _operations["reduce"]("min", self, axis, keepdims)

    def max(self, axis: Any = None, keepdims: bool = False) -> DArray:
        return _operations["reduce"]("max", self, axis, keepdims)

    def any(self, axis: Any = None, keepdims: bool = False) -> DArray:
        return _operations["reduce"]("any", self, axis, keepdims)

    def all(self, axis: Any = None, keepdims: bool = False) -> DArray:
        return _operations["reduce"]("all", self, axis, keepdims)

    def mean(self, axis: Any = None, dtype: Any = None, keepdims: bool = False) -> DArray:
        return _operations["reduce"]("mean", self, axis, keepdims, dtype=dtype)

    def var(self, axis: Any = None, dtype: Any = None, ddof: int = 0, keepdims: bool = False) -> DArray:
        return _operations["reduce"]("var", self, axis, keepdims, dtype=dtype, ddof=ddof)

    def std(self, axis: Any = None, dtype: Any = None, ddof: int = 0, keepdims: bool = False) -> DArray:
        return _operations["reduce"]("std", self, axis, keepdims, dtype=dtype, ddof=ddof)

    def argmax(self, axis: int | None = None, keepdims: bool = False) -> DArray:
        return _operations["arg_reduce"]("argmax", self, axis, keepdims)

    def argmin(self, axis: int | None = None, keepdims: bool = False) -> DArray:
        return _operations["arg_reduce"]("argmin", self, axis, keepdims)


def _binary(ufunc: Any, reflected: bool = False) -> Callable[[DArray, Any], Any]:
    if reflected:
        def op(self: DArray, other: Any) -> Any:
            return ufunc(other, self)
    else:
        def op(self: DArray, other: Any) -> Any:
            return ufunc(self, other)
    return op


for _name, _ufunc in [("add", np.add), ("sub", np.subtract), ("mul", np.multiply),
                      ("truediv", np.true_divide), ("floordiv", np.floor_divide), ("mod", np.remainder),
                      ("pow", np.power), ("and", np.bitwise_and), ("or", np.bitwise_or),
                      ("xor", np.bitwise_xor), ("lshift", np.left_shift), ("rshift", np.right_shift)]:
    setattr(DArray, f"__{_name}__", _binary(_ufunc))
    setattr(DArray, f"__r{_name}__", _binary(_ufunc, reflected=True))
for _name, _compare in [("eq", np.equal), ("ne", np.not_equal), ("lt", np.less), ("le", np.less_equal),
                      ("gt", np.greater), ("ge", np.greater_equal)]:
    setattr(DArray, f"__{_name}__", _binary(_compare))
for _name, _unary in [("neg", np.negative), ("pos", np.positive), ("abs", np.absolute),
                      ("invert", np.invert)]:
    setattr(DArray, f"__{_name}__", lambda self, _u=_unary: _u(self))


def region_of(arr: DArray, region: tuple[slice, ...]) -> DTask[Any]:
    """A task whose value is ``arr[region]`` (step-1 slices): the block itself when the
    region is exactly one block, else the pieces cut and joined by one task."""
    parts = grid.region_blocks(arr.chunks, region)
    layout = tuple(len(p) for p in parts)
    pieces: list[tuple[Any, Any]] = []
    for combo in itertools.product(*parts):
        index = tuple(b for b, _ in combo)
        inner = tuple(s for _, s in combo)
        block = arr._blocks[index]
        whole = all(s.start == 0 and s.stop == c[b] for (b, s), c in zip(combo, arr.chunks, strict=True))
        pieces.append((block, None if whole else inner))
    # Each part of a block is cut by a task of its own, which runs where that block lives,
    # so that only the part wanted moves to the task that joins them.
    cut = [block if inner is None else block_task(take, block, inner) for block, inner in pieces]
    return cut[0] if len(cut) == 1 else block_task(join, layout, *cut)


def broadcast_region(x: Any, region: tuple[slice, ...], shape: tuple[int, ...],
                     cache: dict[tuple[int, tuple[Any, ...]], Any]) -> Any:
    """What operand ``x`` (a DArray, a numpy array or a scalar) contributes to ``region``
    of a result of ``shape``, under numpy's broadcasting; the tasks made are kept in
    ``cache``, for the other output blocks that need the same region."""
    if not isinstance(x, (DArray, np.ndarray)):
        return x
    lead = len(shape) - x.ndim  # numpy's broadcasting aligns the last axes
    mapped = tuple(slice(0, 1) if x.shape[a] == 1 and shape[lead + a] != 1 else region[lead + a]
                   for a in range(x.ndim))
    if isinstance(x, np.ndarray):
        return x[mapped]
    key = (id(x), tuple((s.start, s.stop) for s in mapped))
    found = cache.get(key)
    if found is None:
        found = cache[key] = region_of(x, mapped)
    return found


def take(block: np.ndarray, index: tuple[slice, ...]) -> np.ndarray:
    return block[index]


def _transpose(block: np.ndarray, order: tuple[int, ...]) -> np.ndarray:
    return block.transpose(order)


def join(layout: tuple[int, ...], *pieces: np.ndarray) -> np.ndarray:
    """Blocks joined in a grid of ``layout``, C order."""
    return join_grid(layout, pieces)


def join_grid(layout: tuple[int, ...], pieces: Sequence[Any]) -> Any:
    """``pieces`` (C order) joined in a grid of ``layout``, one grid axis per array axis,
    as ``np.block`` does; always a new array."""
    xp = array_module(*pieces)
    if xp is np:
        nested = np.empty(layout, dtype=object)
        for i, piece in enumerate(pieces):
            nested.flat[i] = piece
        return np.block(nested.tolist())
    return _concatenate(xp, layout, pieces, 0)  # cupy has no block()


def _concatenate(xp: Any, layout: tuple[int, ...], pieces: Sequence[Any], axis: int) -> Any:
    step = len(pieces) // layout[0]
    parts = [pieces[i * step] if len(layout) == 1 else
             _concatenate(xp, layout[1:], pieces[i * step:(i + 1) * step], axis + 1)
             for i in range(layout[0])]
    return xp.concatenate(parts, axis=axis)

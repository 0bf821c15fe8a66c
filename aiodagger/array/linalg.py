"""Tiled linear algebra as datadeps regions (Dagger.jl's ``cholesky``, ``lu``, ``\\``).

The matrix is copied into square tiles, each a :func:`~aiodagger.mutable` on a worker
(tile column ``j`` on worker ``j mod N``: a panel of LU, one tile column, then lives on
one worker). The algorithm is written as a sequence of tile kernels in a datadeps
region: each kernel runs where the tile it writes lives, tiles it only reads come to
it as copies, and tasks that touch different tiles run in parallel. The input is
never modified. Kernels are LAPACK's, through scipy (the ``array`` extra), or, for
tiles on a GPU, cuSOLVER's and cuBLAS's through cupy (:mod:`._gpu_tiles`).

Under a GPU scope (``with dagger.options(scope=dagger.scope(gpu=True)):``) the tiles
are made on the GPUs of the workers that scope admits, and the same region's tasks
run there, on cupy tiles.

Functions return a DArray (or a tuple of them) at once; the region's tasks run in the
background, and an error (numpy's ``LinAlgError`` for a matrix that is not positive
definite, or singular) is raised when the result is awaited.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..gpu.arrays import array_module, is_device_array, to_host
from ..mutables import mutable
from ..regions import Region
from ..taskoptions import current_options
from . import _blas
from . import _gpu_tiles as _gpu
from .core import DArray, _scheduler, block_task, new_block, on_gpu, pin, region_of
from .creation import distribute

__all__ = ["cholesky", "lu", "solve"]


def _lapack() -> Any:
    try:
        import scipy.linalg
    except ImportError as exc:  # pragma: no cover - scipy comes with the "array" extra
        raise ImportError("dagger.array's linear algebra needs scipy: pip install 'aiodagger[array]'") from exc
    return scipy.linalg


def _square(a: Any, what: str) -> DArray:
    if not isinstance(a, DArray):
        a = distribute(np.asarray(a), 512)
    if a.ndim != 2:
        raise np.linalg.LinAlgError(f"{a.ndim}-dimensional array given. Array must be two-dimensional")
    if a.shape[0] != a.shape[1]:
        raise np.linalg.LinAlgError("Last 2 dimensions of the array must be square")
    return a


class _Tiles:
    """The matrix's square tiles, as mutables, along ``bounds`` on both axes, over the
    workers the scope in effect admits; each tile's scope is that scope pinned to its
    worker, so a GPU scope makes it on a GPU there."""

    def __init__(self, a: DArray, dtype: Any) -> None:
        self.sizes = a.chunks[0]
        self.n = len(self.sizes)
        starts = np.concatenate([[0], np.cumsum(self.sizes)]).astype(int)
        self.slices = [slice(int(starts[i]), int(starts[i + 1])) for i in range(self.n)]
        scope = current_options().scope
        workers = _scheduler().placeable_workers(scope)
        self.column_worker = [workers[j % len(workers)] for j in range(self.n)]
        self.column_scope = [pin(scope, w) for w in self.column_worker]
        from ..api import options

        with options(priority=10 * self.n + 10):  # before any step: every step waits for them
            self.tile = [[mutable(_copy_as, region_of(a, (self.slices[i], self.slices[j])), dtype,
                                  scope=self.column_scope[j])
                          for j in range(self.n)] for i in range(self.n)]


def _copy_as(block: np.ndarray, dtype: Any) -> np.ndarray:
    return array_module(block).array(block, dtype=dtype, copy=True, order="C")


def _run(body: Any) -> Any:
    """Run ``body(dd)`` in a datadeps region that is left without waiting: the region's
    tasks go on in the background, their outcome reaches whoever awaits the results."""
    region = Region()
    region._open()
    try:
        return body(region)
    finally:
        region._close()


def _result(tiles: list[list[Any]], dd: Region, sizes: tuple[int, ...], dtype: Any,
            keep: Any = None) -> DArray:
    """The DArray of the tiles' final values (a copy each, taken where the tile lives);
    ``keep(i, j)`` says which part of tile (i, j) to keep ("lower", "upper", "unit", "zero")."""
    blocks = np.empty((len(tiles), len(tiles[0])), dtype=object)
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            part = keep(i, j) if keep is not None else "all"
            if part == "zero":
                blocks[i, j] = block_task(new_block, "zeros", (sizes[i], sizes[j]), dtype, on_gpu(),
                                          name="zeros")
            else:
                blocks[i, j] = dd.spawn(_part, tile, part)
    return DArray(blocks, (sizes, sizes), dtype)


def _part(tile: np.ndarray, part: str) -> np.ndarray:
    xp = array_module(tile)
    if part == "lower":
        return xp.tril(tile)
    if part == "upper":
        return xp.triu(tile)
    if part == "unit":
        out = xp.tril(tile, -1)
        xp.fill_diagonal(out, 1)
        return out
    return xp.array(tile, order="C")  # a copy: the tile is freed, or written, after


# -- Cholesky ------------------------------------------------------------------------------
def cholesky(a: Any) -> DArray:
    """The lower Cholesky factor ``L`` of a Hermitian positive-definite ``a`` (numpy's
    ``np.linalg.cholesky``): ``a == L @ L.conj().T``."""
    a = _square(a, "cholesky")
    dtype = np.linalg.cholesky(np.eye(1, dtype=a.dtype)).dtype
    tiles = _Tiles(a, dtype)

    def body(dd: Region) -> DArray:
        _factor_cholesky(dd, tiles.tile)
        return _result(tiles.tile, dd, tiles.sizes, dtype,
                       lambda i, j: "lower" if i == j else ("all" if i > j else "zero"))

    return _run(body)


def _urgent(dd: Region, n: int, k: int, rank: int, fn: Any, *args: Any) -> Any:
    """``dd.spawn`` with a priority: step ``k``'s tasks before later steps', and within a
    step by ``rank`` (the panel first, then what the next panel needs). In spawn order,
    the next panel's factorization waited behind every update of this step: both
    threads were busy only 80 % of LA-chol's time."""
    from ..api import options

    with options(priority=10 * (n - k) + rank):
        return dd.spawn(fn, *args)


def _factor_cholesky(dd: Region, t: list[list[Any]]) -> None:
    from ..access import In, InOut

    n = len(t)
    for k in range(n):
        _urgent(dd, n, k, 9, _potrf, InOut(t[k][k]))
        for i in range(k + 1, n):
            _urgent(dd, n, k, 8, _trsm_right_lower_h, In(t[k][k]), InOut(t[i][k]))
        for i in range(k + 1, n):
            _urgent(dd, n, k, 7 if i == k + 1 else 5, _herk, In(t[i][k]), InOut(t[i][i]))
            for j in range(k + 1, i):
                _urgent(dd, n, k, 7 if j == k + 1 else 5, _gemm_h, In(t[i][k]), In(t[j][k]), InOut(t[i][j]))


def _potrf(tile: np.ndarray) -> None:
    if is_device_array(tile):
        return _gpu.potrf(tile)
    tile[...] = np.linalg.cholesky(tile)  # LinAlgError: not positive definite


# The tiles are C-ordered: each kernel hands BLAS the transposed (Fortran-ordered)
# views, which it updates in place, and states the operation transposed. Converting
# the tiles to Fortran order instead cost a transposing copy per tile in and out (64 +
# 36 copies for LA-chol, a quarter of its time here). _blas calls BLAS without the GIL.
def _trsm_right_lower_h(lkk: np.ndarray, tile: np.ndarray) -> None:
    """tile := tile @ inv(L)^H; transposed: tile^T := inv(conj(L)) @ tile^T, and conj(L)
    is op("C") of lkk.T, whose upper triangle holds L^T."""
    if is_device_array(tile):
        return _gpu.trsm_right_lower_h(lkk, tile)
    _blas.trsm("L", "U", "C", "N", 1.0, lkk.T, tile.T)


def _herk(aik: np.ndarray, tile: np.ndarray) -> None:
    """tile -= aik @ aik^H, the lower triangle only (all potrf reads): half a gemm.
    Transposed: tile^T -= (aik^T)^H @ aik^T, the upper triangle of tile^T."""
    if is_device_array(tile):
        return _gpu.herk(aik, tile)
    _blas.herk("U", "C", -1.0, aik.T, 1.0, tile.T)


def _gemm_h(aik: np.ndarray, ajk: np.ndarray, tile: np.ndarray) -> None:
    """tile -= aik @ ajk^H; transposed: tile^T -= (ajk^T)^H @ aik^T."""
    if is_device_array(tile):
        return _gpu.gemm_h(aik, ajk, tile)
    _blas.gemm("C", "N", -1.0, ajk.T, aik.T, 1.0, tile.T)


# -- LU with partial pivoting ----------------------------------------------------------------
def lu(a: Any) -> tuple[DArray, DArray, DArray]:
    """``p, l, u`` with ``a == p @ l @ u`` (scipy's ``scipy.linalg.lu``): partial pivoting,
    ``l`` unit lower triangular, ``u`` upper triangular."""
    a = _square(a, "lu")
    dtype = np.linalg.solve(np.eye(1, dtype=a.dtype), np.ones(1, dtype=a.dtype)).dtype
    tiles = _Tiles(a, dtype)

    def body(dd: Region) -> tuple[DArray, DArray, DArray]:
        pivots = _factor_lu(dd, tiles)
        perm = block_task(_permutation, tiles.sizes, *pivots, name="lu-permutation")
        l_ = _result(tiles.tile, dd, tiles.sizes, dtype,
                     lambda i, j: "unit" if i == j else ("all" if i > j else "zero"))
        u_ = _result(tiles.tile, dd, tiles.sizes, dtype,
                     lambda i, j: "upper" if i == j else ("all" if i < j else "zero"))
        p_blocks = np.empty((tiles.n, tiles.n), dtype=object)
        for i in range(tiles.n):
            for j in range(tiles.n):
                p_blocks[i, j] = block_task(_permutation_block, perm, tiles.slices[i], tiles.slices[j], dtype)
        return DArray(p_blocks, (tiles.sizes, tiles.sizes), dtype), l_, u_

    return _run(body)


def _factor_lu(dd: Region, tiles: _Tiles) -> list[Any]:
    """The tiles become L (strictly lower) and U; returns each panel's pivots (tasks)."""
    from ..access import In, InOut

    t, n = tiles.tile, tiles.n
    pivots = []
    for k in range(n):
        panel = [InOut(t[i][k]) for i in range(k, n)]
        piv = _urgent(dd, n, k, 9, _getrf_panel, *panel)  # one tile column: on one worker
        pivots.append(piv)
        for j in range(n):
            if j != k:
                _urgent(dd, n, k, 8 if j == k + 1 else 4, _swap_rows, piv,
                        *[InOut(t[i][j]) for i in range(k, n)])
        for j in range(k + 1, n):
            _urgent(dd, n, k, 7 if j == k + 1 else 5, _trsm_left_unit_lower, In(t[k][k]), InOut(t[k][j]))
        for i in range(k + 1, n):
            for j in range(k + 1, n):
                _urgent(dd, n, k, 6 if j == k + 1 else 5, _gemm_sub, In(t[i][k]), In(t[k][j]), InOut(t[i][j]))
    return pivots


def _getrf_panel(*panel: np.ndarray) -> np.ndarray:
    if is_device_array(panel[0]):
        return _gpu.getrf_panel(*panel)
    stacked = np.concatenate(panel)
    (getrf,) = _lapack().get_lapack_funcs(("getrf",), (stacked,))
    lu_, piv, info = getrf(stacked, overwrite_a=True)
    if info > 0:  # a zero pivot: no row of the panel can make it non-singular
        raise np.linalg.LinAlgError("Singular matrix")
    start = 0
    for tile in panel:
        tile[...] = lu_[start:start + tile.shape[0]]
        start += tile.shape[0]
    return piv


def _swap_rows(piv: np.ndarray, *column: np.ndarray) -> None:
    if is_device_array(column[0]):
        return _gpu.swap_rows(_row_order(piv, sum(t.shape[0] for t in column)), column)
    stacked = np.concatenate(column)
    for r, p in enumerate(piv):
        if p != r:
            stacked[[r, p]] = stacked[[p, r]]
    start = 0
    for tile in column:
        tile[...] = stacked[start:start + tile.shape[0]]
        start += tile.shape[0]


def _row_order(piv: Any, n: int) -> np.ndarray:
    """The order ``piv``'s row swaps (LAPACK's, one after the other) put ``n`` rows in."""
    order = np.arange(n)
    for r, p in enumerate(to_host(piv).tolist()):
        if p != r:
            order[[r, p]] = order[[p, r]]
    return order


def _trsm_left_unit_lower(lkk: np.ndarray, tile: np.ndarray) -> None:
    """tile := inv(L) @ tile (L unit lower); transposed: tile^T := tile^T @ inv(L^T), and
    L^T is the upper triangle of lkk.T."""
    if is_device_array(tile):
        return _gpu.trsm_left_unit_lower(lkk, tile)
    _blas.trsm("R", "U", "N", "U", 1.0, lkk.T, tile.T)


def _gemm_sub(a: np.ndarray, b: np.ndarray, tile: np.ndarray) -> None:
    """tile -= a @ b; transposed: tile^T -= b^T @ a^T."""
    if is_device_array(tile):
        return _gpu.gemm_sub(a, b, tile)
    _blas.gemm("N", "N", -1.0, b.T, a.T, 1.0, tile.T)


def _permutation(sizes: tuple[int, ...], *pivots: np.ndarray) -> np.ndarray:
    """``perm`` with ``a[perm] == l @ u``: each panel's row swaps applied in order."""
    perm = np.arange(sum(sizes))
    start = 0
    for size, piv in zip(sizes, pivots, strict=True):
        for r, p in enumerate(to_host(piv).tolist()):
            if p != r:
                perm[[start + r, start + p]] = perm[[start + p, start + r]]
        start += size
    return perm


def _permutation_block(perm: np.ndarray, rows: slice, cols: slice, dtype: Any) -> np.ndarray:
    """Block (rows, cols) of ``p`` (``p[perm[i], i] == 1``), on the GPU where ``perm``
    was given to a GPU task (which receives it as a cupy array)."""
    xp = array_module(perm)
    block = xp.zeros((rows.stop - rows.start, cols.stop - cols.start), dtype=dtype)
    where = perm[cols]
    inside = (where >= rows.start) & (where < rows.stop)
    block[where[inside] - rows.start, xp.arange(cols.stop - cols.start)[inside]] = 1
    return block


# -- solve ------------------------------------------------------------------------------------
def solve(a: Any, b: Any, assume_a: str = "gen") -> DArray:
    """``x`` with ``a @ x == b`` for a non-singular square ``a`` (numpy's ``np.linalg.solve``):
    a pivoted LU, or Cholesky with ``assume_a="pos"``; ``b`` a vector or a matrix."""
    if assume_a not in ("gen", "pos"):
        raise ValueError(f'assume_a must be "gen" (any non-singular matrix) or "pos" (Hermitian '
                         f'positive definite), got {assume_a!r}')
    a = _square(a, "solve")
    if not isinstance(b, DArray):
        b = np.asarray(b)
        b = distribute(b, tuple(max(n, 1) for n in b.shape))
    if b.ndim not in (1, 2) or b.shape[0] != a.shape[0]:
        raise ValueError(f"solve: a is {a.shape} and b is {b.shape}; b must have {a.shape[0]} rows")
    dtype = np.linalg.solve(np.eye(1, dtype=a.dtype), np.ones((1,) * b.ndim, dtype=b.dtype)).dtype
    tiles = _Tiles(a, dtype)
    home = tiles.column_scope[0]
    columns = (slice(0, b.shape[1]),) if b.ndim == 2 else ()
    rhs = [mutable(_rhs_tile, region_of(b, (tiles.slices[i], *columns)), dtype, scope=home)
           for i in range(tiles.n)]

    def body(dd: Region) -> DArray:
        from ..access import In, InOut

        t, n = tiles.tile, tiles.n
        if assume_a == "pos":
            _factor_cholesky(dd, t)
            for k in range(n):  # L y = b
                dd.spawn(_trsm_lower, In(t[k][k]), InOut(rhs[k]), False)
                for i in range(k + 1, n):
                    dd.spawn(_gemm_sub, In(t[i][k]), In(rhs[k]), InOut(rhs[i]))
            for k in reversed(range(n)):  # L^H x = y
                dd.spawn(_trsm_lower_h, In(t[k][k]), InOut(rhs[k]))
                for i in range(k):
                    dd.spawn(_gemm_h_sub, In(t[k][i]), In(rhs[k]), InOut(rhs[i]))
        else:
            pivots = _factor_lu(dd, tiles)
            for k in range(n):  # P^T b, then L y = P^T b
                dd.spawn(_swap_rows, pivots[k], *[InOut(rhs[i]) for i in range(k, n)])
            for k in range(n):
                dd.spawn(_trsm_lower, In(t[k][k]), InOut(rhs[k]), True)
                for i in range(k + 1, n):
                    dd.spawn(_gemm_sub, In(t[i][k]), In(rhs[k]), InOut(rhs[i]))
            for k in reversed(range(n)):  # U x = y
                dd.spawn(_trsm_upper, In(t[k][k]), InOut(rhs[k]))
                for i in range(k):
                    dd.spawn(_gemm_sub, In(t[i][k]), In(rhs[k]), InOut(rhs[i]))
        blocks = np.empty((n, 1) if b.ndim == 2 else (n,), dtype=object)
        for i in range(n):
            blocks[(i, 0) if b.ndim == 2 else i] = dd.spawn(_rhs_block, rhs[i], b.ndim)
        chunks = (tiles.sizes, (b.shape[1],)) if b.ndim == 2 else (tiles.sizes,)
        return DArray(blocks, chunks, dtype)

    return _run(body)


def _rhs_tile(block: np.ndarray, dtype: Any) -> np.ndarray:
    """A tile of the right-hand side, always a matrix (one column for a vector)."""
    return array_module(block).array(block, dtype=dtype, copy=True).reshape(len(block), -1)


def _rhs_block(tile: np.ndarray, ndim: int) -> np.ndarray:
    return array_module(tile).array(tile.ravel() if ndim == 1 else tile, copy=True)


def _solver(tile: Any) -> Any:
    """Where ``solve_triangular`` is for ``tile``: scipy.linalg, or cupyx.scipy.linalg."""
    return _gpu.triangular() if is_device_array(tile) else _lapack()


def _trsm_lower(lkk: np.ndarray, tile: np.ndarray, unit: bool) -> None:
    tile[...] = _solver(tile).solve_triangular(lkk, tile, lower=True, unit_diagonal=unit)


def _trsm_lower_h(lkk: np.ndarray, tile: np.ndarray) -> None:
    tile[...] = _solver(tile).solve_triangular(lkk, tile, lower=True, trans="C")


def _trsm_upper(ukk: np.ndarray, tile: np.ndarray) -> None:
    xp = array_module(ukk)
    if xp.any(xp.diag(ukk) == 0):
        raise np.linalg.LinAlgError("Singular matrix")
    tile[...] = _solver(tile).solve_triangular(ukk, tile, lower=False)


def _gemm_h_sub(lki: np.ndarray, yk: np.ndarray, tile: np.ndarray) -> None:
    tile -= lki.conj().T @ yk

"""``dagger.array``: distributed arrays of numpy blocks (Dagger.jl's DArray).

    import aiodagger as dagger
    a = dagger.array.rand((4000, 4000), blocks=(1000, 1000))
    total = await a.sum()            # a tree of tasks; the blocks never come here
    col_means = await a.mean(axis=0)
"""

from . import functions, linalg, rechunk, reductions, reshape, slicing  # noqa: F401 - they register DArray's operations
from .core import DArray
from .creation import distribute, fromfunction, full, ones, rand, randn, zeros
from .elementwise import map_blocks
from .linalg import cholesky, lu, solve
from .matmul import matmul
from .overlap import map_overlap

__all__ = ["DArray", "cholesky", "distribute", "fromfunction", "full", "linalg", "lu", "map_blocks", "map_overlap",
           "matmul", "ones", "rand", "randn", "solve", "zeros"]

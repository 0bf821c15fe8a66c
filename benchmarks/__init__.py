"""Benchmarks that run aiodagger and its peers on the same workloads in one run.

Entry point: ``python -m benchmarks.run --help``. See ``benchmarks/README.md``.
"""

import os

# One BLAS thread per process for every system, numpy's floor included, unless the
# environment says otherwise. Set here, before anything imports numpy (worker
# processes inherit it): a tiled system runs one BLAS call per pool thread, and BLAS
# threads of their own on top oversubscribe the cores (a 512² Cholesky tile took
# 270 ms instead of a few, its BLAS threads spinning against another tile's).
for _blas in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_blas, "1")

"""Benchmarks that run aiodagger and its peers on the same workloads in one run.

Entry point: ``python -m benchmarks.run --help``. See ``benchmarks/README.md``.
"""

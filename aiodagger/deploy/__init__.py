"""Clusters whose workers run elsewhere: as batch jobs (Slurm) or on other hosts.

    from aiodagger.deploy import SlurmCluster

    async with SlurmCluster(queue="normal", cores=8, memory="16GiB") as cluster:
        await cluster.scale(4)          # four workers, each a job of its own

Each class loads on first use, with what it needs (``import aiodagger.deploy`` loads
none of them).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .slurm import SlurmCluster

__all__ = ["SlurmCluster"]

# name -> the module of this package that defines it
_LAZY = {
    "SlurmCluster": "slurm",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'aiodagger.deploy' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

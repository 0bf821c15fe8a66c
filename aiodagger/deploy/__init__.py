"""Clusters whose workers run elsewhere: on other hosts over SSH, or as batch jobs (Slurm).

    from aiodagger.deploy import SSHCluster, SlurmCluster

    async with SSHCluster(["node1", "node2"], python="/opt/venv/bin/python") as cluster:
        print(await dagger.spawn(work, 1))

    async with SlurmCluster(queue="normal", cores=8, memory="16GiB") as cluster:
        await cluster.scale(4)          # four workers, each a job of its own

The scheduler runs in this process. Each class loads on first use, with what it needs
(asyncssh for SSH: ``pip install 'aiodagger[ssh]'``): ``import aiodagger.deploy`` loads
none of them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import DeployConnectionError, DeployError, DeployTimeoutError, JobStartTimeoutError

if TYPE_CHECKING:
    from .slurm import SlurmCluster
    from .ssh import SSHCluster

__all__ = ["DeployConnectionError", "DeployError", "DeployTimeoutError", "JobStartTimeoutError", "SSHCluster",
           "SlurmCluster"]

# name -> the module of this package that defines it
_LAZY = {
    "SSHCluster": "ssh",
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

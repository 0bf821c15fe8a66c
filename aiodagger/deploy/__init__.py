"""Starting a cluster's workers on other machines.

    from aiodagger.deploy import SSHCluster

    async with SSHCluster(["node1", "node2"], python="/opt/venv/bin/python") as cluster:
        print(await dagger.spawn(work, 1))

The scheduler runs in this process; each host runs ``aiodagger worker`` processes that
an SSH session started, and that join it. asyncssh is needed (``pip install
'aiodagger[ssh]'``), and loaded only when a cluster is made: neither ``import aiodagger``
nor ``import aiodagger.deploy`` imports it.
"""

from ..errors import DeployConnectionError, DeployError, DeployTimeoutError
from .ssh import SSHCluster

__all__ = ["DeployConnectionError", "DeployError", "DeployTimeoutError", "SSHCluster"]

"""The systems a run compares, by the name used on the command line.

Entries are "module:Class" strings so that importing the registry imports no peer
module and, through them, no peer library: each library is imported in the
peer's ``start``.
"""

from __future__ import annotations

import importlib

from benchmarks.peers.base import Peer

PEERS: dict[str, str] = {
    "aiodagger": "benchmarks.peers.aiodagger_:AiodaggerPeer",
    "asyncio": "benchmarks.peers.floors:AsyncioPeer",
    "executor": "benchmarks.peers.floors:ExecutorPeer",
    "process-pool": "benchmarks.peers.floors:ProcessPoolPeer",
    "process-pool-map": "benchmarks.peers.floors:ProcessPoolMapPeer",
    "tcp-socket": "benchmarks.peers.floors:SocketPeer",
    "numpy": "benchmarks.peers.floors:NumpyPeer",
    "dask": "benchmarks.peers.dask_:DaskDistributedPeer",
    "dask-delayed": "benchmarks.peers.dask_:DaskDelayedPeer",
    "ray": "benchmarks.peers.ray_:RayPeer",
}

# The system every ratio is relative to.
REFERENCE = "aiodagger"


def make_peer(name: str) -> Peer:
    module_name, _, class_name = PEERS[name].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    peer: Peer = cls()
    return peer

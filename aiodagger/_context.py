"""Which cluster a ``spawn`` uses, and what else follows it, as context: shared by
clusters and worker processes.

Kept apart from ``cluster.py`` so that a worker process can set it without importing
the client side.
"""

from __future__ import annotations

import contextvars
import enum
import threading
from typing import Any

__all__ = ["RUNNING", "ClusterState", "current_cluster_var", "pool_thread", "spawn_collector_var"]


class ClusterState(enum.Enum):
    """A cluster's life. Here, not in ``cluster.py``: the stand-in cluster inside a
    worker process reports RUNNING without importing the client side."""

    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


# Read once, for every spawn: an enum member's lookup costs ~50 ns, 3 of them 6 % of
# W4's scheduler process in a py-spy profile.
RUNNING = ClusterState.RUNNING

# The cluster entered in this context (``async with`` / ``with``), or set for tasks.
current_cluster_var: contextvars.ContextVar[Any] = contextvars.ContextVar("aiodagger_cluster", default=None)
# ``pool_thread.cluster``: the cluster whose pool thread is calling; ``pool_thread.pool``:
# that thread's pool (a ThreadProc), which a blocking fetch() tells it is waiting.
pool_thread = threading.local()
# Whatever collects the tasks spawned in this context (``aiodagger.web.RequestTasks``:
# a web request's, to cancel them when its client goes away); None nearly always.
spawn_collector_var: contextvars.ContextVar[Any] = contextvars.ContextVar("aiodagger_spawn_collector",
                                                                          default=None)

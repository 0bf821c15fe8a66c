"""Which cluster a ``spawn`` uses, as context: shared by clusters and worker processes.

Kept apart from ``cluster.py`` so that a worker process can set it without importing
the client side.
"""

from __future__ import annotations

import contextvars
import threading
from typing import Any

__all__ = ["current_cluster_var", "pool_thread"]

# The cluster entered in this context (``async with`` / ``with``), or set for tasks.
current_cluster_var: contextvars.ContextVar[Any] = contextvars.ContextVar("aiodagger_cluster", default=None)
# ``pool_thread.cluster``: the cluster whose pool thread is calling.
pool_thread = threading.local()

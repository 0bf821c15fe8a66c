"""aiodagger: asyncio-native parallel, distributed and out-of-core computing.

    import aiodagger as dagger

    a = dagger.spawn(add, 1, 3)       # a DTask, returned at once
    b = dagger.spawn(double, a)       # a DTask argument is a dependency
    print(await b)                    # or b.fetch() from synchronous code
"""

from ._version import __version__
from .api import Options, as_completed, fetch, gather, options, put, spawn, tochunk, wait
from .cluster import Cluster, WorkerInfo
from .errors import (
    AuthenticationError,
    DaggerError,
    NoProcessorError,
    ProtocolError,
    SerializationError,
    TaskCancelledError,
    TaskTimeoutError,
    UpstreamError,
    WorkerLostError,
)
from .logs import Logs, disable_logging, enable_logging, fetch_logs
from .options import MISSING, Scope, scope
from .progress import progress
from .task import Chunk, DTask
from .taskgroup import TaskGroup

__all__ = [
    "MISSING",
    "AuthenticationError",
    "Chunk",
    "Cluster",
    "DTask",
    "DaggerError",
    "Logs",
    "NoProcessorError",
    "Options",
    "ProtocolError",
    "Scope",
    "SerializationError",
    "TaskCancelledError",
    "TaskGroup",
    "TaskTimeoutError",
    "UpstreamError",
    "WorkerInfo",
    "WorkerLostError",
    "__version__",
    "as_completed",
    "disable_logging",
    "enable_logging",
    "fetch",
    "fetch_logs",
    "gather",
    "options",
    "progress",
    "put",
    "scope",
    "spawn",
    "tochunk",
    "wait",
]

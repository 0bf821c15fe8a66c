"""aiodagger: asyncio-native parallel, distributed and out-of-core computing.

    import aiodagger as dagger

    a = dagger.spawn(add, 1, 3)       # a DTask, returned at once
    b = dagger.spawn(double, a)       # a DTask argument is a dependency
    print(await b)                    # or b.fetch() from synchronous code
"""

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    AuthenticationError,
    ConnectError,
    DaggerError,
    DeployConnectionError,
    DeployError,
    DeployTimeoutError,
    FrameTooLargeError,
    JobStartTimeoutError,
    NoProcessorError,
    ProtocolError,
    SchedulerLostError,
    SerializationError,
    TaskCancelledError,
    TaskTimeoutError,
    UpstreamError,
    WorkerLostError,
)
from .progress import progress
from .task import Chunk, DTask
from .taskoptions import MISSING, Scope, scope

if TYPE_CHECKING:
    from . import array, gpu
    from .access import In, InOut, Out
    from .api import Options, admit, as_completed, fetch, gather, options, put, spawn, tochunk, wait
    from .client import connect
    from .cluster import Cluster, WorkerInfo
    from .files import File, tofile
    from .logs import Logs, disable_logging, enable_logging, fetch_logs
    from .mutables import mutable, shard
    from .regions import datadeps
    from .streaming import Stream, spawn_streaming
    from .taskgroup import TaskGroup

# Loaded on first use. A worker process imports this package too, and never needs the
# cluster, the scheduler or the logs: importing them there cost each worker's start
# (W0) the compilation and import of about a third of the package.
_LAZY = {
    "Options": "api", "admit": "api", "as_completed": "api", "fetch": "api", "gather": "api",
    "options": "api", "put": "api", "spawn": "api", "tochunk": "api", "wait": "api",
    "Cluster": "cluster", "WorkerInfo": "cluster", "connect": "client",
    "File": "files", "tofile": "files",
    "Logs": "logs", "disable_logging": "logs", "enable_logging": "logs", "fetch_logs": "logs",
    "Stream": "streaming", "spawn_streaming": "streaming",
    "TaskGroup": "taskgroup",
    "In": "access", "InOut": "access", "Out": "access", "datadeps": "regions",
    "mutable": "mutables", "shard": "mutables", "array": "array", "gpu": "gpu",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'aiodagger' has no attribute {name!r}")
    import importlib

    imported = importlib.import_module(f".{module}", __name__)
    value = imported if module == name else getattr(imported, name)  # a subpackage: dagger.array
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "MISSING",
    "AuthenticationError",
    "Chunk",
    "Cluster",
    "ConnectError",
    "DTask",
    "DaggerError",
    "DeployConnectionError",
    "DeployError",
    "DeployTimeoutError",
    "File",
    "FrameTooLargeError",
    "In",
    "InOut",
    "JobStartTimeoutError",
    "Logs",
    "NoProcessorError",
    "Options",
    "Out",
    "ProtocolError",
    "SchedulerLostError",
    "Scope",
    "SerializationError",
    "Stream",
    "TaskCancelledError",
    "TaskGroup",
    "TaskTimeoutError",
    "UpstreamError",
    "WorkerInfo",
    "WorkerLostError",
    "__version__",
    "admit",
    "array",
    "as_completed",
    "connect",
    "datadeps",
    "disable_logging",
    "enable_logging",
    "fetch",
    "fetch_logs",
    "gather",
    "gpu",
    "mutable",
    "options",
    "progress",
    "put",
    "scope",
    "shard",
    "spawn",
    "spawn_streaming",
    "tochunk",
    "tofile",
    "wait",
]

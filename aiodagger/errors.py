"""The exceptions aiodagger raises.

Awaiting a task whose own function raised re-raises *that* exception (its original
type), with notes naming the task and the worker. Everything the framework itself
raises derives from :class:`DaggerError`::

    DaggerError
    ├── UpstreamError        a dependency failed; .origin is the root-cause task
    ├── TaskCancelledError   the task was cancelled
    ├── TaskTimeoutError     the task ran past its ``timeout`` (also a TimeoutError)
    ├── WorkerLostError      the task's worker died and its retries are spent
    ├── NoProcessorError     no processor in the cluster satisfies the task's scope
    ├── SerializationError   a function or argument cannot be sent to a worker (also a TypeError)
    ├── FrameTooLargeError   a value is larger than the frames a connection carries (max_frame)
    ├── ProtocolError        a peer sent something that is not a valid frame
    ├── AuthenticationError  a peer failed the handshake
    └── DeployError          workers could not be started on a host (aiodagger.deploy); .host
        ├── DeployConnectionError  no SSH session with the host: unreachable, refused,
        │                          timed out, host key or credentials (also a ConnectionError)
        └── DeployTimeoutError     a worker started there never joined (also a TimeoutError)
            └── JobStartTimeoutError  submitted batch jobs' workers did not join in time

Exceptions cross process boundaries, so every class here survives a pickle
round-trip, ``__cause__`` and notes included.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthenticationError",
    "ConnectError",
    "DaggerError",
    "DeployConnectionError",
    "DeployError",
    "DeployTimeoutError",
    "FrameTooLargeError",
    "JobStartTimeoutError",
    "NoProcessorError",
    "ProtocolError",
    "SchedulerLostError",
    "SerializationError",
    "TaskCancelledError",
    "TaskRef",
    "TaskTimeoutError",
    "UpstreamError",
    "WorkerLostError",
]


class DaggerError(Exception):
    """Base of every exception the framework raises itself."""

    # The default Exception pickling keeps ``args`` and ``__dict__`` (so notes survive)
    # but drops ``__cause__``; an UpstreamError without its cause loses its point.
    def __reduce__(self) -> tuple[Any, ...]:
        state = dict(self.__dict__)
        if self.__cause__ is not None:
            state["__cause__"] = self.__cause__
        return (type(self), self.args, state)

    def __setstate__(self, state: dict[str, Any] | None) -> None:
        state = dict(state or {})
        cause = state.pop("__cause__", None)
        self.__dict__.update(state)
        if cause is not None:
            self.__cause__ = cause


class TaskRef:
    """What is left of a task after it crossed a process boundary: its id and name."""

    __slots__ = ("id", "name")

    def __init__(self, id: int, name: str) -> None:
        self.id = id
        self.name = name

    def __repr__(self) -> str:
        return f"<TaskRef {self.name!r} id={self.id}>"

    def __eq__(self, other: object) -> bool:
        return getattr(other, "id", None) == self.id and getattr(other, "name", None) == self.name

    def __hash__(self) -> int:
        return hash((self.id, self.name))

    def __reduce__(self) -> tuple[Any, ...]:
        return (TaskRef, (self.id, self.name))


class UpstreamError(DaggerError):
    """A task could not run because a task it depends on failed.

    ``origin`` is the task whose own function raised (the root cause, however far up
    the graph), and ``__cause__`` is that task's original exception.
    """

    def __init__(self, message: str, origin: Any = None) -> None:
        super().__init__(message)
        self.origin = origin

    def __reduce__(self) -> tuple[Any, ...]:
        cls, args, state = super().__reduce__()
        origin = state.get("origin")
        if origin is not None and not isinstance(origin, TaskRef):
            # A live task handle belongs to one process; what crosses is its identity.
            state["origin"] = TaskRef(origin.id, origin.name)
        return (cls, args, state)


class TaskCancelledError(DaggerError):
    """The task was cancelled (``t.cancel()``, a cancelled dependency, or shutdown)."""


class TaskTimeoutError(DaggerError, TimeoutError):
    """The task ran longer than its ``timeout`` option allows."""


class WorkerLostError(DaggerError):
    """The worker running the task died and the task's retries are spent."""


class NoProcessorError(DaggerError):
    """No processor in the cluster satisfies the task's scope."""


class SerializationError(DaggerError, TypeError):
    """A function or argument cannot be pickled to be sent to a worker."""


class FrameTooLargeError(DaggerError):
    """A value (a task's argument, input or result) is larger than one frame may be.

    Every connection carries frames up to the smaller ``max_frame`` of its two ends
    (``Cluster(max_frame=...)``, ``aiodagger worker --max-frame``); ``size`` and ``limit``
    are in bytes. The task concerned fails with it instead of breaking the connection.
    """

    def __init__(self, message: str, size: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit

    @classmethod
    def of(cls, what: str, size: int, limit: int) -> FrameTooLargeError:
        """The error for ``what`` (e.g. "the result of task 'f' (id 3)") of ``size`` bytes."""
        return cls(f"{what} is {size} bytes ({size / 2**20:.1f} MiB), more than max_frame={limit} "
                   f"bytes, the largest frame the connection that would carry it takes: raise it with "
                   f"Cluster(max_frame=...) (and `aiodagger worker --max-frame` on remote workers)",
                   size, limit)


class ProtocolError(DaggerError):
    """A peer sent bytes that are not a valid frame of the wire protocol."""


class AuthenticationError(DaggerError):
    """A peer failed the handshake (wrong token, version or challenge)."""


class ConnectError(DaggerError, ConnectionError):
    """``dagger.connect`` could not attach to a scheduler: nothing listens at the
    address, or what answers there is not an aiodagger scheduler (it does not speak the
    handshake, or does not take clients). A wrong token is an AuthenticationError."""


class SchedulerLostError(DaggerError, ConnectionError):
    """A connected client lost its scheduler: its tasks still pending there are lost to
    it (the scheduler released them). The client reconnects by itself; what it spawns
    after that runs again."""


class DeployError(DaggerError):
    """Workers could not be started where a deployment puts them: on ``host`` over SSH
    (no such interpreter, aiodagger not installed there, a worker that left saying why:
    a wrong token), or by a batch system (``sbatch`` missing or failing, a job that ended
    before its workers joined). The message carries what the command or worker said."""

    def __init__(self, message: str, host: str = "") -> None:
        super().__init__(message)
        self.host = host


class DeployConnectionError(DeployError, ConnectionError):
    """No SSH session with ``host``: unreachable, refused, timed out, or its host key or
    the credentials were not accepted."""


class DeployTimeoutError(DeployError, TimeoutError):
    """A worker started on ``host`` did not join the cluster in time."""


class JobStartTimeoutError(DeployTimeoutError):
    """Submitted batch jobs' workers did not join the cluster in time.

    ``jobs`` maps each such job's id to its state as Slurm gave it, e.g.
    ``{"17": "PENDING (PartitionDown)"}``; the jobs have been cancelled.
    """

    def __init__(self, message: str, jobs: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.jobs = dict(jobs or {})

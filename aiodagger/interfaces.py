"""The seams between the scheduler, its workers and task handles, as named interfaces.

The scheduler never imports a worker, and a worker never imports the scheduler: each
knows the other only as one of these protocols, and the cluster (``cluster.py``) wires
them together. Worker processes implement the same interfaces for their own processors
and for the handles of tasks spawned inside them, instead of posing as a scheduler.

* :class:`TaskOwner` - what a :class:`~aiodagger.task.DTask` or
  :class:`~aiodagger.task.Chunk` asks of whoever owns it: the cluster's scheduler, or
  the client of the scheduler inside a worker process.
* :class:`ProcessorOwner` - what a processor (a thread pool, an event loop) reports to.
* :class:`WorkerStatus` - a worker's life, the same for worker 0 and worker processes.
* :class:`ThreadProcessor`, :class:`AsyncProcessor`, :class:`LocalWorkerPort` - what the scheduler asks of worker 0,
  the cluster's own process, and of its processors; :class:`LocalWorkerOwner` - what
  worker 0 reports back.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .task import DTask
    from .taskoptions import Scope, TaskOptions

__all__ = ["AsyncProcessor", "LocalWorkerOwner", "LocalWorkerPort", "ProcessorOwner", "TaskOwner",
           "ThreadProcessor", "WorkerStatus"]


class WorkerStatus(enum.Enum):
    """Where a worker is in its life; ``WorkerInfo.status`` shows the value."""

    NEW = "new"
    RUNNING = "running"
    RETIRING = "retiring"
    CLOSING = "closing"
    CLOSED = "closed"
    LOST = "lost"


class TaskOwner(Protocol):
    """What a task handle asks of its owner (from any thread, for blocking calls)."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop on which the owner changes its tasks' state."""
        ...

    def cancel_threadsafe(self, task: DTask[Any]) -> bool:
        """Cancel ``task`` and what depends on it; False if it was already done."""
        ...

    def wait_blocking(self, task: DTask[Any], timeout: float | None) -> None:
        """Block this thread until ``task`` is done (TimeoutError after ``timeout``)."""
        ...

    def bring_here(self, objs: list[Any]) -> Awaitable[None]:
        """An awaitable, for the caller's loop, that brings the values of finished
        tasks and chunks that live elsewhere into this process."""
        ...

    def bring_blocking(self, objs: list[Any], timeout: float | None) -> None:
        """:meth:`bring_here` for a thread that is not the owner's loop."""
        ...

    def spawn(self, opts: TaskOptions, fn: Any, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> DTask[Any]:
        """A new task of the same cluster (``tofile`` writes a value beside it so)."""
        ...


class ProcessorOwner(Protocol):
    """What a processor reports to, on the owner's loop."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def timed(self) -> bool:
        """Whether runs of coroutine tasks should be timed (someone observes them)."""
        ...

    def complete(self, task: DTask[Any], attempt: int, ok: bool, value: Any,
                 start: float, seconds: float, proc: Any) -> None:
        """One run of ``task`` ended: its value, or the exception it raised if not ``ok``."""
        ...

    def ready_priority(self) -> float:
        """The priority of the best task waiting to run (-inf if none), read from pool
        threads: a chain of continuations yields to a higher one."""
        ...

    def request_flush(self) -> None:
        """The processor has room again: the owner may hand it more work."""
        ...


class LocalWorkerOwner(ProcessorOwner, Protocol):
    """What worker 0 reports to: its processors' completions, and inputs it lost."""

    def starting(self, task: DTask[Any]) -> None:
        """``task``'s inputs are loaded and it starts now (its timeout runs from here)."""
        ...

    def input_lost(self, task: DTask[Any], dep: DTask[Any]) -> None:
        """``dep``'s stored result turned out unreadable before ``task`` could run:
        compute it again, then run ``task``."""
        ...


class ThreadProcessor(Protocol):
    """Worker 0's thread pool, as the scheduler drives it."""

    kind: str
    worker_id: int
    nthreads: int

    def has_room(self) -> bool:
        """Whether it takes another task now (else tasks wait in the scheduler's heap)."""
        ...

    def submit(self, task: DTask[Any]) -> None: ...


class AsyncProcessor(Protocol):
    """Worker 0's event loop as a processor for coroutine tasks."""

    kind: str
    worker_id: int

    def submit(self, task: DTask[Any], coro: Coroutine[Any, Any, Any] | None = None) -> None:
        """Run ``task`` (or ``coro``, a coroutine its sync function returned) on the loop."""
        ...

    def cancel(self, handle: Any) -> None: ...


class LocalWorkerPort(Protocol):
    """Worker 0 (the cluster's own process) as the scheduler sees it."""

    id: int
    resources: dict[str, float]  # declared amounts (Cluster(resources=) without processes=)

    @property
    def thread_proc(self) -> ThreadProcessor: ...

    @property
    def async_proc(self) -> AsyncProcessor: ...

    @property
    def keeps_results(self) -> bool:
        """Whether results stay in the worker's store (a memory limit): their DTasks
        then hold REMOTE, and inputs are loaded and pinned before a task runs."""
        ...

    @property
    def paused(self) -> bool:
        """Past the store's pause threshold: start nothing new until :meth:`admitted`."""
        ...

    async def admitted(self) -> None:
        """Wait until the worker takes new tasks again (bounded: never forever)."""
        ...

    def admits(self, scope: Scope) -> bool:
        """Whether a processor of this worker satisfies ``scope``."""
        ...

    def run(self, task: DTask[Any], stored: list[DTask[Any]]) -> None:
        """Start ``task``; its ``stored`` inputs are loaded and pinned first."""
        ...

    def holds(self, key: int) -> bool:
        """Whether the store still has the result ``key``."""
        ...

    async def bring(self, objs: list[Any]) -> None:
        """Hand stored results to the caller (they leave the store); LookupError(obj)
        for one that was lost."""
        ...

    def describe(self) -> str: ...

"""Worker 0: the cluster's own process, with an AsyncProc and a ThreadProc."""

from __future__ import annotations

import contextvars
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .aio import AsyncProc
from .threads import ThreadProc

if TYPE_CHECKING:
    from ..memory import ChunkStore
    from ..scheduler.core import Scheduler

__all__ = ["LocalWorker", "WorkerInfo"]


@dataclass(frozen=True)
class WorkerInfo:
    """A snapshot of one worker, as ``cluster.workers`` lists it."""

    id: int
    address: str
    host: str
    pid: int
    status: str
    processors: tuple[str, ...]
    memory_used: int
    memory_limit: int | None
    spilled_bytes: int
    spill_errors: int
    tasks_running: int


class LocalWorker:
    """The in-process worker. The scheduler talks to it only through its processors."""

    id = 0

    def __init__(self, sched: Scheduler, nthreads: int, task_context: contextvars.Context,
                 thread_init: Callable[[], None], memory_limit: int | None = None) -> None:
        self.thread_proc = ThreadProc(self.id, nthreads, sched, thread_init)
        self.async_proc = AsyncProc(self.id, sched, task_context)
        self.memory_limit = memory_limit
        self.store: ChunkStore | None = None  # set when the cluster has a memory limit
        self._sched = sched
        self.status = "new"

    def start(self) -> None:
        self.thread_proc.start()
        self.status = "running"

    async def close(self, timeout: float) -> bool:
        """Stop both processors; False if some thread was still in user code at the timeout."""
        self.status = "closing"
        await self.async_proc.close()
        clean = await self.thread_proc.close(timeout)
        self.status = "closed"
        return clean

    def describe(self) -> str:
        return f"worker {self.id} (pid {os.getpid()}, this process): {self.async_proc!r}, {self.thread_proc!r}"

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            id=self.id,
            address="inproc://" + str(os.getpid()),
            host=socket.gethostname(),
            pid=os.getpid(),
            status=self.status,
            processors=(repr(self.async_proc), repr(self.thread_proc)),
            memory_used=self.store.used if self.store else 0,
            memory_limit=self.store.memory_limit if self.store else None,
            spilled_bytes=self.store.spilled_bytes if self.store else 0,
            spill_errors=self.store.spill_errors if self.store else 0,
            tasks_running=self.thread_proc.queued + self.async_proc.running,
        )

"""Worker 0: the cluster's own process, with an AsyncProc, a ThreadProc and maybe a store.

The scheduler drives it through :class:`~aiodagger.interfaces.LocalWorkerPort`. With a
memory limit (and no other workers), worker 0 keeps its results in a
:class:`~aiodagger.memory.ChunkStore` of its own, as a worker process does: results
spill past the limit, their DTasks hold REMOTE, a task's inputs are loaded and pinned
before it runs (``ChunkStore.pin_and_load``, shared with worker processes), and a
result leaves the store for the caller when awaited. Without a limit its processors
report straight to the scheduler: nothing stands between them on the hot path.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import socket
import sys
import types
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._bridge import Wakeup
from ..gpu.discovery import GpuSpec, choose, missing_reason, pick_gpu
from ..gpu.streams import readiness
from ..interfaces import WorkerStatus
from ..memory import ChunkStore, SpillCorruptedError, admit, shared
from ..placed import Ref
from ..task import NOWHERE, REMOTE, DTask
from .aio import AsyncProc
from .threads import ThreadProc

if TYPE_CHECKING:
    from ..gpu.proc import GPUProc
    from ..interfaces import LocalWorkerOwner
    from ..taskoptions import Scope

__all__ = ["LocalWorker", "WorkerInfo", "WorkerStatus"]

logger = logging.getLogger(__name__)


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
    """The in-process worker."""

    id = 0

    def __init__(self, owner: LocalWorkerOwner, nthreads: int, task_context: contextvars.Context,
                 thread_init: Callable[[], None], memory_limit: int | None = None,
                 spill_dir: str | None = None, gpus: GpuSpec = 0, gpu_memory_limit: int | None = None,
                 resources: dict[str, float] | None = None) -> None:
        self._owner = owner
        self.loop = owner.loop
        self.memory_limit = memory_limit
        self.spill_dir = spill_dir
        self.resources = dict(resources or {})  # Cluster(resources=) without processes=
        # With a store, completions pass through complete() below on their way to the
        # scheduler; without one the processors report to the scheduler directly.
        reports_to = self if memory_limit is not None else owner
        self.thread_proc = ThreadProc(self.id, nthreads, reports_to, thread_init)
        self.async_proc = AsyncProc(self.id, reports_to, task_context)
        self._reports_to = reports_to
        self._task_context = task_context
        self._gpu_spec = gpus
        self._gpu_memory_limit = gpu_memory_limit
        # Made at the first GPU-scoped task or GPU question, not at start: finding
        # devices imports cupy and starts CUDA, which a CPU-only program never needs.
        self._gpu_procs: dict[int, GPUProc] | None = None
        self.store: ChunkStore | None = None
        self._pins: dict[int, list[Any]] = {}
        self._drops: deque[int] = deque()
        self._drop_wakeup = Wakeup(self.loop, self._drop_released)
        self.status = WorkerStatus.NEW

    # -- life ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._gpu_spec != "auto" and self._gpu_spec != 0:
            self.gpu_procs()  # devices asked for by number or count: missing ones fail the start
        self.thread_proc.start()
        self.status = WorkerStatus.RUNNING

    async def start_store(self) -> None:
        """Open the store (with a memory limit); before the first task."""
        if self.memory_limit is not None and self.store is None:
            store = ChunkStore(self.memory_limit, self.spill_dir, worker_name="w0",
                               device_limit=self._gpu_memory_limit)
            await store.start()
            self.store = store
            shared.keep_mappings(False)  # the limit counts this process's RSS, until close

    async def close(self, timeout: float) -> bool:
        """Stop both processors, then the store; False if some thread was still in user
        code at the timeout."""
        self.status = WorkerStatus.CLOSING
        deadline = self.loop.time() + timeout
        clean = await self.async_proc.close(timeout)
        clean = await self.thread_proc.close(max(0.0, deadline - self.loop.time())) and clean
        for gpu in (self._gpu_procs or {}).values():
            clean = await gpu.close(max(0.0, deadline - self.loop.time())) and clean
        if self.store is not None:
            try:
                await self.store.close()
            finally:
                shared.keep_mappings(True)  # this limit ends
        self.status = WorkerStatus.CLOSED
        return clean

    # -- LocalWorkerPort -----------------------------------------------------------------
    @property
    def keeps_results(self) -> bool:
        return self.memory_limit is not None

    @property
    def paused(self) -> bool:
        return self.store is not None and self.store.paused

    async def admitted(self) -> None:
        if self.store is not None:
            await admit(self.store)

    def admits(self, scope: Scope) -> bool:
        if not scope.admits_worker(self.id, os.getpid()):
            return False
        return not scope.wants_gpu or scope.admits_gpus(self.gpu_procs())

    def gpu_procs(self) -> dict[int, GPUProc]:
        """This worker's GPU processors by device, found at the first call."""
        if self._gpu_procs is None:
            procs: dict[int, GPUProc] = {}
            devices = choose(self._gpu_spec) if self._gpu_spec != 0 else []
            if devices:
                from ..gpu.proc import GPUProc

                free = self.store.free_device if self.store is not None else None
                for d in devices:
                    procs[d] = GPUProc(self.id, d, self._reports_to, self._task_context, free_device=free)
            self._gpu_procs = procs
        return self._gpu_procs

    def run(self, task: DTask[Any], stored: list[DTask[Any]]) -> None:
        if stored:
            asyncio.ensure_future(self._load_then_run(task, stored))
        else:
            self._submit(task)

    def _submit(self, task: DTask[Any]) -> None:
        self._owner.starting(task)
        if task._kind == "async":
            self.async_proc.submit(task)
        elif task._kind[0] == "g":
            pick_gpu(self.gpu_procs(), task._opts.scope.gpu, task._args or (), task._kwargs).submit(task)
        else:
            self.thread_proc.submit(task)

    async def _load_then_run(self, task: DTask[Any], deps: list[DTask[Any]]) -> None:
        """Load a task's stored inputs (pinned: not spilled while it runs), then run it."""
        store = self.store
        assert store is not None
        attempt = task._attempts
        values, unavailable = await store.pin_and_load([dep.id for dep in deps])
        if task.done() or task._attempts != attempt:  # cancelled, or failed meanwhile
            store.unpin_all(values)
            return
        if unavailable:
            lost = next(dep for dep in deps if dep.id in unavailable)
            logger.warning("the result of %s is unreadable (%s): computing it again",
                           lost._describe(), unavailable[lost.id])
            self._owner.input_lost(task, lost)
            return
        task._inputs = values
        self._pins[task.id] = list(values)
        self._submit(task)

    def holds(self, key: int) -> bool:
        return self.store is not None and key in self.store

    async def bring(self, objs: list[Any]) -> None:
        store = self.store
        for obj in objs:
            if type(obj) is not DTask or obj._value is not REMOTE:
                continue
            try:
                if store is None:
                    raise KeyError(obj.id)
                value = await store.get(obj.id)
            except (KeyError, SpillCorruptedError):
                if obj._value is not REMOTE:
                    continue  # a concurrent awaiter took it meanwhile
                raise LookupError(obj) from None
            if obj._value is REMOTE:
                obj._value = value  # now the caller's memory, out of the store's account
                store.delete(obj.id)
                obj._where.discard(0)

    def describe(self) -> str:
        text = f"worker {self.id} (pid {os.getpid()}, this process): " + ", ".join(self._processors())
        if self._gpu_procs == {} and self._gpu_spec != 0:
            text += f" (no GPU processor: {missing_reason() or 'none asked for'})"
        return text

    def _processors(self) -> tuple[str, ...]:
        gpus = self._gpu_procs or {}
        return (repr(self.async_proc), repr(self.thread_proc), *[repr(g) for g in gpus.values()])

    # -- ProcessorOwner, with a store: keep results, release inputs ---------------------
    @property
    def timed(self) -> bool:
        return self._owner.timed

    def request_flush(self) -> None:
        self._owner.request_flush()

    def ready_priority(self) -> float:
        return self._owner.ready_priority()

    def complete(self, task: DTask[Any], attempt: int, ok: bool, value: Any,
                 start: float, seconds: float, proc: Any) -> None:
        store = self.store
        assert store is not None
        pins = self._pins.pop(task.id, None)
        if pins is not None:
            task._inputs = None
            store.unpin_all(pins)
        if (ok and type(value) is not types.CoroutineType and not task._cancelled
                and task._attempts == attempt and not task.done()):
            value = self._keep(task, value)
        self._owner.complete(task, attempt, ok, value, start, seconds, proc)

    def _keep(self, task: DTask[Any], value: Any) -> Any:
        """Put a result in the store; its DTask holds REMOTE (and keeps its lineage)."""
        assert self.store is not None
        stream = None
        if "cupy" in sys.modules:  # a device value moves to host after the work that made it
            made = readiness.of(value)
            stream = made.stream if made is not None else None
        self.store.put(task.id, value, spillable=type(value) is not Ref, stream=stream)
        if task._where is NOWHERE:
            task._where = set()
        task._where.add(self.id)
        if not task._tracked:
            task._tracked = True
            weakref.finalize(task, self._release_later, task.id)
        return REMOTE

    def _release_later(self, key: int) -> None:
        """A stored result's handle was garbage collected (in any thread): free it."""
        self._drops.append(key)
        if not self._drop_wakeup.pending:
            self._drop_wakeup.request()

    def _drop_released(self) -> None:
        while self._drops:
            key = self._drops.popleft()
            if self.store is not None:
                self.store.delete(key)

    def info(self) -> WorkerInfo:
        store = self.store
        return WorkerInfo(
            id=self.id,
            address="inproc://" + str(os.getpid()),
            host=socket.gethostname(),
            pid=os.getpid(),
            status=self.status.value,
            processors=self._processors(),
            memory_used=store.used if store else 0,
            memory_limit=store.memory_limit if store else None,
            spilled_bytes=store.spilled_bytes if store else 0,
            spill_errors=store.spill_errors if store else 0,
            tasks_running=(self.thread_proc.queued + self.async_proc.running
                           + sum(g.running for g in (self._gpu_procs or {}).values())),
        )

"""Nested spawning from inside a worker process.

A task running in a subprocess or remote worker may call ``dagger.spawn`` and await
or fetch the result, as it would in the cluster's own process. There, the cluster
is a :class:`NestedCluster` whose scheduler is a :class:`SchedulerClient`: spawns
are batched to the real scheduler, which runs the tasks like any other (anywhere in
the cluster), and reports back on the handles this worker waits for.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import TYPE_CHECKING, Any

import cloudpickle

from .._args import find_dependencies
from ..errors import TaskCancelledError
from ..options import TaskOptions
from ..task import CANCELLED, FAILED, FINISHED, REMOTE, DTask
from .wire import FunctionCache, dumps_args, loads_error, loads_value

if TYPE_CHECKING:
    from .process import WorkerProcess

__all__ = ["NestedCluster", "SchedulerClient"]

# Ids of tasks spawned in worker N start at N * ID_SPACE: the scheduler's own ids
# count up from 1 and never get there.
ID_SPACE = 1 << 40


class SchedulerClient:
    """Stands in for the scheduler inside a worker process (the parts tasks use)."""

    closed = False

    def __init__(self, worker: WorkerProcess) -> None:
        self.worker = worker
        self.loop = worker.loop
        self.loop_thread_id = worker.loop_thread_id
        self._ids = itertools.count(1)
        self._fn_cache = FunctionCache()
        self._outbox: list[list[Any]] = []
        self._buffers: list[Any] = []
        self._watch: list[int] = []
        self._lock = threading.Lock()  # spawns come from pool threads and the loop
        self._scheduled = False
        self.handles: weakref.WeakValueDictionary[int, DTask[Any]] = weakref.WeakValueDictionary()

    # -- spawning (any thread of the worker) ------------------------------------------------
    def spawn(self, opts: TaskOptions, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DTask[Any]:
        if self.worker.worker_id < 0:
            raise RuntimeError("this worker is not connected to a cluster right now")
        key = self.worker.worker_id * ID_SPACE + next(self._ids)
        name = opts.name or getattr(fn, "__qualname__", None) or type(fn).__name__
        task: DTask[Any] = DTask(self, key, name, fn, args, kwargs, opts)  # type: ignore[arg-type]
        deps, found = find_dependencies(args, kwargs)
        fn_hash, fn_bytes = self._fn_cache.get(fn)
        payload, parts, _ = dumps_args(name, args, kwargs, found)
        opts_bytes = cloudpickle.dumps(opts)
        self.handles[key] = task
        weakref.finalize(task, self._forget, key)
        with self._lock:
            base = len(self._buffers)
            self._buffers.extend([fn_bytes, opts_bytes, payload, *parts])
            self._outbox.append([key, fn_hash, base, 3 + len(parts), found])
            self._watch.append(key)
        self._schedule()
        return task

    def _schedule(self) -> None:
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:
            pass

    def _flush(self) -> None:
        with self._lock:
            self._scheduled = False
            tasks, buffers, self._outbox, self._buffers = self._outbox, self._buffers, [], []
        rpc = self.worker._rpc
        if rpc is None:
            for key, *_ in tasks:
                self._settle_cancelled(key, "the worker lost its scheduler connection")
            return
        try:
            rpc.send_nowait({"op": "spawn", "tasks": tasks}, buffers)
        except ConnectionError:
            for key, *_ in tasks:
                self._settle_cancelled(key, "the worker lost its scheduler connection")

    def _forget(self, key: int) -> None:
        rpc = self.worker._rpc
        if rpc is not None:
            try:
                self.loop.call_soon_threadsafe(_send_quietly, rpc, {"op": "forget", "ids": [key]})
            except RuntimeError:
                pass

    # -- what the scheduler reports -------------------------------------------------------
    def on_task_done(self, header: dict[str, Any], buffers: list[bytearray]) -> None:
        task = self.handles.get(header["id"])
        if task is None or task.done():
            return
        status = header["status"]
        if status == "finished":
            if buffers:
                task._value = loads_value(buffers[0], buffers[1:])
            else:
                task._value = REMOTE
                task._where = {wid for wid, _ in header["holders"]}
                task._handle = header["holders"]  # where to fetch it from
            task._state = FINISHED
        elif status == "failed":
            task._exc = loads_error(buffers[0])
            task._tb = task._exc.__traceback__
            task._state = FAILED
        else:
            self._settle_cancelled(task.id, header.get("reason", "cancelled"))
            return
        task._notify()

    def _settle_cancelled(self, key: int, reason: str) -> None:
        task = self.handles.get(key)
        if task is not None and not task.done():
            task._cancelled = True
            task._state = CANCELLED
            task._exc = TaskCancelledError(f"{task._describe()} was cancelled: {reason}")
            task._notify()

    # -- the parts of the Scheduler interface handles use ----------------------------------
    def cancel_threadsafe(self, task: DTask[Any]) -> bool:
        rpc = self.worker._rpc
        if rpc is None:
            return False
        self.loop.call_soon_threadsafe(_send_quietly, rpc, {"op": "cancel-task", "ids": [task.id]})
        return True

    def wait_blocking(self, task: DTask[Any], timeout: float | None) -> None:
        from ..scheduler.core import block_until_done

        block_until_done(task, timeout, self.loop_thread_id)

    async def _bring(self, objs: list[Any]) -> None:
        for obj in objs:
            if obj._value is REMOTE:
                key = obj.id
                await self.worker._fetch(key, obj._handle)
                obj._value = await self.worker.store.get(key)

    def bring_here(self, objs: list[Any]) -> Any:
        from ..scheduler.core import run_on_loop_awaitable

        return run_on_loop_awaitable(self._bring(objs), self.loop)

    def bring_blocking(self, objs: list[Any], timeout: float | None) -> None:
        from ..scheduler.core import run_on_loop_blocking

        run_on_loop_blocking(self._bring(objs), self.loop, self.loop_thread_id, timeout)


def _send_quietly(rpc: Any, header: dict[str, Any]) -> None:
    try:
        rpc.send_nowait(header)
    except ConnectionError:
        pass


class NestedCluster:
    """What ``current_cluster()`` returns inside a worker process's tasks."""

    def __init__(self, client: SchedulerClient) -> None:
        self._scheduler = client

    @property
    def _state(self) -> Any:
        from ..cluster import ClusterState  # only when a task spawns: not at worker start

        return ClusterState.RUNNING

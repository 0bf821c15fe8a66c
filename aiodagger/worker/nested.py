"""Nested spawning from inside a worker process.

A task running in a subprocess or remote worker may call ``dagger.spawn`` and await
or fetch the result, as it would in the cluster's own process. There, the cluster
is a :class:`NestedCluster` whose scheduler is a :class:`SchedulerClient` (the
:class:`~aiodagger.interfaces.TaskOwner` of the handles made here): spawns are batched
to the real scheduler, which runs the tasks like any other (anywhere in the cluster),
and reports back on the handles this worker waits for.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import cloudpickle

from .._args import DEPS, find_dependencies
from .._bridge import (
    Wakeup,
    block_until_done,
    call_soon_quietly,
    run_on_loop_awaitable,
    run_on_loop_blocking,
)
from .._context import ClusterState
from ..comm import protocol as P
from ..errors import FrameTooLargeError, TaskCancelledError
from ..task import CANCELLED, FAILED, FINISHED, REMOTE, Chunk, DTask
from ..taskoptions import TaskOptions

if TYPE_CHECKING:
    from .process import WorkerProcess

__all__ = ["NestedCluster", "SchedulerClient"]


class SchedulerClient:
    """Stands in for the scheduler inside a worker process: the TaskOwner of its handles."""

    closed = False
    # A datadeps region opened here pins its tasks to this worker (aiodagger.regions).
    in_worker_process = True

    def __init__(self, worker: WorkerProcess) -> None:
        self.worker = worker
        self.loop = worker.loop
        self.loop_thread_id = worker.loop_thread_id
        self._ids = itertools.count(1)
        self._fn_cache = P.FunctionCache()
        self._spawns = P.Batch(P.Spawn, worker.max_frame)
        self._lock = threading.Lock()  # spawns come from pool threads and the loop
        self._wakeup = Wakeup(self.loop, self._flush)
        self.handles: weakref.WeakValueDictionary[int, DTask[Any]] = weakref.WeakValueDictionary()
        # Chunks put here and still held, with their key (box[0]): a client puts them
        # again after a reconnection, since the scheduler dropped them with the old one.
        self._chunks: weakref.WeakKeyDictionary[Chunk[Any], list[int]] = weakref.WeakKeyDictionary()

    @property
    def home_worker(self) -> int:
        return self.worker.worker_id

    def placeable_workers(self, scope: Any) -> list[int]:
        raise RuntimeError(
            "dagger.mutable, dagger.shard and dagger.array place objects on chosen workers, "
            "which a task running in a worker process cannot do yet: create them in the "
            "cluster's own process and pass them to the task")

    @property
    def streams(self) -> Any:
        """This worker's stream port, where readers and producers here find their ends."""
        return self.worker.streams

    # -- spawning (any thread of the worker) ------------------------------------------------
    def spawn(self, opts: TaskOptions, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DTask[Any]:
        if self.worker.worker_id < 0:
            raise self._disconnected()
        name = opts.name or getattr(fn, "__qualname__", None) or type(fn).__name__
        deps, refs = find_dependencies(args, kwargs)
        found = bool(refs)  # no Stream here: one cannot be pickled into a worker process
        fn_hash, fn_bytes = self._fn_cache.get(fn)
        refs = found if found is False or found is True else bool(found & DEPS)  # Files too
        payload, parts, _ = P.dumps_args(name, args, kwargs, refs)
        if opts.after:  # handles of this process: the scheduler knows them by key
            opts = opts.merged({"after": tuple(t.id for t in opts.after)})
        opts_bytes = cloudpickle.dumps(opts)
        size = len(fn_bytes) + len(opts_bytes) + len(payload) + sum(p.nbytes for p in parts)
        if size > (limit := self.worker._scheduler_limit()):
            raise FrameTooLargeError.of(f"task {name!r}, its function and arguments pickled,",
                                        size, limit)
        # Keys go out in the order they are taken (the scheduler refuses one lower than
        # the last), and a handle is in place before its task can be reported on.
        with self._lock:
            key = self.worker.worker_id * P.ID_SPACE + next(self._ids)
            task: DTask[Any] = DTask(self, key, name, fn, args, kwargs, opts)
            self.handles[key] = task
            self._spawns.add(P.SpawnTask(key, fn_hash, 3 + len(parts), refs),
                             (fn_bytes, opts_bytes, payload, *parts))
        weakref.finalize(task, self._forget, key)
        if not self._wakeup.pending:
            self._wakeup.request()
        return task

    def _flush(self) -> None:
        with self._lock:
            frames = self._spawns.take()
        endpoint = self.worker.endpoint
        try:
            if endpoint is None:
                raise ConnectionResetError
            for msg, buffers in frames:
                endpoint.send_nowait(msg, buffers)
        except ConnectionError:
            for msg, _ in frames:
                for rec in msg.tasks:
                    self._settle_lost(rec.key)

    def _disconnected(self) -> Exception:
        return RuntimeError("this worker is not connected to a cluster right now")

    def _settle_lost(self, key: int) -> None:
        """A task spawned here whose spawn or report was lost with the scheduler."""
        self._settle_cancelled(key, "the worker lost its scheduler connection")

    # -- put (the scheduler keeps the value while this process holds the chunk) ---------
    async def put(self, obj: Any) -> Chunk[Any]:
        """Hand ``obj`` to the scheduler once; the chunk keeps it here too."""
        chunk: Chunk[Any] = Chunk(obj, 0, 0, self)
        box = [0]
        self._send_put(chunk, box)
        self._chunks[chunk] = box
        weakref.finalize(chunk, self._forget_chunk, box)
        return chunk

    def _send_put(self, chunk: Chunk[Any], box: list[int]) -> None:
        """Take the chunk's key and send it, after the spawns batched before it (the
        scheduler takes keys in increasing order only)."""
        endpoint = self.worker.endpoint
        if endpoint is None or self.worker.worker_id < 0:
            raise self._disconnected()
        payload, parts = P.dumps(chunk._value)
        size = len(payload) + sum(p.nbytes for p in parts)
        if size > (limit := self.worker._scheduler_limit()):
            raise FrameTooLargeError.of("the value put()", size, limit)
        with self._lock:
            key = self.worker.worker_id * P.ID_SPACE + next(self._ids)
            frames = self._spawns.take()
            for msg, buffers in frames:
                endpoint.send_nowait(msg, buffers)
            endpoint.send_nowait(P.Put(-key), [payload, *parts])
        chunk.id = box[0] = key

    def _forget_chunk(self, box: list[int]) -> None:
        call_soon_quietly(self.loop, self._send_quietly, P.Forget([-box[0]]))

    def _forget(self, key: int) -> None:
        call_soon_quietly(self.loop, self._send_quietly, P.Forget([key]))

    def _send_quietly(self, msg: Any) -> None:
        endpoint = self.worker.endpoint
        if endpoint is None:
            return
        try:
            endpoint.send_nowait(msg)
        except ConnectionError:
            pass

    # -- what the scheduler reports -------------------------------------------------------
    def on_task_done(self, msg: P.TaskDone, buffers: list[Any]) -> None:
        task = self.handles.get(msg.key)
        if task is None or task.done():
            return
        if msg.status == "finished":
            if buffers:
                task._value = P.loads(buffers[0], buffers[1:])
            else:
                task._value = REMOTE
                task._where = {h.worker for h in msg.holders}
                task._handle = msg.holders  # where to fetch it from
            task._state = FINISHED
        elif msg.status == "failed":
            task._exc = P.loads_error(buffers[0])
            task._tb = task._exc.__traceback__
            task._state = FAILED
        else:
            self._settle_cancelled(task.id, msg.reason or "cancelled")
            return
        task._notify()

    def _settle_cancelled(self, key: int, reason: str) -> None:
        task = self.handles.get(key)
        if task is not None and not task.done():
            task._cancelled = True
            task._state = CANCELLED
            task._exc = TaskCancelledError(f"{task._describe()} was cancelled: {reason}")
            task._notify()

    # -- TaskOwner -----------------------------------------------------------------------
    def cancel_threadsafe(self, task: DTask[Any]) -> bool:
        if self.worker.endpoint is None:
            return False
        return call_soon_quietly(self.loop, self._send_quietly, P.CancelSpawned([task.id]))

    def wait_blocking(self, task: DTask[Any], timeout: float | None) -> None:
        block_until_done(task, timeout, self.loop_thread_id)

    async def _bring(self, objs: list[Any]) -> None:
        for obj in objs:
            if obj._value is REMOTE:
                key = obj.id
                await self.worker._fetch(key, obj._handle)
                obj._value = await self.worker.store.get(key)

    def bring_here(self, objs: list[Any]) -> Awaitable[None]:
        return run_on_loop_awaitable(self._bring(objs), self.loop)

    def bring_blocking(self, objs: list[Any], timeout: float | None) -> None:
        run_on_loop_blocking(self._bring(objs), self.loop, self.loop_thread_id, timeout)


class NestedCluster:
    """What ``current_cluster()`` returns inside a worker process's tasks."""

    _state = ClusterState.RUNNING

    def __init__(self, client: SchedulerClient) -> None:
        self._scheduler = client

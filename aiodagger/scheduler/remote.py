"""The scheduler's side of workers in other processes: registry, dispatch, results, loss.

Each remote worker is a :class:`RemoteWorker` proxy holding the connection, what was
sent to it, and what it holds. Tasks placed on a worker during one loop iteration go
out as one "run" message; the worker answers with batched "done" messages. A result
stays on the worker that made it (``task._where``), and only its size comes back
unless it is small enough to travel inline; values move to the caller only when
awaited, and to another worker straight from the holder.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import weakref
from typing import TYPE_CHECKING, Any

import cloudpickle

from ..comm.framing import Comm
from ..comm.rpc import Rpc
from ..errors import ProtocolError, SerializationError
from ..options import ANY_SCOPE
from ..task import FINISHED, NOWHERE, REMOTE, Chunk, DTask
from ..worker.wire import (
    FunctionCache,
    dumps_args,
    dumps_error,
    dumps_value,
    loads_args,
    loads_error,
    loads_value,
)
from .placement import DEFAULT_BANDWIDTH, Candidate, choose_processor

if TYPE_CHECKING:
    from .core import Scheduler

__all__ = ["Distributor", "RemoteWorker"]

logger = logging.getLogger(__name__)

# Estimated work (seconds) queued per worker thread beyond which tasks wait in the heap.
REMOTE_HORIZON_S = 5e-3


class ProcView:
    """A remote processor as the scheduler's complete() and the observers see it."""

    __slots__ = ("kind", "threads", "worker_id")

    def __init__(self, kind: str, worker_id: int, threads: int = 0) -> None:
        self.kind = kind
        self.worker_id = worker_id
        self.threads = threads

    def __repr__(self) -> str:
        if self.kind == "thread":
            return f"ThreadProc(worker={self.worker_id}, threads={self.threads})"
        return f"AsyncProc(worker={self.worker_id})"


class _Outbox:
    __slots__ = ("buffers", "functions", "tasks", "values")

    def __init__(self) -> None:
        self.tasks: list[list[Any]] = []
        self.functions: list[list[Any]] = []
        self.values: list[list[Any]] = []
        self.buffers: list[Any] = []


class RemoteWorker:
    """The scheduler's view of one worker process."""

    def __init__(self, wid: int, rpc: Rpc, info: dict[str, Any]) -> None:
        self.id = wid
        self.rpc = rpc
        self.name: str = info.get("name", f"worker-{wid}")
        self.pid: int = int(info.get("pid", 0))
        self.host: str = info.get("host", "?")
        self.address: str = info.get("address", "")
        self.threads: int = int(info.get("threads", 1))
        self.memory_limit: int | None = info.get("memory_limit")
        self.status = "running"
        self.last_seen = 0.0
        self.stats: dict[str, Any] = {}
        self.running: dict[int, DTask[Any]] = {}
        self.holds: set[int] = set()
        self.functions: set[bytes] = set()
        self.backlog_s = 0.0
        self.queued = 0
        self.outbox = _Outbox()
        self.thread_view = ProcView("thread", wid, self.threads)
        self.async_view = ProcView("async", wid)

    def has_room(self, kind: str) -> bool:
        if kind == "async":
            return True
        return self.queued < self.threads or self.backlog_s < REMOTE_HORIZON_S * self.threads

    def describe(self) -> str:
        return (f"worker {self.id} (pid {self.pid} on {self.host}, {self.address}): "
                f"{self.async_view!r}, {self.thread_view!r}")


def _load_error(payload: Any, task: DTask[Any]) -> BaseException:
    try:
        return loads_error(payload)
    except Exception as exc:  # noqa: BLE001 - e.g. the exception's class is not importable here
        err = RuntimeError(f"{task._describe()} failed on a worker with an error that cannot be "
                           f"loaded in this process: {exc}")
        return err


def _load(worker: RemoteWorker) -> float:
    return worker.backlog_s / worker.threads


class Distributor:
    """Everything the scheduler does with remote workers (on the cluster's loop)."""

    def __init__(self, sched: Scheduler, heartbeat_interval: float = 1.0,
                 heartbeat_timeout: float = 10.0) -> None:
        self.sched = sched
        self.workers: dict[int, RemoteWorker] = {}
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.fn_cache = FunctionCache()
        self.bandwidth = DEFAULT_BANDWIDTH
        self.bytes_received = 0
        self._ids = itertools.count(1)
        self._dirty: set[RemoteWorker] = set()
        self._send_scheduled = False
        self._registered = asyncio.Condition()
        self._releases: collections.deque[tuple[int, set[int]]] = collections.deque()
        self._release_scheduled = False
        self._monitor: asyncio.Task[None] | None = None
        self.connections: set[Comm] = set()
        # Results and chunks that live on workers, by key (task id, or -chunk id), for
        # when a worker reports on them or is lost. Weak: a handle dropped is forgotten.
        self.objects: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self._tracked_chunks: set[int] = set()
        # Tasks spawned by tasks running in workers: id -> (task, spawning worker id),
        # kept until that worker drops its handle.
        self.nested: dict[int, tuple[DTask[Any], int]] = {}
        self._nested_fns: dict[bytes, Any] = {}

    @property
    def received_bytes(self) -> int:
        """Bytes this process has received from workers, over all their connections."""
        return self.bytes_received + sum(c.parser.bytes_received for c in self.connections)

    # -- registration and connection life --------------------------------------------------
    def start(self) -> None:
        self._monitor = asyncio.get_running_loop().create_task(self._watch())

    async def handle_connection(self, comm: Comm, info: dict[str, Any]) -> None:
        """The listener's handler for one authenticated connection from a worker."""
        holder: list[RemoteWorker] = []
        rpc: Rpc

        def on_frame(header: dict[str, Any], buffers: list[bytearray]) -> Any:
            # Raising ProtocolError ends this connection only (the listener logs it).
            op = header["op"]
            if op == "done" and holder:
                self._on_done(holder[0], header, buffers)
            elif op == "heartbeat":
                if holder:
                    holder[0].last_seen = self.sched.loop.time()
                    holder[0].stats = header
            elif op == "register" and not holder:
                return self._register(rpc, header, holder)
            elif op == "spawn" and holder:
                self._on_spawn(holder[0], header, buffers)
            elif op == "forget":
                for key in header["ids"]:
                    self.nested.pop(key, None)
            elif op == "cancel-task":
                for key in header["ids"]:
                    entry = self.nested.get(key)
                    if entry is not None:
                        self.sched.cancel(entry[0])
            elif op in ("done", "register", "spawn"):
                raise ProtocolError(f"{comm.peer} sent {op!r} "
                                    f"{'before registering' if not holder else 'twice'}")
            else:
                raise ProtocolError(f"unknown op {op!r} from {comm.peer}")
            return None

        rpc = Rpc(comm, on_frame)
        self.connections.add(comm)
        try:
            await rpc.serve()
        except (ConnectionError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
        except Exception as exc:  # a ProtocolError: logged by the listener
            reason = f"{type(exc).__name__}: {exc}"
            raise
        else:  # pragma: no cover - serve() only ends by raising
            reason = "connection closed"
        finally:
            self.connections.discard(comm)
            self.bytes_received += comm.parser.bytes_received
            if holder and holder[0].id in self.workers:
                self.lost(holder[0], locals().get("reason", "connection closed"))

    async def _register(self, rpc: Rpc, header: dict[str, Any], holder: list[RemoteWorker]) -> None:
        worker = RemoteWorker(next(self._ids), rpc, header)
        worker.last_seen = self.sched.loop.time()
        holder.append(worker)
        self.workers[worker.id] = worker
        await rpc.reply(header, {"worker_id": worker.id})
        logger.info("worker %d joined: %s", worker.id, worker.describe())
        async with self._registered:
            self._registered.notify_all()
        self.sched.request_flush()

    async def poll_stats(self, timeout: float = 10.0) -> None:
        """Ask every worker for its counters now (instead of waiting for a heartbeat)."""
        async def one(worker: RemoteWorker) -> None:
            try:
                reply, _ = await worker.rpc.request({"op": "stats"}, timeout=timeout)
            except (ConnectionError, TimeoutError):
                return
            reply.pop("op", None)
            reply.pop("reply_to", None)
            worker.stats = reply

        await asyncio.gather(*(one(w) for w in list(self.workers.values())))

    async def wait_for_workers(self, names: set[str], timeout: float) -> None:
        async with self._registered:
            await asyncio.wait_for(
                self._registered.wait_for(lambda: names <= {w.name for w in self.workers.values()}),
                timeout)

    async def _watch(self) -> None:
        """Heartbeats both ways; a worker silent past the timeout is declared lost."""
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            now = self.sched.loop.time()
            for worker in list(self.workers.values()):
                if now - worker.last_seen > self.heartbeat_timeout:
                    worker.rpc.comm.close()
                    self.lost(worker, f"no heartbeat for {self.heartbeat_timeout:.0f} s")
                    continue
                try:
                    worker.rpc.send_nowait({"op": "heartbeat"})
                except ConnectionError:
                    pass

    # -- placement and dispatch ------------------------------------------------------------
    def candidates(self, task: DTask[Any]) -> list[RemoteWorker]:
        scope = task._opts.scope
        if scope is ANY_SCOPE:
            return [w for w in self.workers.values() if w.status == "running"]
        if scope.gpu:
            return []
        return [w for w in self.workers.values()
                if w.status == "running" and scope.admits_worker(w.id, w.pid)]

    def place(self, task: DTask[Any], candidates: list[RemoteWorker]) -> RemoteWorker | None:
        """The worker with the lowest estimated finish time that has room, or None."""
        kind = "async" if task._kind == "async" else "thread"
        room = [w for w in candidates if w.has_room(kind)]
        if not room:
            return None
        if len(room) == 1:
            return room[0]
        if not task._deps:  # nothing to move: the least loaded worker
            return min(room, key=_load)
        held: dict[int, int] = {}
        for dep in task._deps or ():
            if dep._value is REMOTE:
                for wid in dep._where:
                    held[wid] = held.get(wid, 0) + dep._nbytes
        cands = [Candidate(w.id, w.backlog_s / w.threads) for w in room]
        est = self.sched.runtimes.get(task._fnkey)
        return room[choose_processor(cands, est, held, self.bandwidth)]

    def lost_dependency(self, task: DTask[Any]) -> DTask[Any] | None:
        """A dependency of ``task`` whose only copies died, if any."""
        for dep in task._deps or ():
            if dep._value is REMOTE and not any(w in self.workers for w in dep._where):
                return dep
        return None

    def dispatch(self, task: DTask[Any], worker: RemoteWorker) -> None:
        """Queue ``task`` for ``worker``; raises SerializationError if it cannot be sent."""
        assert task._fn is not None and task._args is not None and task._kwargs is not None
        fn_hash, fn_bytes = self.fn_cache.get(task._fn)
        payload, parts, chunks = dumps_args(task.name, task._args, task._kwargs, task._resolve)
        opts = task._opts
        extra = None
        if opts.restore is not None or opts.checkpoint is not None:
            try:
                extra = cloudpickle.dumps((opts.restore, opts.checkpoint))
            except Exception as exc:
                raise SerializationError(f"the restore/checkpoint callbacks of {task._describe()} "
                                         f"cannot be sent to a worker: {exc}") from exc
        out = worker.outbox
        if fn_hash not in worker.functions:
            worker.functions.add(fn_hash)
            out.functions.append([fn_hash, len(out.buffers)])
            out.buffers.append(fn_bytes)
        deps: list[list[Any]] = []
        for dep in [*(task._deps or ()), *chunks]:
            key = dep.id if type(dep) is DTask else -dep.id
            if worker.id in dep._where:
                continue
            if dep._value is not REMOTE:  # the value is in this process: send it along once
                p, b = dumps_value(dep._value)
                out.values.append([key, len(out.buffers), 1 + len(b)])
                out.buffers.append(p)
                out.buffers.extend(b)
                self._note_holder(dep, key, worker)
            else:
                holders = [[wid, self.workers[wid].address] for wid in dep._where if wid in self.workers]
                deps.append([key, holders])
        opts_index = -1
        if extra is not None:
            opts_index = len(out.buffers)
            out.buffers.append(extra)
        keys = [d.id for d in task._deps or ()] + [-c.id for c in chunks]  # every input it reads
        out.tasks.append([task.id, task.name, fn_hash, task._kind, task._attempts,
                          len(out.buffers), 1 + len(parts), deps, opts_index, task._resolve, keys])
        out.buffers.append(payload)
        out.buffers.extend(parts)
        task._est = est = self.sched.runtimes.get(task._fnkey)
        if task._kind != "async":
            worker.queued += 1
            worker.backlog_s += est
        worker.running[task.id] = task
        task._handle = worker
        self._dirty.add(worker)
        if not self._send_scheduled:
            self._send_scheduled = True
            self.sched.loop.call_soon(self._send)

    def _note_holder(self, obj: Any, key: int, worker: RemoteWorker) -> None:
        if obj._where is NOWHERE:
            obj._where = set()
        obj._where.add(worker.id)
        worker.holds.add(key)
        self.objects[key] = obj
        self._track(obj, key)

    def _track(self, obj: Any, key: int) -> None:
        """Free the copies on workers once the handle (DTask or Chunk) is garbage."""
        if type(obj) is DTask:
            if obj._tracked:
                return
            obj._tracked = True
        elif key in self._tracked_chunks:
            return
        else:
            self._tracked_chunks.add(key)
        weakref.finalize(obj, self._release_later, key, obj._where)

    def _send(self) -> None:
        self._send_scheduled = False
        dirty, self._dirty = self._dirty, set()
        for worker in dirty:
            out, worker.outbox = worker.outbox, _Outbox()
            if not out.tasks:
                continue
            header = {"op": "run", "tasks": out.tasks, "functions": out.functions, "values": out.values}
            asyncio.ensure_future(self._send_one(worker, header, out.buffers))

    async def _send_one(self, worker: RemoteWorker, header: dict[str, Any], buffers: list[Any]) -> None:
        try:
            await worker.rpc.comm.send(header, buffers)
        except ConnectionError as exc:
            self.lost(worker, str(exc))

    def cancel(self, task: DTask[Any], worker: RemoteWorker) -> None:
        if worker.running.pop(task.id, None) is not None:
            self._account_done(worker, task)
            try:
                worker.rpc.send_nowait({"op": "cancel", "ids": [task.id]})
            except ConnectionError:
                pass

    def _account_done(self, worker: RemoteWorker, task: DTask[Any]) -> None:
        if task._kind != "async":
            worker.queued -= 1
            worker.backlog_s = worker.backlog_s - task._est if worker.queued else 0.0

    # -- results ---------------------------------------------------------------------------
    def _on_done(self, worker: RemoteWorker, header: dict[str, Any], buffers: list[bytearray]) -> None:
        sched = self.sched
        index = 0
        for record in header["results"]:
            key, attempt, status, size, start, seconds, nparts = record[:7]
            parts = buffers[index:index + nparts]
            index += nparts
            task = worker.running.pop(key, None)
            if task is None:
                continue  # cancelled or re-run meanwhile
            self._account_done(worker, task)
            task._handle = None
            proc = worker.async_view if task._kind == "async" else worker.thread_view
            if status == "ok":
                if task._where:
                    task._where.clear()  # the same set object lives on in the finalizer
                task._nbytes = size
                self._note_holder(task, key, worker)
                value = REMOTE
                if nparts:
                    try:
                        value = loads_value(parts[0], parts[1:])
                    except Exception as exc:  # noqa: BLE001 - e.g. its class is not importable here
                        logger.warning("the result of %s cannot be loaded in this process (%s); it "
                                       "stays on worker %d", task._describe(), exc, worker.id)
                sched.complete(task, attempt, True, value, start, seconds, proc)
            elif status == "error":
                sched.complete(task, attempt, False, _load_error(parts[0], task), start, seconds, proc)
            elif status == "missing":
                lost = []
                for key, without in record[7]:
                    obj = self.objects.get(key)
                    if obj is not None:
                        # Those holders answered that they lack it (or hold a corrupted copy).
                        obj._where.difference_update(without)
                        for wid in without:
                            holder = self.workers.get(wid)
                            if holder is not None:
                                holder.holds.discard(key)
                    lost.append(obj)
                sched.dependencies_lost(task, lost)
        for key in header.get("holding", ()):
            obj = self._find(key)
            if obj is not None:
                self._note_holder(obj, key, worker)
        sched.request_flush()

    # -- tasks spawned inside workers --------------------------------------------------------
    def _on_spawn(self, worker: RemoteWorker, header: dict[str, Any], buffers: list[bytearray]) -> None:
        for key, fn_hash, base, nparts, refs in header["tasks"]:
            try:
                fn = self._nested_fns.get(fn_hash)
                if fn is None:
                    fn = self._nested_fns[fn_hash] = cloudpickle.loads(buffers[base])
                opts = cloudpickle.loads(buffers[base + 1])
                args, kwargs = loads_args(buffers[base + 2], buffers[base + 3:base + nparts],
                                          self._nested_task if refs else None)
                task = self.sched.spawn(opts, fn, args, kwargs, key=key)
            except Exception as exc:  # noqa: BLE001 - reported to the task's handle
                self._report_failure(worker, key, exc)
                continue
            self.nested[key] = (task, worker.id)
            task._on_done(functools.partial(self._report, worker.id))

    def _nested_task(self, key: int) -> DTask[Any]:
        return self.nested[key][0]

    def _report(self, wid: int, task: DTask[Any]) -> None:
        worker = self.workers.get(wid)
        if worker is None:
            return
        header: dict[str, Any] = {"op": "task-done", "id": task.id}
        buffers: list[Any] = []
        if task._cancelled:
            header["status"] = "cancelled"
        elif task._state == FINISHED:
            header["status"] = "finished"
            if task._value is REMOTE:
                header["holders"] = [[h, self.workers[h].address] for h in task._where if h in self.workers]
            else:
                payload, parts = dumps_value(task._value)
                buffers = [payload, *parts]
        else:
            header["status"] = "failed"
            assert task._exc is not None
            buffers = [dumps_error(task._exc)]
        asyncio.ensure_future(self._send_quietly(worker, header, buffers))

    def _report_failure(self, worker: RemoteWorker, key: int, exc: BaseException) -> None:
        exc.add_note("aiodagger: a task spawned inside a worker could not be loaded by the scheduler")
        asyncio.ensure_future(self._send_quietly(
            worker, {"op": "task-done", "id": key, "status": "failed"}, [dumps_error(exc)]))

    async def _send_quietly(self, worker: RemoteWorker, header: dict[str, Any], buffers: list[Any]) -> None:
        try:
            await worker.rpc.comm.send(header, buffers)
        except ConnectionError:
            pass

    def _find(self, key: int) -> Any:
        return self.objects.get(key)

    def _release_later(self, key: int, where: set[int]) -> None:
        """A remote result's handle was garbage collected (any thread): free its copies."""
        self._releases.append((key, where))
        if not self._release_scheduled:
            self._release_scheduled = True
            try:
                self.sched.loop.call_soon_threadsafe(self._send_releases)
            except RuntimeError:
                pass  # the loop is gone, and the workers with it

    def _send_releases(self) -> None:
        self._release_scheduled = False
        by_worker: dict[int, list[int]] = {}
        while self._releases:
            key, where = self._releases.popleft()
            self._tracked_chunks.discard(key)
            for wid in where:
                by_worker.setdefault(wid, []).append(key)
        for wid, keys in by_worker.items():
            worker = self.workers.get(wid)
            if worker is not None:
                worker.holds.difference_update(keys)
                try:
                    worker.rpc.send_nowait({"op": "release", "ids": keys})
                except ConnectionError:
                    pass

    async def fetch(self, objs: list[Any]) -> None:
        """Bring the values of finished remote results into this process."""
        by_worker: dict[int, list[Any]] = {}
        for obj in objs:
            if obj._value is not REMOTE:
                continue
            alive = [wid for wid in obj._where if wid in self.workers]
            if not alive:
                raise LookupError(obj)
            by_worker.setdefault(alive[0], []).append(obj)
        await asyncio.gather(*(self._fetch_from(self.workers[wid], items) for wid, items in by_worker.items()))

    async def _fetch_from(self, worker: RemoteWorker, objs: list[Any]) -> None:
        keys = [o.id if type(o) is DTask else -o.id for o in objs]
        reply, buffers = await worker.rpc.request({"op": "get", "ids": keys})
        found = {}
        index = 0
        for key, nparts in reply["items"]:
            found[key] = loads_value(buffers[index], buffers[index + 1:index + nparts])
            index += nparts
        for obj, key in zip(objs, keys, strict=True):
            if key in found and obj._value is REMOTE:
                obj._value = found[key]

    async def put(self, chunk: Chunk[Any], worker: RemoteWorker) -> None:
        payload, parts = dumps_value(chunk._value)
        await worker.rpc.comm.send({"op": "put", "id": -chunk.id}, [payload, *parts])
        chunk._nbytes = len(payload) + sum(p.nbytes for p in parts)
        self._note_holder(chunk, -chunk.id, worker)
        chunk._value = REMOTE

    # -- loss ------------------------------------------------------------------------------
    def lost(self, worker: RemoteWorker, reason: str) -> None:
        if self.workers.pop(worker.id, None) is None:
            return
        worker.status = "lost"
        logger.warning("worker %d (%s) lost: %s", worker.id, worker.address, reason)
        running = list(worker.running.values())
        worker.running.clear()
        for key in [k for k, (_, wid) in self.nested.items() if wid == worker.id]:
            del self.nested[key]  # nobody there waits for these any more
        for key in worker.holds:
            obj = self.objects.get(key)
            if obj is not None:
                obj._where.discard(worker.id)
        for task in running:
            task._handle = None
            self.sched.run_lost(task, worker.id, worker.address, reason)
        self.sched.request_flush()

    async def retire(self, worker: RemoteWorker, timeout: float = 60.0) -> None:
        """Move what only ``worker`` holds to other workers, then let it go."""
        others = [w for w in self.workers.values() if w is not worker and w.status == "running"]
        worker.status = "retiring"
        if others:
            items = []
            for key in list(worker.holds):
                obj = self.objects.get(key)
                if obj is not None and obj._where == {worker.id}:
                    items.append([key, [[worker.id, worker.address]]])
            target_of: dict[int, list[list[Any]]] = {}
            for i, item in enumerate(items):
                target_of.setdefault(others[i % len(others)].id, []).append(item)
            await asyncio.gather(*(self.workers[wid].rpc.request({"op": "replicate", "items": part},
                                                                 timeout=timeout)
                                   for wid, part in target_of.items()))
            await asyncio.sleep(0)  # let their "holding" notes arrive first
        self.workers.pop(worker.id, None)
        worker.status = "closing"
        try:
            worker.rpc.send_nowait({"op": "shutdown"})
        except ConnectionError:
            pass

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
        for worker in list(self.workers.values()):
            worker.status = "closing"
            del self.workers[worker.id]  # leaving, not lost
            try:
                worker.rpc.send_nowait({"op": "shutdown"})
            except ConnectionError:
                pass

    def describe(self) -> list[str]:
        return [w.describe() for w in self.workers.values()]


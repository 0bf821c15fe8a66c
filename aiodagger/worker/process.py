"""A worker in a process of its own: subprocess workers and ``aiodagger worker`` alike.

It connects to the scheduler, authenticates, registers, then runs what it is sent on
the same processors as worker 0 (a ThreadProc and an AsyncProc), keeping each result
in its own memory. Results leave only when asked: the scheduler asks when a caller
awaits one; another worker asks, through this worker's data server, when a task there
needs it. Completions go back in one message per loop iteration.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import socket
import threading
import types
from collections.abc import Awaitable, Sequence
from typing import Any

import cloudpickle

from .._context import current_cluster_var as _current_cluster
from .._context import pool_thread as _pool_thread
from ..comm.framing import Comm, open_comm
from ..comm.handshake import client_handshake
from ..comm.rpc import Rpc
from ..comm.server import Listener, parse_address
from ..errors import ProtocolError, TaskCancelledError
from ..memory import ChunkStore, SpillCorruptedError, admit
from ..options import TaskOptions
from ..task import DTask
from .aio import AsyncProc
from .nested import NestedCluster, SchedulerClient
from .threads import ThreadProc
from .wire import dumps_error, dumps_value, loads_args, loads_value

__all__ = ["INLINE_LIMIT", "WorkerProcess"]

logger = logging.getLogger(__name__)

# Results up to this size travel with their completion, so awaiting them (or using
# them in a task elsewhere) costs no extra round trip. Larger ones stay here.
INLINE_LIMIT = 64 << 10


_PLAIN = TaskOptions()


class MissingDependency(Exception):
    """A chunk that no holder could provide; ``holders`` are those that said they lack it."""

    def __init__(self, key: int, holders: list[int]) -> None:
        super().__init__(key, holders)
        self.key = key
        self.holders = holders


class WorkerProcess:
    """Runs tasks for one cluster; lives as long as its process."""

    def __init__(self, scheduler: str, token: str, *, threads: int, name: str,
                 reconnect: bool = False, ssl_client: Any = None, ssl_server: Any = None,
                 heartbeat_interval: float = 1.0, heartbeat_timeout: float = 10.0,
                 memory_limit: int | None = None, spill_dir: str | None = None) -> None:
        self.scheduler_host, self.scheduler_port = parse_address(scheduler)
        self.token = token
        self.threads = threads
        self.name = name
        self.reconnect = reconnect
        self.ssl_client = ssl_client
        self.ssl_server = ssl_server
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.memory_limit = memory_limit
        self.spill_dir = spill_dir
        self.worker_id = -1
        # Results and inputs by key (task id, or -chunk id), spilled to disk past the
        # memory limit. Running tasks pin what they read.
        self.store: ChunkStore = self._new_store()
        self._pins: dict[int, list[int]] = {}
        self.functions: dict[bytes, Any] = {}
        self.running: dict[int, DTask[Any]] = {}
        self.loop: asyncio.AbstractEventLoop
        self.loop_thread_id = 0
        self._rpc: Rpc | None = None
        self._peers: dict[str, Rpc] = {}
        self._peer_tasks: set[asyncio.Task[None]] = set()
        self._fetching: dict[int, asyncio.Future[None]] = {}
        self._records: list[list[Any]] = []
        self._record_buffers: list[Any] = []
        self._holding: list[int] = []
        self._flush_scheduled = False
        self._stopping = False
        self._listener: Listener | None = None
        self._last_seen = 0.0
        self._backoff = 0.1

    def _new_store(self) -> ChunkStore:
        return ChunkStore(self.memory_limit, self.spill_dir, worker_name=self.name)

    # -- processor interface (what ThreadProc/AsyncProc call) ----------------------------
    instruments: list[Any] = []  # observers live with the scheduler, not here

    def request_flush(self) -> None:
        """Nothing waits here for capacity: the scheduler meters what it sends."""

    def complete(self, task: DTask[Any], attempt: int, ok: bool, value: Any,
                 start: float, seconds: float, proc: Any) -> None:
        if ok and type(value) is types.CoroutineType:
            self.async_proc.submit(task, value)  # a sync function returned a coroutine
            return
        self.running.pop(task.id, None)
        task._fn = task._args = task._kwargs = None
        for key in self._pins.pop(task.id, ()):
            self.store.unpin(key)
        if task._cancelled:
            self._record([task.id, attempt, "cancelled", 0, start, seconds, 0])
            return
        if ok:
            try:
                payload, buffers = dumps_value(value)
            except Exception as exc:  # noqa: BLE001 - an unpicklable result cannot be fetched
                exc.add_note(f"aiodagger: the result of {task._describe()} cannot be pickled")
                ok, value = False, exc
            else:
                size = len(payload) + sum(b.nbytes for b in buffers)
                self.store.put(task.id, value, nbytes=size)
                if size <= INLINE_LIMIT:
                    self._record([task.id, attempt, "ok", size, start, seconds, 1 + len(buffers)],
                                 [payload, *[bytes(b) for b in buffers]])
                else:
                    self._record([task.id, attempt, "ok", size, start, seconds, 0])
                return
        error = value if isinstance(value, BaseException) else RuntimeError(repr(value))
        error.add_note(f"aiodagger: raised by {task._describe()} on worker {self.worker_id} "
                     f"(pid {os.getpid()}, {socket.gethostname()}), attempt {attempt + 1}")
        self._record([task.id, attempt, "error", 0, start, seconds, 1], [dumps_error(error)])

    def _record(self, record: list[Any], buffers: list[Any] = ()) -> None:  # type: ignore[assignment]
        self._records.append(record)
        self._record_buffers.extend(buffers)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_records)

    def _flush_records(self) -> None:
        self._flush_scheduled = False
        rpc = self._rpc
        records, buffers, holding = self._records, self._record_buffers, self._holding
        self._records, self._record_buffers, self._holding = [], [], []
        if rpc is None or rpc.comm.closed:
            return
        try:
            rpc.send_nowait({"op": "done", "results": records, "holding": holding}, buffers)
        except ConnectionError:
            pass

    # -- lifecycle -----------------------------------------------------------------------
    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop_thread_id = threading.get_ident()
        # Tasks here spawn nested tasks through a client of the scheduler.
        self.client = SchedulerClient(self)
        nested = NestedCluster(self.client)
        task_context = contextvars.Context()
        task_context.run(_current_cluster.set, nested)

        def thread_init() -> None:
            _pool_thread.cluster = nested

        self.thread_proc = ThreadProc(0, self.threads, self, thread_init)  # type: ignore[arg-type]
        self.async_proc = AsyncProc(0, self, task_context)  # type: ignore[arg-type]
        self.thread_proc.start()
        await self.store.start()
        self._listener = Listener(self._serve_peer, self.token, ssl=self.ssl_server)
        await self._listener.start("0.0.0.0" if self.reconnect else "127.0.0.1", 0)
        try:
            while not self._stopping:
                try:
                    await self._session()
                except (ConnectionError, OSError, TimeoutError) as exc:
                    logger.info("worker %s: scheduler connection ended: %s", self.name, exc)
                except ProtocolError as exc:  # a bad frame ends the connection, not the worker
                    logger.warning("worker %s: scheduler connection closed: %s", self.name, exc)
                if not self.reconnect or self._stopping:
                    break
                logger.warning("worker %s: reconnecting to the scheduler in %.1f s", self.name, self._backoff)
                await asyncio.sleep(self._backoff)
                self._backoff = min(self._backoff * 2, 5.0)
        finally:
            await self._shutdown()

    async def _session(self) -> None:
        comm = await open_comm(self.scheduler_host, self.scheduler_port, ssl=self.ssl_client)
        await client_handshake(comm, self.token, {"role": "worker"})
        # A new session is a new worker for the scheduler: what we held belongs to the
        # worker it has already declared lost.
        if len(self.store):
            await self.store.close()
            self.store = self._new_store()
            await self.store.start()
        rpc = Rpc(comm, self._on_scheduler_frame)
        self._rpc = rpc
        serving = asyncio.ensure_future(rpc.serve())
        heartbeat = asyncio.ensure_future(self._heartbeat(rpc))
        try:
            assert self._listener is not None
            host = comm.transport.get_extra_info("sockname")[0] if comm.transport else "127.0.0.1"
            reply, _ = await rpc.request({
                "op": "register", "name": self.name, "pid": os.getpid(), "host": socket.gethostname(),
                "threads": self.threads, "address": f"tcp://{host}:{self._listener.port}",
                "memory_limit": self.memory_limit,
            }, timeout=30)
            self.worker_id = reply["worker_id"]
            self._backoff = 0.1
            logger.info("worker %s registered as worker %d", self.name, self.worker_id)
            self._last_seen = self.loop.time()
            await serving
        finally:
            heartbeat.cancel()
            serving.cancel()
            await asyncio.gather(heartbeat, serving, return_exceptions=True)
            self._rpc = None
            await rpc.close()
            self._cancel_all()

    async def _heartbeat(self, rpc: Rpc) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            if self.loop.time() - self._last_seen > self.heartbeat_timeout:
                logger.warning("worker %s: no word from the scheduler for %.0f s; reconnecting",
                               self.name, self.heartbeat_timeout)
                rpc.comm.close()
                return
            try:
                rpc.send_nowait({"op": "heartbeat", **self._stats()})
            except ConnectionError:
                return

    def _stats(self) -> dict[str, Any]:
        stats = self.store.stats()
        stats["memory_used"] = stats["used"]
        stats["running"] = len(self.running)
        return stats

    def _cancel_all(self) -> None:
        for task in list(self.running.values()):
            task._cancelled = True
            if task._handle is not None:
                self.async_proc.cancel(task._handle)
        self.running.clear()

    async def _shutdown(self) -> None:
        self._stopping = True
        self._cancel_all()
        for rpc in list(self._peers.values()):
            await rpc.close()
        for task in list(self._peer_tasks):
            task.cancel()
        if self._listener is not None:
            await self._listener.close()
        await self.async_proc.close()
        await self.thread_proc.close(5.0)
        await self.store.close()

    # -- messages from the scheduler -----------------------------------------------------
    def _on_scheduler_frame(self, header: dict[str, Any], buffers: list[bytearray]) -> Awaitable[None] | None:
        self._last_seen = self.loop.time()
        op = header["op"]
        if op == "run":
            self._on_run(header, buffers)
        elif op == "get":
            assert self._rpc is not None
            return self._serve_get(self._rpc, header)
        elif op == "release":
            for key in header["ids"]:
                self.store.delete(key)
        elif op == "cancel":
            for key in header["ids"]:
                task = self.running.get(key)
                if task is not None:
                    task._cancelled = True
                    if task._handle is not None:
                        self.async_proc.cancel(task._handle)
        elif op == "put":
            self.store.put(header["id"], loads_value(buffers[0], buffers[1:]))
        elif op == "stats":
            assert self._rpc is not None
            return self._rpc.reply(header, self._stats())
        elif op == "task-done":
            self.client.on_task_done(header, buffers)
        elif op == "replicate":
            return self._replicate(header)
        elif op == "shutdown":
            self._stopping = True
            if self._rpc is not None:
                self._rpc.comm.close()
        elif op != "heartbeat":
            # ends this session (the worker reconnects), as DESIGN.md section 3 asks
            raise ProtocolError(f"unknown op {op!r} from the scheduler")
        return None

    def _on_run(self, header: dict[str, Any], buffers: list[bytearray]) -> None:
        # Anything that fails to load fails the tasks that need it, never the worker:
        # e.g. a function whose module this machine cannot import.
        broken: dict[bytes, BaseException] = {}
        for fn_hash, index in header.get("functions", ()):
            try:
                self.functions[fn_hash] = cloudpickle.loads(buffers[index])
            except Exception as exc:  # noqa: BLE001
                broken[fn_hash] = exc
        for key, index, nparts in header.get("values", ()):
            try:
                self.store.put(key, loads_value(buffers[index], buffers[index + 1:index + nparts]))
            except Exception as exc:  # noqa: BLE001 - the tasks needing it report it missing
                logger.error("worker %s: cannot load input %d: %s", self.name, key, exc)
        for entry in header["tasks"]:
            key, name, fn_hash, kind, attempt, index, nparts, deps, opts_index, refs, keys = entry
            args_parts = buffers[index:index + nparts]
            task: DTask[Any] = DTask(self, key, name, None, (), {}, _PLAIN)  # type: ignore[arg-type]
            task._kind = kind
            task._attempts = attempt
            task._resolve = refs  # here: whether the arguments hold references to resolve
            self.running[key] = task
            try:
                if fn_hash in broken:
                    raise broken[fn_hash]
                task._fn = self.functions[fn_hash]
                if opts_index >= 0:
                    restore, checkpoint = cloudpickle.loads(buffers[opts_index])
                    task._opts = TaskOptions(name=name, restore=restore, checkpoint=checkpoint)
            except Exception as exc:  # noqa: BLE001
                exc.add_note(f"aiodagger: {task._describe()} could not be loaded on worker {self.worker_id}")
                self.complete(task, attempt, False, exc, 0.0, 0.0, None)
                continue
            missing = [d for d in deps if d[0] not in self.store]
            if missing or (keys and self.store.memory_limit is not None) or self.store.paused:
                asyncio.ensure_future(self._prepare_then_start(task, args_parts, missing, keys))
            else:  # everything is in RAM and nothing can be spilled: start at once
                self._start(task, args_parts, self.store.peek_in_memory)

    def _start(self, task: DTask[Any], parts: list[bytearray], lookup: Any) -> None:
        if task._cancelled:
            self.complete(task, task._attempts, False, TaskCancelledError(task._describe()), 0.0, 0.0, None)
            return
        try:
            task._args, task._kwargs = loads_args(parts[0], parts[1:], lookup if task._resolve else None)
            task._resolve = False  # the values are in place
        except Exception as exc:  # noqa: BLE001 - e.g. a class this worker cannot import
            exc.add_note(f"aiodagger: the arguments of {task._describe()} could not be loaded on "
                         f"worker {self.worker_id}")
            self.complete(task, task._attempts, False, exc, 0.0, 0.0, None)
            return
        if task._kind == "async":
            self.async_proc.submit(task)
        else:
            self.thread_proc.submit(task)

    async def _prepare_then_start(self, task: DTask[Any], parts: list[bytearray],
                                  missing: list[Any], keys: list[int]) -> None:
        """Fetch missing inputs, wait for admission, load and pin inputs, then start."""
        bad: dict[int, list[int]] = {}
        for key, holders in missing:
            try:
                await self._fetch(key, holders)
            except MissingDependency as exc:
                bad[key] = exc.holders
        store = self.store
        # Back-pressure: above the pause threshold nothing new starts until spilling
        # (or finishing tasks) brings memory down; see ChunkStore.wait_admitted.
        await admit(store)
        values: dict[int, Any] = {}
        pinned: list[int] = []
        for key in keys:
            if key in bad:
                continue
            try:
                store.pin(key)
                pinned.append(key)
                values[key] = await store.get(key)
            except (KeyError, SpillCorruptedError) as exc:
                logger.warning("worker %s: input %d of %s is unavailable here: %s",
                               self.name, key, task._describe(), exc)
                bad[key] = [self.worker_id]
        if bad or task._cancelled:
            for key in pinned:
                store.unpin(key)
            self.running.pop(task.id, None)
            if bad:
                self._record([task.id, task._attempts, "missing", 0, 0.0, 0.0, 0,
                              [[k, h] for k, h in bad.items()]])
            else:
                self._record([task.id, task._attempts, "cancelled", 0, 0.0, 0.0, 0])
            return
        self._pins[task.id] = pinned
        self._start(task, parts, values.__getitem__)

    async def _fetch(self, key: int, holders: list[list[Any]]) -> None:
        """Bring chunk ``key`` here from one of its holders (each fetched once at a time)."""
        pending = self._fetching.get(key)
        without: list[int] = []
        if pending is None:
            pending = self.loop.create_future()
            self._fetching[key] = pending
            try:
                without = await self._fetch_from(key, holders)
            finally:
                del self._fetching[key]
                pending.set_result(None)
        else:
            await asyncio.shield(pending)
        if key not in self.store:
            raise MissingDependency(key, without)

    async def _fetch_from(self, key: int, holders: list[list[Any]]) -> list[int]:
        """Try the holders in turn; return the ids of those that answered without it."""
        without = []
        for wid, address in holders:
            try:
                rpc = await self._peer(address)
                reply, buffers = await rpc.request({"op": "get", "ids": [key]}, timeout=300)
            except (ConnectionError, OSError, TimeoutError) as exc:
                logger.info("worker %s: fetching %d from %s failed: %s", self.name, key, address, exc)
                continue
            if reply["items"]:
                self.store.put(key, loads_value(buffers[0], buffers[1:]))
                self._holding.append(key)
                return []
            without.append(wid)
        return without

    async def _peer(self, address: str) -> Rpc:
        rpc = self._peers.get(address)
        if rpc is not None and not rpc.comm.closed:
            return rpc
        host, port = parse_address(address)
        comm = await open_comm(host, port, ssl=self.ssl_client)
        await client_handshake(comm, self.token, {"role": "peer", "worker": self.worker_id})
        rpc = Rpc(comm, lambda h, b: None)
        self._peers[address] = rpc
        task = asyncio.ensure_future(rpc.serve())
        self._peer_tasks.add(task)
        task.add_done_callback(self._peer_done)
        return rpc

    def _peer_done(self, task: asyncio.Task[None]) -> None:
        self._peer_tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a peer going away is expected

    async def _replicate(self, header: dict[str, Any]) -> None:
        for key, holders in header["items"]:
            try:
                await self._fetch(key, holders)
            except MissingDependency:
                pass
        self._record_holding_now()
        assert self._rpc is not None
        await self._rpc.reply(header, {"ok": True})

    def _record_holding_now(self) -> None:
        if self._holding and not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_records)

    # -- data server (peers and the scheduler ask for chunks) ----------------------------
    async def _serve_peer(self, comm: Comm, info: dict[str, Any]) -> None:
        rpc: Rpc

        def handle(header: dict[str, Any], buffers: list[bytearray]) -> Awaitable[None] | None:
            if header["op"] == "get":
                return self._serve_get(rpc, header)
            # ends this connection only; the listener logs it
            raise ProtocolError(f"unknown op {header['op']!r} from a peer")

        rpc = Rpc(comm, handle)
        await rpc.serve()

    async def _serve_get(self, rpc: Rpc, header: dict[str, Any]) -> None:
        items: list[list[int]] = []
        missing: list[int] = []
        buffers: list[Any] = []
        for key in header["ids"]:
            try:
                # A spilled chunk goes out as its file's parts: the file is in the wire's
                # format, so it is neither unpickled nor loaded back into the store.
                chunk_parts: tuple[Any, Sequence[Any]] | None = await self.store.read_spilled(key)
                if chunk_parts is None:
                    chunk_parts = dumps_value(await self.store.get(key))
            except (KeyError, SpillCorruptedError):
                missing.append(key)
                continue
            payload, parts = chunk_parts
            items.append([key, 1 + len(parts)])
            buffers.append(payload)
            buffers.extend(parts)
        await rpc.reply(header, {"items": items, "missing": missing}, buffers)


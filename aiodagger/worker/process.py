"""A worker in a process of its own: subprocess workers and ``aiodagger worker`` alike.

It connects to the scheduler, authenticates, registers, then runs what it is sent on
the same processors as worker 0 (a ThreadProc and an AsyncProc, to which it is the
:class:`~aiodagger.interfaces.ProcessorOwner`), keeping each result in its own
ChunkStore. Results leave only when asked: the scheduler asks when a caller awaits
one; another worker asks, through this worker's data server, when a task there needs
it. Completions go back in one "done" batch per loop iteration, with the store's
counters. A task sent ahead of inputs still running here is held until they finish,
then started, as a continuation on the thread that finished the last of them when its
other inputs are in memory (see ``_hold``). Messages are those of
:mod:`aiodagger.comm.protocol`, each handled by the method its handler table names.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import socket
import sys
import threading
import types
from collections.abc import Sequence
from time import perf_counter
from typing import TYPE_CHECKING, Any

import cloudpickle

from .._args import DEPS, FILES
from .._bridge import Wakeup
from .._context import current_cluster_var as _current_cluster
from .._context import pool_thread as _pool_thread
from ..comm import protocol as P
from ..comm.framing import DEFAULT_MAX_FRAME, Comm, open_comm
from ..comm.handshake import client_handshake
from ..comm.server import Listener, parse_address
from ..errors import FrameTooLargeError, NoProcessorError, ProtocolError, TaskCancelledError
from ..gpu.arrays import device_nbytes, is_device_array
from ..gpu.discovery import parse_kind, pick_gpu
from ..gpu.streams import readiness
from ..memory import ChunkStore, SpillCorruptedError, admit, shared
from ..placed import Ref
from ..task import CANCELLED, PENDING, RUNNING, Chunk, DTask
from ..taskoptions import TaskOptions
from .aio import HURRY_GRACE, AsyncProc
from .execute import callback_errors
from .nested import NestedCluster, SchedulerClient
from .threads import ThreadProc

if TYPE_CHECKING:
    from .streams import WorkerStreams

__all__ = ["INLINE_LIMIT", "WorkerProcess"]

logger = logging.getLogger(__name__)

# Results up to this size travel with their completion, so awaiting them (or using
# them in a task elsewhere) costs no extra round trip. Larger ones stay here.
INLINE_LIMIT = 64 << 10
# A result of a builtin type (int, str...) this small, that no task held here waits for,
# is sent with its record and not kept: the scheduler keeps it (status "value"), and
# sends it along to a task that needs it (this worker's too). Kept, each cost the
# scheduler a holder's note and a release, and this worker a store entry and its
# removal. W4's shape (5,000 tasks returning ints) repeated for 8 s, CPU time per task
# from psutil: each worker 4.4 -> 3.6-3.9 us, the scheduler's process 10.7 -> 9.3-10.4.
TINY_RESULT = 1024


_PLAIN = TaskOptions()
_NO_KWARGS: dict[str, Any] = {}  # shared by the tasks of RunPlain: none takes keywords
_NONE_WAITING = float("-inf")
_streams_lock = threading.Lock()


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
                 ssl_scheduler: Any = None,
                 heartbeat_interval: float = 1.0, heartbeat_timeout: float = 10.0,
                 memory_limit: int | None = None, spill_dir: str | None = None,
                 shutdown_timeout: float = 10.0, max_frame: int = DEFAULT_MAX_FRAME,
                 data_host: str | None = None, gpus: list[int] | None = None,
                 gpu_memory_limit: int | None = None, resources: dict[str, float] | None = None) -> None:
        self.scheduler_host, self.scheduler_port = parse_address(scheduler)
        # Where the data server listens: a remote worker for peers anywhere; a subprocess
        # worker on loopback, unless its cluster takes remote workers (they fetch from it).
        self.data_host = data_host or ("0.0.0.0" if reconnect else "127.0.0.1")
        self.max_frame = max_frame
        self.shutdown_timeout = shutdown_timeout
        self.token = token
        self.threads = threads
        self.name = name
        self.reconnect = reconnect
        self.ssl_client = ssl_client  # to peers' data servers
        self.ssl_server = ssl_server  # this worker's data server
        self.ssl_scheduler = ssl_scheduler
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.memory_limit = memory_limit
        self.spill_dir = spill_dir
        self.gpus = list(gpus or [])  # devices found by the CLI, in this process
        self.resources = dict(resources or {})  # declared to the scheduler (--resources)
        self.gpu_memory_limit = gpu_memory_limit
        self.gpu_procs: dict[int, Any] = {}
        # Events for the scheduler's observers, batched, collected only while it asks
        # (P.Listen): with nobody listening a worker pays one truth test per event.
        self.listening = False
        self._events: tuple[list[P.RunEvent], list[P.MoveEvent], list[P.StoreEvent]] = ([], [], [])
        self.worker_id = -1
        self._early_runs: list[tuple[P.Run | P.RunPlain, list[Any]]] = []  # read before the id was taken
        # Results and inputs by key (task id, or -chunk id), spilled to disk past the
        # memory limit. Running tasks pin what they read.
        # Values handed to readers on this machine through /dev/shm, and what names
        # this machine's /dev/shm to holders we ask ("" : not used).
        self._segments = shared.Segments(
            name, shared.FREE_BYTES if memory_limit is None else min(shared.FREE_BYTES, memory_limit // 8))
        if memory_limit is not None:
            shared.keep_mappings(False)  # the limit counts this process's RSS
        self._shm_key = shared.host_key()
        # Set once a reader on this machine took a value through a segment, where there
        # is no memory limit (a segment is RAM the store does not count): from then on,
        # large results are shared as they are made.
        self._share_eagerly = False
        self.store: ChunkStore = self._new_store()
        # What each running attempt pinned, by (task id, attempt): a task whose timed-out
        # attempt still runs in its thread may run again here meanwhile.
        self._pins: dict[tuple[int, int], list[Any]] = {}
        self.functions: dict[bytes, Any] = {}
        self.running: dict[int, DTask[Any]] = {}
        # Tasks sent ahead of inputs still running here (RunTask.waits), by key, with
        # their parts, the inputs to fetch and the input keys: each starts once those
        # inputs finish here (on the finishing thread when it can, see _hold). They are
        # in ``running`` too, which is what cancels and the end of a session walk.
        self.held: dict[int, tuple[DTask[Any], Sequence[Any], list[P.Dep], list[int]]] = {}
        # Tasks handed to the pool with a priority other than 0, until they end: a chain
        # of held tasks yields to one of them waiting (ready_priority).
        self._urgent: list[DTask[Any]] = []
        self._priorities: dict[int, TaskOptions] = {}
        self.loop: asyncio.AbstractEventLoop
        self.loop_thread_id = 0
        self.endpoint: P.Endpoint | None = None
        self._blocked_sent = 0  # the scheduler's count of our threads waiting in fetch()
        self._peers: dict[str, P.Endpoint] = {}
        self._peer_tasks: set[asyncio.Task[None]] = set()
        # Tasks getting their inputs ready: cancelled at shutdown before the store closes
        # (a fetch that completed after it raised "store is closing" into the void).
        self._preparing: set[asyncio.Future[None]] = set()
        # Fetches under way, by key: what waits for one learns its outcome (None, or the
        # FrameTooLargeError that makes the input unobtainable).
        self._fetching: dict[int, asyncio.Future[FrameTooLargeError | None]] = {}
        self._done = P.Batch(self._done_message, max_frame)
        self._values = P.PlainValues()
        self._holding: list[int] = []
        self._flush_wakeup: Wakeup | None = None  # made with the loop, in run()
        self._stopping = False
        self._serving: asyncio.Future[None] | None = None
        # Set by stop(now=True): running tasks get HURRY_GRACE, not the shutdown timeout.
        self._hurry = asyncio.Event()
        self._listener: Listener | None = None
        self._backoff = 0.1
        self._streams: WorkerStreams | None = None

    @property
    def streams(self) -> WorkerStreams:
        """The ends of the streams produced or read here (made on first use, which may
        be on a pool thread and the loop at once: a reader and a producer starting)."""
        if self._streams is None:
            with _streams_lock:
                if self._streams is None:
                    from .streams import WorkerStreams

                    self._streams = WorkerStreams(self)
        return self._streams

    def _on_stream(self, msg: Any, buffers: list[Any]) -> None:
        self.streams.on_message(msg, buffers)

    @property
    def stopping(self) -> bool:
        """Whether this worker is on its way out (asked to stop, or shutting down)."""
        return self._stopping

    def _new_store(self) -> ChunkStore:
        store = ChunkStore(self.memory_limit, self.spill_dir, worker_name=self.name,
                           device_limit=self.gpu_memory_limit)
        store.on_drop = self._segments.drop
        return store

    # -- ProcessorOwner: what ThreadProc / AsyncProc report to ---------------------------
    timed = False  # observers live with the scheduler; coroutines are not timed here

    def ready_priority(self) -> float:
        """The best priority among tasks waiting for a pool thread (read from pool
        threads, unlocked: a heuristic, as the scheduler's). Only tasks with a priority
        other than 0 are tracked, and one counts as waiting while anything is queued."""
        urgent = self._urgent
        if not urgent or not self.thread_proc.waiting():
            return _NONE_WAITING
        return max([t._opts.priority for t in urgent], default=_NONE_WAITING)

    def request_flush(self) -> None:
        """A pool thread began or ended waiting in ``fetch()``: tell the scheduler, which
        meters what it sends by free slots (see protocol.Blocked)."""
        blocked = self.thread_proc.blocked_threads
        if blocked != self._blocked_sent and self.endpoint is not None:
            self._blocked_sent = blocked
            try:
                self.endpoint.send_nowait(P.Blocked(blocked))
            except ConnectionError:
                pass  # the session is ending; the next one starts from none blocked

    def _forget_running(self, task: DTask[Any]) -> None:
        """``task``'s run is over here; a later attempt of it may be running still."""
        if self.running.get(task.id) is task:
            del self.running[task.id]

    def complete(self, task: DTask[Any], attempt: int, ok: bool, value: Any,
                 start: float, seconds: float, proc: Any) -> None:
        if ok and type(value) is types.CoroutineType:
            self.async_proc.submit(task, value)  # a sync function returned a coroutine
            return
        self._forget_running(task)
        if self.listening and proc is not None:
            self._events[0].append(P.RunEvent(task.id, attempt, getattr(proc, "thread", repr(proc))))
        task._fn = task._args = task._kwargs = None
        if self.held:
            self.held.pop(task.id, None)  # a held task a pool thread ran as a continuation
        if self._urgent and task._opts.priority and task in self._urgent:
            self._urgent.remove(task)
        pins = self._pins.pop((task.id, attempt), None)
        if pins is not None:
            self.store.unpin_all(pins)
        if task._cancelled:
            self._record(P.Finished(task.id, attempt, "cancelled", 0, start, seconds, 0, []))
            self._drop_held(task)
            return
        if ok and task._dependents is None and (size := P.small_size(value)) >= 0:
            # A small builtin that nothing here waits for: kept by the scheduler only (see
            # TINY_RESULT), sent with others in columns, all pickled in one call.
            self._values.add(task.id, attempt, start, seconds, value, size)
            self._schedule_flush()
            return
        if ok and "cupy" in sys.modules and is_device_array(value):
            # Stays on its device (a tier of the store, moved to host past the device
            # limit, after the work on the stream that made it); pickled, to host, only
            # if a reader elsewhere asks.
            size = device_nbytes(value)
            made = readiness.of(value)
            self.store.put(task.id, value, stream=made.stream if made is not None else None)
            self._record(P.Finished(task.id, attempt, "ok", size, start, seconds, 0, []))
            if task._dependents is not None:
                self._finished_here(task, value)
            return
        if ok:
            try:
                payload, buffers = P.dumps(value)
            except Exception as exc:  # noqa: BLE001 - an unpicklable result cannot be fetched
                exc.add_note(f"aiodagger: the result of {task._describe()} cannot be pickled")
                ok, value = False, exc
            else:
                size = len(payload) + sum(b.nbytes for b in buffers)
                if size <= TINY_RESULT and type(value) in P.PLAIN_TYPES and task._dependents is None:
                    # Nothing here waits for it and the scheduler keeps it: not stored here,
                    # so never released either (see TINY_RESULT).
                    self._record(P.Finished(task.id, attempt, "value", size, start, seconds, 1, []),
                                 [payload])
                    return
                self.store.put(task.id, value, nbytes=size, spillable=type(value) is not Ref)
                if self._share_eagerly and size >= shared.EAGER_BYTES and type(value) is not Ref:
                    sharing = asyncio.ensure_future(self._share_then_record(
                        task, attempt, value, payload, list(buffers), size, start, seconds))
                    self._preparing.add(sharing)
                    sharing.add_done_callback(self._preparing.discard)
                    return
                if size <= INLINE_LIMIT:
                    self._record(P.Finished(task.id, attempt, "ok", size, start, seconds,
                                            1 + len(buffers), []),
                                 [payload, *[bytes(b) for b in buffers]])
                else:
                    self._record(P.Finished(task.id, attempt, "ok", size, start, seconds, 0, []))
                if task._dependents is not None:
                    self._finished_here(task, value)
                return
        error = value if isinstance(value, BaseException) else RuntimeError(repr(value))
        error.add_note(f"aiodagger: raised by {task._describe()} on worker {self.worker_id} "
                       f"(pid {os.getpid()}, {socket.gethostname()}), attempt {attempt + 1}")
        payload = P.dumps_error(error)
        if len(payload) > (limit := self._scheduler_limit()):
            payload = P.dumps_error(FrameTooLargeError.of(
                f"the {type(error).__name__} raised by {task._describe()}, pickled,", len(payload), limit))
        self._record(P.Finished(task.id, attempt, "error", 0, start, seconds, 1, []), [payload])
        self._drop_held(task)

    # -- tasks sent ahead of their inputs (RunTask.waits) ----------------------------------
    def _finished_here(self, task: DTask[Any], value: Any) -> None:
        """``task`` finished here: start each held task that waited for it last.

        As the scheduler's _finish: the list is taken off ``task`` before any count goes
        down, which is how a pool thread's _claim_continuation knows that this record is
        on the books (see threads.py); a dependent a thread claimed is RUNNING, skipped."""
        dependents = task._dependents
        task._dependents = None
        task._value = value  # what a held task's arguments read (they hold this DTask)
        for dep in dependents or ():
            left = dep._npending - 1
            dep._npending = left
            if left == 0 and dep._state is PENDING and not dep._cancelled:
                self._release_held(dep)

    def _drop_held(self, task: DTask[Any]) -> None:
        """``task`` ended here without a result (error, cancelled, inputs missing): the
        tasks held for it, and those held for them, will not start here. Each is
        reported "dropped", after ``task``'s own record: the scheduler decides what
        becomes of it, as it does for a task whose input failed."""
        stack = task._dependents
        if not stack:
            return
        task._dependents = None
        stack = list(stack)
        held = self.held
        while stack:
            dep = stack.pop()
            entry = held.get(dep.id)
            if entry is None or entry[0] is not dep or dep._state is not PENDING:
                continue  # started already (a thread claimed it), or ended
            del held[dep.id]
            self._forget_running(dep)
            dep._cancelled = True  # never claimed or released from here on
            dep._state = CANCELLED
            dep._fn = dep._args = dep._kwargs = None
            self._record(P.Finished(dep.id, dep._attempts, "dropped", 0, 0.0, 0.0, 0, []))
            if dep._dependents:
                stack.extend(dep._dependents)
                dep._dependents = None

    def _hold(self, task: DTask[Any], parts: Sequence[Any], deps: list[P.Dep],
              inputs: list[int], waits: list[int]) -> None:
        """Keep ``task`` until ``waits``, inputs running or held here, have finished.

        One that is neither running here nor finished here (it failed, or never came)
        drops the task at once. When every other input is in memory here and nothing
        can be spilled, the arguments are loaded now, with the DTasks of the awaited
        inputs in their place (read as the task starts): a pool thread that finishes
        the last of them runs the task at once (a continuation, threads.py), as worker
        0 runs its chains, with no trip through this loop or the scheduler."""
        running = self.running
        store = self.store
        pending: dict[int, DTask[Any]] = {}
        for key in waits:
            dep = running.get(key)
            if dep is not None and not dep._cancelled:
                pending[key] = dep
            elif key not in store or dep is not None:
                task._dependents = None
                self.held[task.id] = (task, parts, deps, inputs)
                task._state = PENDING
                source: DTask[Any] = DTask(self.client, key, "", None, (), {}, _PLAIN)
                source._dependents = [task]
                self._drop_held(source)
                return
        task._state = PENDING
        task._npending = len(pending)
        self.held[task.id] = (task, parts, deps, inputs)
        if (task._kind == "thread" and store.memory_limit is None and not task._resolve & FILES
                and all(d.key in store for d in deps)):
            peek = store.peek_in_memory

            def lookup(key: int) -> Any:
                dep = pending.get(key)
                return dep if dep is not None else peek(key)
            try:
                task._args, task._kwargs = P.loads_args(parts[0], parts[1:], lookup if task._resolve else None)
            except Exception:  # noqa: BLE001 - loaded again as it starts, and reported then
                task._args = task._kwargs = None
            else:
                task._resolve = bool(pending)  # DTasks in place of those inputs
                task._thread_ok = True
        for dep in pending.values():
            if dep._dependents is None:
                dep._dependents = [task]
            else:
                dep._dependents.append(task)
        if not pending:
            self._release_held(task)

    def _release_held(self, task: DTask[Any]) -> None:
        """Every input ``task`` waited for finished here: start it from the loop."""
        entry = self.held.pop(task.id, None)
        if entry is None:
            return
        _, parts, deps, inputs = entry
        task._state = RUNNING
        if task._thread_ok:
            self._submit(task)  # its arguments are in place
        else:
            task._thread_ok = False
            self._prepare_or_start(task, parts, deps, inputs)

    async def _share_then_record(self, task: DTask[Any], attempt: int, value: Any, payload: bytes,
                                 buffers: list[Any], size: int, start: float, seconds: float) -> None:
        """Write a large result into a shared segment, hold the segment's mapping in its
        place (the process's own copy is freed), then report it done (see EAGER_BYTES)."""
        try:
            await self._share(task.id, value, payload, buffers)
        except (OSError, KeyError, ValueError, SpillCorruptedError) as exc:
            logger.info("worker %s: result of %s not shared (%s)", self.name, task._describe(), exc)
        del value, payload, buffers
        self._record(P.Finished(task.id, attempt, "ok", size, start, seconds, 0, []))

    async def _share(self, key: int, held: Any, payload: Any, buffers: list[Any]) -> tuple[str, int]:
        """Put ``key``'s value (its parts) in a shared segment; where the store still holds
        ``held`` in RAM, it holds the segment's mapping instead from then on, so the data
        is in memory once (a segment is RAM too). Returns the segment's (path, size)."""
        made = await self._segments.offer(key, payload, buffers)
        if held is not None:
            mapped = await self.loop.run_in_executor(None, shared.load, made[0])
            self.store.swap(key, held, mapped)
        return made

    def _record(self, rec: P.Finished, buffers: Sequence[Any] = ()) -> None:
        self._done.add(rec, buffers)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        wakeup = self._flush_wakeup
        if wakeup is not None and not wakeup.pending:
            wakeup.request()

    def _memory(self) -> P.Memory:
        store = self.store
        return P.Memory(store.used, store.spilled_bytes, store.spill_errors,
                        len(self.running) - len(self.held))

    def _done_message(self, results: list[P.Finished]) -> P.Done:
        return P.Done(results, self._memory())

    def _flush_records(self) -> None:
        frames = self._done.take()
        if self._values:  # after the records: an input's before its dependent's
            frames += self._values.take(self._memory())
        holding, self._holding = self._holding, []
        endpoint = self.endpoint
        if endpoint is None or endpoint.closed:
            return
        try:
            if self.listening:
                self._send_events(endpoint)  # before the results: a run's thread, then its end
            for msg, buffers in frames:
                endpoint.send_nowait(msg, buffers)
            if holding:
                endpoint.send_nowait(P.Holding(holding))
        except ConnectionError:
            pass

    # -- events for observers --------------------------------------------------------------
    def _on_listen(self, msg: P.Listen, buffers: list[Any]) -> None:
        self.listening = msg.on
        self.timed = msg.on  # coroutine runs get their times too
        self.store.on_event = self._stored if msg.on else None
        if not msg.on:
            self._events = ([], [], [])

    def _stored(self, how: str, key: Any, nbytes: int, start: float, stop: float) -> None:
        if type(key) is int:
            self._events[2].append(P.StoreEvent(key, nbytes, how, start, stop))
            self._schedule_flush()

    def _send_events(self, endpoint: Any) -> None:
        runs, moves, stores = self._events
        if runs or moves or stores:
            self._events = ([], [], [])
            endpoint.send_nowait(P.Events(runs, moves, stores))

    # -- lifecycle -----------------------------------------------------------------------
    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._flush_wakeup = Wakeup(self.loop, self._flush_records, threadsafe=False)
        self.loop_thread_id = threading.get_ident()
        # Tasks here spawn nested tasks through a client of the scheduler.
        self.client = SchedulerClient(self)
        nested = NestedCluster(self.client)
        task_context = contextvars.Context()
        task_context.run(_current_cluster.set, nested)

        def thread_init() -> None:
            _pool_thread.cluster = nested

        self.thread_proc = ThreadProc(0, self.threads, self, thread_init)
        self.async_proc = AsyncProc(0, self, task_context)
        if self.gpus:
            from ..gpu.proc import GPUProc

            self.gpu_procs = {d: GPUProc(0, d, self, task_context, free_device=self.store.free_device)
                              for d in self.gpus}
        self.thread_proc.start()
        await self.store.start()
        self._listener = Listener(self._serve_peer, self.token, ssl=self.ssl_server,
                                  max_frame=self.max_frame)
        await self._listener.start(self.data_host, 0)
        serving = self._serving = asyncio.ensure_future(self._serve())
        try:
            await asyncio.wait([serving])  # until the scheduler or stop() ends it
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            await self._shutdown()
        if not serving.cancelled():
            serving.result()  # what ended it, a refused token say, ends the worker too

    async def _serve(self) -> None:
        while not self._stopping:
            try:
                await self._session()
            except (ConnectionError, OSError, TimeoutError) as exc:
                logger.info("worker %s: scheduler connection ended: %s", self.name, exc)
            except ProtocolError as exc:  # a bad frame ends the connection, not the worker
                logger.warning("worker %s: scheduler connection closed: %s", self.name, exc)
            if not self.reconnect and not self._stopping:
                # A subprocess worker that lost its cluster unasked: the cluster is gone
                # (killed, say, where the parent-death signal does not exist), and
                # nobody waits for what runs here.
                self._hurry.set()
            if not self.reconnect or self._stopping:
                break
            logger.warning("worker %s: reconnecting to the scheduler in %.1f s", self.name, self._backoff)
            await asyncio.sleep(self._backoff)
            self._backoff = min(self._backoff * 2, 5.0)

    def stop(self, now: bool = False) -> None:
        """Leave the cluster: running tasks are cancelled and get the shutdown timeout to
        end, or, ``now``, HURRY_GRACE; then the store and its spill directory go."""
        self._stopping = True
        if now:
            self._hurry.set()
        if self._serving is not None:
            self._serving.cancel()

    @property
    def stuck(self) -> bool:
        """Coroutines swallowed their cancellation and still run: closing the loop would
        wait for them forever."""
        return self.async_proc.running > 0

    def _handlers(self) -> dict[type, Any]:
        """What the scheduler may send, and who handles it."""
        return {
            P.Functions: self._on_functions,
            P.Values: self._on_values,
            P.Run: self._on_run,
            P.RunPlain: self._on_run_plain,
            P.Get: functools.partial(self._serve_get, self._scheduler_limit),
            P.Release: self._on_release,
            P.Cancel: self._on_cancel,
            P.Put: self._on_put,
            P.Stats: self._on_stats,
            P.TaskDone: self.client.on_task_done,
            P.Replicate: self._replicate,
            P.Shutdown: self._on_shutdown,
            P.Heartbeat: self._on_heartbeat,
            P.Listen: self._on_listen,
            P.StreamItems: self._on_stream,
            P.StreamEnd: self._on_stream,
            P.StreamCredit: self._on_stream,
        }

    async def _session(self) -> None:
        comm = await open_comm(self.scheduler_host, self.scheduler_port, ssl=self.ssl_scheduler,
                               max_frame=self.max_frame)
        await client_handshake(comm, self.token, {"role": "worker"})
        # A new session is a new worker for the scheduler; what this one still holds is
        # offered with the registration (Register.holds), and the scheduler releases
        # what it no longer wants.
        endpoint = P.Endpoint(comm, self._handlers())
        self.endpoint = endpoint
        self._blocked_sent = 0
        self._early_runs = []
        serving = asyncio.ensure_future(endpoint.serve())
        heartbeat = asyncio.ensure_future(self._heartbeat(endpoint))
        try:
            assert self._listener is not None
            host = comm.transport.get_extra_info("sockname")[0] if comm.transport else "127.0.0.1"
            reply, _ = await endpoint.request(P.Register(
                self.name, os.getpid(), socket.gethostname(), self.threads,
                f"tcp://{host}:{self._listener.port}", self.memory_limit,
                [k for k in self.store.keys() if type(k) is int], self.gpus, perf_counter(),
                self.resources),
                timeout=30)
            self.worker_id = reply.worker_id
            early, self._early_runs = self._early_runs, []
            for msg, buffers in early:
                if isinstance(msg, P.Run):
                    self._on_run(msg, buffers)
                else:
                    self._on_run_plain(msg, buffers)
            self._backoff = 0.1
            logger.info("worker %s registered as worker %d", self.name, self.worker_id)
            await serving
        finally:
            heartbeat.cancel()
            serving.cancel()
            await asyncio.gather(heartbeat, serving, return_exceptions=True)
            self.endpoint = None
            await endpoint.close()
            if self._streams is not None:
                self._streams.disconnected()
            self._cancel_all()

    async def _heartbeat(self, endpoint: P.Endpoint) -> None:
        """Give up on a scheduler silent past the timeout (its heartbeats are answered
        as they come, in ``_on_heartbeat``). Any byte from it is a sign of life, not only
        whole messages: a large frame (an input sent with its task) may take longer than
        the timeout to arrive."""
        seen, heard = endpoint.bytes_received, self.loop.time()
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            now = self.loop.time()
            if endpoint.bytes_received != seen:
                seen, heard = endpoint.bytes_received, now
            elif now - heard > self.heartbeat_timeout:
                logger.warning("worker %s: no word from the scheduler for %g s; reconnecting",
                               self.name, self.heartbeat_timeout)
                endpoint.comm.abort()
                return

    def _stats(self) -> dict[str, Any]:
        stats = self.store.stats()
        stats["memory_used"] = stats["used"]
        stats["running"] = len(self.running) - len(self.held)
        stats.update(callback_errors())
        return stats

    def _cancel_all(self) -> None:
        for task in list(self.running.values()):
            task._cancelled = True
            if task._handle is not None:
                self.async_proc.cancel(task._handle)
        self.running.clear()
        self.held.clear()

    async def _shutdown(self) -> None:
        self._stopping = True
        self._cancel_all()
        try:
            for endpoint in list(self._peers.values()):
                await endpoint.close()
            for task in list(self._peer_tasks):
                task.cancel()
            for preparing in list(self._preparing):
                preparing.cancel()
            await asyncio.gather(*self._preparing, return_exceptions=True)
            if self._listener is not None:
                await self._listener.close()
            winding_down = asyncio.ensure_future(self._wind_down())
            hurry = asyncio.ensure_future(self._hurry.wait())
            try:
                await asyncio.wait([winding_down, hurry], return_when=asyncio.FIRST_COMPLETED)
                if not winding_down.done():
                    await asyncio.wait([winding_down], timeout=HURRY_GRACE)
            finally:
                for fut in (winding_down, hurry):
                    fut.cancel()
                await asyncio.gather(winding_down, hurry, return_exceptions=True)
        finally:
            await self._close_store()
            self._segments.close()

    async def _wind_down(self) -> None:
        """Wait for the cancelled tasks to end, at most the shutdown timeout."""
        deadline = self.loop.time() + self.shutdown_timeout
        await self.async_proc.close(self.shutdown_timeout)
        await self.thread_proc.close(max(0.0, deadline - self.loop.time()))
        for gpu in self.gpu_procs.values():
            await gpu.close(max(0.0, deadline - self.loop.time()))

    async def _close_store(self) -> None:
        """Close the store, and only then give way to a cancellation (a signal).

        A signal may cut the wait for running tasks short, not this: the spill directory
        may hold gigabytes that only a later worker on this machine would remove, and the
        process's exit cancels whatever still runs.
        """
        closing = asyncio.ensure_future(self.store.close())
        cancelled: asyncio.CancelledError | None = None
        while True:
            try:
                await asyncio.shield(closing)
                break
            except asyncio.CancelledError as exc:
                if closing.cancelled():
                    raise
                cancelled = exc
        if cancelled is not None:
            raise cancelled

    # -- messages from the scheduler -----------------------------------------------------
    def _on_heartbeat(self, msg: P.Heartbeat, buffers: list[Any]) -> None:
        """Answer with ours. The scheduler's heartbeat timeout may be shorter than any
        rhythm of our own (it was declaring idle workers lost under 1 s), and an answer
        tells it that this direction of the link works too."""
        endpoint = self.endpoint
        if endpoint is not None:
            try:
                endpoint.send_nowait(P.Heartbeat(self._stats()))
            except ConnectionError:
                pass  # the session's end is handled where the connection is read

    def _on_release(self, msg: P.Release, buffers: list[Any]) -> None:
        for key in msg.keys:
            self.store.delete(key)

    def _on_cancel(self, msg: P.Cancel, buffers: list[Any]) -> None:
        for key in msg.ids:
            task = self.running.get(key)
            if task is not None:
                task._cancelled = True
                if task._handle is not None:
                    self.async_proc.cancel(task._handle)
                entry = self.held.get(key)
                if entry is not None and entry[0] is task and task._state is PENDING:
                    del self.held[key]  # never started: nothing will report it
                    self._forget_running(task)
                    task._state = CANCELLED
                    task._fn = task._args = task._kwargs = None
                # What was held for it will not get its value here (a run cancelled for
                # its timeout may also run on for long in its thread).
                self._drop_held(task)

    def _on_put(self, msg: P.Put, buffers: list[Any]) -> None:
        self.store.put(msg.key, P.loads(buffers[0], buffers[1:]))

    def _on_stats(self, msg: P.Stats, buffers: list[Any]) -> tuple[P.StatsReply, Sequence[Any]]:
        if self.listening and self.endpoint is not None:
            try:
                self._send_events(self.endpoint)  # ahead of the reply: fetch_logs waits for it
            except ConnectionError:
                pass
        return P.StatsReply(self._stats()), ()

    def _on_shutdown(self, msg: P.Shutdown, buffers: list[Any]) -> None:
        self._stopping = True
        if self.endpoint is not None:
            self.endpoint.comm.close()

    def _on_functions(self, msg: P.Functions, buffers: list[Any]) -> None:
        # Anything that fails to load fails the tasks that need it, never the worker:
        # e.g. a function whose module this machine cannot import.
        for fdef, data in zip(msg.defs, buffers, strict=True):
            try:
                self.functions[fdef.hash] = cloudpickle.loads(data)
            except Exception as exc:  # noqa: BLE001
                self.functions[fdef.hash] = _Unloadable(exc)

    def _on_values(self, msg: P.Values, buffers: list[Any]) -> None:
        for vdef, parts in P.split_parts(msg.defs, buffers):
            try:
                self.store.put(vdef.key, P.loads(parts[0], parts[1:]))
            except Exception as exc:  # noqa: BLE001 - the tasks needing it report it missing
                logger.error("worker %s: cannot load input %d: %s", self.name, vdef.key, exc)

    def _on_run(self, msg: P.Run, buffers: list[Any]) -> None:
        if self.worker_id < 0:
            # Read with the registration's reply, before the session coroutine has taken
            # its id (two loop steps later): its tasks would start as a worker with no
            # id, and a task spawning another at once failed ("not connected").
            self._early_runs.append((msg, buffers))
            return
        index = 0
        for rec in msg.tasks:  # once per task: split_parts inlined, fields unpacked at once
            key, name, fn_hash, kind, attempt, nparts, deps, callbacks, refs, inputs, files, waits, priority = rec
            parts: Sequence[Any] = buffers[index:index + nparts]
            index += nparts
            task: DTask[Any] = DTask(self.client, key, name, None, (), {}, _PLAIN)
            task._kind = kind
            task._attempts = attempt
            # Here: whether the arguments hold references to resolve; an int of _args
            # flags when they hold Files too (read as the task runs, not on this loop).
            task._resolve = (FILES | refs) if files else refs
            self.running[key] = task
            try:
                task._fn = self._function(fn_hash, key)
                if callbacks:
                    restore, checkpoint = cloudpickle.loads(parts[0])
                    task._opts = TaskOptions(name=name, restore=restore, checkpoint=checkpoint,
                                             priority=priority)
                    parts = parts[1:]
                elif priority:
                    task._opts = self._with_priority(priority)
            except Exception as exc:  # noqa: BLE001
                exc.add_note(f"aiodagger: {task._describe()} could not be loaded on worker {self.worker_id}")
                self.complete(task, attempt, False, exc, 0.0, 0.0, None)
                continue
            if waits:
                self._hold(task, parts, deps, inputs, waits)
            else:
                self._prepare_or_start(task, parts, deps, inputs)

    def _function(self, fn_hash: bytes, key: int) -> Any:
        """The function ``fn_hash`` names, for task ``key``; raises what loading it raised."""
        fn = self.functions.get(fn_hash)
        if fn is None:
            raise ProtocolError(f"task {key} names a function that was never sent")
        if type(fn) is _Unloadable:
            raise fn.error
        return fn

    def _on_run_plain(self, msg: P.RunPlain, buffers: list[Any]) -> None:
        """Tasks without inputs, in columns (see _on_run): each starts at once, with the
        arguments unpickled for all in one call."""
        if self.worker_id < 0:
            self._early_runs.append((msg, buffers))
            return
        keys = msg.keys
        try:
            every_args = P.loads(buffers[0])
            if type(every_args) is not list or len(every_args) != len(keys):
                raise ProtocolError(f"a batch of {len(keys)} tasks came with "
                                    f"{len(every_args) if type(every_args) is list else 'no list of'} "
                                    "argument tuples")
            error = None
        except Exception as exc:  # noqa: BLE001 - failed below, task by task
            every_args, error = None, exc
        names = msg.names
        client = self.client
        running = self.running
        paused = self.store.paused
        for i, key in enumerate(keys):
            which = msg.which[i]
            attempt = msg.attempts[i]
            args = every_args[i] if every_args is not None else ()
            task: DTask[Any] = DTask(client, key, names[which], None, args, _NO_KWARGS, _PLAIN)
            task._kind = "thread"
            task._attempts = attempt
            running[key] = task
            try:
                if error is not None:
                    raise error
                if type(args) is not tuple:
                    raise ProtocolError(f"task {key} came with arguments that are not a tuple")
                task._fn = self._function(msg.fns[which], key)
            except Exception as exc:  # noqa: BLE001
                exc.add_note(f"aiodagger: {task._describe()} could not be loaded on worker {self.worker_id}")
                self.complete(task, attempt, False, exc, 0.0, 0.0, None)
                continue
            if msg.priorities[i]:
                task._opts = self._with_priority(msg.priorities[i])
            if paused:  # wait for admission, as a task with a record would
                task._args = None
                self._prepare_or_start(task, [P.dumps_plain((args, {}))], [], [])
            else:
                self._submit(task)

    def _with_priority(self, priority: int) -> TaskOptions:
        opts = self._priorities.get(priority)
        if opts is None:
            if len(self._priorities) > 1024:  # priorities taken from a counter, say
                self._priorities.clear()
            opts = self._priorities[priority] = TaskOptions(priority=priority)
        return opts

    def _prepare_or_start(self, task: DTask[Any], parts: Sequence[Any], deps: list[P.Dep],
                          inputs: list[int]) -> None:
        store = self.store
        missing = [d for d in deps if d.key not in store] if deps else deps
        if missing or (inputs and store.memory_limit is not None) or store.paused:
            preparing = asyncio.ensure_future(self._prepare_then_start(task, parts, missing, inputs))
            self._preparing.add(preparing)
            preparing.add_done_callback(self._preparing.discard)
        else:  # everything is in RAM and nothing can be spilled: start at once
            self._start(task, parts, store.peek_in_memory)

    def _start(self, task: DTask[Any], parts: Sequence[Any], lookup: Any) -> None:
        if task._cancelled:
            self.complete(task, task._attempts, False, TaskCancelledError(task._describe()), 0.0, 0.0, None)
            return
        resolve = task._resolve
        try:
            if resolve is False or resolve is True:  # no File: the common case
                task._args, task._kwargs = P.loads_args(parts[0], parts[1:], lookup if resolve else None)
                task._resolve = False  # the values are in place
            else:
                # Files are read first, and that walk must not enter the inputs' values:
                # each stays wrapped as a Chunk (a leaf to it) until the values go in.
                held = None if not resolve & DEPS else (
                    lambda key: Chunk(lookup(key), self.worker_id, key))
                task._args, task._kwargs = P.loads_args(parts[0], parts[1:], held)
        except Exception as exc:  # noqa: BLE001 - e.g. a class this worker cannot import
            exc.add_note(f"aiodagger: the arguments of {task._describe()} could not be loaded on "
                         f"worker {self.worker_id}")
            self.complete(task, task._attempts, False, exc, 0.0, 0.0, None)
            return
        if task._kind == "async":
            self.async_proc.submit(task)
        elif task._kind[0] == "g":
            self._submit_gpu(task)
        else:
            self._submit(task)

    def _submit_gpu(self, task: DTask[Any]) -> None:
        try:
            task._kind, device = parse_kind(task._kind)
            if not self.gpu_procs or (device is not None and device not in self.gpu_procs):
                raise NoProcessorError(f"{task._describe()} asks for GPU {'any' if device is None else device} "
                                       f"and worker {self.worker_id} has "
                                       f"{sorted(self.gpu_procs) or 'no GPU processor'}")
        except (ValueError, NoProcessorError) as exc:
            self.complete(task, task._attempts, False, exc, 0.0, 0.0, None)
            return
        pick_gpu(self.gpu_procs, device if device is not None else True, task._args or (), task._kwargs).submit(task)

    def _submit(self, task: DTask[Any]) -> None:
        if task._opts.priority:
            self._urgent.append(task)
        self.thread_proc.submit(task)

    async def _prepare_then_start(self, task: DTask[Any], parts: Sequence[Any],
                                  missing: list[P.Dep], keys: list[int]) -> None:
        """Fetch missing inputs, wait for admission, load and pin inputs, then start."""
        bad: dict[int, list[int]] = {}
        for dep in missing:
            try:
                await self._fetch(dep.key, dep.holders)
            except MissingDependency as exc:
                bad[dep.key] = exc.holders
            except FrameTooLargeError as exc:  # computing it again would not make it smaller
                exc.add_note(f"aiodagger: an input of {task._describe()}, which could not start")
                self.complete(task, task._attempts, False, exc, 0.0, 0.0, None)
                return
        store = self.store
        # Back-pressure: above the pause threshold nothing new starts until spilling
        # (or finishing tasks) brings memory down; see ChunkStore.wait_admitted.
        await admit(store)
        values, unavailable = await store.pin_and_load([k for k in keys if k not in bad])
        for key, why in unavailable.items():
            logger.warning("worker %s: input %d of %s is unavailable here: %s",
                           self.name, key, task._describe(), why)
            bad[key] = [self.worker_id]
        if bad or task._cancelled:
            store.unpin_all(values)
            self._forget_running(task)
            if bad:
                self._record(P.Finished(task.id, task._attempts, "missing", 0, 0.0, 0.0, 0,
                                        [P.Missing(k, h) for k, h in bad.items()]))
            else:
                self._record(P.Finished(task.id, task._attempts, "cancelled", 0, 0.0, 0.0, 0, []))
            self._drop_held(task)
            return
        self._pins[task.id, task._attempts] = list(values)
        self._start(task, parts, values.__getitem__)

    async def _fetch(self, key: int, holders: list[P.Holder]) -> None:
        """Bring chunk ``key`` here from one of its holders (each fetched once at a time).

        Raises MissingDependency if none gave it, FrameTooLargeError if it is too large
        to come here at all.
        """
        pending = self._fetching.get(key)
        without: list[int] = []
        error: FrameTooLargeError | None = None
        if pending is None:
            pending = self.loop.create_future()
            self._fetching[key] = pending
            try:
                without = await self._fetch_from(key, holders)
            except FrameTooLargeError as exc:
                error = exc
            finally:
                del self._fetching[key]
                pending.set_result(error)
        else:
            error = await asyncio.shield(pending)
        if error is not None:
            raise FrameTooLargeError(str(error), error.size, error.limit)
        if key not in self.store:
            raise MissingDependency(key, without)

    async def _fetch_from(self, key: int, holders: list[P.Holder]) -> list[int]:
        """Try the holders in turn; return the ids of those that answered without it."""
        without = []
        for holder in holders:
            start = perf_counter()
            try:
                peer = await self._peer(holder.address)
                reply, buffers = await self._ask(peer, P.Get([key], self._shm_key))
                if reply.shared:
                    value = await self._map_shared(reply.shared[0])
                    if value is not _NOT_MAPPED:
                        self.store.put(key, value)
                        self._holding.append(key)
                        if self.listening:
                            self._moved(key, reply.shared[0].size, holder.worker, start)
                        return []
                    reply, buffers = await self._ask(peer, P.Get([key]))  # over the socket
            except (ConnectionError, OSError, TimeoutError, ProtocolError) as exc:
                # Unreachable from here counts as not holding it: the scheduler gets it
                # elsewhere or computes it again, rather than sending this task back here.
                logger.info("worker %s: fetching %d from %s failed: %s", self.name, key, holder.address, exc)
                without.append(holder.worker)
                continue
            if reply.items:
                self.store.put(key, P.loads(buffers[0], buffers[1:]))
                self._holding.append(key)
                if self.listening:
                    self._moved(key, sum(len(b) if type(b) is bytes else memoryview(b).nbytes for b in buffers),
                                holder.worker, start)
                return []
            if reply.oversized:
                what = f"the result of task id {key}" if key > 0 else f"chunk id {-key}"
                raise FrameTooLargeError.of(
                    f"{what}, held by worker {holder.worker} ({holder.address}),",
                    reply.oversized[0].size, peer.comm.limit)
            without.append(holder.worker)
        return without

    def _moved(self, key: int, nbytes: int, source: int, start: float) -> None:
        self._events[1].append(P.MoveEvent(key, nbytes, source, start, perf_counter()))
        self._schedule_flush()

    async def _map_shared(self, seg: P.Shared) -> Any:
        """The value in a holder's shared segment, or _NOT_MAPPED if it cannot be mapped
        here (released meanwhile, or another /dev/shm after all): then ask over TCP."""
        try:
            return await self.loop.run_in_executor(None, shared.load, seg.path)
        except (OSError, ValueError, SpillCorruptedError) as exc:
            logger.info("worker %s: segment %s of %d not mapped (%s); asking over TCP",
                        self.name, seg.path, seg.key, exc)
            return _NOT_MAPPED

    async def _ask(self, peer: P.Endpoint, msg: Any) -> tuple[Any, list[Any]]:
        """``peer.request(msg)``, given up (TimeoutError, its connection closed) once not a
        byte has come from the peer for heartbeat_timeout: a holder cut off from here, or
        frozen, answers never; one behind a slow link keeps sending, however long it takes.
        """
        request = asyncio.ensure_future(peer.request(msg))
        try:
            seen = peer.bytes_received
            while True:
                done, _ = await asyncio.wait((request,), timeout=self.heartbeat_timeout)
                if done:
                    return request.result()
                if peer.bytes_received == seen:
                    peer.comm.close()
                    raise TimeoutError(f"not a byte from {peer.peer} for {self.heartbeat_timeout:.0f} s")
                seen = peer.bytes_received
        finally:
            request.cancel()

    async def _peer(self, address: str) -> P.Endpoint:
        endpoint = self._peers.get(address)
        if endpoint is not None and not endpoint.closed:
            return endpoint
        host, port = parse_address(address)
        # A holder that does not answer within the heartbeat timeout counts as unreachable,
        # as the scheduler counts a silent worker as lost.
        timeout = self.heartbeat_timeout
        comm = await open_comm(host, port, ssl=self.ssl_client, max_frame=self.max_frame, timeout=timeout)
        try:
            await client_handshake(comm, self.token, {"role": "peer", "worker": self.worker_id},
                                   timeout=timeout)
        except BaseException:
            comm.close()
            raise
        endpoint = P.Endpoint(comm)  # this end only asks: nothing is handled
        self._peers[address] = endpoint
        task = asyncio.ensure_future(endpoint.serve())
        self._peer_tasks.add(task)
        task.add_done_callback(self._peer_done)
        return endpoint

    def _peer_done(self, task: asyncio.Task[None]) -> None:
        self._peer_tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a peer going away is expected

    async def _replicate(self, msg: P.Replicate, buffers: list[Any]) -> tuple[P.Ack, Sequence[Any]]:
        for dep in msg.items:
            try:
                await self._fetch(dep.key, dep.holders)
            except (MissingDependency, FrameTooLargeError) as exc:
                logger.warning("worker %s: could not copy %d here: %s", self.name, dep.key, exc)
        if self._holding:
            self._schedule_flush()
        return P.Ack(), ()

    # -- data server (peers and the scheduler ask for chunks) ----------------------------
    async def _serve_peer(self, comm: Comm, info: dict[str, Any]) -> None:
        # A peer may only ask for chunks; anything else ends its connection.
        await P.Endpoint(comm, {P.Get: functools.partial(self._serve_get, lambda: comm.limit)}).serve()

    def _scheduler_limit(self) -> int:
        endpoint = self.endpoint
        return endpoint.comm.limit if endpoint is not None else self.max_frame

    async def _serve_get(self, limit_of: Any, msg: P.Get, buffers: list[Any]) -> tuple[P.Items, list[Any]]:
        """The chunks asked for, as many as one frame of the asking connection carries
        (``limit_of()``: its limit, which the handshake set)."""
        limit = limit_of()
        batch = min(limit, P.BATCH_BYTES)
        items: list[P.Item] = []
        missing: list[int] = []
        later: list[int] = []
        oversized: list[P.Oversized] = []
        out: list[Any] = []
        segments: list[P.Shared] = []
        same_host = bool(msg.shm) and msg.shm == shared.host_key()
        size = 0
        for index, key in enumerate(msg.keys):
            if items and (len(out) + 1 + P.MAX_OUT_OF_BAND > P.MAX_BUFFERS or size >= batch):
                later = msg.keys[index:]  # one reply is one frame: the rest on the next ask
                break
            made = self._segments.get(key) if same_host else None
            if made is not None:
                segments.append(P.Shared(key, *made))
                continue
            try:
                # A spilled chunk goes out as its file's parts: the file is in the wire's
                # format, so it is neither unpickled nor loaded back into the store.
                chunk_parts: tuple[Any, Sequence[Any]] | None = await self.store.read_spilled(key)
                # Under a memory limit a spilled value stays out of RAM: a segment is RAM.
                shareable = same_host and (chunk_parts is None or self.memory_limit is None)
                held = None
                if chunk_parts is None:
                    held = await self.store.get(key)
                    chunk_parts = P.dumps(held)
            except (KeyError, SpillCorruptedError):
                missing.append(key)
                continue
            payload, parts = chunk_parts
            nbytes = len(payload) + sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in parts)
            if shareable and nbytes - len(payload) >= shared.MIN_BYTES:
                try:
                    path, seg_size = await self._share(key, held, payload, list(parts))
                except KeyError:
                    if key not in self.store:  # released while it was being written
                        missing.append(key)
                        continue
                    # Spilled meanwhile (its segment goes as its RAM copy does, under a
                    # limit): the parts in hand go over the socket. Answering "missing"
                    # made the scheduler compute a value again that was on disk here.
                except (OSError, ValueError, SpillCorruptedError) as exc:
                    # /dev/shm full, say: this one goes over the socket. A segment removed
                    # as its value was spilled, just after it was written, is no news.
                    gone = isinstance(exc, FileNotFoundError) and key in self.store
                    logger.log(logging.INFO if gone else logging.WARNING,
                               "worker %s: no shared segment for %d (%s)", self.name, key, exc)
                else:
                    segments.append(P.Shared(key, path, seg_size))
                    self._share_eagerly = self.memory_limit is None
                    continue
            if nbytes > limit:
                oversized.append(P.Oversized(key, nbytes))
                continue
            if items and size + nbytes > batch:
                later = msg.keys[index:]  # read for nothing, once per reply: sizes are not kept
                break
            items.append(P.Item(key, 1 + len(parts)))
            out.append(payload)
            out.extend(parts)
            size += nbytes
        return P.Items(items, missing, later, oversized, segments), out


_NOT_MAPPED = object()


class _Unloadable:
    """A function that was sent but cannot be loaded here: its tasks fail with ``error``."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error

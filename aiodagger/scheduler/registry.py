"""The registry of workers in other processes: who they are, what they run and hold.

:class:`WorkerRegistry` is the scheduler's side of every worker process: it takes their
connections (registration, heartbeats, loss), places and dispatches tasks on them,
applies their completions, and keeps track of where each result lives. Each worker is
a :class:`RemoteWorker` proxy holding its connection, what was sent to it, and what it
holds. It speaks to workers only in the messages of :mod:`aiodagger.comm.protocol`.

Tasks placed on a worker during one loop iteration go out as one batch ("functions"
and "values" for what the worker lacks, then "run"); the worker answers with batched "done"
messages, which carry its memory counters. A result stays on the worker that made it
(``task._where``), and only its size comes back unless it is small enough to travel
inline; values move to the caller only when awaited, and to another worker straight
from the holder.

A task whose unfinished inputs all run on one worker is sent there ahead of them
(send_ahead, at most MAX_AHEAD held per worker): the worker starts it as they finish,
on the finishing thread where it can, so that a chain costs no round trip per link. An
input that ends there without a result sends it back ("dropped"), and the scheduler
decides, as for a task that was never sent.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ipaddress
import itertools
import logging
import socket
import weakref
from collections.abc import Sequence
from time import perf_counter
from typing import TYPE_CHECKING, Any

import cloudpickle

from .._args import DEPS
from .._bridge import Wakeup
from ..comm import protocol as P
from ..errors import DaggerError, FrameTooLargeError, SerializationError, WorkerLostError
from ..interfaces import WorkerStatus
from ..task import FINISHED, NOWHERE, PENDING, READY, REMOTE, RUNNING, Chunk, DTask
from ..taskoptions import ANY_SCOPE, check_resources
from .placement import DEFAULT_BANDWIDTH, Candidate, choose_processor
from .spawned import ClientConn, Spawned

if TYPE_CHECKING:
    from .core import Scheduler

__all__ = ["RemoteWorker", "WorkerRegistry"]

logger = logging.getLogger(__name__)

# The names of the Memory record's fields in a heartbeat's stats.
_MEMORY_STATS = ("memory_used", "spilled_bytes", "spill_errors", "running")

# Estimated work (seconds) queued per worker thread beyond which tasks wait in the heap.
REMOTE_HORIZON_S = 5e-3

# Tasks a worker may hold at once, sent ahead of inputs still running there (see
# send_ahead). Held tasks take no slot: a pool thread runs each as it finishes its last
# input, so a chain runs there without a round trip per link, and the scheduler tops
# them up from each batch of completions. The bound keeps what holding costs small and
# fixed: the held tasks' arguments in the worker's memory; the work one lost worker
# sends back to be placed again; and how far a chain runs past the scheduler's view of
# it (its records come back in batches). Two of a pool thread's runs of continuations
# (threads.MAX_CONTINUATIONS) keep a chain going while the next completions travel.
MAX_AHEAD = 512
# Frames of this size or less are written at once (send_now): a graph spawned in one
# go starts on the workers while the rest of it is being spawned.
SEND_NOW_BYTES = 256 << 10
# WorkerStatus.RUNNING, read once: an enum member's lookup costs ~50 ns, and placement
# reads it for every task (W4's profile: 1-2 % of the scheduler's process).
_UP = WorkerStatus.RUNNING
# Tasks known to run this briefly (and without inputs) are placed in runs of up to
# TINY_STREAK on the worker place_any chose for the first, while it has room: a pick
# costs more than such a task's run, and a pool of threads in one process gains nothing
# from tiny tasks spread wider. Tasks of unknown or longer run times are each placed
# (a CPU-bound run shares its process's GIL). In W4's shape place_any took 9.7 % of the
# scheduler's process (py-spy), placing each task alone.
TINY_TASK_S = 100e-6
TINY_STREAK = 8
_I64 = 1 << 63  # an int argument within +-_I64 is counted for RunPlain without small_size()
# A task's arguments, pickled, past which it is sent with a record of its own, not in
# a RunPlain batch (whose arguments are pickled in one call, ~P.PLAIN_BYTES a message).
PLAIN_TASK_BYTES = 16 << 10


def _plain_size(args: tuple[Any, ...]) -> int:
    """The bytes ``args`` take in a RunPlain's columns, or -1 if one of them is not a
    small builtin (serialize.small_size) or they take more than PLAIN_TASK_BYTES."""
    size = 0
    for value in args:
        if type(value) is int and -_I64 <= value < _I64:  # most: no call
            size += 9
            continue
        n = P.small_size(value)
        if n < 0:
            return -1
        size += n
    return size if size <= PLAIN_TASK_BYTES else -1


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


# This machine's name, as workers on it report theirs (Register.host).
_THIS_HOST = socket.gethostname()


class RemoteWorker:
    """The scheduler's view of one worker process."""

    def __init__(self, wid: int, endpoint: P.Endpoint, info: P.Register,
                 max_frame: int = P.DEFAULT_MAX_FRAME) -> None:
        self.id = wid
        self.max_frame = max_frame  # the largest frame its connection carries
        self.endpoint = endpoint
        self.name = info.name
        self.pid = info.pid
        self.host = info.host
        self.address = info.address
        # A worker on another machine reaches one on this machine's loopback at the
        # address it reaches the scheduler on (see WorkerRegistry.address_for).
        self.reach_host = _reach_host(endpoint)
        self.threads = info.threads  # >= 1: checked when the message was decoded
        self.memory_limit = info.memory_limit
        self.gpus = list(info.gpus)  # its GPU processors' devices
        # Its clock less ours, to put its events' times on this process's clock: none on
        # this machine (perf_counter is CLOCK_MONOTONIC, one clock for all processes),
        # else from its registration's send time (off by the one-way latency).
        self.clock_offset = 0.0 if info.host == _THIS_HOST else info.clock - perf_counter()
        self.paused = False
        self.status = WorkerStatus.RUNNING
        self.last_seen = 0.0
        self.bytes_seen = 0  # what its connection had received at the last watch
        self.stats: dict[str, Any] = {}
        # Memory counters as of the worker's last completion (or heartbeat).
        self.memory = P.Memory(0, 0, 0, 0)
        self.running: dict[int, DTask[Any]] = {}
        # Keys of the tasks in ``running`` that were sent ahead of their inputs and take
        # no slot (MAX_AHEAD); tasks that could go ahead but for that bound, by id.
        self.ahead: set[int] = set()
        self.deferred: dict[int, DTask[Any]] = {}
        # Cancelled thread runs whose thread still runs them, (key, attempt) -> estimate:
        # their slots stay taken until the worker reports the run ended.
        self.ending: dict[tuple[int, int], float] = {}
        self.holds: set[int] = set()
        self.blocked = 0  # threads waiting in fetch() inside a task: slots handed back
        self.functions: set[bytes] = set()
        self.backlog_s = 0.0
        self.queued = 0
        self.function_defs = P.Batch(P.Functions, max_frame)
        self.value_defs = P.Batch(P.Values, max_frame)
        self.runs = P.Batch(P.Run, max_frame)
        self.plain = P.PlainRuns()
        # One batch's frames go out before the next batch's: a task's "run" must not
        # overtake the "values" frame carrying its input.
        self.sending = asyncio.Lock()
        self.last_spawned = wid * P.ID_SPACE  # ids of tasks it spawns lie above this
        self.spawned: dict[int, Any] = {}  # what its tasks spawned, by key (Spawned)
        self.thread_view = ProcView("thread", wid, self.threads)
        self.async_view = ProcView("async", wid)

    def has_room(self, kind: str) -> bool:
        if kind == "async":
            return True
        return self.queued < self.threads + self.blocked or self.backlog_s < REMOTE_HORIZON_S * self.threads

    def send_quietly(self, msg: Any) -> None:
        """Send a small message; a closed connection is noticed (and handled) elsewhere."""
        try:
            self.endpoint.send_nowait(msg)
        except ConnectionError:
            pass

    def describe(self) -> str:
        return (f"worker {self.id} (pid {self.pid} on {self.host}, {self.address}): "
                + ", ".join(self.processors()))

    def processors(self) -> tuple[str, ...]:
        return (repr(self.async_view), repr(self.thread_view),
                *[f"GPUProc(worker={self.id}, device={d})" for d in self.gpus])


def _load_error(payload: Any, task: DTask[Any]) -> BaseException:
    try:
        return P.loads_error(payload)
    except Exception as exc:  # noqa: BLE001 - e.g. the exception's class is not importable here
        return RuntimeError(f"{task._describe()} failed on a worker with an error that cannot be "
                            f"loaded in this process: {exc}")


def _brief_len(values: Any) -> str:
    return str(len(values)) if type(values) is list else f"a {type(values).__name__}"


def _load(worker: RemoteWorker) -> float:
    return worker.backlog_s / worker.threads


def _reach_host(endpoint: P.Endpoint) -> str | None:
    """This process's address as a worker connected from another machine sees it; None
    for a worker on this machine's loopback."""
    transport = endpoint.comm.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    sock = transport.get_extra_info("sockname") if transport is not None else None
    if not peer or not sock or ipaddress.ip_address(peer[0]).is_loopback:
        return None
    return str(sock[0])


def _address_for(holder: RemoteWorker, to: RemoteWorker | ClientConn) -> str:
    """``holder``'s data server as ``to`` reaches it: a worker of this machine listens on
    every interface when the cluster takes remote workers, but says 127.0.0.1."""
    if to.reach_host is None or not holder.address.startswith("tcp://127."):
        return holder.address
    host = f"[{to.reach_host}]" if ":" in to.reach_host else to.reach_host
    return f"tcp://{host}:{holder.address.rpartition(':')[2]}"


def _key(obj: Any) -> int:
    """A task's key is its id, a chunk's is minus its id: the two never collide."""
    return obj.id if type(obj) is DTask else -obj.id


class WorkerRegistry:
    """Everything the scheduler does with workers in other processes (on its loop)."""

    def __init__(self, sched: Scheduler, heartbeat_interval: float = 1.0,
                 heartbeat_timeout: float = 10.0) -> None:
        self.sched = sched
        self.listening = False  # worker processes send their events (see listen())
        self.workers: dict[int, RemoteWorker] = {}
        # True while the cluster keeps worker processes of its own (processes=N): tasks
        # that do not name worker 0 wait for one rather than run in the caller's process.
        self.expects_workers = False
        # True while workers on other machines may join (listen=): a task needing
        # resources that no worker has yet waits for one rather than fail.
        self.accepts_remote = False
        self.gave_up: str | None = None  # why no worker process will be started again
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.fn_cache = P.FunctionCache()
        self.bandwidth = DEFAULT_BANDWIDTH
        self.bytes_received = 0
        self._ids = itertools.count(1)
        # Workers a peer could not fetch from, until when: placed on last (see _trusted).
        self._suspect: dict[int, float] = {}
        # Placement of unscoped tasks without scanning every worker (place_any): the
        # workers in a ring, rebuilt when one joins or leaves (``_members`` counts those).
        self._members = 0
        self._ring: list[RemoteWorker] = []
        self._ring_members = -1
        self._cursor = 0
        # Workers that reported results since (a slot of theirs came free): looked at
        # first, so that a cluster busy everywhere does not go round the whole ring to
        # find the one worker with room.
        self._freed: collections.deque[RemoteWorker] = collections.deque(maxlen=4096)
        # The worker place_any chose last for a tiny task, and how many more tiny tasks
        # in a row may go there while it has room (TINY_STREAK).
        self._streak: RemoteWorker | None = None
        self._streak_left = 0
        self._dirty: set[RemoteWorker] = set()
        self._send_wakeup = Wakeup(sched.loop, self._send, threadsafe=False)
        self._registered = asyncio.Condition()
        self._releases: collections.deque[tuple[int, set[int]]] = collections.deque()
        self._release_wakeup = Wakeup(sched.loop, self._send_releases)
        self._monitor: asyncio.Task[None] | None = None
        self.endpoints: set[P.Endpoint] = set()
        # Results and chunks that live on workers, by key, for when a worker reports on
        # them or is lost: one weak reference per handle (DTask or Chunk), whose death
        # releases the copies. Not a WeakValueDictionary plus weakref.finalize: those
        # made two references and a registry entry per result, 4 % of W4's profile.
        self._refs: dict[int, weakref.ref[Any]] = {}
        self._handles: dict[weakref.ref[Any], tuple[int, set[int]]] = {}
        # Connected clients (dagger.connect), by id: ids from the workers' counter, so
        # that the ranges of ids they spawn under never meet.
        self.clients: dict[int, ClientConn] = {}
        # What workers' tasks and clients spawn, put and publish.
        self.spawned = Spawned(self)

    @property
    def received_bytes(self) -> int:
        """Bytes this process has received from workers, over all their connections."""
        return self.bytes_received + sum(e.bytes_received for e in self.endpoints)

    # -- registration and connection life --------------------------------------------------
    def start(self) -> None:
        self._monitor = asyncio.get_running_loop().create_task(self._watch())

    async def handle_connection(self, comm: P.Comm, info: dict[str, Any]) -> None:
        """The listener's handler for one authenticated connection from a worker."""
        endpoint = P.Endpoint(comm)
        holder: list[Any] = []
        # Until it registers (a worker) or attaches (a client), it may do nothing else.
        endpoint.handlers = {P.Register: functools.partial(self._register, endpoint, holder),
                             P.Attach: functools.partial(self._attach, endpoint, holder)}
        self.endpoints.add(endpoint)
        reason = "connection closed"
        try:
            await endpoint.serve()
        except (ConnectionError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
        except Exception as exc:  # a ProtocolError: logged by the listener
            reason = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.endpoints.discard(endpoint)
            self.bytes_received += endpoint.bytes_received
            if holder and holder[0].id in self.workers:
                self.lost(holder[0], reason)
            elif holder and isinstance(holder[0], ClientConn) and holder[0].id in self.clients:
                self._detach(holder[0], reason)

    def _handlers(self, worker: RemoteWorker) -> dict[type, Any]:
        """What a registered worker may send, and who handles it."""
        return {
            P.Done: functools.partial(self._on_done, worker),
            P.DoneValues: functools.partial(self._on_done_values, worker),
            P.Holding: functools.partial(self._on_holding, worker),
            P.Heartbeat: functools.partial(self._on_heartbeat, worker),
            P.Events: functools.partial(self._on_events, worker),
            P.Blocked: functools.partial(self._on_blocked, worker),
            **self.spawned.handlers(worker),
            P.StreamOpen: functools.partial(self._on_stream, worker),
            P.StreamItems: functools.partial(self._on_stream, worker),
            P.StreamAck: functools.partial(self._on_stream, worker),
        }

    def _on_stream(self, worker: RemoteWorker, msg: Any, buffers: list[Any]) -> None:
        self.sched.streams.on_message(worker, msg, buffers)

    def _register(self, endpoint: P.Endpoint, holder: list[RemoteWorker], msg: P.Register,
                  buffers: list[Any]) -> tuple[P.Registered, Sequence[Any]]:
        if msg.resources:
            try:
                check_resources(msg.resources, "a worker's resources")
            except (TypeError, ValueError) as exc:
                raise P.ProtocolError(f"register: {exc}") from None
        worker = RemoteWorker(next(self._ids), endpoint, msg, endpoint.comm.limit)
        worker.last_seen = self.sched.loop.time()
        holder.append(worker)
        self.workers[worker.id] = worker
        self._members += 1
        self.sched.book.add_worker(worker.id, msg.resources, worker.threads)
        self.sched.resources_freed()
        endpoint.handlers = self._handlers(worker)
        logger.info("worker %d joined: %s", worker.id, worker.describe())
        if self.listening:
            worker.send_quietly(P.Listen(True))
        instruments = self.sched.instruments
        if instruments:
            now = perf_counter()
            for i in instruments:
                i.worker_joined(worker.id, worker.name, worker.address, worker.processors(), now)
        if msg.holds:
            self._adopt(worker, msg.holds)
        asyncio.ensure_future(self._notify_registered())
        self.sched.request_flush()
        return P.Registered(worker.id), ()

    def _adopt(self, worker: RemoteWorker, keys: list[int]) -> None:
        """A worker that comes back (its connection was lost, and with it the worker the
        scheduler knew) still holds ``keys``: count it as a holder of each finished result
        or chunk that is still wanted, so that nothing it kept is computed again; tell it
        to free the rest. A result being computed again is not adopted: its new run is
        the one its waiters get."""
        unwanted = []
        for key in keys:
            obj = self.object(key)
            if obj is not None and (type(obj) is not DTask or obj._value is REMOTE):
                self._note_holder(obj, key, worker)
            else:
                unwanted.append(key)
        logger.info("worker %d came back holding %d values still wanted, %d no longer",
                    worker.id, len(keys) - len(unwanted), len(unwanted))
        if unwanted:
            worker.send_quietly(P.Release(unwanted))

    def _attach(self, endpoint: P.Endpoint, holder: list[Any], msg: P.Attach,
                buffers: list[Any]) -> tuple[P.Registered, Sequence[Any]]:
        """A client (``dagger.connect``): it spawns and puts, and is never placed on."""
        client = ClientConn(next(self._ids), endpoint, msg, _reach_host(endpoint))
        client.last_seen = self.sched.loop.time()
        holder.append(client)
        self.clients[client.id] = client
        endpoint.handlers = {**self.spawned.handlers(client),
                             P.Heartbeat: functools.partial(self._on_client_heartbeat, client)}
        logger.info("client %d attached: %s", client.id, client.describe())
        return P.Registered(client.id), ()

    def _on_client_heartbeat(self, client: ClientConn, msg: P.Heartbeat, buffers: list[Any]) -> None:
        client.last_seen = self.sched.loop.time()
        try:
            client.endpoint.send_nowait(P.Heartbeat({}))  # the client's sign of our life
        except ConnectionError:
            pass

    def _detach(self, client: ClientConn, reason: str) -> None:
        """A client went away: what it spawned or put is dropped unless published."""
        del self.clients[client.id]
        logger.info("client %d detached (%s), releasing %d task(s) and chunk(s)",
                    client.id, reason, len(client.spawned))
        client.spawned.clear()

    def connected(self, spawner: Any) -> bool:
        """Whether the worker or client ``spawner`` is still connected."""
        return self.workers.get(spawner.id) is spawner or self.clients.get(spawner.id) is spawner

    async def _notify_registered(self) -> None:
        async with self._registered:
            self._registered.notify_all()

    def _on_heartbeat(self, worker: RemoteWorker, msg: P.Heartbeat, buffers: list[Any]) -> None:
        worker.last_seen = self.sched.loop.time()
        worker.stats = stats = msg.stats
        try:
            worker.memory = P.decode_record(P.Memory, [stats.get(name) for name in _MEMORY_STATS])
        except P.ProtocolError:
            pass  # counters missing, or not counts: its completions still carry them
        instruments = self.sched.instruments
        if instruments:
            now = perf_counter()
            paused = stats.get("paused") is True
            memory = worker.memory
            for i in instruments:
                if paused != worker.paused:
                    i.worker_paused(worker.id, paused, now)
                i.memory_sampled(worker.id, memory.used, worker.memory_limit, memory.spilled_bytes, now)
            worker.paused = paused

    def _on_events(self, worker: RemoteWorker, msg: P.Events, buffers: list[Any]) -> None:
        """What a worker process saw, for observers (sent only while they listen)."""
        instruments = self.sched.instruments
        if not instruments:
            return
        offset = worker.clock_offset
        for run in msg.runs:
            task = worker.running.get(run.key)
            if task is not None and task._attempts == run.attempt:
                for i in instruments:
                    i.task_thread(task, worker.id, run.thread)
        for move in msg.moves:
            for i in instruments:
                i.data_moved(move.key, move.nbytes, move.source, worker.id, move.start - offset,
                             move.stop - offset)
        for s in msg.stores:
            for i in instruments:
                i.chunk_stored(worker.id, s.key, s.nbytes, s.how, s.start - offset, s.stop - offset)

    def _on_blocked(self, worker: RemoteWorker, msg: P.Blocked, buffers: list[Any]) -> None:
        more = msg.threads > worker.blocked
        worker.blocked = msg.threads
        if more:
            self.sched.request_flush()

    async def poll_stats(self, timeout: float = 10.0) -> None:
        """Ask every worker for its counters now (instead of waiting for a heartbeat)."""
        async def one(worker: RemoteWorker) -> None:
            try:
                reply, _ = await worker.endpoint.request(P.Stats(), timeout=timeout)
            except (ConnectionError, TimeoutError):
                return
            worker.stats = reply.stats

        await asyncio.gather(*(one(w) for w in list(self.workers.values())))

    async def wait_for_workers(self, names: set[str], timeout: float) -> None:
        async with self._registered:
            await asyncio.wait_for(
                self._registered.wait_for(lambda: names <= {w.name for w in self.workers.values()}),
                timeout)

    async def _watch(self) -> None:
        """A heartbeat to each worker every interval, which it answers; a worker silent
        past the timeout is declared lost.

        Any byte from it counts, not only whole messages: its answers wait behind a large
        frame it is sending, which may take longer than the timeout on a slow link.
        """
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            now = self.sched.loop.time()
            for worker in list(self.workers.values()):
                received = worker.endpoint.bytes_received
                if received != worker.bytes_seen:
                    worker.bytes_seen, worker.last_seen = received, now
                elif now - worker.last_seen > self.heartbeat_timeout:
                    worker.endpoint.comm.abort()
                    self.lost(worker, f"not a byte from it for {self.heartbeat_timeout:g} s")
                    continue
                worker.send_quietly(P.Heartbeat({}))
            for client in list(self.clients.values()):
                # A client sends heartbeats of its own, and is answered (see _attach).
                received = client.endpoint.bytes_received
                if received != client.bytes_seen:
                    client.bytes_seen, client.last_seen = received, now
                elif now - client.last_seen > self.heartbeat_timeout:
                    client.endpoint.comm.abort()  # its connection's end detaches it

    # -- placement and dispatch ------------------------------------------------------------
    def candidates(self, task: DTask[Any]) -> list[RemoteWorker]:
        scope = task._opts.scope
        if scope is ANY_SCOPE:
            return [w for w in self.workers.values() if w.status is _UP]
        return [w for w in self.workers.values()
                if w.status is _UP and scope.admits_worker(w.id, w.pid)
                and scope.admits_gpus(w.gpus)]

    def place(self, task: DTask[Any], candidates: list[RemoteWorker]) -> RemoteWorker | None:
        """The worker with the lowest estimated finish time that has room, or None."""
        # a task of occupancy below 1 takes no slot: its amount of occupancy decides
        kind = "async" if task._kind == "async" or task._kind == "thread-light" else "thread"
        room = [w for w in candidates if w.has_room(kind)]
        if not room:
            return None
        if self._suspect and len(room) > 1:
            room = self._trusted(room)
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

    def place_any(self, task: DTask[Any], est: float | None = None) -> RemoteWorker | None:
        """Where an unscoped task goes, or None if no worker has room now, without
        looking at every worker: the next two workers with room in a ring, the less
        loaded of them (two random choices balance nearly as well as the least loaded of
        all), and, for a task whose inputs live on workers, those workers too, priced by
        the cost model as :meth:`place` does. A worker that just reported results is
        the first choice, once per report, so a busy cluster does not go round the ring
        to find the one with room. With 1,000 workers, :meth:`place` cost the scheduler
        10x its per-task time at 2 (benchmarks/manyworkers.py)."""
        kind = "async" if task._kind == "async" else "thread"
        if est is None:
            est = self.sched.runtimes.get(task._fnkey)
        tiny = task._deps is None and est < TINY_TASK_S
        if tiny and self._streak_left:
            w = self._streak
            assert w is not None
            if w.status is _UP and w.has_room(kind) and self._ring_members == self._members:
                self._streak_left -= 1
                return w
            self._streak_left = 0
        first = self._freed_with_room(kind) or self._next_with_room(kind)
        if first is None:
            return None
        second = self._ring_step(kind)
        if task._deps is None:  # most: nothing to weigh but the two workers' loads
            if second is not None and second is not first and (
                    second.backlog_s / second.threads < first.backlog_s / first.threads):
                first = second
            if tiny:
                self._streak, self._streak_left = first, TINY_STREAK - 1
            return first
        room = [first] if second is None or second is first else [first, second]
        held: dict[int, int] | None = None
        for dep in task._deps or ():
            if dep._value is REMOTE:
                held = held or {}
                for wid in dep._where:
                    held[wid] = held.get(wid, 0) + dep._nbytes
        if held is None:
            return room[0] if len(room) == 1 or _load(room[0]) <= _load(room[1]) else room[1]
        workers = self.workers
        for wid in held:
            w = workers.get(wid)
            if w is not None and w.status is _UP and w not in room and w.has_room(kind):
                room.append(w)
        cands = [Candidate(w.id, w.backlog_s / w.threads) for w in room]
        return room[choose_processor(cands, self.sched.runtimes.get(task._fnkey), held, self.bandwidth)]

    def _freed_with_room(self, kind: str) -> RemoteWorker | None:
        """A worker that reported results lately and has room (each report, one look)."""
        freed = self._freed
        while freed:
            w = freed.popleft()
            if w.status is _UP and w.has_room(kind) and self.workers.get(w.id) is w:
                return w
        return None

    def _ring_step(self, kind: str) -> RemoteWorker | None:
        """The ring's next worker if it has room: the second choice, one look only (a
        full lap would scan every worker of a busy cluster for each task)."""
        ring = self._ring
        if not ring or self._ring_members != self._members:
            return self._next_with_room(kind)
        cursor = self._cursor + 1 if self._cursor + 1 < len(ring) else 0
        self._cursor = cursor
        w = ring[cursor]
        return w if w.status is _UP and w.has_room(kind) else None

    def _next_with_room(self, kind: str) -> RemoteWorker | None:
        if self._ring_members != self._members:
            self._ring = list(self.workers.values())
            self._ring_members = self._members
        ring = self._ring
        n = len(ring)
        cursor = self._cursor
        for _ in range(n):  # one lap at most: only a cluster without room goes all the way round
            cursor = cursor + 1 if cursor + 1 < n else 0
            w = ring[cursor]
            if w.status is _UP and w.has_room(kind):
                self._cursor = cursor
                return w
        self._cursor = cursor
        return None

    @property
    def fast_placement(self) -> bool:
        """Whether :meth:`place_any` may place unscoped tasks (no worker is suspected
        of being unreachable: then every worker is weighed, as :meth:`place` does)."""
        return not self._suspect

    def _trusted(self, room: list[RemoteWorker]) -> list[RemoteWorker]:
        """``room`` without the workers a peer could not get anything from lately, unless
        that leaves none: a value computed again there could be as unreachable as the
        copy it replaces (and a frozen worker is lost a moment later, taking it along)."""
        now = self.sched.loop.time()
        for wid, until in list(self._suspect.items()):
            if until < now:
                del self._suspect[wid]
        return [w for w in room if w.id not in self._suspect] or room

    def lost_dependency(self, task: DTask[Any]) -> DTask[Any] | None:
        """A dependency of ``task`` whose only copies died, if any."""
        for dep in task._deps or ():
            if dep._value is REMOTE and not any(w in self.workers for w in dep._where):
                return dep
        return None

    def _holders(self, obj: Any, to: RemoteWorker | ClientConn) -> list[P.Holder]:
        """Where ``to`` fetches ``obj`` from."""
        workers = self.workers
        return [P.Holder(wid, _address_for(workers[wid], to)) for wid in obj._where if wid in workers]

    def dispatch(self, task: DTask[Any], worker: RemoteWorker, waits: list[int] | None = None) -> None:
        """Queue ``task`` for ``worker``; raises SerializationError if it cannot be sent,
        FrameTooLargeError if its function, arguments or an input here is larger than a
        frame to that worker may be. ``waits``: its inputs still running on ``worker``
        (send_ahead), which the worker waits for before it starts the task."""
        assert task._fn is not None and task._args is not None and task._kwargs is not None
        fn_hash, fn_bytes = self.fn_cache.get(task._fn)
        opts = task._opts
        if (task._deps is None and waits is None and task._resolve is False and task._kind == "thread"
                and not task._kwargs and opts.restore is None and opts.checkpoint is None):
            # Most tiny tasks: their columns in the worker's RunPlain (no record, pickle
            # or buffer of their own) if every argument is a small builtin.
            size = _plain_size(task._args)
            if size >= 0:
                if fn_hash not in worker.functions:
                    self._define(worker, task, fn_hash, fn_bytes)
                worker.plain.add(task.id, fn_hash, task.name, task._attempts, opts.priority,
                                 task._args, size)
                self._dispatched(task, worker, None, self.sched.runtimes.get(task._fnkey))
                return
        resolve = task._resolve
        if resolve is False or resolve is True:
            refs, files = resolve, False
        else:  # an int of flags: a File is among the arguments
            refs, files = bool(resolve & DEPS), True
        payload, parts, chunks = P.dumps_args(task.name, task._args, task._kwargs, refs)
        if opts.restore is not None or opts.checkpoint is not None:
            try:
                sent: list[Any] = [cloudpickle.dumps((opts.restore, opts.checkpoint)), payload, *parts]
            except Exception as exc:
                raise SerializationError(f"the restore/checkpoint callbacks of {task._describe()} "
                                         f"cannot be sent to a worker: {exc}") from exc
            callbacks = True
        else:
            sent = [payload, *parts] if parts else [payload]
            callbacks = False
        limit = worker.max_frame
        size = 0
        for part in sent:
            size += len(part) if type(part) is bytes else part.nbytes
        if size > limit:
            raise FrameTooLargeError.of(f"the arguments of {task._describe()}", size, limit)
        self._define(worker, task, fn_hash, fn_bytes)
        deps: list[P.Dep] = []
        inputs: list[int] = []
        if task._deps or chunks:  # most tiny tasks have no inputs: no lists to walk
            for dep in [*(task._deps or ()), *chunks]:
                key = _key(dep)
                inputs.append(key)
                if worker.id in dep._where or (waits and key in waits):
                    continue  # there, or to be made there
                if dep._value is not REMOTE:  # the value is in this process: send it along once
                    p, b = P.dumps(dep._value)
                    if (size := len(p) + sum(v.nbytes for v in b)) > limit:
                        raise FrameTooLargeError.of(f"{dep!r}, an input of {task._describe()},", size, limit)
                    worker.value_defs.add(P.ValueDef(key, 1 + len(b)), (p, *b))
                    self._note_holder(dep, key, worker)
                else:
                    deps.append(P.Dep(key, self._holders(dep, worker)))
        kind = task._kind
        if kind[0] == "g" and type(opts.scope.gpu) is int:
            kind = f"{kind}:{opts.scope.gpu}"  # the device the scope names ("gpu:1", "gpu-async:0")
        worker.runs.add(P.RunTask(task.id, task.name, fn_hash, kind, task._attempts,
                                  len(sent), deps, callbacks, refs, inputs, files, waits or [],
                                  opts.priority), sent)
        self._dispatched(task, worker, waits, self.sched.runtimes.get(task._fnkey))

    def dispatch_plain(self, tasks: collections.deque[DTask[Any]], before: float) -> int:
        """Send the run of tiny plain tasks at the head of ``tasks`` (the scheduler's
        deque of ready tasks, all of ids below ``before``) to the workers place_any picks,
        in their RunPlain columns, as dispatch() would one by one; return how many left
        the deque. It stops at the first that is not such a task (without options,
        inputs, keywords or callbacks, a thread task of known run time under
        TINY_TASK_S, its arguments small builtins), or that has no worker with room:
        that one goes the usual way. W4 (5,000 ``inc`` tasks on 2 processes): four calls
        a task fewer from the flush to the column, and the scheduler's CPU went from
        4.36-4.58 to 3.95-4.24 µs a task (psutil over 8 s, three runs each, taking turns)."""
        sched = self.sched
        estimate = sched.runtimes.get
        fns = self.fn_cache
        dirty = self._dirty
        taken = 0
        while tasks:
            task = tasks[0]
            if task.id >= before:
                break
            if task._cancelled or task._state is not READY:
                tasks.popleft()
                taken += 1
                continue
            if (task._deps is not None or task._kind != "thread" or task._resolve is not False
                    or task._kwargs or not task._opts.plain or task._fn is None or task._args is None):
                break
            est = estimate(task._fnkey)
            if est >= TINY_TASK_S:
                break
            size = _plain_size(task._args)
            if size < 0:
                break
            try:
                fn_hash, fn_bytes = fns.get(task._fn)
            except (SerializationError, FrameTooLargeError):
                break  # dispatch() fails it, saying why
            worker = self.place_any(task, est)
            if worker is None:
                break
            if fn_hash not in worker.functions:
                if len(fn_bytes) > worker.max_frame:
                    break  # as above
                self._define(worker, task, fn_hash, fn_bytes)
            tasks.popleft()
            taken += 1
            task._state = RUNNING
            worker.plain.add(task.id, fn_hash, task.name, task._attempts, task._opts.priority,
                             task._args, size)
            # _dispatched, for what it comes to here (no waits, a thread task)
            task._est = est
            worker.queued += 1
            worker.backlog_s += est
            worker.running[task.id] = task
            task._handle = worker
            dirty.add(worker)
            if task._dependents is not None:
                self.send_ahead(task, worker)
        if taken and not self._send_wakeup.pending:
            self._send_wakeup.request()
        return taken

    @staticmethod
    def _define(worker: RemoteWorker, task: DTask[Any], fn_hash: bytes, fn_bytes: bytes) -> None:
        """Send ``task``'s function to ``worker`` ahead of it, once."""
        if fn_hash not in worker.functions:
            if len(fn_bytes) > worker.max_frame:
                raise FrameTooLargeError.of(f"the function of {task._describe()}, pickled,",
                                            len(fn_bytes), worker.max_frame)
            worker.functions.add(fn_hash)
            worker.function_defs.add(P.FunctionDef(fn_hash), (fn_bytes,))

    def _dispatched(self, task: DTask[Any], worker: RemoteWorker, waits: list[int] | None,
                    est: float) -> None:
        """``task``'s run is queued for ``worker``: count it there, and send soon
        (``est``: its run time as the scheduler estimates it)."""
        task._est = est
        if waits:
            worker.ahead.add(task.id)
        elif task._kind != "async" and task._kind != "thread-light":
            worker.queued += 1
            worker.backlog_s += est
        worker.running[task.id] = task
        task._handle = worker
        self._dirty.add(worker)
        if self.sched.instruments:
            self.sched.dispatched(task, worker.id)
        if not self._send_wakeup.pending:
            self._send_wakeup.request()
        if task._dependents is not None:
            self.send_ahead(task, worker)

    # -- tasks sent ahead of their inputs ------------------------------------------------------
    def _waits_on(self, task: DTask[Any], worker: RemoteWorker) -> list[int] | None:
        """The keys of ``task``'s inputs still running (or held) on ``worker``, if it may
        be sent there ahead of them: every unfinished input is there (a task with inputs
        running on two workers waits here, to be placed once it is ready, so that holding
        never decides placement for the scheduler), every finished one is on a live
        worker or here, and it is a plain thread task for any worker of the cluster
        (no timeout, which would count from dispatch; no ``after``; no Files). None if not."""
        if (task._state is not PENDING or task._cancelled or task._kind != "thread"
                or type(task) is not DTask or worker.status is not WorkerStatus.RUNNING):
            return None
        opts = task._opts
        if opts.timeout is not None or opts.after or type(task._resolve) is not bool:
            return None
        scope = opts.scope
        if scope is not ANY_SCOPE and (scope.wants_gpu or not self.sched.runs_elsewhere(scope)
                                       or not scope.admits_worker(worker.id, worker.pid)):
            return None
        waits: list[int] = []
        workers = self.workers
        running = worker.running
        for dep in task._deps or ():
            state = dep._state
            if state is FINISHED:
                if dep._value is REMOTE and not any(w in workers for w in dep._where):
                    return None  # lost: placed once ready, which computes it again
            elif state is RUNNING and dep._handle is worker and running.get(dep.id) is dep:
                waits.append(dep.id)
            else:
                return None
        return waits or None

    def send_ahead(self, task: DTask[Any], worker: RemoteWorker) -> None:
        """``task`` was just sent to ``worker``: send along each dependent that may go
        ahead of it (_waits_on), and theirs in turn, up to MAX_AHEAD held there."""
        stack = [task]
        while stack:
            for dep in stack.pop()._dependents or ():
                if dep._state is not PENDING:
                    continue  # the common case: held already
                waits = self._waits_on(dep, worker)
                if waits is not None and self._hold(dep, worker, waits):
                    stack.append(dep)

    def consider(self, task: DTask[Any]) -> None:
        """``task`` was just spawned, and waits for inputs: send it ahead to the worker
        they run on, if it may go (a chain spawned as it runs)."""
        for dep in task._deps or ():
            worker = dep._handle
            if type(worker) is RemoteWorker and dep._state is RUNNING:
                waits = self._waits_on(task, worker)
                if waits is not None:
                    self._hold(task, worker, waits)
                return

    def _hold(self, task: DTask[Any], worker: RemoteWorker, waits: list[int]) -> bool:
        if len(worker.ahead) >= MAX_AHEAD:
            worker.deferred[task.id] = task  # tried again as held tasks end there
            return False
        try:
            self.dispatch(task, worker, waits)
        except (SerializationError, FrameTooLargeError):
            return False  # it fails with that once ready, as any task sent then
        task._state = RUNNING
        return True

    def _top_up(self, worker: RemoteWorker) -> None:
        """Send ahead the tasks that waited for room among ``worker``'s held tasks."""
        deferred = worker.deferred
        while deferred and len(worker.ahead) < MAX_AHEAD:
            task = deferred.pop(next(iter(deferred)))
            if task._handle is None:
                waits = self._waits_on(task, worker)
                if waits is not None and self._hold(task, worker, waits) and task._dependents:
                    self.send_ahead(task, worker)

    def _note_holder(self, obj: Any, key: int, worker: RemoteWorker) -> None:
        if obj._where is NOWHERE:
            obj._where = set()
        obj._where.add(worker.id)
        worker.holds.add(key)
        if key not in self._refs:
            # Free the copies on workers once the handle is garbage.
            ref = weakref.ref(obj, self._handle_died)
            self._refs[key] = ref
            self._handles[ref] = (key, obj._where)

    def object(self, key: int) -> Any:
        """The live handle of a result or chunk held on workers, or None."""
        ref = self._refs.get(key)
        return None if ref is None else ref()

    def _handle_died(self, ref: weakref.ref[Any]) -> None:
        """A tracked handle was garbage collected (in any thread): free its copies."""
        entry = self._handles.pop(ref, None)
        if entry is not None:
            self._refs.pop(entry[0], None)
            self._release_later(*entry)

    def _send(self) -> None:
        dirty, self._dirty = self._dirty, set()
        for worker in dirty:
            frames = (worker.function_defs.take() + worker.value_defs.take() + worker.runs.take()
                      + worker.plain.take())
            if frames and not self._sent_now(worker, frames):
                asyncio.ensure_future(self._send_frames(worker, frames))

    def send_now(self) -> None:
        """Send what was dispatched so far without waiting for the loop's next turn."""
        self._send()

    def _sent_now(self, worker: RemoteWorker, frames: list[tuple[Any, list[Any]]]) -> bool:
        """Write small frames to the transport at once, if nothing is being sent to
        ``worker`` (frames go out in order); False: send them as usual."""
        if worker.sending.locked():
            return False
        size = 0
        for _, buffers in frames:
            for b in buffers:
                size += len(b) if type(b) is bytes else memoryview(b).nbytes
        if size > SEND_NOW_BYTES:
            return False
        endpoint = worker.endpoint
        for i, (msg, buffers) in enumerate(frames):
            try:
                endpoint.send_nowait(msg, buffers)
            except ConnectionError as exc:
                # Handled on the loop's next turn, not inside a spawn that flushed early.
                self.sched.loop.call_soon(self.lost, worker, str(exc))
                return True
            except Exception:  # noqa: BLE001 - not encoded, nothing written: the usual way
                del frames[:i]
                return False
        return True

    async def _send_frames(self, worker: RemoteWorker, frames: list[tuple[Any, list[Any]]]) -> None:
        try:
            async with worker.sending:
                for msg, buffers in frames:
                    try:
                        await worker.endpoint.send(msg, buffers)
                    except (ConnectionError, FrameTooLargeError):
                        raise
                    except Exception as exc:  # nothing was written: frames are encoded whole first
                        if type(msg) is P.RunPlain:
                            msg, buffers = P.plain_as_run(msg, buffers)
                        elif type(msg) is not P.Run:
                            raise
                        await self._send_one_by_one(worker, msg, buffers, exc)
        except ConnectionError as exc:
            self.lost(worker, str(exc))
        except Exception as exc:
            # A definition frame that cannot be encoded: the worker cannot run what needs
            # it, so it is treated as lost (its tasks are retried or fail with that reason).
            logger.error("could not send to worker %d: %r", worker.id, exc)
            self.lost(worker, f"a frame to it could not be encoded: {exc!r}")

    async def _send_one_by_one(self, worker: RemoteWorker, msg: P.Run, buffers: list[Any],
                               exc: Exception) -> None:
        """A batch of runs did not encode: send each task alone, failing only those whose
        own record does not (a name that is not valid UTF-8, say), never leaving them to
        hang."""
        logger.warning("a batch of %d tasks for worker %d did not encode (%r); sending them "
                       "one by one", len(msg.tasks), worker.id, exc)
        index = 0
        for rec in msg.tasks:
            parts = buffers[index:index + rec.nparts]
            index += rec.nparts
            try:
                await worker.endpoint.send(P.Run([rec]), parts)
            except (ConnectionError, FrameTooLargeError):
                raise
            except Exception as err:
                task = worker.running.pop(rec.key, None)
                if task is None or task._attempts != rec.attempt:
                    continue
                if rec.key in worker.ahead:
                    worker.ahead.discard(rec.key)
                else:
                    self._account_done(worker, task)
                task._handle = None
                self.sched.fail_unsent(task, SerializationError(
                    f"{task._describe()} could not be sent to worker {worker.id}: its run record "
                    f"did not encode ({err}). Give the task a name that is valid UTF-8 "
                    f"(dagger.options(name=...))"))

    def cancel(self, task: DTask[Any], worker: RemoteWorker) -> None:
        if worker.running.pop(task.id, None) is not None:
            book = self.sched.book
            if book.held and book.give_back(task, task._attempts):
                self.sched.resources_freed()
            if task.id in worker.ahead:  # held: it takes no slot (if it runs, nobody waits)
                worker.ahead.discard(task.id)
            elif task._kind != "async" and task._kind != "thread-light":
                # a thread cannot be stopped: it stays busy until it returns
                worker.ending[(task.id, task._attempts)] = task._est
            worker.send_quietly(P.Cancel([task.id]))

    def _account_done(self, worker: RemoteWorker, task: DTask[Any]) -> None:
        if task._kind != "async" and task._kind != "thread-light":
            self._free_slot(worker, task._est)

    @staticmethod
    def _free_slot(worker: RemoteWorker, est: float) -> None:
        worker.queued -= 1
        worker.backlog_s = worker.backlog_s - est if worker.queued else 0.0

    # -- results ---------------------------------------------------------------------------
    def _on_done(self, worker: RemoteWorker, msg: P.Done, buffers: list[Any]) -> None:
        sched = self.sched
        worker.memory = msg.memory
        self._freed.append(worker)
        index = 0
        for rec in msg.results:  # split_parts, inlined: this loop runs once per task
            nparts = rec.nparts
            parts: Sequence[Any] = buffers[index:index + nparts] if nparts else ()
            index += nparts
            task, held = self._run_over(worker, rec.key, rec.attempt)
            if task is None:
                continue
            proc = worker.async_view if task._kind == "async" else worker.thread_view
            status = rec.status
            if status == "ok":
                if task._where:
                    task._where.clear()  # the same set lives on in the release's record
                task._nbytes = rec.size
                self._note_holder(task, rec.key, worker)
                value = REMOTE
                if parts:
                    try:
                        value = P.loads(parts[0], parts[1:])
                    except Exception as exc:  # noqa: BLE001 - e.g. its class is not importable here
                        logger.warning("the result of %s cannot be loaded in this process (%s); it "
                                       "stays on worker %d", task._describe(), exc, worker.id)
                sched.complete(task, rec.attempt, True, value, rec.start - worker.clock_offset, rec.seconds, proc)
            elif status == "value":  # a small builtin value the worker did not keep: here only
                if task._where:
                    task._where.clear()
                task._nbytes = rec.size
                try:
                    value, ok = P.loads(parts[0]), True
                except Exception as exc:  # noqa: BLE001 - builtins only: a damaged record
                    value, ok = exc, False
                sched.complete(task, rec.attempt, ok, value, rec.start - worker.clock_offset, rec.seconds, proc)
            elif status == "error":
                sched.complete(task, rec.attempt, False, _load_error(parts[0], task),
                               rec.start - worker.clock_offset, rec.seconds, proc)
            elif status == "missing":
                sched.dependencies_lost(task, [self._missing(worker, m) for m in rec.missing])
            elif status == "dropped" and held:
                # Held, and an input it waited for ended there without a result: that
                # input's record came first, and decided (a retry, a failure that has
                # failed this task too). Still to run: it waits for its inputs again.
                self._unhold(task)
            elif status == "dropped":  # a run it was sent to do, never held: over all the same
                sched.complete(task, rec.attempt, False, WorkerLostError(
                    f"worker {worker.id} ended the run of {task._describe()} without a result (it "
                    "reported a held task dropped, and it held none by that id)"), rec.start,
                    rec.seconds, proc)
            elif not task._cancelled:  # "cancelled" by the worker alone: the run is over all the same
                sched.complete(task, rec.attempt, False, WorkerLostError(
                    f"worker {worker.id} ended the run of {task._describe()} without a result (it "
                    "reported the run cancelled, which nobody asked for)"), rec.start, rec.seconds, proc)
        if worker.deferred and len(worker.ahead) < MAX_AHEAD:
            self._top_up(worker)
        sched.request_flush()

    def _on_done_values(self, worker: RemoteWorker, msg: P.DoneValues, buffers: list[Any]) -> None:
        """Runs that ended with a small builtin value, in columns: as Done's "value"
        records, with one unpickling for all."""
        sched = self.sched
        worker.memory = msg.memory
        self._freed.append(worker)
        keys = msg.keys
        try:
            values = P.loads(buffers[0])
            if type(values) is not list or len(values) != len(keys):
                raise ValueError(f"{len(keys)} values announced, {_brief_len(values)} sent")
            error = None
        except Exception as exc:  # noqa: BLE001 - builtins only: a damaged message
            values, error = None, exc
        offset = worker.clock_offset
        attempts, starts, seconds = msg.attempts, msg.starts, msg.seconds
        observe = sched.runtimes.observe
        for i, key in enumerate(keys):
            attempt = attempts[i]
            task, _ = self._run_over(worker, key, attempt)
            if task is None:
                continue
            if task._where:
                task._where.clear()
            if values is not None and not sched.instruments and task._kind == "thread":
                # complete() for what it comes to here (W4: most of its tasks)
                if seconds[i]:
                    observe(task._fnkey, seconds[i])
                sched.finished_plain(task, values[i])
                continue
            proc = worker.async_view if task._kind == "async" else worker.thread_view
            ok = values is not None
            sched.complete(task, attempt, ok, values[i] if values is not None else error,
                           starts[i] - offset, seconds[i], proc)
        if worker.deferred and len(worker.ahead) < MAX_AHEAD:
            self._top_up(worker)
        sched.request_flush()

    def _run_over(self, worker: RemoteWorker, key: int, attempt: int) -> tuple[DTask[Any] | None, bool]:
        """A run on ``worker`` ended: its task, if that run is the one that counts, and
        whether it was held there (sent ahead); its slot and resources are free again."""
        if worker.ending:
            est = worker.ending.pop((key, attempt), None)
            if est is not None:  # a cancelled run is over: its thread is free again
                self._free_slot(worker, est)
                return None, False
        task = worker.running.get(key)
        if task is None or task._attempts != attempt:
            return None, False  # cancelled, or a record of an attempt that is not the one running
        del worker.running[key]
        book = self.sched.book
        if book.held and book.give_back(task, attempt):
            self.sched.resources_freed()
        held = bool(worker.ahead) and key in worker.ahead
        if held:
            worker.ahead.discard(key)  # it took no slot
        else:
            self._account_done(worker, task)
        task._handle = None
        return task, held

    def _unhold(self, task: DTask[Any]) -> None:
        """A task that was held on a worker did not run there: back to waiting for its
        inputs (ready at once if they have all finished), then perhaps sent ahead again."""
        if task.done() or task._state is not RUNNING:
            return
        task._state = PENDING
        if task._npending <= 0:
            self.sched._make_ready(task, freed=True)
        else:
            self.consider(task)

    def _missing(self, reporter: RemoteWorker, missing: P.Missing) -> Any:
        """An input that its holders said they lack (or hold corrupted), or that
        ``reporter`` could not reach: forget those copies (and let the holders drop them)."""
        obj = self.object(missing.key)
        until = self.sched.loop.time() + self.heartbeat_timeout
        for wid in missing.holders:
            if obj is not None:
                obj._where.discard(wid)
            holder = self.workers.get(wid)
            if holder is not None:
                holder.holds.discard(missing.key)
                holder.send_quietly(P.Release([missing.key]))
                if holder is not reporter:
                    self._suspect[wid] = until
        return obj

    def _on_holding(self, worker: RemoteWorker, msg: P.Holding, buffers: list[Any]) -> None:
        orphans = []
        for key in msg.keys:
            obj = self.object(key)
            if obj is not None:
                self._note_holder(obj, key, worker)
            else:
                orphans.append(key)
        if orphans:
            # Its handle died before this copy was reported (a value fetched for a task
            # whose result was awaited and dropped at once): nobody will ever ask for it,
            # and nothing else would free it. Each W5 repeat in four left 256 MiB so.
            worker.send_quietly(P.Release(orphans))

    def _release_later(self, key: int, where: set[int]) -> None:
        self._releases.append((key, where))
        if not self._release_wakeup.pending:
            self._release_wakeup.request()

    def _send_releases(self) -> None:
        by_worker: dict[int, list[int]] = {}
        while self._releases:
            key, where = self._releases.popleft()
            for wid in where:
                by_worker.setdefault(wid, []).append(key)
        for wid, keys in by_worker.items():
            worker = self.workers.get(wid)
            if worker is not None:
                worker.holds.difference_update(keys)
                worker.send_quietly(P.Release(keys))

    async def fetch(self, objs: list[Any]) -> None:
        """Bring the values of finished remote results into this process.

        LookupError(*objs) names those no holder could give: none is left, or the
        connection to the one asked broke (it is then no holder any more).
        """
        by_worker: dict[int, list[Any]] = {}
        lost = []
        for obj in objs:
            if obj._value is not REMOTE:
                continue
            alive = [wid for wid in obj._where if wid in self.workers]
            if not alive:
                lost.append(obj)
                continue
            by_worker.setdefault(alive[0], []).append(obj)
        outcomes = await asyncio.gather(*(self._fetch_from(self.workers[wid], items)
                                          for wid, items in by_worker.items()), return_exceptions=True)
        for (wid, items), outcome in zip(by_worker.items(), outcomes, strict=True):
            if isinstance(outcome, (ConnectionError, P.ProtocolError)):
                # The holder went away mid-fetch: like a lost value, not the caller's error.
                logger.info("fetching from worker %d failed (%s): its copies count as lost", wid, outcome)
                for obj in items:
                    obj._where.discard(wid)
                lost.extend(items)
            elif isinstance(outcome, BaseException):
                raise outcome
            elif outcome:  # the holder answered that it lacks them (e.g. spill files gone)
                holder = self.workers.get(wid)
                for obj in outcome:
                    obj._where.discard(wid)
                    if holder is not None:
                        holder.holds.discard(_key(obj))
                lost.extend(outcome)
        if lost:
            raise LookupError(*lost)

    async def _fetch_from(self, worker: RemoteWorker, objs: list[Any]) -> list[Any]:
        """Fetch ``objs`` from ``worker``; return those it answered it does not hold.

        Raises FrameTooLargeError for a value larger than a frame from it may be.
        """
        by_key = {_key(o): o for o in objs}
        keys = list(by_key)
        missing: list[Any] = []
        shm = P.shm_key()
        while keys:  # a reply carries what fits in one frame, and names the rest "later"
            start = perf_counter()
            reply, buffers = await worker.endpoint.request(P.Get(keys, shm))
            unmapped = await self._map_shared(reply.shared, by_key)
            if unmapped:  # released meanwhile, or not this machine's /dev/shm after all
                shm = ""
                keys = [*unmapped, *reply.later]
                continue
            if reply.oversized:
                big = reply.oversized[0]
                obj = by_key.get(big.key)
                what = obj._describe() if type(obj) is DTask else repr(obj)
                raise FrameTooLargeError.of(f"the result of {what}, held by worker {worker.id},",
                                            big.size, worker.endpoint.comm.limit)
            for item, parts in P.split_parts(reply.items, buffers):
                obj = by_key.get(item.key)
                if obj is not None and obj._value is REMOTE:
                    obj._value = P.loads(parts[0], parts[1:])
            if self.sched.instruments:
                self._fetched(worker, reply, buffers, start)
            missing.extend(by_key[k] for k in reply.missing if k in by_key)
            if len(reply.later) >= len(keys):
                raise P.ProtocolError(f"worker {worker.id} answered a get with nothing but 'later'")
            keys = reply.later
        return missing

    def _fetched(self, worker: RemoteWorker, reply: P.Items, buffers: list[Any], start: float) -> None:
        """Tell observers what one reply of ``worker`` brought to this process."""
        stop = perf_counter()
        moved = [(seg.key, seg.size) for seg in reply.shared]
        for item, parts in P.split_parts(reply.items, buffers):
            moved.append((item.key, sum(memoryview(p).nbytes for p in parts)))
        for key, nbytes in moved:
            for i in self.sched.instruments:
                i.data_moved(key, nbytes, worker.id, 0, start, stop)

    async def _map_shared(self, segments: list[P.Shared], by_key: dict[int, Any]) -> list[int]:
        """Load the values a holder put in shared segments; return the keys of those that
        could not be mapped here (to be asked for over the socket)."""
        unmapped = []
        loop = self.sched.loop
        for seg in segments:
            obj = by_key.get(seg.key)
            if obj is None or obj._value is not REMOTE:
                continue
            try:
                obj._value = await loop.run_in_executor(None, P.load_shared, seg.path)
            except (OSError, ValueError, DaggerError) as exc:  # DaggerError: a segment not whole
                logger.info("segment %s not mapped (%s); asking over TCP", seg.path, exc)
                unmapped.append(seg.key)
        return unmapped

    def admitted(self, scope: Any) -> list[RemoteWorker]:
        """The running workers ``scope`` admits."""
        return [w for w in self.workers.values()
                if w.status is _UP and scope.admits_worker(w.id, w.pid)
                and scope.admits_gpus(w.gpus)]

    async def put(self, chunk: Chunk[Any], targets: list[RemoteWorker]) -> None:
        """Place a copy of ``chunk`` on each of ``targets`` (pickled once). The caller's
        process keeps its own: tasks there, or on other workers, get it from that."""
        payload, parts = P.dumps(chunk._value)
        size = len(payload) + sum(p.nbytes for p in parts)
        for worker in targets:
            if size > worker.max_frame:
                raise FrameTooLargeError.of(f"the value put() places on worker {worker.id}",
                                            size, worker.max_frame)

        async def one(worker: RemoteWorker) -> None:
            async with worker.sending:  # never inside another batch's frames
                await worker.endpoint.send(P.Put(-chunk.id), [payload, *parts])

        await asyncio.gather(*(one(w) for w in targets))
        chunk._nbytes = size
        for worker in targets:
            if worker.id in self.workers:
                self._note_holder(chunk, -chunk.id, worker)

    # -- loss ------------------------------------------------------------------------------
    def lost(self, worker: RemoteWorker, reason: str) -> None:
        if self.workers.pop(worker.id, None) is None:
            return
        self._members += 1
        worker.status = WorkerStatus.LOST
        logger.warning("worker %d (%s) lost: %s", worker.id, worker.address, reason)
        self._left(worker, reason, lost=True)
        running = list(worker.running.values())
        worker.running.clear()
        worker.spawned.clear()  # nobody there waits for these any more
        for key in worker.holds:
            obj = self.object(key)
            if obj is not None:
                obj._where.discard(worker.id)
        held, worker.ahead = worker.ahead, set()
        worker.deferred.clear()
        for task in running:
            task._handle = None
            if task.id in held and task._npending > 0:
                # An input it waited for had not finished as far as anyone here knows, so
                # it had not started: placed again once its inputs are, and no retry spent
                # (those inputs spend theirs, should this task be what kills workers).
                self._unhold(task)
                continue
            self.sched.run_lost(task, worker.id, worker.address, reason)
        if self.sched.stream_hub is not None:
            self.sched.stream_hub.worker_lost(worker.id)
        self.sched.request_flush()

    async def retire(self, worker: RemoteWorker, timeout: float = 60.0) -> None:
        """Let ``worker`` finish what it runs (it takes nothing new), move what only it
        holds to other workers, then let it go."""
        others = [w for w in self.workers.values()
                  if w is not worker and w.status is _UP]
        worker.status = WorkerStatus.RETIRING
        loop = self.sched.loop
        deadline = loop.time() + timeout
        while worker.running and worker.id in self.workers and loop.time() < deadline:
            await asyncio.sleep(0.02)  # a cold path: polled rather than an event per completion
        if worker.id not in self.workers:
            return  # lost meanwhile: lost() has taken care of its tasks
        if worker.running:  # what still runs there is run again elsewhere (within retries)
            self.lost(worker, f"retired with tasks still running after {timeout:.0f} s")
            worker.send_quietly(P.Shutdown())
            return
        if others:
            keys = [key for key in list(worker.holds)
                    if (obj := self.object(key)) is not None and obj._where == {worker.id}]
            target_of: dict[int, list[P.Dep]] = {}
            for i, key in enumerate(keys):
                to = others[i % len(others)]
                target_of.setdefault(to.id, []).append(
                    P.Dep(key, [P.Holder(worker.id, _address_for(worker, to))]))
            await asyncio.gather(*(self.workers[wid].endpoint.request(P.Replicate(part), timeout=timeout)
                                   for wid, part in target_of.items()))
            await asyncio.sleep(0)  # let their "holding" notes arrive first
        self.workers.pop(worker.id, None)
        self._members += 1
        worker.status = WorkerStatus.CLOSING
        self._left(worker, "retired", lost=False)
        worker.send_quietly(P.Shutdown())

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
        for worker in list(self.workers.values()):
            worker.status = WorkerStatus.CLOSING
            del self.workers[worker.id]  # leaving, not lost
            self._members += 1
            worker.send_quietly(P.Shutdown())

    def describe(self) -> list[str]:
        return [w.describe() for w in self.workers.values()]

    # -- observers -------------------------------------------------------------------------
    def listen(self, on: bool) -> None:
        """Whether worker processes send their events (an observer is attached)."""
        if on != self.listening:
            self.listening = on
            for worker in self.workers.values():
                worker.send_quietly(P.Listen(on))

    def _left(self, worker: RemoteWorker, reason: str, lost: bool) -> None:
        self.sched.book.remove_worker(worker.id)  # lost or retired: its amounts go with it
        instruments = self.sched.instruments
        if instruments:
            now = perf_counter()
            for i in instruments:
                i.worker_left(worker.id, reason, lost, now)

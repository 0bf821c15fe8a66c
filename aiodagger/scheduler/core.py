"""The scheduler: the task graph, the ready heap, dispatch, retries and failure propagation.

All of its state lives on the cluster's loop. Other threads reach it only through
``call_soon_threadsafe`` (spawns are queued in an inbox drained once per wake-up), so
there are no locks here. Every task event does O(1) work: a dependent knows how many
inputs it still waits for, a finished task walks only its own dependents, and nothing
ever scans all tasks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import logging
import os
import threading
import types
from collections import deque
from inspect import CO_ASYNC_GENERATOR, CO_COROUTINE
from time import perf_counter
from typing import TYPE_CHECKING, Any

from .._args import DEPS, LEAF_TYPES, STREAM, find_dependencies
from .._bridge import (
    Wakeup,
    block_until_done,
    call_soon_quietly,
    run_on_loop_awaitable,
    run_on_loop_blocking,
)
from .._callables import classify
from ..errors import (
    FrameTooLargeError,
    NoProcessorError,
    SerializationError,
    TaskCancelledError,
    TaskTimeoutError,
    UpstreamError,
    WorkerLostError,
)
from ..placed import Placed, bind
from ..task import (
    CANCELLED,
    FAILED,
    FINISHED,
    ID_SPACE,
    PENDING,
    READY,
    REMOTE,
    RUNNING,
    DTask,
)
from ..taskoptions import ANY_SCOPE, Scope, TaskOptions
from .events import Instrument
from .gcspacing import GraphSize
from .placement import RuntimeEstimates, function_key
from .resources import ResourceBook

if TYPE_CHECKING:
    from ..interfaces import LocalWorkerPort
    from .registry import WorkerRegistry
    from .streams import StreamHub

__all__ = ["Scheduler"]

logger = logging.getLogger(__name__)

# The keyword arguments of every task spawned without any: one empty dict, not one per
# task (64 bytes of a pending task's ~700). Never changed in place.
_NO_KWARGS: dict[str, Any] = {}
_NO_BOUND = float("inf")
_get_ident = threading.get_ident

# Times a task may find its inputs unobtainable (and have them recomputed) before it fails.
MAX_INPUT_MISSES = 5
_streams_lock = threading.Lock()
_NONE_WAITING = float("-inf")

# Tasks spawned from other threads are registered at most this many per loop callback
# (~2-3 µs each): 100,000 spawned at once from a thread held the loop for 97 ms in one
# drain, and an open dashboard's per-event work made it 237 ms (loop lag is the
# dashboard's own figure); in slices, the loop answers between them.
INBOX_SLICE = 2048
# Ready tasks, in a cluster with worker processes, past which a spawn hands them out at
# once instead of at the loop's next turn (see _make_ready).
EARLY_FLUSH = 256

class Scheduler:
    """Owns every task of one cluster, on that cluster's loop.

    It is the :class:`~aiodagger.interfaces.TaskOwner` of its tasks and the
    :class:`~aiodagger.interfaces.LocalWorkerOwner` of worker 0; it drives worker 0
    through :class:`~aiodagger.interfaces.LocalWorkerPort` and workers in other
    processes through its :class:`~.registry.WorkerRegistry`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, loop_thread_id: int) -> None:
        self.loop = loop
        self.loop_thread_id = loop_thread_id
        self.local: LocalWorkerPort | None = None
        self.closed = False
        self.runtimes = RuntimeEstimates()
        self._ids = itertools.count(1)
        # (-priority, 0 if freed by a completion else 1, spawn order, task). Among equal
        # priorities, a task whose inputs were just produced goes before tasks that have
        # waited since they were spawned: it consumes data while it is still in memory
        # (W6: each chunk summed before it is spilled, not read back from disk later),
        # the depth-first order Dask and Dagger.jl also prefer.
        self._ready: list[tuple[int, int, int, DTask[Any]]] = []
        # Beside the heap, in the same order: tasks of priority 0 that nothing finished
        # made ready (most of a spawned graph's leaves), by rising id, whose key would be
        # (0, 1, id). A heap's push and pop took 430 ns a task at 5,000 queued (W4's
        # burst), a deque's 70. A task that would break the rising ids goes to the heap.
        self._fifo: deque[DTask[Any]] = deque()
        self._top_in_heap = True  # where the task _flush_ready looks at lies
        self._flush_wakeup = Wakeup(loop, self._flush, threadsafe=False)
        self._inbox: deque[DTask[Any]] = deque()
        self._inbox_wakeup = Wakeup(loop, self._drain_inbox)
        self._live: set[DTask[Any]] = set()  # registered and not done
        # Producers waiting in dagger.admit() for the tasks in flight to come down to
        # their mark: (mark, future), woken from _release; _resume is the highest mark.
        self._admitting: list[tuple[int, asyncio.Future[None]]] = []
        self._resume = -1
        # How many there are, when that doubles or halves past 65,536: the collector's
        # full passes are spaced out while a large graph is held (see gcspacing).
        self._graph = GraphSize()
        # Below this many unfinished tasks, _fewer() has work: the larger of the graph
        # size's lower mark and one past the highest admission mark.
        self._low = 0
        self.instruments: list[Instrument] = []
        self.dist: WorkerRegistry | None = None  # set when the cluster has workers in other processes
        # Worker 0 keeps results in a store of its own (a memory limit): its DTasks hold REMOTE.
        self._stored = False
        self._async_proc: Any = None  # worker 0's loop, as a processor
        self._finished_plain = self.finished_plain  # bound once: passed with every start_plain
        self._flushing = False
        self._early_at = EARLY_FLUSH  # ready tasks that make a spawn flush (see _make_ready)
        self._admission_waiting = False
        self.stream_hub: StreamHub | None = None  # made when a stream is first spawned or read
        # Declared resources and occupancy: what runs hold, per worker (resources.py).
        self.book = ResourceBook()

    def attach_local(self, local: LocalWorkerPort) -> None:
        """Drive ``local`` as worker 0 (the cluster calls this once, before any spawn)."""
        self.local = local
        self._async_proc = local.async_proc
        self._stored = local.keeps_results
        self.book.add_worker(local.id, local.resources, local.thread_proc.nthreads)

    def attach(self, instrument: Instrument) -> None:
        """Add an observer of this scheduler's events (on its loop thread). Worker
        processes start sending their events while any observer is attached."""
        if instrument not in self.instruments:
            self.instruments = [*self.instruments, instrument]  # a new list: iterations in flight keep theirs
            self._listening_changed()

    def detach(self, instrument: Instrument) -> None:
        if instrument in self.instruments:
            self.instruments = [i for i in self.instruments if i is not instrument]
            self._listening_changed()

    def _listening_changed(self) -> None:
        # attach() may be called from any thread; workers are told on the loop
        if threading.get_ident() == self.loop_thread_id:
            self._tell_workers()
        elif not self.loop.is_closed():  # closed: no worker left to tell
            call_soon_quietly(self.loop, self._tell_workers)

    def _tell_workers(self) -> None:
        listening = bool(self.instruments)
        if self.dist is not None:
            self.dist.listen(listening)
        store = getattr(self.local, "store", None)
        if store is not None:
            store.on_event = self._stored_here if listening else None

    def _stored_here(self, how: str, key: Any, nbytes: int, start: float, stop: float) -> None:
        if type(key) is int:
            for instrument in self.instruments:
                instrument.chunk_stored(0, key, nbytes, how, start, stop)

    @property
    def timed(self) -> bool:
        """Whether observers want runs timed (coroutines are timed only then)."""
        return bool(self.instruments)

    # -- spawning (any thread) -----------------------------------------------------------
    def spawn(self, opts: TaskOptions, fn: Any, args: tuple[Any, ...],
              kwargs: dict[str, Any], key: int | None = None, scan: bool = True,
              cls: type[DTask[Any]] = DTask) -> DTask[Any]:
        """A new task (``key``: an id given by a worker that spawned it, or taken with
        :meth:`new_id`; ``scan=False``: the caller knows no argument holds a DTask or
        Chunk; ``cls``: a subclass of DTask, a Stream)."""
        if self.closed:
            raise RuntimeError("this cluster is closed; spawn inside `async with dagger.Cluster()`")
        if type(fn) is types.FunctionType and not (flags := fn.__code__.co_flags) & CO_ASYNC_GENERATOR:
            kind = "async" if flags & CO_COROUTINE else "thread"  # classify(), inlined
            name = opts.name or fn.__qualname__
        else:
            kind = classify(fn)
            name = opts.name or getattr(fn, "__qualname__", None) or type(fn).__name__
        if opts.occupancy != 1.0 and kind == "thread":
            kind = "thread-light"  # mostly waits: a thread of its own while it runs
        task = cls(self, next(self._ids) if key is None else key, name, fn, args,
                   kwargs or _NO_KWARGS, opts)
        task._kind = kind
        # Most small tasks take numbers and strings: skip the walk for those.
        for value in args:
            if type(value) not in LEAF_TYPES:
                break
        else:
            if not kwargs:
                if opts.plain and not self.instruments and _get_ident() == self.loop_thread_id:
                    if kind == "async" and self.dist is None:
                        # _register, _wait_for and _make_ready for what they come to here:
                        # the coroutine starts at once (see AsyncProc.start_plain).
                        live = self._live
                        live.add(task)
                        if len(live) >= self._graph.up:
                            self._graph.crossed(len(live))
                            self._set_low()
                        task._npending = 0
                        task._state = RUNNING
                        if self._stored:  # its result goes to worker 0's store
                            self._async_proc.submit(task)
                        else:
                            self._async_proc.start_plain(task, self._finished_plain)
                    else:
                        self._ready_leaf(task)
                else:
                    self._spawn_in_loop_or_inbox(task)
                return task
        if not scan:
            self._spawn_in_loop_or_inbox(task)
            return task
        deps, found = find_dependencies(args, kwargs)
        if found:
            if found & STREAM:  # a stream among them: read as it runs, not waited for
                task._args, task._kwargs = self.streams.bind(task, args, kwargs)
                found = (found & ~STREAM) | DEPS
            task._resolve = True if found == DEPS else found
            if deps:
                placed: list[Any] = []
                for dep in deps:
                    if type(dep) is not DTask and isinstance(dep, Placed):
                        placed.append(dep)
                    elif dep._sched is not self:
                        raise ValueError(
                            f"{dep!r} belongs to another cluster; a task can only depend on "
                            "tasks of its own cluster (fetch the value and pass that instead)"
                        )
                if placed:
                    deps = [dep for dep in deps if not isinstance(dep, Placed)]
                    bind(self, task, placed)
                task._deps = deps or None
        self._spawn_in_loop_or_inbox(task)
        return task

    def new_id(self) -> int:
        """An id for a task spawned next, known before the task exists (a stream's
        producer is given its own)."""
        return next(self._ids)

    @property
    def streams(self) -> StreamHub:
        """The hub of this cluster's streams (worker 0's stream port)."""
        hub = self.stream_hub
        if hub is None:
            # Made once, by whichever thread first spawns or reads a stream: the one lock
            # here, taken once per cluster.
            with _streams_lock:
                hub = self.stream_hub
                if hub is None:
                    from .streams import StreamHub

                    hub = self.stream_hub = StreamHub(self)
        return hub

    def _spawn_in_loop_or_inbox(self, task: DTask[Any]) -> None:
        if threading.get_ident() == self.loop_thread_id:
            self._register(task)
        else:
            self._inbox.append(task)
            if not self._inbox_wakeup.pending and not self._inbox_wakeup.request():
                raise RuntimeError("this cluster's event loop has closed: the task cannot run. "
                                   "Spawn inside `async with dagger.Cluster()` / `with dagger.Cluster()`")

    def _drain_inbox(self) -> None:
        inbox = self._inbox
        register = self._register
        for _ in range(INBOX_SLICE):
            if not inbox:
                return
            register(inbox.popleft())
        if inbox:  # the rest after what else waits on the loop has had its turn
            self._inbox_wakeup.request()

    # -- graph bookkeeping (loop) --------------------------------------------------------
    def _ready_leaf(self, task: DTask[Any]) -> None:
        """_register and _wait_for for what they come to for a task without inputs or
        options, spawned on the loop without observers: it is ready at once (W4's
        tasks; three calls and a dozen tests fewer each)."""
        live = self._live
        live.add(task)
        if len(live) >= self._graph.up:
            self._graph.crossed(len(live))
            self._set_low()
        kind = task._kind
        if kind != "async":
            task._fnkey = function_key(task._fn)
        task._thread_ok = kind == "thread" and not self._stored and not self._goes_remote(task)
        task._npending = 0
        self._make_ready(task)

    def _register(self, task: DTask[Any]) -> None:
        if task._cancelled:  # cancelled from another thread before it got here
            return
        live = self._live
        live.add(task)
        if len(live) >= self._graph.up:
            self._graph.crossed(len(live))
            self._set_low()
        if task._kind != "async":  # run times are learned for thread tasks only
            task._fnkey = function_key(task._fn)
        if self.instruments:  # before any early exit: observers see every task's edges
            for instrument in self.instruments:
                instrument.task_spawned(task, list(task._deps or ()))
        opts = task._opts
        if opts.scope is not ANY_SCOPE and not self._admissible(task):
            return
        # Continuations read a finished input straight off its DTask: not possible when
        # inputs live in a ChunkStore (they are loaded and pinned on the loop first).
        task._thread_ok = (task._kind == "thread" and opts.timeout is None and not self._stored
                           and opts.needs is None and not self._goes_remote(task))
        self._wait_for(task, task._deps or (), opts.after)

    def _wait_for(self, task: DTask[Any], deps: Any, after: tuple[DTask[Any], ...] = ()) -> None:
        """Link ``task`` to every dependency (and every task it runs ``after``); ready it
        if none is outstanding.

        Stops early if a dependency failed or was cancelled (the task then is too).
        """
        pending = 0
        for dep in deps:
            linked = self._link(task, dep)
            if linked is None:
                return
            pending += linked
        for dep in after:
            linked = self._link(task, dep, needs_value=False)
            if linked is None:
                return
            pending += linked
        task._npending = pending
        if pending == 0:
            self._make_ready(task)
        elif self.dist is not None and self.dist.workers:
            self.dist.consider(task)  # its inputs may all run on one worker: sent ahead there

    def _link(self, task: DTask[Any], dep: DTask[Any], needs_value: bool = True) -> int | None:
        """Make ``task`` wait for ``dep``: 1 if it must wait, 0 if dep's value is there,
        None if ``task`` was failed or cancelled because of ``dep``. Without
        ``needs_value`` (``after=``), a finished ``dep`` whose value was lost since is
        not computed again for ``task``."""
        if dep._cancelled:
            self._cancel_from(task, dep)
            return None
        state = dep._state
        if state is FINISHED:
            if not needs_value or not self._value_lost(dep):
                return 0
            if not self._recompute(dep):
                self._fail(task, WorkerLostError(
                    f"{task._describe()} needs the result of {dep._describe()}, whose only copy was "
                    "lost with its worker and which can no longer be recomputed"), annotate=False)
                return None
        elif state is FAILED:
            self._fail_upstream(task, dep)
            return None
        if dep._dependents is None:
            dep._dependents = [task]
        else:
            dep._dependents.append(task)
        return 1

    def _value_lost(self, task: DTask[Any]) -> bool:
        if task._value is not REMOTE:
            return False
        if self._stored:
            assert self.local is not None
            return not self.local.holds(task.id)
        dist = self.dist
        return dist is not None and not any(w in dist.workers for w in task._where)

    def _recompute(self, task: DTask[Any]) -> bool:
        """Run a finished task again from its lineage, its value having been lost."""
        if task._fn is None:
            return False
        logger.info("recomputing %s: its result was lost with its worker", task._describe())
        task._state = PENDING
        task._value = None
        if task._where:
            task._where.clear()  # the same set lives on in the release's record
        self._live.add(task)
        self._wait_for(task, task._deps or ())  # a failure there is told to its waiters
        return True

    def _goes_remote(self, task: DTask[Any]) -> bool:
        """Whether the task runs on workers in other processes rather than worker 0."""
        return self.runs_elsewhere(task._opts.scope)

    # -- what a datadeps region asks (aiodagger.regions) ----------------------------------
    in_worker_process = False

    @property
    def home_worker(self) -> int:
        """The id of the worker whose process this is."""
        return self._local_worker.id

    def placeable_workers(self, scope: Scope) -> list[int]:
        """The ids of the workers a task with ``scope`` could be placed on now (those in
        other processes, while there are any and the scope does not name this one)."""
        if self.runs_elsewhere(scope):
            assert self.dist is not None
            found = [w.id for w in self.dist.admitted(scope)]
        else:
            found = [self._local_worker.id] if self._local_worker.admits(scope) else []
        if not found:
            raise NoProcessorError(f"no running worker of this cluster satisfies {scope!r}. "
                                   f"The cluster has: {self.describe_processors()}")
        return sorted(found)

    def runs_elsewhere(self, scope: Scope) -> bool:
        """Whether a task with ``scope`` runs in another process than this one (its
        arguments then travel pickled, when it is sent)."""
        dist = self.dist
        if dist is None or not (dist.workers or dist.expects_workers):
            return False
        return scope is ANY_SCOPE or not _pins_local(scope)

    def _admissible(self, task: DTask[Any]) -> bool:
        """Check the task's scope against the cluster; fail the task if nothing fits."""
        scope = task._opts.scope
        local = self.local
        assert local is not None
        fits = local.admits(scope) or bool(self.dist is not None and self.dist.candidates(task))
        if fits and scope.thread and task._kind == "async":
            task._kind = "thread-async"
        elif fits and scope.wants_gpu:  # run by a GPUProc: a coroutine there, else a device thread
            task._kind = "gpu-async" if task._kind == "async" else "gpu"
        if not fits:
            err = NoProcessorError(
                f"{task._describe()} has {scope!r}, which no processor of this cluster "
                f"satisfies. The cluster has: {self.describe_processors()}"
            )
            self._fail(task, err, annotate=False)
        return fits

    @property
    def _local_worker(self) -> LocalWorkerPort:
        assert self.local is not None
        return self.local

    def describe_processors(self) -> str:
        assert self.local is not None
        parts = [self.local.describe()]
        if self.dist is not None:
            parts.extend(self.dist.describe())
        return "; ".join(parts)

    def _make_ready(self, task: DTask[Any], freed: bool = False) -> None:
        dist = self.dist
        if self.instruments:
            now = perf_counter()
            for instrument in self.instruments:
                instrument.task_ready(task, now)
        if task._kind == "async" and (dist is None or not self._goes_remote(task)) and (
                not self._stored or not task._resolve) and task._opts.needs is None:
            # Coroutines have no capacity to wait for: start them at once.
            task._state = RUNNING
            if task._opts.timeout is not None:
                self._arm_timeout(task)
            self._local_worker.async_proc.submit(task)
            if self.instruments:
                self.dispatched(task, 0)
            return
        task._state = READY
        # Within a priority, tasks that finished tasks made ready, and tasks spawned inside
        # a worker's task (ids past ID_SPACE; that task usually waits on them, holding its
        # slot), go before the rest: queued behind a large graph's other ready tasks, those
        # children kept their parents waiting for the whole graph, and every worker lost
        # meanwhile took the parents with it until their retries were spent.
        first = freed or task.id > ID_SPACE
        ready = self._ready
        fifo = self._fifo
        if not first and task._opts.priority == 0 and (not fifo or fifo[-1].id < task.id):
            fifo.append(task)
        else:
            heapq.heappush(ready, (-task._opts.priority, 0 if first else 1, task.id, task))
        if not self._flush_wakeup.pending:
            self._flush_wakeup.request()
        elif (len(ready) + len(fifo) >= self._early_at and dist is not None and not self._flushing
              and dist.workers):
            # A graph being spawned in one go (the loop's next turn is after the last
            # task): its first tasks go to the workers now, which run them meanwhile.
            self._flush()
            dist.send_now()

    def ready_priority(self) -> float:
        """The priority of the best task waiting in the ready queue (-inf if none): a pool
        thread's chain of continuations yields to a higher one. Read from pool threads,
        unlocked: a heuristic, which at worst yields once too often or too few."""
        ready = self._ready
        waiting = 0 if self._fifo else _NONE_WAITING
        if not ready:  # the common case on a chain: no exception raised per link
            return waiting
        try:
            return max(-ready[0][0], waiting)
        except IndexError:  # emptied by the loop meanwhile
            return waiting

    def _pop_top(self) -> None:
        """Take off the ready queue the top task _flush_ready is looking at."""
        if self._top_in_heap:
            heapq.heappop(self._ready)
        else:
            self._fifo.popleft()

    def request_flush(self) -> None:
        if (self._ready or self._fifo) and not self._flush_wakeup.pending:
            self._flush_wakeup.request()

    def _flush(self) -> None:
        """Hand ready tasks to the thread pool while it has room, highest priority first."""
        self._flushing = True
        try:
            self._flush_ready()
        finally:
            self._flushing = False
            # What is left waits for room that only the workers' reports make: flushed
            # early again after EARLY_FLUSH more, not at every spawn (with 300 busy
            # workers, each flush looked at every one of them).
            self._early_at = len(self._ready) + len(self._fifo) + EARLY_FLUSH

    def _flush_ready(self) -> None:
        ready = self._ready
        fifo = self._fifo
        assert self.local is not None
        proc = self.local.thread_proc
        estimate = self.runtimes.get
        dist = self.dist
        while True:
            # The top task: the heap's, unless the deque's first goes before it.
            if ready:
                top = ready[0]
                if fifo and top[0] >= 0 and (top[0] > 0 or (top[1] == 1 and top[2] > fifo[0].id)):
                    task = fifo[0]
                    self._top_in_heap = False
                else:
                    task = top[3]
                    self._top_in_heap = True
            elif fifo:
                task = fifo[0]
                self._top_in_heap = False
            else:
                break
            if task._cancelled or task._state is not READY:
                self._pop_top()
                continue
            if (not self._top_in_heap and dist is not None and task._deps is None and dist.workers
                    and not self.instruments and dist.fast_placement):
                # A run of the deque's tiny plain tasks goes out in one loop.
                before = ready[0][2] if ready and ready[0][0] == 0 else _NO_BOUND
                if dist.dispatch_plain(fifo, before):
                    continue
            needs = task._opts.needs
            if needs is not None and not self._reserve(task, needs):
                continue  # parked until amounts are free, or failed
            if dist is not None and (dist.workers or dist.expects_workers or task._resolve):
                if not self._flush_distributed(task):
                    if needs is not None:
                        self.book.give_back(task, task._attempts)
                    break
                continue
            if self._stored:
                if not self._flush_stored(task):
                    if needs is not None:
                        self.book.give_back(task, task._attempts)
                    break
                continue
            if task._kind[0] == "g":  # "gpu"/"gpu-async": device work queues on its streams
                self._pop_top()
                task._state = RUNNING
                self.local.run(task, [])  # arms its timeout (starting())
                continue
            if needs is not None and task._kind == "async":
                self._pop_top()
                task._state = RUNNING
                self._arm_timeout(task)
                self.local.async_proc.submit(task)
                continue
            if task._kind != "thread-light" and not proc.has_room():
                if needs is not None:
                    self.book.give_back(task, task._attempts)
                break
            self._pop_top()
            task._state = RUNNING
            task._est = estimate(task._fnkey)
            if task._opts.timeout is not None:
                self._arm_timeout(task)
            proc.submit(task)
            if self.instruments:
                self.dispatched(task, 0)

    def _flush_distributed(self, task: DTask[Any]) -> bool:
        """Place the top ready task in a cluster with other workers; False: no room now."""
        dist = self.dist
        assert dist is not None
        if task._deps:  # most tiny tasks have none: two calls fewer each
            lost = _recomputing(task) or dist.lost_dependency(task)
            if lost is not None:
                self._wait_again(task, lost)
                return True
        scope = task._opts.scope
        if not ((dist.workers or dist.expects_workers)  # _goes_remote(task), inlined
                and (scope is ANY_SCOPE or not _pins_local(scope))):
            # worker 0 runs it: bring remote inputs here first
            remote = [d for d in task._deps or () if d._value is REMOTE]
            if remote:
                self._pop_top()
                task._state = RUNNING
                asyncio.ensure_future(self._bring_then_run_locally(task, remote))
                return True
            if task._kind == "async":
                self._pop_top()
                task._state = RUNNING
                self._arm_timeout(task)
                self._local_worker.async_proc.submit(task)
                return True
            if task._kind[0] == "g":
                self._pop_top()
                task._state = RUNNING
                self._local_worker.run(task, [])  # arms its timeout (starting())
                return True
            proc = self._local_worker.thread_proc
            if task._kind != "thread-light" and not proc.has_room():
                return False
            self._pop_top()
            task._state = RUNNING
            task._est = self.runtimes.get(task._fnkey)
            self._arm_timeout(task)
            proc.submit(task)
            if self.instruments:
                self.dispatched(task, 0)
            return True
        if scope is ANY_SCOPE and task._opts.needs is None and dist.fast_placement:
            worker = dist.place_any(task)
            if worker is not None:
                return self._dispatch_to(task, worker)
            candidates = dist.candidates(task)  # no room, or no worker at all: which is it
            if candidates:
                return False
        else:
            candidates = dist.candidates(task)
        if not candidates and dist.expects_workers and not dist.workers and dist.gave_up is None:
            return False  # every worker process is gone and one is being started: wait
        needs = task._opts.needs
        if needs is not None and candidates:
            # only workers with the amounts free now; if none, the task waits off the ready queue
            free = [w for w in candidates if self.book.fits(w.id, needs)]
            if not free:
                declared = self.book.declared(needs)
                self._park_or_fail(task, needs, any(w.id in declared for w in candidates))
                return True
            candidates = free
        if not candidates:
            self._pop_top()
            why = f" ({dist.gave_up})" if dist.gave_up is not None and not dist.workers else ""
            self._fail(task, NoProcessorError(
                f"{task._describe()} has {task._opts.scope!r}, which no processor of this cluster "
                f"satisfies any more{why}. The cluster has: {self.describe_processors()}"),
                annotate=False)
            return True
        worker = dist.place(task, candidates)
        if worker is None:
            return False
        return self._dispatch_to(task, worker)

    def _dispatch_to(self, task: DTask[Any], worker: Any) -> bool:
        """Send the top ready task to ``worker`` (another process)."""
        assert self.dist is not None
        self._pop_top()
        task._state = RUNNING
        needs = task._opts.needs
        if needs is not None:
            self.book.take(task, worker.id, needs)
        try:
            self.dist.dispatch(task, worker)
        except (SerializationError, FrameTooLargeError) as exc:
            if needs is not None:
                self.book.give_back(task, task._attempts)
            self._fail(task, exc, annotate=False)
            return True
        if task._opts.timeout is not None:
            self._arm_timeout(task)
        return True

    # -- resources and occupancy (resources.py) -------------------------------------------
    def _reserve(self, task: DTask[Any], needs: dict[str, float]) -> bool:
        """Whether the top ready task may go on to placement now. One for worker 0 takes
        its amounts there now (given back if it then finds no room); one for other
        workers is matched to their free amounts at placement. False: parked or failed."""
        if self._goes_remote(task):
            return True
        local = self._local_worker
        book = self.book
        if book.fits(local.id, needs):
            book.take(task, local.id, needs)
            return True
        self._park_or_fail(task, needs, local.id in book.declared(needs))
        return False

    def _park_or_fail(self, task: DTask[Any], needs: dict[str, float], declared: bool) -> None:
        """Take the top ready task off it: to wait for amounts that some worker has (or
        a worker that may join), or failed when none ever will."""
        self._pop_top()
        dist = self.dist
        if declared or (dist is not None and (dist.accepts_remote or (dist.expects_workers and not dist.workers))):
            self.book.parked.append(task)
            return
        self._fail(task, NoProcessorError(
            f"{task._describe()} needs {needs}, which no worker of this cluster has "
            f"({self.book.describe()}). Declare them: Cluster(resources={{...}}), or "
            "`aiodagger worker --resources NAME=AMOUNT,...`"), annotate=False)

    def resources_freed(self) -> None:
        """Amounts came free (a run ended, a worker joined): parked tasks try again."""
        parked = self.book.parked
        if not parked:
            return
        self.book.parked = []
        for task in parked:
            if not task._cancelled and task._state is READY:
                heapq.heappush(self._ready, (-task._opts.priority, 1, task.id, task))
        self.request_flush()

    # -- worker 0 with a store of its own -------------------------------------------------
    def _wait_again(self, task: DTask[Any], dep: DTask[Any]) -> None:
        """Take the top ready task back to waiting for ``dep`` (lost: _link starts
        computing it again; or being computed again already)."""
        self._pop_top()
        task._state = PENDING
        linked = self._link(task, dep)
        if linked is not None:
            task._npending = linked
            if linked == 0:
                self._make_ready(task)

    def _flush_stored(self, task: DTask[Any]) -> bool:
        """Place the top ready task on worker 0 when its results live in a store."""
        local = self._local_worker
        recomputing = _recomputing(task)
        if recomputing is not None:
            self._wait_again(task, recomputing)
            return True
        if local.paused:  # back-pressure: nothing new starts until memory is back under
            if not self._admission_waiting:
                self._admission_waiting = True
                asyncio.ensure_future(self._await_admission())
            return False
        if task._kind != "async" and task._kind != "thread-light" and not local.thread_proc.has_room():
            return False
        self._pop_top()
        task._state = RUNNING
        if task._kind != "async":
            task._est = self.runtimes.get(task._fnkey)
        local.run(task, [d for d in task._deps or () if d._value is REMOTE])  # calls starting()
        return True

    async def _await_admission(self) -> None:
        try:
            await self._local_worker.admitted()
        finally:
            self._admission_waiting = False
            self.request_flush()

    def starting(self, task: DTask[Any]) -> None:
        """Worker 0 has ``task``'s inputs in place and runs it now: its timeout starts."""
        self._arm_timeout(task)
        if self.instruments:
            self.dispatched(task, 0)

    def dispatched(self, task: DTask[Any], worker: int) -> None:
        """Tell observers ``task`` went to ``worker`` (called only when there are some)."""
        now = perf_counter()
        for instrument in self.instruments:
            instrument.task_dispatched(task, worker, now)

    def _retried(self, task: DTask[Any], reason: str) -> None:
        if self.instruments:
            now = perf_counter()
            for instrument in self.instruments:
                instrument.task_retried(task, reason, now)

    def input_lost(self, task: DTask[Any], dep: DTask[Any]) -> None:
        """Worker 0 could not read ``dep``'s stored result for ``task``: compute it again."""
        if task.done():
            return
        self._disarm_timeout(task)
        task._state = PENDING
        linked = self._link(task, dep)  # recomputes it, and waits for it
        if linked is not None:
            task._npending = linked
            if linked == 0:
                self._make_ready(task)

    async def _bring_then_run_locally(self, task: DTask[Any], deps: list[DTask[Any]]) -> None:
        # Its timeout counts from here, as a task sent to a worker's does from dispatch.
        attempt = task._attempts
        self._arm_timeout(task)
        try:
            await self._bring(deps)
        except Exception as exc:  # noqa: BLE001 - the task fails with what went wrong
            if task._attempts == attempt:
                self._fail(task, exc, annotate=False)
            return
        if task.done() or task._attempts != attempt:
            return  # timed out (and perhaps retried) while its inputs came
        if task._kind == "async":
            self._local_worker.async_proc.submit(task)
        elif task._kind[0] == "g":
            self._disarm_timeout(task)  # armed again, as it starts there (starting())
            self._local_worker.run(task, [])
        else:
            task._est = self.runtimes.get(task._fnkey)
            self._local_worker.thread_proc.submit(task)

    # -- completion (loop) ---------------------------------------------------------------
    def complete(self, task: DTask[Any], attempt: int, ok: bool, value: Any,
                 start: float, seconds: float, proc: Any) -> None:
        """``proc`` reports one run of ``task`` that began at ``start`` (perf_counter)."""
        if self.book.held and self.book.give_back(task, attempt):
            self.resources_freed()
        if seconds and proc.kind == "thread":
            # Coroutines overlap on the loop: their wall time says nothing of their cost.
            self.runtimes.observe(task._fnkey, seconds)
        if self.instruments and start:
            thread = getattr(proc, "thread", "") if proc.worker_id == 0 else ""
            for instrument in self.instruments:
                if thread:
                    instrument.task_thread(task, 0, thread)
                instrument.task_ran(task, proc.worker_id, repr(proc), start, start + seconds, ok)
        if task._cancelled or task._attempts != attempt or task._state is FINISHED or task._state is FAILED:
            return  # cancelled, timed out, or a stale attempt: nobody waits for this run
        if ok:
            if type(value) is types.CoroutineType:
                # A sync function returned a coroutine (e.g. a decorated async def):
                # await it on the loop, where coroutines belong.
                assert self.local is not None
                self.local.async_proc.submit(task, value)
                return
            self._finish(task, value)
        elif isinstance(value, asyncio.CancelledError):
            self.cancel(task)
        else:
            # A worker in another process has already said where it raised.
            self._failed_run(task, value, annotate=proc.worker_id == self._local_worker.id)

    def finished_plain(self, task: DTask[Any], value: Any) -> None:
        """complete() for the run that counts of a task without resources that returned
        ``value`` (a coroutine task started by AsyncProc.start_plain, a thread task's
        small value from another process, its run time already learned): what
        complete() comes to for it, unless it was cancelled, observers came meanwhile,
        or it returned a coroutine. complete() then hears of it as a run of worker 0's
        loop without times: observers that came meanwhile do not draw that run, and a
        cancelled or stale one is dropped there as ever."""
        if (task._cancelled or task._state is not RUNNING or self.instruments
                or type(value) is types.CoroutineType):
            self.complete(task, task._attempts, True, value, 0.0, 0.0, self._async_proc)
            return
        self._finish(task, value)

    def _finish(self, task: DTask[Any], value: Any) -> None:
        task._value = value
        task._state = FINISHED
        if value is REMOTE or self.instruments or task._timer is not None:
            self._release(task)
        else:  # _release, for what it comes to for most: W3 ran 1.6 % fewer instructions
            live = self._live
            live.discard(task)
            if len(live) < self._low:
                self._fewer(len(live))
            task._handle = task._fn = task._args = task._kwargs = task._deps = None
        dependents = task._dependents
        if dependents is not None:
            task._dependents = None
            for dep in dependents:
                left = dep._npending - 1
                dep._npending = left
                if left == 0 and dep._state is PENDING and not dep._cancelled:
                    self._make_ready(dep, freed=True)
        task._notify()

    def _failed_run(self, task: DTask[Any], exc: BaseException, annotate: bool) -> None:
        if task._attempts < task._opts.retries:
            task._attempts += 1
            logger.info("retrying %s (attempt %d) after %r", task._describe(), task._attempts + 1, exc)
            self._retried(task, f"{type(exc).__name__}: {exc}")
            task._state = PENDING
            self._disarm_timeout(task)
            self._make_ready(task)
            return
        self._fail(task, exc, annotate=annotate)

    def _fail(self, task: DTask[Any], exc: BaseException, annotate: bool) -> None:
        if annotate:
            assert self.local is not None
            exc.add_note(f"aiodagger: raised by {task._describe()} on worker {self.local.id} "
                         f"(pid {os.getpid()}), attempt {task._attempts + 1}")
        task._exc = exc
        task._tb = exc.__traceback__
        task._state = FAILED
        self._release(task)
        dependents = task._dependents
        task._dependents = None
        stack = list(dependents or ())
        # Iterative, not recursive: a failure at the head of a 200,000-task chain
        # must not hit the recursion limit. Dependents fail first, so whoever is woken
        # by this failure finds the whole downstream already marked.
        while stack:
            dep = stack.pop()
            if not dep.done():
                stack.extend(self._fail_upstream(dep, task))
        task._notify()

    def _fail_upstream(self, task: DTask[Any], failed: DTask[Any]) -> list[DTask[Any]]:
        """Fail ``task`` because ``failed`` (or its own origin) failed; return its dependents."""
        origin_exc = failed._exc
        origin = failed
        if isinstance(origin_exc, UpstreamError):
            origin = origin_exc.origin
            origin_exc = origin_exc.__cause__
        err = UpstreamError(
            f"{task._describe()} did not run: its dependency {origin._describe()} failed with "
            f"{type(origin_exc).__name__}: {origin_exc}",
            origin,
        )
        err.__cause__ = origin_exc
        task._exc = err
        task._tb = None
        task._state = FAILED
        self._release(task)
        dependents = task._dependents or []
        task._dependents = None
        task._notify()
        return dependents

    # -- cancellation and timeouts (loop) ------------------------------------------------
    def cancel(self, task: DTask[Any]) -> bool:
        if task.done():
            return False
        self._cancel_from(task, None)
        return True

    def _cancel_from(self, task: DTask[Any], cause: DTask[Any] | None) -> None:
        """Cancel ``task`` and every not-yet-finished task downstream of it."""
        stack = [task]
        root = task
        while stack:
            t = stack.pop()
            if t.done():
                continue
            t._cancelled = True
            t._state = CANCELLED
            if t is not root or cause is not None:
                why = cause if t is root else root
                assert why is not None
                t._exc = TaskCancelledError(
                    f"{t._describe()} was cancelled because its dependency {why._describe()} was"
                )
            handle = t._handle
            if handle is not None:
                self._cancel_handle(t, handle)
            self._release(t)
            if t._dependents:
                stack.extend(t._dependents)
                t._dependents = None
            t._notify()

    def _cancel_handle(self, task: DTask[Any], handle: Any) -> None:
        if isinstance(handle, asyncio.Task):
            self._local_worker.async_proc.cancel(handle)
        elif self.dist is not None:
            self.dist.cancel(task, handle)

    def cancel_threadsafe(self, task: DTask[Any]) -> bool:
        if threading.get_ident() == self.loop_thread_id:
            return self.cancel(task)
        result: concurrent.futures.Future[bool] = concurrent.futures.Future()

        def run() -> None:
            result.set_result(self.cancel(task))

        if not call_soon_quietly(self.loop, run):
            return False  # the loop is closed, and with it every task
        return result.result()

    def _arm_timeout(self, task: DTask[Any]) -> None:
        timeout = task._opts.timeout
        if timeout is not None:
            task._timer = self.loop.call_later(timeout, self._timed_out, task, task._attempts)

    def _disarm_timeout(self, task: DTask[Any]) -> None:
        timer = task._timer
        if timer is not None:
            timer.cancel()
            task._timer = None

    def _timed_out(self, task: DTask[Any], attempt: int) -> None:
        task._timer = None
        if task.done() or task._attempts != attempt:
            return
        handle = task._handle
        if handle is not None:  # a coroutine stops; a thread cannot be stopped, its result is dropped
            self._cancel_handle(task, handle)
            task._handle = None
        self._failed_run(task, TaskTimeoutError(
            f"{task._describe()} did not finish within its timeout of {task._opts.timeout} s"
        ), annotate=False)

    # -- waiting from other threads ------------------------------------------------------
    def wait_blocking(self, task: DTask[Any], timeout: float | None) -> None:
        block_until_done(task, timeout, self.loop_thread_id)

    # -- lifecycle -----------------------------------------------------------------------
    def _release(self, task: DTask[Any]) -> None:
        """Drop what a done task no longer needs, so its inputs can be freed."""
        live = self._live
        live.discard(task)
        if len(live) < self._low:
            self._fewer(len(live))
        task._handle = None
        if task._value is not REMOTE:
            task._fn = task._args = task._kwargs = task._deps = None
        # else: lineage. Its only copy lives on another worker; if that worker dies, the
        # function and arguments (and their own lineage) let it be computed again.
        if self.instruments:
            for instrument in self.instruments:
                instrument.task_done(task)
        if task._timer is not None:
            task._timer.cancel()
            task._timer = None

    def _fewer(self, live: int) -> None:
        """The count of unfinished tasks fell below ``_low``: tell the collector's
        policy (gcspacing) or the producers waiting in dagger.admit() what concerns them."""
        if live < self._graph.down:
            self._graph.crossed(live)
        if live <= self._resume:
            self._admit(live)
        self._set_low()

    def _set_low(self) -> None:
        # One comparison a finished task instead of two.
        self._low = max(self._graph.down, self._resume + 1)

    # -- admission (dagger.admit) ---------------------------------------------------------
    async def admitted(self, limit: int) -> None:
        """Return once fewer than ``limit`` tasks are in flight (on the loop). A waiter
        resumes at 90 % of its limit, not at the limit: woken one task below it, a burst
        of producers would take turns one task at a time."""
        if len(self._live) < limit:
            return
        mark = limit - max(1, limit // 10)
        fut = self.loop.create_future()
        self._admitting.append((mark, fut))
        self._resume = max(self._resume, mark)
        self._set_low()
        try:
            await fut
        finally:
            if fut.cancelled() or not fut.done():  # the producer gave up: forget it
                self._admitting = [(m, f) for m, f in self._admitting if f is not fut]
                self._resume = max((m for m, _ in self._admitting), default=-1)
                self._set_low()

    def _admit(self, live: int) -> None:
        waiting = []
        for mark, fut in self._admitting:
            if live <= mark:
                if not fut.done():
                    fut.set_result(None)
            else:
                waiting.append((mark, fut))
        self._admitting = waiting
        self._resume = max((m for m, _ in waiting), default=-1)
        self._set_low()

    # -- workers in other processes --------------------------------------------------------
    def fail_unsent(self, task: DTask[Any], exc: BaseException) -> None:
        """``task`` was placed on a worker but its record could not be sent: fail it at
        once (a retry would not encode any better)."""
        if task.done():
            return
        self._disarm_timeout(task)
        self._fail(task, exc, annotate=False)
        self.request_flush()

    def run_lost(self, task: DTask[Any], wid: int, address: str, reason: str) -> None:
        """``task`` was running on a worker that died."""
        if self.book.held and self.book.give_back(task, task._attempts):
            self.resources_freed()
        if task.done():
            return
        if task._attempts < task._opts.retries:
            task._attempts += 1
            logger.info("retrying %s (attempt %d): worker %d was lost", task._describe(),
                        task._attempts + 1, wid)
            self._retried(task, f"worker {wid} was lost ({reason})")
            task._state = PENDING
            self._disarm_timeout(task)
            self._make_ready(task)
            return
        self._fail(task, WorkerLostError(
            f"{task._describe()} was running on worker {wid} ({address}), which was lost "
            f"({reason}); its retries ({task._opts.retries}) are spent"), annotate=False)

    def dependencies_lost(self, task: DTask[Any], deps: list[Any]) -> None:
        """A worker could not fetch ``deps`` for ``task``: recompute them, then run it.

        Its holders no longer count as holding them (lost, unreachable or corrupted
        copies). Each new try waits longer; after MAX_INPUT_MISSES the task fails, instead
        of being sent to the same worker thousands of times a second.
        """
        if task.done():
            return
        task._state = PENDING
        if any(dep is None or type(dep) is not DTask for dep in deps):  # a put() chunk: no lineage
            self._fail(task, WorkerLostError(
                f"an input of {task._describe()} was lost with its worker"), annotate=False)
            return
        task._misses += 1
        if task._misses > MAX_INPUT_MISSES:
            names = ", ".join(dep._describe() for dep in deps)
            self._fail(task, WorkerLostError(
                f"{task._describe()} could not get its input(s) {names} from any holder in "
                f"{MAX_INPUT_MISSES} tries (lost or unreachable workers)"), annotate=False)
            return
        self.loop.call_later(min(1.0, 0.01 * 2 ** task._misses), self._try_again, task, deps)

    def _try_again(self, task: DTask[Any], deps: list[Any]) -> None:
        if not task.done() and task._state is PENDING:
            self._wait_for(task, deps)

    async def _bring(self, objs: list[Any]) -> None:
        """Fetch the values of finished remote results into this process (on the loop)."""
        for _ in range(3):
            try:
                if self._stored:
                    await self._local_worker.bring(objs)
                else:
                    assert self.dist is not None
                    await self.dist.fetch(objs)
                return
            except LookupError as exc:
                lost = list(exc.args)
                for obj in lost:
                    if type(obj) is not DTask or (obj._state is FINISHED and not self._recompute(obj)):
                        raise WorkerLostError(f"{obj!r} was lost with its worker") from None
                for obj in lost:
                    await obj.wait()
                    if obj._state is not FINISHED:
                        return  # it failed this time: awaiting it raises that
        raise WorkerLostError(f"values of {objs!r} kept being lost with their workers")

    def bring_here(self, objs: list[Any]) -> Any:
        """An awaitable, for the caller's loop, that brings remote values here."""
        return run_on_loop_awaitable(self._bring(objs), self.loop)

    def bring_blocking(self, objs: list[Any], timeout: float | None) -> None:
        run_on_loop_blocking(self._bring(objs), self.loop, self.loop_thread_id, timeout)

    @property
    def live_count(self) -> int:
        return len(self._live)

    def close(self) -> int:
        """Refuse new spawns and cancel every unfinished task; return how many."""
        self.closed = True
        self._admit(-1)  # producers waiting for room: the spawn they go on to says it is closed
        self._drain_inbox()
        live = list(self._live)
        for task in live:
            if not task.done():
                self._cancel_from(task, None)
        self._graph.close()
        return len(live)


def _recomputing(task: DTask[Any]) -> DTask[Any] | None:
    """A dependency of the ready ``task`` that is being computed again (another task
    found its value lost after ``task`` became ready), if any: ``task`` must wait for
    that run, not start with the empty value the dependency has meanwhile."""
    for dep in task._deps or ():
        if type(dep) is DTask and dep._state is not FINISHED:
            return dep
    return None


def _pins_local(scope: Scope) -> bool:
    """Whether a scope asks for worker 0 (the scheduler's own process) by name."""
    return (scope.workers is not None and 0 in scope.workers) or scope.process == os.getpid()

"""ThreadProc: a worker's pool of threads for synchronous task functions.

Hand-offs are batched in both directions, because a ``run_in_executor`` call per task
costs 20-40 µs here while the tasks we care about take a microsecond:

* loop -> threads: the scheduler puts tasks straight onto one ``SimpleQueue`` (a C
  queue, ~0.3 µs a put) while the pool has room; threads block on ``get`` only when idle.
* threads -> loop: a finished task is appended to a deque, and only the first append
  after the loop last drained it pays for ``call_soon_threadsafe``.

Continuation: when a task finishes and a dependent now has every input (whatever their
number: the others finished earlier, in this process), the same thread runs that
dependent at once instead of a round trip through the loop; the scheduler is told
after, and makes any other dependents ready itself. This is what makes long chains
of small tasks cheap. A chain yields (the dependent goes through the loop) after
MAX_CONTINUATIONS links, or when a task of higher priority is waiting, so that it
cannot starve other work.

A pool thread that blocks in ``fetch()`` hands its slot back: another thread is
started while it waits, and the surplus retires when it is done. A task of occupancy
below 1 (kind "thread-light": it mostly waits) gets a thread of its own the same way;
the scheduler bounds how many run at once (scheduler/resources.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from queue import SimpleQueue
from time import perf_counter
from typing import TYPE_CHECKING, Any

from .._bridge import Wakeup, call_soon_quietly
from .._context import pool_thread
from ..task import PENDING, RUNNING, DTask
from .execute import run_sync

if TYPE_CHECKING:
    from ..interfaces import ProcessorOwner

__all__ = ["ThreadProc", "current_pool"]

logger = logging.getLogger(__name__)

# How much estimated work (seconds per thread) may sit queued in the pool. Past it,
# ready tasks wait in the scheduler's heap, where priority still orders them.
QUEUE_HORIZON_S = 2e-3

# Links a thread runs in a row before its chain goes through the loop once: other
# ready tasks of the same priority get their turn, at one loop round trip per chain
# of this length (W2's 1,000 links: 4 round trips).
MAX_CONTINUATIONS = 256

# A completion record: (task, attempt, ok, value, start, seconds, dispatched)
Record = tuple[DTask[Any], int, bool, Any, float, float, bool, str]


def current_pool() -> ThreadProc | None:
    """The ThreadProc whose thread is calling, if any."""
    return getattr(pool_thread, "pool", None)


class ThreadProc:
    """Runs sync task functions on ``nthreads`` threads of one worker."""

    kind = "thread"

    def __init__(self, worker_id: int, nthreads: int, owner: ProcessorOwner,
                 thread_init: Callable[[], None]) -> None:
        if nthreads < 1:
            raise ValueError(f"a thread pool needs at least 1 thread, got threads={nthreads}")
        self.worker_id = worker_id
        self.nthreads = nthreads
        self._owner = owner
        self._loop = owner.loop
        self._thread_init = thread_init
        self._queue: SimpleQueue[DTask[Any] | None] = SimpleQueue()
        self._done: deque[Record] = deque()
        self._wakeup = Wakeup(owner.loop, self._drain)
        # Loop-side accounting of what sits in the pool (touched only on the loop).
        self.queued = 0
        self.backlog_s = 0.0
        # Thread bookkeeping (cold path, under the lock).
        self._lock = threading.Lock()
        self._live = 0
        self._blocked = 0
        self._light = 0  # "thread-light" tasks submitted and not drained: a thread each
        self._serial = 0
        self._threads: set[threading.Thread] = set()
        self._all_exited: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"ThreadProc(worker={self.worker_id}, threads={self.nthreads})"

    # The name of the thread of the run being reported (set as each is drained): the
    # lane observers draw it on.
    thread = ""

    # -- loop side -----------------------------------------------------------------------
    def start(self) -> None:
        self._all_exited = asyncio.Event()
        with self._lock:
            for _ in range(self.nthreads):
                self._start_thread_locked()

    def has_room(self) -> bool:
        slots = self.nthreads + self._blocked
        return self.queued < slots or self.backlog_s < QUEUE_HORIZON_S * slots

    def waiting(self) -> bool:
        """Whether tasks wait in the queue for a thread (read from any thread)."""
        return not self._queue.empty()

    def submit(self, task: DTask[Any]) -> None:
        if task._kind == "thread-light":
            with self._lock:
                self._light += 1
                if self._live < self.nthreads + self._blocked + self._light:
                    self._start_thread_locked()
            self._queue.put(task)
            return
        self.queued += 1
        self.backlog_s += task._est
        self._queue.put(task)

    def _drain(self) -> None:
        done = self._done
        complete = self._owner.complete
        while done:
            task, attempt, ok, value, start, seconds, dispatched, self.thread = done.popleft()
            if dispatched:
                if task._kind == "thread-light":
                    with self._lock:
                        self._light -= 1
                else:
                    self.queued -= 1
                    self.backlog_s = self.backlog_s - task._est if self.queued else 0.0
            complete(task, attempt, ok, value, start, seconds, self)
        self._owner.request_flush()

    async def close(self, timeout: float) -> bool:
        """Stop the threads once they finish what they run; False if some did not in time."""
        with self._lock:
            live = self._live
        for _ in range(live):
            self._queue.put(None)
        assert self._all_exited is not None
        if live:
            try:
                await asyncio.wait_for(self._all_exited.wait(), timeout)
            except TimeoutError:
                return False
        # The last thread signals the loop from its ``finally``, a few bytecodes before
        # it ends: join them, so that a closed cluster leaves no thread of ours behind.
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(1.0)
        return True

    # -- thread side ---------------------------------------------------------------------
    def _start_thread_locked(self) -> None:
        self._live += 1
        self._serial += 1
        thread = threading.Thread(
            target=self._thread_main, name=f"aiodagger-w{self.worker_id}-thread-{self._serial}",
            daemon=True,  # a task stuck in user code must not keep the interpreter alive
        )
        # Retired surplus threads are pruned here (a cold path) rather than by themselves:
        # close() must still find, and join, a thread that has signalled but not ended.
        self._threads = {t for t in self._threads if t.is_alive()}
        self._threads.add(thread)
        thread.start()

    def _thread_main(self) -> None:
        pool_thread.pool = self
        self._thread_init()
        get = self._queue.get
        try:
            while True:
                task = get()
                if task is None:
                    break
                self._run_chain(task)
                task = None  # an idle thread must not keep the last task (and its value) alive
                # A thread started while another was blocked in fetch() retires once
                # that one is back (unlocked read first: this is the per-task path).
                if self._live > self.nthreads + self._blocked + self._light and self._surplus():
                    break
        finally:
            with self._lock:
                self._live -= 1
                last = self._live == 0
            if last:
                call_soon_quietly(self._loop, self._set_exited)

    def _surplus(self) -> bool:
        with self._lock:
            return self._live > self.nthreads + self._blocked + self._light

    def _set_exited(self) -> None:
        if self._all_exited is not None:
            self._all_exited.set()

    def _run_chain(self, task: DTask[Any] | None) -> None:
        dispatched = True
        links = 0
        waiting = self._owner.ready_priority
        # The last tasks this chain ran: their records may not be on the loop's books yet,
        # so a dependent still counts them among its pending inputs (a two-input chain
        # made every other node wait for the loop until this was taken into account).
        recent: deque[DTask[Any]] = deque(maxlen=4)
        thread = threading.current_thread().name  # for observers: the lane this run drew on
        while task is not None:
            attempt = task._attempts
            if task._cancelled:
                self._post((task, attempt, False, None, 0.0, 0.0, dispatched, thread))
                return
            start = perf_counter()
            try:
                value = run_sync(task)
                ok = True
            except BaseException as exc:  # noqa: BLE001 - a task's failure is its result
                value, ok = exc, False
            seconds = perf_counter() - start
            follow = None
            if ok and links < MAX_CONTINUATIONS:
                task._value = value  # published before the dependent reads it below
                follow = _claim_continuation(task, waiting, recent)
                recent.append(task)
                links += 1
            self._post((task, attempt, ok, value, start, seconds, dispatched, thread))
            dispatched = False
            task = follow

    def _post(self, record: Record) -> None:
        self._done.append(record)
        if not self._wakeup.pending:
            self._wakeup.request()

    @contextmanager
    def blocked(self) -> Iterator[None]:
        """Hand this thread's slot back while it waits (fetch inside a task)."""
        with self._lock:
            self._blocked += 1
            if self._live < self.nthreads + self._blocked + self._light:
                self._start_thread_locked()
        call_soon_quietly(self._loop, self._owner.request_flush)
        try:
            yield
        finally:
            with self._lock:
                self._blocked -= 1
            call_soon_quietly(self._loop, self._owner.request_flush)

    @property
    def blocked_threads(self) -> int:
        return self._blocked


def _claim_continuation(task: DTask[Any], waiting: Callable[[], float],
                        recent: deque[DTask[Any]]) -> DTask[Any] | None:
    """The dependent this thread may run next, marked running; None if there is none.

    Runs on a pool thread and reads loop-owned state. That is safe here: ``task`` is not
    counted yet in any dependent's pending inputs (its record is posted after this
    claim), so a dependent whose only pending input is ``task`` cannot change on the loop
    until the loop sees ``task`` finish, and the loop then skips it (RUNNING).

    Inputs this chain finished just before (``recent``) may still be counted pending: one
    is taken off when its record is not on the loop's books yet, which its
    ``_dependents`` still being there says (the loop clears them before counting). The
    count is read first: the loop booking one meanwhile makes this undercount, never over.
    ``waiting`` is the priority of the best task waiting on the loop (a heuristic read).
    """
    if task._opts.timeout is not None or task._cancelled:
        return None
    dependents = task._dependents
    if not dependents:
        return None
    best = None
    for nxt in dependents:
        pending = nxt._npending
        if pending > 1:
            for done in recent:
                theirs = done._dependents
                if theirs is not None and nxt in theirs:
                    pending -= 1
        if (pending == 1 and nxt._state is PENDING and not nxt._cancelled and nxt._thread_ok
                and (best is None or nxt._opts.priority > best._opts.priority)):
            best = nxt
    if best is None or best._opts.priority < waiting():
        return None
    best._state = RUNNING
    return best

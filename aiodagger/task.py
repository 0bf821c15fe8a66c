"""DTask, the awaitable handle of a spawned task, and Chunk, a value placed in the cluster.

A DTask's bookkeeping (state, dependents, pending count) belongs to the scheduler and
changes only on the cluster's loop. What other threads and loops may do is register a
waiter: a callback run exactly once when the task is done. Completion sets the state,
then pops waiters off the list one by one; a registering thread appends, re-checks the
state, and if the task finished meanwhile tries to take its waiter back with
``list.remove``. Both pop and remove are atomic under the GIL, so exactly one side runs
each waiter (callers count on that: ``gather`` counts completions).

Most tasks have one waiter, registered on the loop that completes them (``await t``,
``gather`` there): that one takes a slot of its own, with no list and no lock, since
registering and completing cannot interleave on one thread. The list is made at the
first waiter that needs it, under a lock, so that two threads' first waiters share one.

A DTask is an awaitable, deliberately *not* an asyncio Future: asyncio's helpers
(``wait_for``, ``gather``, ``wait``, ``as_completed``, ``shield``) wrap it in a Task of
their own, so a timeout or cancellation there cancels the wrapper and never the DTask,
which may be shared by other awaiters. ``t.cancel()`` is the one way to cancel a task.
``dagger.wait`` / ``dagger.as_completed`` hand back the DTasks themselves.

A DTask is awaitable from trio code too (anyio's trio backend included): the waiter
then wakes the trio task through its run's token (aiodagger/_trio.py). The rule is the
same there: a cancel scope that ends an ``await t`` ends the wait, not the task.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._asynclib import caller_loop, foreign_loop
from ._bridge import call_soon_quietly
from .errors import TaskCancelledError

if TYPE_CHECKING:
    from .interfaces import TaskOwner
    from .taskoptions import TaskOptions

__all__ = ["CANCELLED", "DONE_STATES", "FAILED", "FINISHED", "ID_SPACE", "PENDING", "NOWHERE", "READY",
           "REMOTE", "RUNNING", "Chunk", "DTask"]

R = TypeVar("R")

# Ids of tasks spawned inside worker N lie above N * ID_SPACE: the scheduler's own ids
# count up from 1 and never get there (the wire checks the ranges: comm/protocol.py).
ID_SPACE = 1 << 40

PENDING = "pending"
READY = "ready"
RUNNING = "running"
FINISHED = "finished"
FAILED = "failed"
CANCELLED = "cancelled"
DONE_STATES = frozenset((FINISHED, FAILED, CANCELLED))


class _Remote:
    """The value of a finished task or chunk that lives on another worker."""

    def __repr__(self) -> str:
        return "<value on a worker>"


REMOTE: Any = _Remote()
NOWHERE: frozenset[int] = frozenset()
# Taken only to make a task's list of waiters (DTask._on_done).
_new_list_lock = threading.Lock()


def _set_future(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _UserCallback:
    """A callback from ``add_done_callback``, run as asyncio runs them: via call_soon."""

    __slots__ = ("context", "fn", "loop")

    def __init__(self, fn: Callable[[Any], object], loop: asyncio.AbstractEventLoop,
                 context: contextvars.Context | None) -> None:
        self.fn = fn
        self.loop = loop
        self.context = context

    def __call__(self, task: DTask[Any]) -> None:
        call_soon_quietly(self.loop, self.fn, task, context=self.context)


class DTask(Generic[R]):
    """The handle of a spawned task: ``await t`` gives its value, ``t.fetch()`` blocks for it."""

    __slots__ = (
        "__weakref__",
        "_args",
        "_attempts",
        "_misses",
        "_cancelled",
        "_deps",
        "_dependents",
        "_est",
        "_exc",
        "_fn",
        "_fnkey",
        "_handle",
        "_inputs",
        "_kind",
        "_kwargs",
        "_npending",
        "_opts",
        "_resolve",
        "_sched",
        "_state",
        "_tb",
        "_thread_ok",
        "_timer",
        "_tracked",
        "_nbytes",
        "_where",
        "_value",
        "_waiter",
        "_waiters",
        "id",
        "name",
    )

    # A Stream (aiodagger/streaming.py) given as an argument is read, not waited for.
    _streaming = False

    def __init__(self, sched: TaskOwner, id: int, name: str, fn: Callable[..., Any] | None,
                 args: tuple[Any, ...], kwargs: dict[str, Any], opts: TaskOptions) -> None:
        self.id = id
        self.name = name
        self._sched = sched
        self._fn: Callable[..., Any] | None = fn
        self._args: tuple[Any, ...] | None = args
        self._kwargs: dict[str, Any] | None = kwargs
        self._opts = opts
        self._state = PENDING
        self._cancelled = False
        self._value: Any = None
        self._exc: BaseException | None = None
        self._tb: Any = None
        self._dependents: list[DTask[Any]] | None = None
        self._npending = -1  # -1 until the scheduler has registered the task
        self._waiter: Callable[[DTask[Any]], object] | None = None
        self._waiters: list[Callable[[DTask[Any]], object]] | None = None
        self._deps: list[DTask[Any]] | None = None
        self._resolve: int = False  # what to replace in the arguments (see _args)
        self._attempts = 0
        self._misses = 0  # times a worker could not get this task's inputs
        self._handle: Any = None
        self._inputs: dict[int, Any] | None = None  # input values loaded for one run
        self._est = 0.0
        self._kind = ""
        self._fnkey: Any = None
        self._thread_ok = False
        self._timer: Any = None
        self._tracked = False
        self._nbytes = 0
        # Shared and empty until the result lives on some worker: most tasks never need a set.
        self._where: set[int] = NOWHERE  # type: ignore[assignment]

    # -- state -------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """One of "pending", "ready", "running", "finished", "failed", "cancelled"."""
        return CANCELLED if self._cancelled else self._state

    def done(self) -> bool:
        return self._cancelled or self._state in DONE_STATES

    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self, msg: Any = None) -> bool:
        """Cancel the task and its not-yet-started dependents; False if already done.

        A running coroutine task is cancelled; a running sync task cannot be interrupted,
        so its result is discarded when it returns.
        """
        if self.done():
            return False
        return self._sched.cancel_threadsafe(self)

    # -- results -------------------------------------------------------------------------
    def result(self) -> R:
        """The value if finished; raises the task's error if it failed or was cancelled.

        Like ``asyncio.Future.result()`` it does not wait: use ``await t`` or ``t.fetch()``.
        """
        state = self._state
        if self._cancelled:
            raise self._cancelled_error()
        if state == FINISHED:
            value = self._value
            if value is REMOTE:
                raise asyncio.InvalidStateError(
                    f"{self!r} finished on worker {sorted(self._where)}, where its value stays until "
                    "asked for: `await` it, or call .fetch()")
            return value
        if state == FAILED:
            assert self._exc is not None
            raise self._exc.with_traceback(self._tb)
        raise asyncio.InvalidStateError(
            f"{self!r} is not done yet; `await` it, or call .fetch() from synchronous code"
        )

    def exception(self) -> BaseException | None:
        """The task's error (None if it finished); raises if not done or cancelled."""
        if self._cancelled:
            raise self._cancelled_error()
        if self._state == FINISHED:
            return None
        if self._state == FAILED:
            return self._exc
        raise asyncio.InvalidStateError(f"{self!r} is not done yet")

    def _cancelled_error(self) -> TaskCancelledError:
        if isinstance(self._exc, TaskCancelledError):
            return self._exc
        return TaskCancelledError(f"{self._describe()} was cancelled")

    def __await__(self) -> Generator[Any, None, R]:
        if not self.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # trio's run, or no loop at all (which says what to do)
                loop = foreign_loop()
            fut = loop.create_future()
            self._on_done_in(loop, lambda _t: _set_future(fut))
            # Cancelling the awaiting coroutine cancels `fut`, never the task: the task
            # may be shared by other awaiters.
            yield from fut.__await__()
        if self._value is REMOTE and self._state == FINISHED and not self._cancelled:
            yield from self._sched.bring_here([self]).__await__()
        return self.result()

    async def wait(self) -> None:
        """Wait until the task is done, whatever its outcome, without taking its value."""
        if not self.done():
            loop = caller_loop()
            fut = loop.create_future()
            self._on_done_in(loop, lambda _t: _set_future(fut))
            await fut

    def fetch(self, timeout: float | None = None) -> R:
        """Block the calling thread until the task is done and return its value.

        For synchronous code. On the cluster's own loop thread it would deadlock the
        loop, so there it raises ``RuntimeError``: write ``await t`` instead.
        """
        if not self.done():
            self._sched.wait_blocking(self, timeout)
        if self._value is REMOTE and self._state == FINISHED and not self._cancelled:
            self._sched.bring_blocking([self], timeout)
        return self.result()

    # -- waiters -------------------------------------------------------------------------
    def _on_done(self, cb: Callable[[DTask[Any]], object]) -> None:
        """Run ``cb(self)`` exactly once when done, on whichever thread completes it."""
        if self._cancelled or self._state in DONE_STATES:  # done(), inlined
            cb(self)
            return
        waiters = self._waiters
        if waiters is None:
            with _new_list_lock:
                waiters = self._waiters
                if waiters is None:
                    waiters = self._waiters = []
        waiters.append(cb)
        # Completion may already have emptied the list before the append.
        if self._cancelled or self._state in DONE_STATES:
            try:
                waiters.remove(cb)
            except ValueError:
                return  # completion popped it and runs it
            cb(self)

    def _on_done_here(self, cb: Callable[[DTask[Any]], object]) -> None:
        """:meth:`_on_done` for a caller on the owner's loop thread, where completion
        runs. The first such waiter takes the slot, unless the list already holds
        earlier ones (waiters run in registration order). A list a task was one more
        allocation and one more object for the collector to visit: W3 (10,000
        coroutines spawned, then gathered; `benchmarks.run --only W3 --peers
        aiodagger,asyncio --rounds 3`, five runs each, taking turns) went from
        1.44-1.55x asyncio's time to 1.36-1.40x with the slot and gather's single pass."""
        if self._cancelled or self._state in DONE_STATES:
            cb(self)
        elif self._waiter is None and self._waiters is None:
            self._waiter = cb
        else:
            self._on_done(cb)

    def _on_done_in(self, loop: asyncio.AbstractEventLoop, fn: Callable[[DTask[Any]], object]) -> None:
        """Run ``fn(self)`` on ``loop``'s thread once done (directly when that is the cluster's)."""
        if loop is self._sched.loop:
            self._on_done_here(fn)
        else:
            self._on_done(lambda t: call_soon_quietly(loop, fn, t))

    def _notify(self) -> None:
        """Deliver every waiter; called by the scheduler once the task is done."""
        cb = self._waiter
        if cb is not None:
            self._waiter = None
            cb(self)
        waiters = self._waiters
        if waiters is not None:
            self._waiters = None
            if len(waiters) > 1:
                waiters.reverse()  # pop() from the end, in registration order
            pop = waiters.pop
            while waiters:
                try:
                    cb = pop()
                except IndexError:  # a registering thread took the last one back
                    break
                cb(self)

    def add_done_callback(self, fn: Callable[[DTask[R]], object], *,
                          context: contextvars.Context | None = None) -> None:
        """Call ``fn(task)`` when done, through ``call_soon`` on the caller's running loop
        (in its trio run's thread, from trio; on the cluster's loop when called outside
        any), as asyncio futures do."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            try:
                loop = foreign_loop()
            except RuntimeError:
                loop = self._sched.loop
        self._on_done(_UserCallback(fn, loop, context))

    def remove_done_callback(self, fn: Callable[[DTask[R]], object]) -> int:
        waiters = self._waiters
        if not waiters:
            return 0
        removed = 0
        for w in [w for w in waiters if isinstance(w, _UserCallback) and w.fn == fn]:
            try:
                waiters.remove(w)  # atomic: never races a completion into a double call
                removed += 1
            except ValueError:
                pass
        return removed

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The caller's running loop: a DTask can be awaited from any loop."""
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            return self._sched.loop

    # -- misc ----------------------------------------------------------------------------
    def _describe(self) -> str:
        return f"task {self.name!r} (id {self.id})"

    def __repr__(self) -> str:
        return f"<DTask {self.name!r} id={self.id} {self.state}>"

    def __reduce__(self) -> Any:
        raise TypeError(
            f"{self!r} is a handle bound to this process's cluster and cannot be pickled; "
            "pass it to dagger.spawn() as an argument and the task receives its value"
        )


class Chunk(Generic[R]):
    """A value placed in the cluster's memory once (``await dagger.put(obj)``).

    Passed to any number of tasks, it is replaced by its value there, like a DTask.
    """

    __slots__ = ("__weakref__", "_nbytes", "_sched", "_value", "_where", "id", "worker")

    def __init__(self, value: R, worker: int, id: int, sched: Any = None) -> None:
        self._value = value
        self.worker = worker
        self.id = id
        self._sched = sched
        self._where: set[int] = set()
        self._nbytes = 0

    def __await__(self) -> Generator[Any, None, R]:
        if self._value is REMOTE:
            yield from self._sched.bring_here([self]).__await__()
        return self._value

    def fetch(self, timeout: float | None = None) -> R:
        if self._value is REMOTE:
            self._sched.bring_blocking([self], timeout)
        return self._value

    def __repr__(self) -> str:
        return f"<Chunk id={self.id} on worker {self.worker}: {type(self._value).__name__}>"


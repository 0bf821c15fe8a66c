"""The module-level futures API: spawn, options, fetch, wait, gather, as_completed, put."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from types import FunctionType
from typing import Any, Literal, TypeVar, overload

from ._asynclib import caller_loop, foreign_loop, wait_for
from ._bridge import run_on_loop_awaitable
from ._callables import spawn_callable_error
from ._context import RUNNING, current_cluster_var, spawn_collector_var
from .cluster import current_cluster
from .errors import NoProcessorError
from .task import DONE_STATES, FINISHED, REMOTE, Chunk, DTask
from .taskoptions import Scope, TaskOptions, current_options_var, validate_options

__all__ = ["ADMIT_LIMIT", "Options", "admit", "as_completed", "fetch", "gather", "options", "put", "spawn", "spawn_with_options",
           "tochunk", "wait"]

R = TypeVar("R")

_spawn_collector = spawn_collector_var.get
_current_options = current_options_var.get  # current_options(), one Python call fewer a spawn
_context_cluster = current_cluster_var.get

ReturnWhen = Literal["ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION"]
ALL_COMPLETED: ReturnWhen = "ALL_COMPLETED"
FIRST_COMPLETED: ReturnWhen = "FIRST_COMPLETED"
FIRST_EXCEPTION: ReturnWhen = "FIRST_EXCEPTION"


@overload
def spawn(fn: Callable[..., Awaitable[R]], /, *args: Any, **kwargs: Any) -> DTask[R]: ...
@overload
def spawn(fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> DTask[R]: ...
def spawn(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> DTask[Any]:
    """Run ``fn(*args, **kwargs)`` as a task and return its DTask at once.

    DTasks and Chunks among the arguments (also inside lists, tuples and dicts) are
    dependencies: the task runs after them and receives their values. A coroutine
    function runs on the cluster's loop, a sync function on its thread pool. Options
    from an enclosing ``with dagger.options(...)`` apply.
    """
    return spawn_with_options(_current_options(), fn, args, kwargs)


def spawn_with_options(opts: TaskOptions, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DTask[Any]:
    if type(fn) is not FunctionType:  # plain functions need no check: the hot path
        err = spawn_callable_error(fn)
        if err is not None:
            raise err
    cluster = _context_cluster()  # current_cluster(), two calls fewer where one is entered
    if cluster is None or cluster._state is not RUNNING:
        cluster = current_cluster()
    task = cluster._scheduler.spawn(opts, fn, args, kwargs)
    collector = _spawn_collector()
    if collector is not None:  # inside a request that aiodagger.web watches
        collector.add(task)
    return task


def fetch(task: DTask[R] | Chunk[R], timeout: float | None = None) -> R:
    """Block until ``task`` is done and return its value (``task.fetch()``)."""
    return task.fetch(timeout)


def _check_tasks(tasks: Iterable[Any], what: str) -> list[DTask[Any]]:
    out = list(tasks)
    for t in out:
        if not isinstance(t, DTask):
            raise TypeError(f"{what}() takes DTasks (from dagger.spawn), got {type(t).__name__}: {t!r}")
    return out


async def gather(*tasks: DTask[Any], return_exceptions: bool = False) -> list[Any]:
    """The values of ``tasks``, in order, once all are done.

    Like ``asyncio.gather``: the first failure is raised at once unless
    ``return_exceptions`` is true. Cancelling the caller does not cancel the tasks.
    """
    # One pass (W3 and W4 gather every task they spawn): a failure already known raises
    # at once, and each task not done yet is registered on as it is counted. A task
    # may finish on the cluster's thread between the count and the registration, and
    # registering still delivers it; the callbacks of a gather that raised find its
    # future done and return.
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = foreign_loop()
    fut: asyncio.Future[DTask[Any] | None] = loop.create_future()
    left = 0

    def on_done(t: DTask[Any]) -> None:
        nonlocal left
        if fut.done():
            return
        if not return_exceptions and (t._cancelled or t._state is not FINISHED):
            fut.set_result(t)  # the first failure, raised below
            return
        left -= 1
        if left == 0:
            fut.set_result(None)

    for t in tasks:
        if type(t) is not DTask and not isinstance(t, DTask):
            fut.set_result(None)  # the callbacks registered so far find it done
            _check_tasks((t,), "gather")  # raises
        if t._cancelled or t._state in DONE_STATES:
            if not return_exceptions and (t._cancelled or t._state is not FINISHED):
                fut.set_result(None)  # (set, not cancelled: a trio run's future has no cancel)
                t.result()  # raises
            continue
        left += 1
        if loop is t._sched.loop:
            # _on_done_here's first case inlined: the task is not done, so on this
            # thread it cannot finish before the slot is taken.
            if t._waiter is None and t._waiters is None:
                t._waiter = on_done
            else:
                t._on_done_here(on_done)
        else:
            t._on_done_in(loop, on_done)
    if left:
        failed = await fut
        if failed is not None:
            failed.result()  # raises
    if not return_exceptions:  # most: every value here, read without result()'s calls
        values = []
        for t in tasks:
            value = t._value
            if value is REMOTE or t._state is not FINISHED or t._cancelled:
                break
            values.append(value)
        else:
            return values
    await _bring_values(tasks)
    if return_exceptions:
        return [_outcome(t) for t in tasks]
    return [t.result() for t in tasks]


async def _bring_values(items: Iterable[DTask[Any]]) -> None:
    """Bring the values that live on workers (or in a store) here, in one go per cluster."""
    by_sched: dict[int, list[DTask[Any]]] = {}
    for t in items:
        if t._value is REMOTE and t._state is FINISHED and not t._cancelled:
            by_sched.setdefault(id(t._sched), []).append(t)
    for group in by_sched.values():
        await group[0]._sched.bring_here(group)


def _outcome(t: DTask[Any]) -> Any:
    try:
        return t.result()
    except BaseException as exc:  # noqa: BLE001 - returned, as the caller asked
        return exc


async def wait(
    tasks: Iterable[DTask[Any]],
    timeout: float | None = None,
    return_when: ReturnWhen = ALL_COMPLETED,
) -> tuple[set[DTask[Any]], set[DTask[Any]]]:
    """Wait for tasks as ``asyncio.wait`` does; return ``(done, pending)``. Moves no data."""
    if return_when not in (ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION):
        raise ValueError(f"return_when must be ALL_COMPLETED, FIRST_COMPLETED or FIRST_EXCEPTION, got {return_when!r}")
    items = set(_check_tasks(tasks, "wait"))
    if not items:
        raise ValueError("wait() needs at least one task")

    def satisfied() -> bool:
        done = [t for t in items if t.done()]
        if return_when == FIRST_COMPLETED:
            return bool(done)
        if return_when == FIRST_EXCEPTION and any(t._cancelled or t._state is not FINISHED for t in done):
            return True
        return len(done) == len(items)

    if not satisfied():
        loop = caller_loop()
        fut: asyncio.Future[None] = loop.create_future()
        # Every task gets a waiter, done ones included (theirs is delivered at once):
        # counting only the unfinished ones would race with the cluster's thread.
        left = [len(items)]

        def on_done(t: DTask[Any]) -> None:
            left[0] -= 1
            if fut.done():
                return
            failed = t._cancelled or t._state is not FINISHED
            if (return_when == FIRST_COMPLETED or left[0] == 0
                    or (return_when == FIRST_EXCEPTION and failed)):
                fut.set_result(None)

        for t in items:
            t._on_done_in(loop, on_done)
        try:
            await wait_for(fut, timeout, shield=True)
        except TimeoutError:
            pass
    done = {t for t in items if t.done()}
    return done, items - done


class as_completed:  # noqa: N801 - used like a function: `async for t in as_completed(ts)`
    """``async for t in dagger.as_completed(tasks)`` yields each task as it finishes.

    ``timeout`` (seconds, for the whole iteration) raises ``TimeoutError`` when it runs out.
    """

    def __init__(self, tasks: Iterable[DTask[Any]], timeout: float | None = None) -> None:
        self._tasks = list(dict.fromkeys(_check_tasks(tasks, "as_completed")))
        self._timeout = timeout
        self._finished: deque[DTask[Any]] = deque()
        self._left = len(self._tasks)
        self._wakeup: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadline: float | None = None

    def __aiter__(self) -> AsyncIterator[DTask[Any]]:
        return self

    def _arrived(self, t: DTask[Any]) -> None:
        self._finished.append(t)
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def __anext__(self) -> DTask[Any]:
        if self._loop is None:
            self._loop = caller_loop()
            if self._timeout is not None:
                self._deadline = self._loop.time() + self._timeout
            for t in self._tasks:
                t._on_done_in(self._loop, self._arrived)
        if self._left == 0:
            raise StopAsyncIteration
        while not self._finished:
            self._wakeup = self._loop.create_future()
            remaining = None if self._deadline is None else self._deadline - self._loop.time()
            try:
                await wait_for(self._wakeup, remaining)
            except TimeoutError:
                raise TimeoutError(f"as_completed(): {self._left} task(s) not done within {self._timeout} s") from None
        self._left -= 1
        return self._finished.popleft()


# dagger.admit()'s bound when none is given: tasks spawned and not done.
ADMIT_LIMIT = 10_000


async def admit(limit: int = ADMIT_LIMIT) -> None:
    """Wait until the current cluster holds fewer than ``limit`` tasks in flight (spawned
    and not done), then return: call it before spawning from a producer that could
    outrun the cluster (a web handler taking work in, a stream's source), so that a
    burst slows the intake instead of growing memory without bound. Returns at once
    while there is room; a waiting producer resumes once the count is back under 90 %
    of ``limit``."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"admit(limit=...) takes a number of tasks >= 1, got {limit!r}")
    sched = current_cluster()._scheduler
    if sched.live_count < limit:  # the common case: no trip to the cluster's loop
        return
    await run_on_loop_awaitable(sched.admitted(limit), sched.loop)


async def put(obj: R, scope: Scope | None = None) -> Chunk[R]:
    """Place ``obj`` in the cluster's memory once, to pass to many tasks.

    With a ``scope`` naming workers in other processes, a copy goes to each of them now
    (several: a broadcast), so that their tasks find it there; this process keeps the
    value too, for tasks elsewhere.
    """
    cluster = current_cluster()
    sched = cluster._scheduler
    if not hasattr(sched, "local"):  # a client or a worker's task: the scheduler keeps it
        if scope is not None:
            raise ValueError("put(..., scope=...) places copies on chosen workers, which only "
                             "the program that runs the cluster can do: put() without a scope")
        chunk: Chunk[R] = await run_on_loop_awaitable(sched.put(obj), sched.loop)  # type: ignore[attr-defined]
        return chunk
    local = sched.local
    assert local is not None
    chunk = Chunk(obj, local.id, next(_chunk_ids), sched)
    if scope is None:
        return chunk
    dist = sched.dist
    targets = dist.admitted(scope) if dist is not None else []
    if not targets:
        if not local.admits(scope):
            raise NoProcessorError(
                f"put() with {scope!r}: no worker of this cluster satisfies it. "
                f"The cluster has: {sched.describe_processors()}"
            )
        return chunk
    assert dist is not None
    await run_on_loop_awaitable(dist.put(chunk, targets), sched.loop)
    chunk.worker = targets[0].id
    return chunk


tochunk = put

_chunk_ids = itertools.count(1)


class Options:
    """``dagger.options(**opts)``: spawn with these options, or apply them to a block."""

    __slots__ = ("_overrides", "_tokens")

    def __init__(self, overrides: dict[str, Any]) -> None:
        self._overrides = validate_options(overrides)
        self._tokens: list[contextvars.Token[TaskOptions]] = []

    def resolve(self) -> TaskOptions:
        return current_options_var.get().merged(self._overrides)

    def spawn(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> DTask[Any]:
        return spawn_with_options(self.resolve(), fn, args, kwargs)

    def __enter__(self) -> Options:
        self._tokens.append(current_options_var.set(self.resolve()))
        return self

    def __exit__(self, *exc: object) -> None:
        current_options_var.reset(self._tokens.pop())

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._overrides.items())
        return f"dagger.options({inner})"


def options(**opts: Any) -> Options:
    """Task options, e.g. ``dagger.options(priority=5, retries=2)``.

    Use ``.spawn(fn, *args)`` on the result, or ``with dagger.options(...):`` to apply
    them to every spawn in the block. Unknown names raise ``TypeError`` at once.
    """
    return Options(opts)

"""Datadeps regions: ``async with dagger.datadeps() as dd: dd.spawn(f, In(a), InOut(b))``.

Tasks spawned through ``dd`` are ordered by what they do to their arguments, as in
Dagger.jl's ``spawn_datadeps``: a read waits for the last write of any byte it reads,
a write also for the reads since (:class:`~aiodagger.aliasing.AccessLog`). The order is
handed to the scheduler as ``after=`` links, so tasks that share no byte run in
parallel and the scheduler's own fast paths stay in use.

Where a task runs decides how its arguments reach it:

* in this process (an in-process cluster, or a scope naming this worker): the caller's
  objects themselves, written in place;
* in another process, from the cluster's own process: arguments are pickled when the
  task is sent, after every task it waits for, so they carry the writes so far. What
  the task writes comes back with its result and is copied into the caller's objects
  (only the written ones) by a small coroutine here, before any later task starts;
* from a task inside a worker process: the region's tasks run on that worker, given
  the objects of that process by reference.
"""

from __future__ import annotations

import asyncio
import copy
import functools
from collections.abc import Callable
from types import FunctionType
from typing import Any

import numpy as np

from ._args import LEAF_TYPES
from ._callables import classify, spawn_callable_error
from .access import Access, In, InOut, Out, open_regions
from .aliasing import AccessLog
from .errors import UpstreamError
from .files import File
from .placed import Mutable, Placed, call_dereferenced, call_dereferenced_async, lend, take_back
from .task import Chunk, DTask
from .taskoptions import TaskOptions, current_options, scope

__all__ = ["In", "InOut", "Out", "Region", "datadeps"]

_NEW, _OPEN, _CLOSED = "new", "open", "closed"

# Copies back larger than this are made on a thread, not on the loop (a 1 MiB copy
# takes ~0.1 ms here; 100 MiB, 20 ms, too long to hold every other task up).
_COPY_ON_LOOP_BYTES = 1 << 20


def datadeps() -> Region:
    """A region whose tasks are ordered by the accesses they declare (``In``, ``Out``,
    ``InOut``; a bare argument is ``In``). At exit every task has finished, every
    argument holds its final value in the caller's objects, and the first failure
    is raised."""
    return Region()


class Region:
    """``async with dagger.datadeps() as dd`` (or ``with`` from synchronous code)."""

    def __init__(self) -> None:
        self._state = _NEW
        self._log = AccessLog()
        self._tasks: list[DTask[Any]] = []
        self._sched: Any = None
        self._token: Any = None
        self._wrappers: dict[Any, Any] = {}
        self._lent: list[Any] = []  # keys of the objects lent to tasks (in a worker process)
        self._scan = False  # whether the task being spawned has arguments to scan
        self._copies: dict[tuple[int, int], tuple[DTask[Any], Any]] = {}  # see _read_copies

    def __repr__(self) -> str:
        return f"<dagger.datadeps region {self._state}, {len(self._tasks)} task(s)>"

    # -- lifecycle -----------------------------------------------------------------------
    def _open(self) -> None:
        if self._state is not _NEW:
            raise RuntimeError("a datadeps region is entered once; call dagger.datadeps() again")
        from .cluster import current_cluster

        self._sched = current_cluster()._scheduler
        self._state = _OPEN
        self._token = open_regions.set(open_regions.get() + 1)

    def _close(self) -> None:
        self._state = _CLOSED
        open_regions.reset(self._token)

    async def __aenter__(self) -> Region:
        self._open()
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._close()
        try:
            await self._wait_all()
        finally:
            self._forget_refs()
        if exc_type is None:
            self._raise_first_failure()

    async def _wait_all(self) -> None:
        """Every task finishes before the caller may touch its objects again, also when
        the body raised (they may still be writing them). Cancelled meanwhile: the tasks
        not started yet are cancelled, those running are still waited for."""
        from .api import wait

        if not self._tasks:
            return
        cancelled = False
        while True:
            try:
                await wait(self._tasks)
                break
            except asyncio.CancelledError:
                cancelled = True
                for task in self._tasks:
                    task.cancel()
        if cancelled:
            raise asyncio.CancelledError

    def __enter__(self) -> Region:
        self._open()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._close()
        try:
            for task in self._tasks:
                if not task.done():
                    task._sched.wait_blocking(task, None)
        finally:
            self._forget_refs()
        if exc_type is None:
            self._raise_first_failure()

    def _raise_first_failure(self) -> None:
        """The first task (in spawn order) that failed of its own accord; failing that,
        the first that failed at all (all of them because of tasks outside the region)."""
        first: DTask[Any] | None = None
        for task in self._tasks:
            if task.done() and (task._cancelled or task._exc is not None):
                if task._cancelled or not isinstance(task._exc, UpstreamError):
                    task.result()  # raises
                first = first or task
        if first is not None:
            first.result()

    def _forget_refs(self) -> None:
        take_back(self._lent)

    # -- spawning --------------------------------------------------------------------------
    def spawn(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> DTask[Any]:
        """Spawn ``fn(*args, **kwargs)`` ordered by its accesses; return its DTask."""
        if self._state is not _OPEN:
            raise RuntimeError(
                "dd.spawn() on a datadeps region that is not open: spawn inside "
                "`async with dagger.datadeps() as dd:` (this one has "
                f"{'exited' if self._state is _CLOSED else 'not been entered yet'})")
        if type(fn) is not FunctionType:
            err = spawn_callable_error(fn)
            if err is not None:
                raise err
        log = self._log
        self._scan = False
        after: dict[Any, None] = {}
        accesses: list[tuple[Any, bool]] = []
        written: list[tuple[int | str, Any]] = []  # where a written argument sits, and it
        placed: list[tuple[int | str, Any, bool]] = []  # mutables and shards among them
        plain_args = list(args)
        for i, arg in enumerate(args):
            if type(arg) not in LEAF_TYPES:
                plain_args[i] = self._access(arg, i, log, after, accesses, written, placed)
        plain_kwargs = kwargs
        if kwargs:
            plain_kwargs = dict(kwargs)
            for key, arg in kwargs.items():
                if type(arg) not in LEAF_TYPES:
                    plain_kwargs[key] = self._access(arg, key, log, after, accesses, written, placed)
        sched = self._sched
        if len(placed) > 1 and not sched.in_worker_process:
            self._read_copies(placed, plain_args, plain_kwargs, accesses)
        opts = current_options()
        if after:
            opts = opts.with_after(tuple(after))
        if sched.in_worker_process:
            task = self._spawn_pinned(sched, opts, fn, plain_args, plain_kwargs)
        elif written and sched.runs_elsewhere(opts.scope):
            task = self._spawn_with_copy_back(sched, opts, fn, plain_args, plain_kwargs, written)
        else:
            task = sched.spawn(opts, fn, tuple(plain_args), plain_kwargs, scan=self._scan)
        for entry, writes in accesses:
            log.record(entry, writes, task)
        self._tasks.append(task)
        return task

    def _read_copies(self, placed: list[tuple[int | str, Any, bool]], args: list[Any],
                     kwargs: dict[str, Any], accesses: list[tuple[Any, bool]]) -> None:
        """A task runs where the mutable it writes lives (else where the first it reads
        does); a mutable of another worker that it only reads comes to it as a copy, made
        by a task of the region at this point of its order (Dagger.jl's datadeps moves
        data the same way)."""
        mutables = [(where, m, writes) for where, m, writes in placed if isinstance(m, Mutable)]
        if len({m.worker for _, m, _ in mutables}) < 2:
            return
        home = next((m.worker for _, m, writes in mutables if writes), mutables[0][1].worker)
        for where, m, writes in mutables:
            if writes or m.worker == home:
                continue
            # One copy per version of the object and worker: a tiled LU reads each panel
            # tile in every update of its row, on the same few workers.
            writer = self._log.entry(m).writer
            cached = self._copies.get((id(m), home))
            if cached is not None and cached[1] is writer:
                duplicate = cached[0]
            else:
                duplicate = self.spawn(_copy_of, m)
                self._copies[(id(m), home)] = (duplicate, writer)
            self._scan = True  # the task being spawned has a DTask argument now
            if type(where) is int:
                args[where] = duplicate
            else:
                kwargs[str(where)] = duplicate
            accesses.remove((self._log.entry(m), False))  # the copy was the read

    def _access(self, arg: Any, where: int | str, log: AccessLog, after: dict[Any, None],
                accesses: list[tuple[Any, bool]], written: list[tuple[int | str, Any]],
                placed: list[tuple[int | str, Any, bool]]) -> Any:
        """Note one argument's access (the tasks it waits for go into ``after``); return
        the argument as the task receives it."""
        kind = type(arg)
        if kind is In or kind is Out or kind is InOut:
            value, writes = arg.value, kind.writes
        elif isinstance(arg, Access):
            value, writes = arg.value, arg.writes
        else:
            value, writes = arg, False
        kind = type(value)
        if kind is list or kind is tuple or kind is dict or isinstance(value, (DTask, Chunk, Placed, File)):
            self._scan = True  # the scheduler must look inside for dependencies
        elif kind in LEAF_TYPES:
            if writes:
                raise TypeError(
                    f"{arg!r}: {type(value).__name__} values cannot be changed in place, so no task "
                    "can write it; return the new value instead, or wrap it in something "
                    "mutable (a numpy array, a list)")
            return value
        if (writes and isinstance(value, (DTask, Chunk)) and not self._sched.in_worker_process
                and self._sched.runs_elsewhere(current_options().scope)):
            raise TypeError(
                f"{arg!r}: a task in another process cannot write a DTask's or Chunk's value "
                "in place (each worker keeps its own copy). Create the object with "
                "dagger.mutable(...) so that tasks run where it lives, or pass a plain object")
        entry = log.entry(value)
        log.conflicts(entry, writes, after)
        accesses.append((entry, writes))
        if isinstance(value, Placed):  # a mutable is written where it lives
            placed.append((where, value, writes))
        elif writes:
            written.append((where, value))
        return value

    def _spawn_with_copy_back(self, sched: Any, opts: TaskOptions, fn: Any, args: list[Any],
                              kwargs: dict[str, Any], written: list[tuple[int | str, Any]]) -> DTask[Any]:
        """The task runs elsewhere and returns what it wrote; a coroutine here copies that
        into the caller's objects and is the task the caller (and later tasks) see."""
        where = tuple(w for w, _ in written)
        key = (fn, where)
        wrapper = self._wrappers.get(key)
        if wrapper is None:
            body = _call_returning_written_async if classify(fn) == "async" else _call_returning_written
            wrapper = self._wrappers[key] = functools.partial(body, fn, where)
        name = opts.name or getattr(fn, "__qualname__", None) or type(fn).__name__
        inner = sched.spawn(_named(opts, name), wrapper, tuple(args), kwargs)
        targets = [target for _, target in written]
        here = _named(TaskOptions(scope=scope(worker=sched.home_worker)), name)
        return sched.spawn(here, functools.partial(_copy_back, inner, targets), (), {})

    def _spawn_pinned(self, sched: Any, opts: TaskOptions, fn: Any, args: list[Any],
                      kwargs: dict[str, Any]) -> DTask[Any]:
        """Inside a worker process: the task runs on this worker, on this process's objects."""
        home = sched.home_worker
        chosen = opts.scope.workers
        if chosen is not None and home not in chosen:
            raise ValueError(
                f"a datadeps region inside a task runs its tasks on that task's worker "
                f"({home}), but this one has {opts.scope!r}; spawn it with dagger.spawn instead")
        lent = self._lent
        for i, arg in enumerate(args):
            if type(arg) not in LEAF_TYPES and not isinstance(arg, (DTask, Chunk)):
                args[i] = lend(arg, lent, home)
        for k, arg in kwargs.items():
            if type(arg) not in LEAF_TYPES and not isinstance(arg, (DTask, Chunk)):
                kwargs[k] = lend(arg, lent, home)
        key = (fn, None)
        wrapper = self._wrappers.get(key)
        if wrapper is None:
            body = call_dereferenced_async if classify(fn) == "async" else call_dereferenced
            wrapper = self._wrappers[key] = functools.partial(body, fn)
        name = opts.name or getattr(fn, "__qualname__", None) or type(fn).__name__
        pinned = opts.merged({"name": name, "scope": scope(worker=home)})
        return sched.spawn(pinned, wrapper, tuple(args), kwargs)


def _copy_of(obj: Any) -> Any:
    return copy.deepcopy(obj)


def _named(opts: TaskOptions, name: str) -> TaskOptions:
    return opts if opts.name == name else opts.merged({"name": name})


# -- what runs in other processes ------------------------------------------------------
def _written(where: tuple[int | str, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    return [args[w] if type(w) is int else kwargs[w] for w in where]  # type: ignore[index]


def _call_returning_written(fn: Any, where: tuple[int | str, ...], *args: Any, **kwargs: Any) -> Any:
    result = fn(*args, **kwargs)
    return result, _written(where, args, kwargs)


async def _call_returning_written_async(fn: Any, where: tuple[int | str, ...], *args: Any, **kwargs: Any) -> Any:
    result = await fn(*args, **kwargs)
    return result, _written(where, args, kwargs)


async def _copy_back(inner: DTask[Any], targets: list[Any]) -> Any:
    try:
        result, values = await inner  # the task's own error, as it raised it
    except asyncio.CancelledError:
        inner.cancel()
        raise
    pairs = [(t, v) for t, v in zip(targets, values, strict=True) if t is not v]
    if sum(getattr(v, "nbytes", 0) for _, v in pairs) > _COPY_ON_LOOP_BYTES:
        await asyncio.to_thread(_copy_all, pairs)
    else:
        _copy_all(pairs)
    return result


def _copy_all(pairs: list[tuple[Any, Any]]) -> None:
    for target, value in pairs:
        copy_into(target, value)


def copy_into(target: Any, value: Any) -> None:
    """Make ``target`` hold what ``value`` holds, in place (``value``: its changed copy)."""
    if isinstance(target, np.ndarray):
        np.copyto(target, value, casting="no")
    elif isinstance(target, (list, bytearray)):
        target[:] = value
    elif isinstance(target, (dict, set)):
        target.clear()
        target.update(value)
    elif hasattr(target, "__setstate__"):
        target.__setstate__(value.__getstate__())
    elif hasattr(value, "__getstate__") and isinstance(state := value.__getstate__(), dict | tuple):
        # object.__getstate__: the instance dict, or (dict, slots) for slotted classes
        dict_state, slots = state if isinstance(state, tuple) else (state, None)
        if dict_state is not None:
            target.__dict__.clear()
            target.__dict__.update(dict_state)
        for name, item in (slots or {}).items():
            setattr(target, name, item)
    else:
        raise TypeError(
            f"a task in another process wrote a {type(target).__name__}, which cannot be "
            "updated in place here; give the class __getstate__/__setstate__, or use a numpy "
            "array, list, dict or plain object")

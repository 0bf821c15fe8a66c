"""What lives in one worker process and is only ever referred to: the object table,
:class:`Ref`, and the handles of mutables and shards (:mod:`aiodagger.mutables` makes
them).

What travels is a :class:`Ref` (a key), never the object: a task given a handle is
sent to a worker that holds the object and receives the object itself, so that its
changes are made in place and seen by the next task. The object lives as long as the
task that created it keeps its result: that result is the ``Ref``, held in the
worker's store (never spilled) or on the creating DTask, and the table entry goes
with it. Kept apart from :mod:`aiodagger.mutables` because argument scanning and the
workers need these, and must not import the cluster.
"""

from __future__ import annotations

import functools
import itertools
import os
import weakref
from collections.abc import Generator
from typing import Any

from .errors import NoProcessorError
from .task import DTask
from .taskoptions import Scope

__all__ = ["Mutable", "Placed", "Ref", "Shard", "bind", "call_dereferenced", "call_dereferenced_async",
           "create", "create_async", "here", "lend", "new_key", "take_back"]

# This process's objects, by key: mutables and shard pieces made here, and the objects a
# datadeps region inside a task lends to the tasks it runs on this worker.
_TABLE: dict[Any, Any] = {}
_keys = itertools.count(1)


class Ref:
    """A key into the object table of the process a task runs in."""

    __slots__ = ("__weakref__", "key", "worker")

    def __init__(self, key: Any, worker: int | None) -> None:
        self.key = key
        self.worker = worker  # None: every worker has its own (a shard)

    def get(self) -> Any:
        try:
            return _TABLE[self.key]
        except KeyError:
            where = "on the worker that made it" if self.worker is None else f"on worker {self.worker}"
            raise RuntimeError(
                f"this task (pid {os.getpid()}) was given an object that lives {where}, and it "
                "is not here: its worker was lost or restarted, or its last handle was "
                "dropped. Create it again") from None

    def __reduce__(self) -> Any:
        return (Ref, (self.key, self.worker))

    def __repr__(self) -> str:
        return f"<dagger.Ref {self.key!r} on worker {self.worker}>"


def _keep(key: Any, obj: Any, worker: int | None) -> Ref:
    _TABLE[key] = obj
    ref = Ref(key, worker)
    weakref.finalize(ref, _TABLE.pop, key, None)  # the object goes with the creator's result
    return ref


def create(fn: Any, key: Any, worker: int | None, *args: Any, **kwargs: Any) -> Ref:
    return _keep(key, fn(*args, **kwargs), worker)


async def create_async(fn: Any, key: Any, worker: int | None, *args: Any, **kwargs: Any) -> Ref:
    return _keep(key, await fn(*args, **kwargs), worker)


def lend(obj: Any, keys: list[Any], worker: int) -> Ref:
    """Put ``obj`` in this process's table for tasks that run here; ``keys`` collects the
    keys, for :func:`take_back`."""
    key = new_key("lent")
    _TABLE[key] = obj
    keys.append(key)
    return Ref(key, worker)


def take_back(keys: list[Any]) -> None:
    for key in keys:
        _TABLE.pop(key, None)
    keys.clear()


# -- the handles -------------------------------------------------------------------------
class Placed:
    """What mutables and shards share: creating tasks, and the workers that hold pieces."""

    __slots__ = ("__weakref__", "_creators", "_sched", "key", "name")

    def __init__(self, sched: Any, key: Any, name: str, creators: dict[int, DTask[Any]]) -> None:
        self._sched = sched
        self.key = key
        self.name = name
        self._creators = creators

    @property
    def workers(self) -> list[int]:
        return sorted(self._creators)

    def __await__(self) -> Generator[Any, None, Any]:
        for creator in self._creators.values():
            yield from creator.wait().__await__()
        self._raise_if_failed()
        return self

    def fetch(self, timeout: float | None = None) -> Any:
        """Wait until the object exists (from synchronous code); return this handle."""
        for creator in self._creators.values():
            if not creator.done():
                creator._sched.wait_blocking(creator, timeout)
        self._raise_if_failed()
        return self

    def _raise_if_failed(self) -> None:
        for creator in self._creators.values():
            if creator._cancelled or creator._exc is not None:
                creator.result()  # raises

    def get(self) -> Any:
        """The object itself, inside a task on a worker that holds it."""
        return Ref(self.key, None).get()


class Mutable(Placed):
    """``dagger.mutable(fn, *args)``: one object on one worker, changed in place there."""

    __slots__ = ()

    @property
    def worker(self) -> int:
        (worker,) = self._creators
        return worker

    def __reduce__(self) -> Any:
        return (Ref, (self.key, self.worker))

    def __repr__(self) -> str:
        return f"<dagger.mutable {self.name} on worker {self.worker}>"


class Shard(Placed):
    """``dagger.shard(fn)``: one object per worker; a task gets the one where it runs."""

    __slots__ = ()

    def __reduce__(self) -> Any:
        return (Ref, (self.key, None))

    def __repr__(self) -> str:
        return f"<dagger.shard {self.name} on workers {self.workers}>"


# -- tasks given handles -----------------------------------------------------------------
def bind(sched: Any, task: DTask[Any], handles: list[Placed]) -> None:
    """Send ``task`` where its handles' objects live, after they exist, and hand it the
    objects rather than the handles. Raises NoProcessorError when no worker has them all."""
    args, kwargs = task._args or (), task._kwargs or {}
    where: set[int] | None = None
    for handle in handles:
        if handle._sched is not sched:
            raise RuntimeError(
                f"{handle!r} belongs to a cluster that has closed (or to another cluster); "
                "create it again in this one")
        if not any(a is handle for a in args) and not any(v is handle for v in kwargs.values()):
            raise TypeError(f"{handle!r} must be a direct argument of the task, not inside a container")
        held = set(handle._creators)
        if where is not None and not where & held:
            raise NoProcessorError(
                f"{task._describe()} is given objects that live on different workers "
                f"({sorted(where)} and {sorted(held)}): no worker holds them all. Give a task "
                "objects of one worker, or move the data with a task")
        where = held if where is None else where & held
    assert where is not None
    scope = task._opts.scope
    if scope.workers is not None:
        if not where & scope.workers:
            raise NoProcessorError(
                f"{task._describe()} has {scope!r}, but the objects it is given live on "
                f"worker(s) {sorted(where)}: they never move, so it cannot run there")
        where &= scope.workers
    pinned = Scope(frozenset(where), scope.thread, scope.gpu, scope.process)
    opts = task._opts.merged({"scope": pinned})
    task._opts = opts.with_after(tuple(c for h in handles for c in h._creators.values()))
    task._fn = functools.partial(
        call_dereferenced_async if task._kind == "async" else call_dereferenced, task._fn)


def here(value: Any) -> Any:
    """The object a Ref or handle stands for if it lives in this process, else None."""
    return _TABLE.get(value.key) if isinstance(value, (Ref, Placed)) else None


def _deref(value: Any) -> Any:
    return value.get() if isinstance(value, (Ref, Placed)) else value


def call_dereferenced(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn`` given the objects its Refs (or handles, in this process) stand for."""
    return fn(*[_deref(a) for a in args], **{k: _deref(v) for k, v in kwargs.items()})


async def call_dereferenced_async(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await fn(*[_deref(a) for a in args], **{k: _deref(v) for k, v in kwargs.items()})


def new_key(kind: str) -> tuple[str, int, int]:
    """A key no other object of this cluster's process has."""
    return (kind, next(_keys), os.getpid())

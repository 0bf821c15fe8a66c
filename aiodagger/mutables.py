"""``dagger.mutable(fn, *args)`` and ``dagger.shard(fn)``: objects made on workers and
changed in place there (Dagger.jl's ``@mutable`` and ``@shard``).

``mutable`` calls ``fn`` on one worker (one its ``scope`` admits, taken in turn) and
keeps what it returns there; ``shard`` does so on every worker that runs tasks. Tasks
given the handle run where the object lives and receive the object itself
(:mod:`aiodagger.placed` has the handles and how a task is bound to them). The object
is freed when its last handle goes.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any

from ._callables import classify, spawn_callable_error
from .placed import Mutable, Shard, create, create_async, new_key
from .taskoptions import ANY_SCOPE, Scope, current_options

__all__ = ["Mutable", "Shard", "mutable", "shard"]


def _scheduler() -> Any:
    from .cluster import current_cluster

    return current_cluster()._scheduler


def _creator(fn: Any) -> Callable[..., Any]:
    err = spawn_callable_error(fn)
    if err is not None:
        raise err
    return create_async if classify(fn) == "async" else create


_round_robin = itertools.count()


def mutable(fn: Callable[..., Any], /, *args: Any, scope: Scope | None = None, **kwargs: Any) -> Mutable:
    """Create ``fn(*args, **kwargs)`` on one worker (one ``scope`` admits) and keep it
    there; tasks given the handle run on that worker and receive the object itself.
    The options in effect (priority...) apply to the task that creates it."""
    make = _creator(fn)
    if scope is not None and not isinstance(scope, Scope):
        raise TypeError(f"mutable(..., scope=...) takes dagger.scope(...), got {scope!r}")
    sched = _scheduler()
    workers = sched.placeable_workers(scope or ANY_SCOPE)
    worker = workers[next(_round_robin) % len(workers)]
    key = new_key("mutable")
    name = getattr(fn, "__qualname__", type(fn).__name__)
    # Pinned to the worker; a GPU the scope asks for still holds there (tiles on a GPU).
    opts = current_options().merged({"name": f"mutable {name}", "scope": (scope or ANY_SCOPE).on_worker(worker)})
    creator = sched.spawn(opts, functools.partial(make, fn, key, worker), args, kwargs)
    return Mutable(sched, key, name, {worker: creator})


def shard(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Shard:
    """Create ``fn(*args, **kwargs)`` on every worker that runs tasks; a task given the
    handle receives the piece of the worker it runs on."""
    make = _creator(fn)
    sched = _scheduler()
    key = new_key("shard")
    name = getattr(fn, "__qualname__", type(fn).__name__)
    creators = {}
    for worker in sched.placeable_workers(ANY_SCOPE):
        opts = current_options().merged({"name": f"shard {name}", "scope": Scope(frozenset([worker]))})
        creators[worker] = sched.spawn(opts, functools.partial(make, fn, key, None), args, kwargs)
    return Shard(sched, key, name, creators)



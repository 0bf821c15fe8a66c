"""Streaming tasks: ``s = dagger.spawn_streaming(gen_fn, *args, buffer=16)``.

A stream is a task that runs a generator (``async def`` with ``yield``, on the loop;
plain ``def`` with ``yield``, on a pool thread) and hands its values, in order, to
every reader as they are produced. ``s`` is a :class:`Stream`, a DTask whose value is
the number of values produced. A task spawned with ``s`` among its arguments starts
without waiting for the stream to end and receives a reader in its place: an async
iterator for an ``async def`` consumer, a plain iterator for a sync one. The caller
reads with ``async for v in s`` (or ``for v in s`` from synchronous code).

How values move (the hub, ``scheduler/streams.py``, counts and routes; the ends are
in ``_streams.py``):

* The producer's outlet, in the process where it runs, gathers values and sends them
  as one batch when its loop goes idle (or half a window is waiting), to the hub in
  the scheduler's process, which relays each batch, still pickled, to the processes
  of the readers. Values do not go from worker to worker directly; values produced
  and read in the scheduler's process are never pickled.
* Back-pressure is by credit: each reader reports how many values it has taken (a
  value counts as taken once handed to the consumer), at least every half window and
  before it waits; the hub grants the producer ``min(taken by each reader) + buffer``
  values in all, and the producer asks its generator for the next value only while
  it has credit. So the producer is never more than ``buffer`` values ahead of its
  slowest reader, across processes too: values in flight count against the window,
  not beside it.
* A stream waits for its first reader before it produces anything, so values are
  never dropped. A reader joins when the task it is given to is spawned, or when
  ``async for`` starts, and gets the values that reach the hub after it joined:
  readers spawned on the cluster's loop in the same step as the stream get them all,
  as does the first reader spawned from another thread; a reader that joins later
  (or after the end) gets what is left.
* The end reaches every reader after the last value: the stream finished, or its
  exception (raised in the reader as its own type), or :class:`TaskCancelledError`
  if it was cancelled. When every reader has left before the end (finished, cancelled,
  closed or dropped its reader), the producer is cancelled and its generator closed.
* A stream is never run again (``retries`` does not apply), and a reader whose task
  is run again elsewhere (its worker was lost) ends with WorkerLostError: values are
  not kept for re-reading.

Each process has one stream port for its cluster, on its loop: the hub itself in the
scheduler's process (worker 0), ``worker/streams.py`` in a worker process.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from ._context import spawn_collector_var
from ._streams import AsyncReader, Reader, Stream, produce_async, produce_sync
from .taskoptions import current_options

__all__ = ["AsyncReader", "Reader", "Stream", "spawn_streaming"]


def spawn_streaming(fn: Callable[..., Any], /, *args: Any, buffer: int = 16, **kwargs: Any) -> Stream:
    """Run the generator ``fn(*args, **kwargs)`` as a streaming task; return its Stream.

    ``fn`` is an async generator function (runs on the event loop) or a generator
    function (runs on a pool thread). Tasks given the stream as an argument read its
    values as they come; the producer stays at most ``buffer`` values ahead of its
    slowest reader. Options from an enclosing ``with dagger.options(...)`` apply
    (``scope`` places the producer), except ``retries``: a stream is never run again,
    since readers may have taken its values.
    """
    producer = _producer_for(fn)
    if isinstance(buffer, bool) or not isinstance(buffer, int):
        raise TypeError(f"spawn_streaming(buffer=...) takes an int >= 1, the values the producer "
                        f"may run ahead of its slowest reader; got {buffer!r}")
    if buffer < 1:
        raise ValueError(f"spawn_streaming(buffer={buffer}): the producer must be allowed at least "
                         "one value ahead of its readers, e.g. buffer=16")
    from .cluster import current_cluster

    hub = current_cluster()._scheduler
    spawn = getattr(getattr(hub, "streams", None), "spawn_stream", None)
    if spawn is None:
        raise RuntimeError("spawn_streaming() inside a task that runs in a worker process is not "
                           "supported: spawn the stream where the cluster runs and pass it to the "
                           "tasks that read it")
    stream: Stream = spawn(current_options(), producer, fn, args, kwargs, buffer)
    collector = spawn_collector_var.get()
    if collector is not None:  # inside a request that aiodagger.web watches
        collector.add(stream)
    return stream


def _producer_for(fn: Any) -> Callable[..., Any]:
    """The task function that runs ``fn``'s generator, or a TypeError that says what to pass."""
    if inspect.isasyncgenfunction(fn):
        return produce_async
    if inspect.isgeneratorfunction(fn):
        return produce_sync
    if inspect.isasyncgen(fn) or inspect.isgenerator(fn):
        name = getattr(fn, "__qualname__", "gen")
        raise TypeError(f"spawn_streaming() got a generator object ({name}(...) was already "
                        f"called). Pass the function and its arguments: "
                        f"dagger.spawn_streaming({name}, *args)")
    what = (f"the coroutine function {fn.__qualname__}" if inspect.iscoroutinefunction(fn)
            else f"{type(fn).__name__} {fn!r}")
    raise TypeError(f"spawn_streaming() needs a generator function (`def` with `yield`) or an "
                    f"async generator function (`async def` with `yield`); got {what}. "
                    "For a task with one result use dagger.spawn()")

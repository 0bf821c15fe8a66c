"""Running one task's body: arguments resolved, ``restore`` consulted, ``checkpoint`` called.

Shared by every processor so that a task means the same thing wherever it runs. Files
among the arguments are read here, where the task runs: on the pool thread for a sync
function, without blocking the loop for a coroutine function.

A ``restore`` or ``checkpoint`` callback that raises is logged as a warning and
counted (``callback_errors()``), never the task's failure: a failed restore means
nothing was saved, so the function runs; a failed checkpoint leaves the value unsaved
but still the task's result. Saving is an optimisation the result must not depend on.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

from .._args import DEPS, find_files, replace_files, resolve_arguments
from ..errors import TaskCancelledError
from ..files import aread_file, read_file
from ..task import DTask
from ..taskoptions import MISSING

__all__ = ["callback_errors", "run_async", "run_sync"]

logger = logging.getLogger(__name__)

_errors_lock = threading.Lock()  # pool threads and the loop both count
_errors = {"checkpoint_errors": 0, "restore_errors": 0}


def callback_errors() -> dict[str, int]:
    """How many ``checkpoint``/``restore`` calls raised in this process so far."""
    with _errors_lock:
        return dict(_errors)


def _callback_failed(task: DTask[Any], which: str, callback: Any, exc: Exception) -> None:
    with _errors_lock:
        _errors[f"{which}_errors"] += 1
    name = getattr(callback, "__qualname__", None) or repr(callback)
    then = ("running the task as if nothing was saved" if which == "restore"
            else "its value stands but was not saved")
    logger.warning("%s: %s callback %s raised %s: %s; %s", task._describe(), which, name,
                   type(exc).__name__, exc, then, exc_info=exc)


def _call_of(task: DTask[Any]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    fn, args, kwargs = task._fn, task._args, task._kwargs
    if fn is None or args is None or kwargs is None:
        # The loop released the task (cancelled) after this thread picked it up.
        raise TaskCancelledError(f"{task._describe()} was cancelled")
    return fn, args, kwargs


def _prepare(task: DTask[Any]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    fn, args, kwargs = _call_of(task)
    resolve = task._resolve
    if resolve:
        if resolve is not True:  # Files among the arguments (_args.FILES): read on this thread
            files = find_files(args, kwargs)
            reader = task._describe()
            args, kwargs = replace_files(args, kwargs, {f: read_file(f, reader) for f in files})
            if not resolve & DEPS:
                return fn, args, kwargs
        args, kwargs = resolve_arguments(args, kwargs, task._inputs)
    return fn, args, kwargs


async def _prepare_async(task: DTask[Any]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    fn, args, kwargs = _call_of(task)
    resolve = task._resolve
    if resolve:
        if resolve is not True:  # Files: read without blocking this loop, all at once
            files = find_files(args, kwargs)
            reader = task._describe()
            read = await asyncio.gather(*[aread_file(f, reader) for f in files],
                                        return_exceptions=True)
            for value in read:
                if isinstance(value, BaseException):
                    raise value
            args, kwargs = replace_files(args, kwargs, dict(zip(files, read, strict=True)))
            if not resolve & DEPS:
                return fn, args, kwargs
        args, kwargs = resolve_arguments(args, kwargs, task._inputs)
    return fn, args, kwargs


# What a processor does to a task's resolved arguments before the call: a GPU
# processor moves host arrays to its device.
Convert = Callable[[tuple[Any, ...], dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any]]]


def _on_host(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Device arrays among a CPU task's arguments, copied to host (asked only once cupy
    was imported in this process: nothing else can hold one)."""
    from ..gpu.streams import host_arguments

    return host_arguments(args, kwargs)


def run_sync(task: DTask[Any], convert: Convert | None = None) -> Any:
    """Run a task on the calling (pool) thread and return its value."""
    fn, args, kwargs = _prepare(task)
    if convert is not None:
        args, kwargs = convert(args, kwargs)
    elif "cupy" in sys.modules:
        args, kwargs = _on_host(args, kwargs)
    opts = task._opts
    if opts.restore is not None:
        try:
            saved = _settled(opts.restore(task))
        except Exception as exc:  # noqa: BLE001
            _callback_failed(task, "restore", opts.restore, exc)
            saved = MISSING
        if saved is not MISSING:
            return saved
    value = fn(*args, **kwargs)
    if task._kind == "thread-async":
        # scope(thread=True) on a coroutine function: the caller asked for a thread.
        value = asyncio.run(value)
    if opts.checkpoint is not None:
        try:
            _settled(opts.checkpoint(task, value))
        except Exception as exc:  # noqa: BLE001
            _callback_failed(task, "checkpoint", opts.checkpoint, exc)
    return value


def _settled(result: Any) -> Any:
    """An ``async def`` restore or checkpoint given to a task that runs on a thread is
    awaited there, on a loop of its own (it was left a coroutine: never run, its
    checkpoint never saved)."""
    if inspect.isawaitable(result):
        return asyncio.run(_awaited(result))
    return result


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


async def run_async(task: DTask[Any], convert: Convert | None = None) -> Any:
    """Run a coroutine-function task on the running loop and return its value."""
    fn, args, kwargs = await _prepare_async(task)
    if convert is not None:
        args, kwargs = convert(args, kwargs)
    elif "cupy" in sys.modules:
        args, kwargs = _on_host(args, kwargs)
    opts = task._opts
    if opts.restore is not None:
        try:
            saved = opts.restore(task)
            if inspect.isawaitable(saved):
                saved = await saved
        except Exception as exc:  # noqa: BLE001
            _callback_failed(task, "restore", opts.restore, exc)
            saved = MISSING
        if saved is not MISSING:
            return saved
    value = await fn(*args, **kwargs)
    if opts.checkpoint is not None:
        try:
            done = opts.checkpoint(task, value)
            if inspect.isawaitable(done):
                await done
        except Exception as exc:  # noqa: BLE001
            _callback_failed(task, "checkpoint", opts.checkpoint, exc)
    return value

"""Running one task's body: arguments resolved, ``restore`` consulted, ``checkpoint`` called.

Shared by every processor so that a task means the same thing wherever it runs.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

from .._args import resolve_arguments
from ..errors import TaskCancelledError
from ..options import MISSING
from ..task import DTask

__all__ = ["run_async", "run_sync"]


def _prepare(task: DTask[Any]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    fn, args, kwargs = task._fn, task._args, task._kwargs
    if fn is None or args is None or kwargs is None:
        # The loop released the task (cancelled) after this thread picked it up.
        raise TaskCancelledError(f"{task._describe()} was cancelled")
    if task._resolve:
        args, kwargs = resolve_arguments(args, kwargs, task._inputs)
    return fn, args, kwargs


def run_sync(task: DTask[Any]) -> Any:
    """Run a task on the calling (pool) thread and return its value."""
    fn, args, kwargs = _prepare(task)
    opts = task._opts
    if opts.restore is not None:
        saved = opts.restore(task)
        if saved is not MISSING:
            return saved
    value = fn(*args, **kwargs)
    if task._kind == "thread-async":
        # scope(thread=True) on a coroutine function: the caller asked for a thread.
        value = asyncio.run(value)
    if opts.checkpoint is not None:
        opts.checkpoint(task, value)
    return value


async def run_async(task: DTask[Any]) -> Any:
    """Run a coroutine-function task on the running loop and return its value."""
    fn, args, kwargs = _prepare(task)
    opts = task._opts
    if opts.restore is not None:
        saved = opts.restore(task)
        if inspect.isawaitable(saved):
            saved = await saved
        if saved is not MISSING:
            return saved
    value = await fn(*args, **kwargs)
    if opts.checkpoint is not None:
        done = opts.checkpoint(task, value)
        if inspect.isawaitable(done):
            await done
    return value

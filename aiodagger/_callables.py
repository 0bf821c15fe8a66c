"""What ``spawn`` takes as its function: the checks that teach, and how it will run.

:func:`spawn_callable_error` catches the usual mistakes (``spawn(f(x))``, a coroutine
object, an awaitable) with the call to write instead; :func:`classify` says whether a
callable runs on the event loop ("async") or on a thread pool ("thread").
"""

from __future__ import annotations

import types
from typing import Any

__all__ = ["classify", "spawn_callable_error"]

_CO_COROUTINE = 0x80
_CO_ASYNC_GENERATOR = 0x200


def classify(fn: Any) -> str:
    """"async" for coroutine functions, "thread" for everything else callable."""
    code = fn.__code__ if type(fn) is types.FunctionType else getattr(fn, "__code__", None)
    if code is not None and not isinstance(fn, type):
        flags = code.co_flags
        if flags & _CO_COROUTINE:
            return "async"
        if flags & _CO_ASYNC_GENERATOR:
            raise TypeError(
                f"spawn() got the async generator function {fn.__qualname__}; a task returns "
                "one value. Collect it inside an async def, e.g. "
                "`async def collect(): return [v async for v in gen()]`"
            )
        return "thread"
    import inspect

    target = fn
    while hasattr(target, "func"):  # functools.partial
        target = target.func
    if inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
        getattr(type(target), "__call__", None)  # noqa: B004 - an async __call__ method
    ):
        return "async"
    return "thread"


_PLAIN_CALLABLES = frozenset((types.FunctionType, types.BuiltinFunctionType, types.MethodType))


def spawn_callable_error(fn: Any) -> TypeError | None:
    """The error for something that is not a function to spawn, or None if it is fine."""
    if type(fn) in _PLAIN_CALLABLES:
        return None
    import inspect

    if inspect.iscoroutine(fn):
        qual = getattr(fn, "__qualname__", "f")
        fn.close()  # we will never run it: close it so Python does not warn it was never awaited
        return TypeError(
            f"spawn() got a coroutine object ({qual}(...) was already called). Pass the "
            f"function and its arguments instead: dagger.spawn({qual}, *args)"
        )
    if inspect.isawaitable(fn):
        return TypeError(
            f"spawn() got an awaitable ({type(fn).__name__}), not a function. Await it "
            "directly, or wrap it: `async def run(): return await thing` then dagger.spawn(run)"
        )
    if not callable(fn):
        return TypeError(
            f"spawn() needs a callable as its first argument, got {type(fn).__name__}: {fn!r}. "
            "Write dagger.spawn(fn, *args), not dagger.spawn(fn(*args)); to place a value in "
            "the cluster, use `await dagger.put(value)`"
        )
    return None

"""Progress over a set of tasks: a tqdm bar to await, or the tasks as they finish.

    await dagger.progress(tasks)                 # a bar until every task is done
    async for t in dagger.progress(tasks):       # each DTask as it finishes
        ...

Completions arrive through each task's exactly-once waiter, delivered on the caller's
loop: nothing polls, and the scheduler does no extra work for a bar. ``tqdm.auto``
draws a widget in notebooks (with ipywidgets) and text in terminals. tqdm is optional
(``pip install 'aiodagger[progress]'``): without it the tasks are still awaited and
iterated, with no bar, and a warning says so once.
"""

from __future__ import annotations

import asyncio
import warnings
from collections import deque
from collections.abc import AsyncIterator, Generator, Iterable
from typing import Any

from ._asynclib import caller_loop
from .task import FINISHED, DTask

__all__ = ["progress"]

_warned_no_tqdm = False


def _make_bar(total: int, desc: str | None) -> Any:
    """A tqdm.auto bar, or None (warning once per process) when tqdm is missing."""
    global _warned_no_tqdm
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if not _warned_no_tqdm:
            _warned_no_tqdm = True
            warnings.warn(
                "dagger.progress(): tqdm is not installed, so no bar is shown (the tasks are "
                "still awaited). Install it with: pip install 'aiodagger[progress]'",
                RuntimeWarning, stacklevel=4,
            )
        return None
    return tqdm(total=total, desc=desc, unit="task", dynamic_ncols=True)


class progress:  # noqa: N801 - used like a function: `await dagger.progress(ts)`
    """Show progress over ``tasks``: ``await`` it for a bar, or ``async for`` each task.

    ``await dagger.progress(tasks)`` returns the tasks, in the order given, once all
    are done, whatever their outcome (like ``dagger.wait``, it raises nothing and moves
    no data). ``async for t in dagger.progress(tasks)`` yields each DTask as it
    finishes; with ``bar=False`` it draws nothing, which suits a web handler that
    streams progress to its client. An iteration left early closes its bar when the
    object is garbage-collected, or at once with ``await p.aclose()``.

    Cancelling the awaiting coroutine never cancels the tasks.
    """

    def __init__(self, tasks: Iterable[DTask[Any]], *, desc: str | None = None,
                 bar: bool = True) -> None:
        items = list(tasks)
        for t in items:
            if not isinstance(t, DTask):
                raise TypeError(
                    f"progress() takes DTasks (from dagger.spawn), got {type(t).__name__}: {t!r}"
                )
        self._tasks = items
        self._desc = desc
        self._want_bar = bar
        self._bar: Any = None
        self._unique = list(dict.fromkeys(items))
        self._left = len(self._unique)
        self._finished: deque[DTask[Any]] = deque()
        self._failed = 0
        self._wakeup: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def __repr__(self) -> str:
        done = len(self._unique) - self._left + len(self._finished) if self._loop else 0
        return f"<dagger.progress {self._desc or ''} {done}/{len(self._unique)} seen>"

    # -- the waiters ---------------------------------------------------------------------
    def _start(self) -> asyncio.AbstractEventLoop:
        loop = self._loop = caller_loop()
        if self._want_bar:
            self._bar = _make_bar(len(self._unique), self._desc)
        for t in self._unique:
            t._on_done_in(loop, self._arrived)
        return loop

    def _arrived(self, t: DTask[Any]) -> None:
        # On the caller's loop, once per task (the waiter mechanism guarantees once).
        self._finished.append(t)
        bar = self._bar
        if bar is not None and not self._closed:
            if t._cancelled or t._state is not FINISHED:
                self._failed += 1
                bar.set_postfix(failed=self._failed, refresh=False)
            bar.update(1)
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    # -- iteration -----------------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[DTask[Any]]:
        return self

    async def __anext__(self) -> DTask[Any]:
        loop = self._loop or self._start()
        if caller_loop() is not loop:
            raise RuntimeError(
                "this dagger.progress() object was started on another event loop; "
                "make a new one here (tasks themselves can be awaited from any loop)"
            )
        if self._left == 0 or self._closed:
            self._close_bar()
            raise StopAsyncIteration
        while not self._finished:
            self._wakeup = loop.create_future()
            try:
                await self._wakeup
            finally:
                self._wakeup = None
        self._left -= 1
        return self._finished.popleft()

    async def aclose(self) -> None:
        """Stop iterating and close the bar (``contextlib.aclosing`` calls this)."""
        self._closed = True
        self._close_bar()

    def _close_bar(self) -> None:
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()

    # -- awaiting ------------------------------------------------------------------------
    def __await__(self) -> Generator[Any, None, list[DTask[Any]]]:
        return self._run().__await__()

    async def _run(self) -> list[DTask[Any]]:
        try:
            async for _ in self:
                pass
        finally:
            self._close_bar()
        return self._tasks

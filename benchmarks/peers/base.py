"""What every peer provides, and the helpers peers share."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from benchmarks.workloads import Workload

T = TypeVar("T")

WorkloadRun = Callable[[Workload], Awaitable[Any]]


class Unavailable(Exception):
    """The peer cannot run at all in this environment; the message becomes the row's note."""


@dataclass
class Timed:
    """A run that timed itself: what a workload method returns when the runner's
    clock, around the whole call, would measure the wrong thing (W5 times only the
    transfer, not the array's creation; W0 times a child process up to its first
    result, not its shutdown).

    ``stages`` optionally splits ``seconds`` into named parts, reported as medians
    in the row's note.
    """

    value: Any
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)


class Peer:
    """One system under comparison.

    A peer is started once per *setup* (see ``benchmarks.workloads``) and runs every
    selected workload of that setup before it is stopped, so start-up cost (a Ray
    cluster, a Dask scheduler, worker processes) stays out of the figures. A
    workload is a coroutine method named after the workload's key in lower case, a
    hyphen as an underscore (``w1``, ``w6_0``...), that runs it once and returns the
    result (or a :class:`Timed`), which the runner checks outside the timed region.
    ``not_applicable`` says why a peer has no method for a workload; a workload with
    neither gets no row.
    """

    name: ClassVar[str]
    not_applicable: ClassVar[dict[str, str]] = {}
    # How the peer runs a workload, where the row should say it (an unpinned run, a
    # different mechanism): printed in the row's note.
    notes: ClassVar[dict[str, str]] = {}

    def setup_of(self, workload: Workload) -> str:
        """The setup to start in for ``workload``. Workloads whose setups map to the
        same value share one start: Ray, always multi-process, serves the local and
        the processes workloads from one ``ray.init``. "processes-tcp" is "processes"
        for every system but aiodagger, which turns its shared memory off there."""
        return "processes" if workload.setup == "processes-tcp" else workload.setup

    async def start(self, setup: str) -> None:
        """Import the system and bring it up for ``setup``; raise Unavailable if it cannot be."""

    async def stop(self) -> None:
        """Shut the system down; must be safe to call after a failed start."""

    def runner(self, workload: Workload) -> WorkloadRun | str | None:
        """The bound method that runs ``workload``, the reason it does not apply, or
        None when the peer has nothing to say about it (no row)."""
        method = getattr(self, method_name(workload.key), None)
        if method is None:
            return self.not_applicable.get(workload.key)
        return method


def method_name(key: str) -> str:
    """The peer method that runs workload ``key``: ``W6L`` -> ``w6l``, ``W6-0`` -> ``w6_0``."""
    return key.lower().replace("-", "_")


def require(module: str, *, label: str | None = None) -> Any:
    """Import ``module`` lazily, turning a missing package into Unavailable('not installed')."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        # Only the package itself being absent means 'not installed'; a missing
        # dependency of an installed package is a broken install worth showing.
        if exc.name is not None and exc.name.split(".")[0] == module.split(".")[0]:
            raise Unavailable("not installed") from exc
        raise Unavailable(f"import failed ({type(exc).__name__}: {exc})") from exc
    except ImportError as exc:
        raise Unavailable(f"import failed ({type(exc).__name__}: {exc})") from exc


async def run_blocking(fn: Callable[[], T], timeout: float) -> T:
    """Run a blocking call in a daemon thread and await it with a timeout.

    ``asyncio.to_thread`` is not used because a call that never returns would
    keep the default executor, and so interpreter exit, waiting forever; a
    daemon thread is simply abandoned when the timeout fires.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if future.done():  # the awaiting side timed out and moved on
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def target() -> None:
        try:
            outcome: tuple[bool, Any] = (True, fn())
        except BaseException as exc:  # handed to the awaiting side, re-raised there
            outcome = (False, exc)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop is closed: the run gave up on this call long ago
            pass

    threading.Thread(target=target, name=f"bench-blocking-{fn!r:.40}", daemon=True).start()
    async with asyncio.timeout(timeout):
        return await future

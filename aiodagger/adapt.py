"""``cluster.adapt(minimum=, maximum=)``: as many workers as the work in flight needs.

Any cluster that can start and retire workers adapts by offering what :class:`Scalable`
lists: ``dagger.Cluster`` its subprocess workers, ``aiodagger.deploy.SlurmCluster`` its
batch jobs. Every ``interval`` the adaptive loop asks for one worker per ``threads`` tasks in
flight (spawned and not done), within ``[minimum, maximum]``: more at once, fewer only
after ``wait_count`` intervals in a row have asked for fewer, so that a graph's gap
between two waves of tasks does not cost a worker's start (a batch job's queue wait,
with Slurm). Retiring takes idle workers only, which hand the results only they hold
to the others first.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Protocol

__all__ = ["Adaptive", "Scalable"]

logger = logging.getLogger(__name__)

# Seconds between tries after a step failed (sbatch refused, say), doubling up to this.
MAX_BACKOFF = 60.0


class Scalable(Protocol):
    """What an adaptive cluster offers its :class:`Adaptive` (on the cluster's loop)."""

    @property
    def tasks_in_flight(self) -> int: ...

    @property
    def requested_workers(self) -> int:
        """Workers running or on their way (a job still queued counts)."""
        ...

    @property
    def threads_per_worker(self) -> int: ...

    async def refresh(self) -> None:
        """Bring ``requested_workers`` up to date (workers that left, jobs that ended)."""
        ...

    async def adapt_to(self, n: int) -> None:
        """Ask for ``n`` workers: start more without waiting for them, or retire idle ones."""
        ...


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"adapt({what}=...) takes a number of workers >= 0, got {value!r}")
    return value


class Adaptive:
    """The running adaptation of one cluster; ``stop()`` ends it (any thread)."""

    def __init__(self, cluster: Scalable, loop: asyncio.AbstractEventLoop, *, minimum: int,
                 maximum: int, interval: float, wait_count: int) -> None:
        self.minimum = _count(minimum, "minimum")
        self.maximum = _count(maximum, "maximum")
        if self.maximum < self.minimum:
            raise ValueError(f"adapt(minimum={minimum}, maximum={maximum}): the maximum is below the minimum")
        if not interval > 0:
            raise ValueError(f"adapt(interval=...) takes seconds > 0, got {interval!r}")
        if isinstance(wait_count, bool) or not isinstance(wait_count, int) or wait_count < 1:
            raise ValueError(f"adapt(wait_count=...) takes a number of intervals >= 1, got {wait_count!r}")
        self.interval = interval
        self.wait_count = wait_count
        self._cluster = cluster
        self._loop = loop
        self._below = 0  # intervals in a row that asked for fewer workers
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Adaptive {state} minimum={self.minimum} maximum={self.maximum} interval={self.interval:g}>"

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def stopped(self) -> bool:
        """Told to stop (the step under way may still be finishing)."""
        return self._stopping.is_set()

    def start(self, on_done: Callable[[], None] | None = None) -> None:
        """Start adapting, on the cluster's loop (from elsewhere: ``call_soon_threadsafe``);
        ``on_done`` runs there once it has stopped."""
        self._task = self._loop.create_task(self._run())
        if on_done is not None:
            self._task.add_done_callback(lambda _task: on_done())

    def stop(self) -> None:
        """Stop adapting, after the step under way if any; the workers stay as they are."""
        if _on_loop(self._loop):
            self._stopping.set()
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stopping.set)

    async def wait_stopped(self, timeout: float) -> None:
        """Stop, and wait for the step under way, at most ``timeout`` seconds before
        cancelling it (on the cluster's loop)."""
        self._stopping.set()
        task = self._task
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def recommendation(self) -> int:
        """The workers the work in flight needs now, within [minimum, maximum]."""
        per_worker = max(1, self._cluster.threads_per_worker)
        wanted = math.ceil(self._cluster.tasks_in_flight / per_worker)
        return min(self.maximum, max(self.minimum, wanted))

    async def step(self) -> None:
        """One look at the work in flight, and what it takes."""
        await self._cluster.refresh()
        target = self.recommendation()
        requested = self._cluster.requested_workers
        if target > requested:
            self._below = 0
            logger.info("adapt: %d task(s) in flight; asking for %d worker(s), up from %d",
                        self._cluster.tasks_in_flight, target, requested)
            await self._cluster.adapt_to(target)
        elif target < requested:
            self._below += 1
            if self._below >= self.wait_count:
                self._below = 0
                logger.info("adapt: %d task(s) in flight; retiring idle workers down to %d",
                            self._cluster.tasks_in_flight, target)
                await self._cluster.adapt_to(target)
        else:
            self._below = 0

    async def _run(self) -> None:
        delay = self.interval
        while not self._stopping.is_set():
            try:
                await self.step()
                delay = self.interval
            except Exception as exc:  # noqa: BLE001 - tried again later; the cluster goes on
                delay = min(MAX_BACKOFF, max(delay * 2, self.interval))
                logger.warning("adapt: %s; trying again in %.0f s", exc, delay)
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
            except TimeoutError:
                pass


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False

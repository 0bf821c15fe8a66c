"""Memory against a limit: the spill and pause thresholds, and the gates they open.

Memory is the chunks in RAM (counted by the store) plus *unmanaged* memory: whatever
else the process's RSS shows at the last sample (interpreter, libraries, a running
task's temporaries, freed memory the allocator kept). Both count against the limit.
"""

from __future__ import annotations

import asyncio
import logging

from . import process

__all__ = ["Pressure"]

logger = logging.getLogger(__name__)


class Pressure:
    """Thresholds over one worker's memory, and two gates: one for new work, one for
    reading chunks back. The store calls :meth:`update` after every change."""

    def __init__(self, limit: int | None, spill_fraction: float, pause_fraction: float,
                 worker_name: str) -> None:
        if not 0 < spill_fraction <= pause_fraction <= 1:
            raise ValueError(f"need 0 < spill_fraction <= pause_fraction <= 1, got spill_fraction="
                             f"{spill_fraction!r}, pause_fraction={pause_fraction!r} (defaults: 0.6, 0.8)")
        self.limit = limit
        self.spill_at = None if limit is None else int(limit * spill_fraction)
        self.pause_at = None if limit is None else int(limit * pause_fraction)
        self.worker_name = worker_name
        self.rss: int | None = None  # None until sampled
        self.peak_rss = 0
        self.unmanaged = 0
        self.paused = False  # over the pause threshold, room being made: new work waits
        self.overrun = False  # over it with no way to make room: new work goes on
        self._warned = False
        self.admitted = asyncio.Event()  # set while new work may start
        self.admitted.set()
        self.loads_go = asyncio.Event()  # set while a spilled chunk may be read back
        self.loads_go.set()

    def sample(self, used: int) -> None:
        """Read the process's RSS; what the chunks (``used``) do not explain is unmanaged."""
        rss = process.rss()
        self.rss = rss
        self.peak_rss = max(self.peak_rss, rss)
        self.unmanaged = max(0, rss - used)

    def stop_sampling(self) -> None:
        self.rss, self.unmanaged = None, 0

    def excess(self, used: int) -> int:
        """Bytes above the spill threshold (0 or less: nothing to spill)."""
        if self.spill_at is None:
            return 0
        return used + self.unmanaged - self.spill_at

    def update(self, used: int, spilling: bool, pinned: bool,
               disabled_by: BaseException | None) -> None:
        """Recompute paused/overrun and the gates; O(1).

        ``spilling``: the store can make room by itself (chunks to evict, or a write in
        flight). ``pinned``: chunks in use will become evictable once released.
        ``disabled_by``: the error that stopped spilling, if one did.
        """
        if self.pause_at is None:
            return
        memory = used + self.unmanaged
        over = memory > self.pause_at
        self.paused = over and (spilling or pinned)
        self.overrun = over and not self.paused
        if self.overrun and not self._warned:
            self._warned = True
            why = (f"spilling is disabled after {disabled_by!r}" if disabled_by is not None
                   else "nothing left in memory can be spilled")
            logger.warning("worker %s: memory %d MiB is above the pause threshold (%d of %d MiB) "
                           "and cannot be brought down (%s); running tasks anyway",
                           self.worker_name, memory >> 20, self.pause_at >> 20,
                           (self.limit or 0) >> 20, why)
        _set(self.admitted, not self.paused)
        # Reading back waits only while the store makes room on its own: a load that
        # waited for a pinned chunk to be released could wait for the task that needs it.
        _set(self.loads_go, not (over and spilling))

    def open_gates(self) -> None:
        """Let every waiter go (the store is closing)."""
        self.admitted.set()
        self.loads_go.set()

    async def wait_admitted(self) -> None:
        while not self.admitted.is_set():
            await self.admitted.wait()

    async def wait_load(self) -> None:
        # Re-checked after each wake-up: the first load to go counts its bytes at once,
        # which may close the gate again for the others.
        while not self.loads_go.is_set():
            await self.loads_go.wait()


def _set(event: asyncio.Event, value: bool) -> None:
    if value:
        event.set()
    else:
        event.clear()

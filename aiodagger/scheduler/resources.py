"""Resources and occupancy: what runs of tasks hold on their worker (on the loop).

Each worker declares amounts of named resources (``Cluster(resources={"db": 4})``,
``aiodagger worker --resources db=4``), and has ``threads`` of the implicit resource
``occupancy``. A task with ``options(resources={"db": 1})`` runs only on a worker that
declares enough of each, and holds its amounts while it runs: at most four such tasks at
once on that worker. A task with ``options(occupancy=0.25)`` holds a quarter of a
thread: a worker with 2 threads runs 8 of them at once (each on a thread of its own,
since they mostly wait). Tasks with neither never come here.

A ready task that fits no worker's free amounts now is parked, off the ready heap (it
would block the tasks behind it), and goes back to it when a run ends or a worker
joins. Parked tasks keep their order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..taskoptions import OCCUPANCY

if TYPE_CHECKING:
    from ..task import DTask

__all__ = ["ResourceBook"]

# Amounts are floats: a sum of quarters taken and given back may be off by this much.
_EPS = 1e-9


class ResourceBook:
    """Declared and free amounts per worker; what each run holds; parked tasks."""

    def __init__(self) -> None:
        self.capacity: dict[int, dict[str, float]] = {}
        self.free: dict[int, dict[str, float]] = {}
        # (task id, attempt) -> (worker, needs): a timed-out attempt may still run when
        # the next one starts, and each gives back its own.
        self.held: dict[tuple[int, int], tuple[int, dict[str, float]]] = {}
        self.parked: list[DTask[Any]] = []

    def add_worker(self, wid: int, resources: dict[str, float], threads: int) -> None:
        capacity = {**resources, OCCUPANCY: float(threads)}
        self.capacity[wid] = capacity
        self.free[wid] = dict(capacity)

    def remove_worker(self, wid: int) -> None:
        self.capacity.pop(wid, None)
        self.free.pop(wid, None)

    def declared(self, needs: dict[str, float]) -> list[int]:
        """The workers that declare at least ``needs`` (free or not)."""
        return [wid for wid, cap in self.capacity.items() if _covers(cap, needs)]

    def fits(self, wid: int, needs: dict[str, float]) -> bool:
        free = self.free.get(wid)
        return free is not None and _covers(free, needs)

    def take(self, task: DTask[Any], wid: int, needs: dict[str, float]) -> None:
        free = self.free[wid]
        for name, amount in needs.items():
            free[name] -= amount
        self.held[(task.id, task._attempts)] = (wid, needs)

    def give_back(self, task: DTask[Any], attempt: int) -> bool:
        """A run of ``task`` ended: its amounts are free again. False if it held none."""
        entry = self.held.pop((task.id, attempt), None)
        if entry is None:
            return False
        wid, needs = entry
        free = self.free.get(wid)
        if free is not None:  # else its worker is gone, and its amounts with it
            for name, amount in needs.items():
                free[name] += amount
        return True

    def describe(self) -> str:
        return "; ".join(f"worker {wid}: " + ", ".join(f"{k}={v:g}" for k, v in sorted(cap.items()))
                         for wid, cap in sorted(self.capacity.items())) or "no worker"


def _covers(have: dict[str, float], needs: dict[str, float]) -> bool:
    for name, amount in needs.items():
        if have.get(name, 0.0) + _EPS < amount:
            return False
    return True

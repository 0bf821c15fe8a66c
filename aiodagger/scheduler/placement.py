"""Where a task runs: the cost model, as a few small pure functions.

This is Dagger.jl's model: among the processors a task's scope admits, pick the one
with the lowest estimated finish time, where

    finish = queue wait on that processor
           + estimated run time of the task's function (learned, exponentially weighted)
           + bytes of inputs not already on that processor's worker / measured bandwidth

Nothing here touches scheduler state, so tests call it directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Candidate", "RuntimeEstimates", "choose_processor", "estimated_finish"]

# Until a function has run once, assume it takes this long. Big enough that an
# unknown function is not piled onto one thread; small enough that the first batch
# is not starved. Measured run times replace it after the first completion.
DEFAULT_RUNTIME_S = 1e-3

# Default bandwidth between workers until one is measured (bytes/s): loopback TCP here.
DEFAULT_BANDWIDTH = 1e9


@dataclass(frozen=True, slots=True)
class Candidate:
    """A processor the task may run on, as the cost model sees it."""

    worker: int
    backlog_s: float  # estimated seconds of work already queued on this processor


def estimated_finish(backlog_s: float, runtime_s: float, missing_bytes: int, bandwidth: float) -> float:
    """Seconds until a task would finish on a processor."""
    transfer = missing_bytes / bandwidth if missing_bytes else 0.0
    return backlog_s + runtime_s + transfer


def choose_processor(
    candidates: Sequence[Candidate],
    runtime_s: float,
    input_bytes: Mapping[int, int] | None = None,
    bandwidth: float = DEFAULT_BANDWIDTH,
) -> int:
    """Index of the candidate with the lowest estimated finish time.

    ``input_bytes`` maps worker id -> bytes of this task's inputs held there; inputs
    held elsewhere must be moved at ``bandwidth``. Ties go to the earlier candidate, so
    callers list the local worker first.
    """
    if not candidates:
        raise ValueError("choose_processor() needs at least one candidate")
    total = sum(input_bytes.values()) if input_bytes else 0
    best, best_cost = 0, float("inf")
    for i, cand in enumerate(candidates):
        here = input_bytes.get(cand.worker, 0) if input_bytes else 0
        cost = estimated_finish(cand.backlog_s, runtime_s, total - here, bandwidth)
        if cost < best_cost:
            best, best_cost = i, cost
    return best


class RuntimeEstimates:
    """Exponentially weighted run time per function, keyed by its code object.

    Keyed by code rather than function object so that closures and lambdas made per
    call share one estimate and the table stays bounded.
    """

    __slots__ = ("_alpha", "_table")

    _MAX_ENTRIES = 4096

    def __init__(self, alpha: float = 0.3) -> None:
        self._alpha = alpha
        self._table: dict[Any, float] = {}

    def get(self, key: Any) -> float:
        return self._table.get(key, DEFAULT_RUNTIME_S)

    def observe(self, key: Any, seconds: float) -> None:
        table = self._table
        old = table.get(key)
        if old is None:
            if len(table) >= self._MAX_ENTRIES:
                table.clear()
            table[key] = seconds
        else:
            table[key] = old + self._alpha * (seconds - old)


def function_key(fn: Any) -> Any:
    """The key under which a function's run times are learned."""
    code = getattr(fn, "__code__", None)
    if code is not None:
        return code
    inner = getattr(fn, "func", None)  # functools.partial
    if inner is not None:
        return function_key(inner)
    return type(fn)

"""The messages the page receives: a full ``hello`` when it connects (or falls behind),
then an ``update`` a few times a second with what changed.

Each update is built once and sent to every page, and its size is bounded whatever the
cluster does: at most ``RUNS_PER_UPDATE`` runs (the newest; the count of the others is
sent instead), the busiest ``FUNCTION_ROWS`` functions, the graph of the last
``GRAPH_KEEP`` tasks only when it changed and at most twice a second. Runs and errors
carry a sequence number, so a page that got some of them in its hello skips them again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any

from .state import DashboardState

if TYPE_CHECKING:
    from ..worker.local import WorkerInfo

__all__ = ["Feed"]

RUNS_PER_UPDATE = 500
RUNS_IN_HELLO = 1500
FUNCTION_ROWS = 60
GRAPH_EVERY = 0.5  # seconds between two graphs sent


class Feed:
    def __init__(self, state: DashboardState, workers: Callable[[], list[WorkerInfo]],
                 in_flight: Callable[[], int]) -> None:
        self.state = state
        self._workers = workers
        self._in_flight = in_flight
        self._run_seq = 0
        self._error_seq = 0
        self._graph_version = -1
        self._graph_sent = 0.0

    def hello(self) -> dict[str, Any]:
        """Everything the page shows, from scratch (moves no cursor)."""
        state = self.state
        runs, dropped = state.runs_since(max(0, state.stream_seq - RUNS_IN_HELLO), RUNS_IN_HELLO)
        return {"type": "hello", **self._common(), "runs": runs, "runs_dropped": dropped,
                "run_seq": state.stream_seq, "graph": state.graph_nodes(),
                "errors": state.errors_since(0)}

    def update(self) -> dict[str, Any]:
        """What changed since the previous update."""
        state = self.state
        runs, dropped = state.runs_since(self._run_seq, RUNS_PER_UPDATE)
        self._run_seq = state.stream_seq
        message = {"type": "update", **self._common(), "runs": runs, "runs_dropped": dropped,
                   "run_seq": state.stream_seq}
        if state.errors_seq != self._error_seq:
            message["errors"] = state.errors_since(self._error_seq)
            self._error_seq = state.errors_seq
        now = perf_counter()
        if state.graph_version != self._graph_version and now - self._graph_sent >= GRAPH_EVERY:
            message["graph"] = state.graph_nodes()
            self._graph_version = state.graph_version
            self._graph_sent = now
        return message

    def skip(self) -> None:
        """Move the cursors to now without building anything (no page is open)."""
        self._run_seq = self.state.stream_seq
        self._error_seq = self.state.errors_seq
        self._graph_version = -1  # the next page's first update carries the graph

    def _common(self) -> dict[str, Any]:
        state = self.state
        workers = [dataclasses.asdict(w) for w in self._workers()]
        return {
            "now": state.rel(perf_counter()),
            "workers": workers,
            "functions": state.function_rows(FUNCTION_ROWS),
            "totals": {
                "spawned": state.spawned, **state.done, "retried": state.retried,
                "upstream_failed": state.upstream_failed, "in_flight": self._in_flight(),
                "bytes_moved": state.bytes_moved, "spilled": sum(w["spilled_bytes"] for w in workers),
                "workers": len(workers), "running_known": state.dispatch_seen,
            },
            "lag": state.lag.summary(),
        }

"""``/metrics``: the dashboard's state in Prometheus' text format, through prometheus-client.

A collector reads the counters when scraped, so the scheduler's events never touch
prometheus-client (whose metric objects take a lock per update). Each cluster has a
registry of its own: two clusters in one process never mix their figures, and the
process-wide default registry is left to the application.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .state import DashboardState, Histogram

if TYPE_CHECKING:
    from ..worker.local import WorkerInfo

__all__ = ["CONTENT_TYPE", "make_registry", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ClusterCollector(Collector):
    """Yields every metric from ``state`` and the workers' latest snapshot."""

    def __init__(self, state: DashboardState, workers: Callable[[], list[WorkerInfo]],
                 in_flight: Callable[[], int]) -> None:
        self.state = state
        self.workers = workers
        self.in_flight = in_flight

    def collect(self) -> Iterator[Metric]:
        state = self.state
        spawned = CounterMetricFamily("aiodagger_tasks_spawned", "Tasks spawned on this cluster.")
        spawned.add_metric([], state.spawned)
        yield spawned
        done = CounterMetricFamily("aiodagger_tasks_done", "Tasks that reached a final state, by state.",
                                   labels=["state"])
        for name, count in state.done.items():
            done.add_metric([name], count)
        yield done
        retried = CounterMetricFamily("aiodagger_tasks_retried", "Runs that ended without a result "
                                      "and were run again (worker lost, input lost).")
        retried.add_metric([], state.retried)
        yield retried
        yield GaugeMetricFamily("aiodagger_tasks_in_flight", "Tasks spawned and not yet done.",
                                value=self.in_flight())
        yield _histogram("aiodagger_task_duration_seconds", "Run time of each task run.",
                         state.durations)
        moved = CounterMetricFamily("aiodagger_bytes_moved", "Bytes of values moved between workers.")
        moved.add_metric([], state.bytes_moved)
        yield moved
        stored = CounterMetricFamily("aiodagger_store_bytes", "Bytes the workers' stores wrote to "
                                     "disk (spilled), read back (loaded) or served from disk (sent).",
                                     labels=["how"])
        for how, nbytes in state.stored.items():
            stored.add_metric([how], nbytes)
        yield stored
        yield from self._workers()
        yield _histogram("aiodagger_event_loop_lag_seconds", "How late the scheduler's loop ran "
                         "a timer due every 100 ms.", state.lag.histogram)

    def _workers(self) -> Iterator[Metric]:
        workers = self.workers()
        yield GaugeMetricFamily("aiodagger_workers", "Workers in the cluster (worker 0 included).",
                                value=len(workers))
        used = GaugeMetricFamily("aiodagger_worker_memory_used_bytes",
                                 "Bytes of results a worker's store holds.", labels=["worker"])
        limit = GaugeMetricFamily("aiodagger_worker_memory_limit_bytes",
                                  "A worker's memory limit (absent: none).", labels=["worker"])
        spilled = GaugeMetricFamily("aiodagger_worker_spilled_bytes",
                                    "Bytes a worker has written to spill files since it started.", labels=["worker"])
        running = GaugeMetricFamily("aiodagger_worker_tasks_running",
                                    "Tasks running or queued on a worker's processors.",
                                    labels=["worker"])
        for w in workers:
            label = [str(w.id)]
            used.add_metric(label, w.memory_used)
            if w.memory_limit is not None:
                limit.add_metric(label, w.memory_limit)
            spilled.add_metric(label, w.spilled_bytes)
            running.add_metric(label, w.tasks_running)
        yield from (used, limit, spilled, running)


def _histogram(name: str, documentation: str, hist: Histogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation)
    family.add_metric([], hist.cumulative(), sum_value=hist.sum)
    return family


def make_registry(state: DashboardState, workers: Callable[[], list[Any]],
                  in_flight: Callable[[], int]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(state, workers, in_flight))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)

"""Chrome Trace Event JSON, for ui.perfetto.dev and chrome://tracing.

Layout: one trace *process* per worker (trace pid = worker id + 1: Perfetto keeps pid 0
for the kernel's idle process), one trace *thread* per thread the worker ran tasks on
(a pool thread, "event loop" for its coroutines, split into rows where runs overlap:
see ``Logs.lanes``), plus a "data in" lane (values that came to the worker from
another, each a slice from request to arrival) and a "store" lane (chunks spilled,
loaded back, sent from disk). Each run is a complete event (``ph: "X"``, microseconds
from the moment logging began); each dependency edge is a flow (``ph: "s"`` on the
dependency's last run, ``ph: "f"`` on the dependent's first run), drawn as an arrow, and
so is each data move (from the run that made the value to its arrival). Flow events
carry the ``ts``, ``pid``, ``tid`` and ``cat`` of the slice they belong to, which is how
both Perfetto and Chrome's viewer bind a flow to its slice. Memory samples are counters
("memory": bytes used and spilled) on each worker's track.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .records import Lane, Logs, Ran

__all__ = ["chrome_trace", "write_json"]

CATEGORY = "task"


def chrome_trace(logs: Logs) -> dict[str, Any]:
    origin = logs.origin

    def us(t: float) -> float:
        return round((t - origin) * 1e6, 3)

    placed = logs.lanes()
    tids: dict[Lane, int] = {}
    for lane, _ in placed:
        tids.setdefault(lane, 0)
    events: list[dict[str, Any]] = []
    workers = {lane.worker for lane in tids} | {m.target for m in logs.moves} | {
        s.worker for s in logs.stored} | {m.worker for m in logs.memory}
    for worker in sorted(workers):
        events.append(_meta("process_name", _pid(worker), None, f"worker {worker}"))
        events.append(_meta("process_sort_index", _pid(worker), None, worker, key="sort_index"))
    for n, lane in enumerate(sorted(tids, key=lambda ln: (ln.worker, ln.processor, ln.row)), start=1):
        tids[lane] = n
        events.append(_meta("thread_name", _pid(lane.worker), n, lane.label))
        events.append(_meta("thread_sort_index", _pid(lane.worker), n, n, key="sort_index"))

    first: dict[int, tuple[Lane, Ran]] = {}  # a task's first run: where arrows end
    last: dict[int, tuple[Lane, Ran]] = {}  # its last run: where arrows start
    for lane, run in placed:
        events.append({
            "name": run.name, "cat": CATEGORY, "ph": "X",
            "ts": us(run.start), "dur": round(max(run.stop - run.start, 0.0) * 1e6, 3),
            "pid": _pid(run.worker), "tid": tids[lane],
            "args": {"task": run.task, "ok": run.ok, "processor": run.processor},
        })
        first.setdefault(run.task, (lane, run))
        last[run.task] = (lane, run)

    flow_id = 0
    for flow_id, (dep, task) in enumerate(logs.edges, start=1):
        if dep not in last or task not in first:
            continue  # one side never ran (failed upstream, cancelled)
        for ph, (lane, run) in (("s", last[dep]), ("f", first[task])):
            event = {"name": "dependency", "cat": CATEGORY, "ph": ph, "id": flow_id,
                     "ts": us(run.start), "pid": _pid(run.worker), "tid": tids[lane]}
            if ph == "f":
                event["bp"] = "e"  # bind to the enclosing slice, not the next one
            events.append(event)
    events.extend(_data_lanes(logs, us, last, tids, len(tids) + 1, flow_id + 1))
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"producer": "aiodagger", "tasks": len(logs.tasks)}}


def _data_lanes(logs: Logs, us: Any, last: dict[int, tuple[Lane, Ran]], tids: dict[Lane, int],
                next_tid: int, next_flow: int) -> list[dict[str, Any]]:
    """Slices for data moves and store operations, their flows, and memory counters."""
    events: list[dict[str, Any]] = []
    lane_tid: dict[tuple[int, str], int] = {}

    def tid(worker: int, name: str) -> int:
        nonlocal next_tid
        if (worker, name) not in lane_tid:
            lane_tid[(worker, name)] = next_tid
            events.append(_meta("thread_name", _pid(worker), next_tid, name))
            events.append(_meta("thread_sort_index", _pid(worker), next_tid, next_tid, key="sort_index"))
            next_tid += 1
        return lane_tid[(worker, name)]

    for move in logs.moves:
        t = tid(move.target, "data in")
        ts = us(move.start)
        events.append({"name": f"from worker {move.source}", "cat": "data", "ph": "X", "ts": ts,
                       "dur": round(max(move.stop - move.start, 0.0) * 1e6, 3), "pid": _pid(move.target),
                       "tid": t, "args": {"key": move.key, "bytes": move.nbytes, "source": move.source}})
        made = last.get(move.key)
        if made is not None:  # an arrow from the run that made it to its arrival
            lane, run = made
            events.append({"name": "data", "cat": "data", "ph": "s", "id": next_flow, "ts": us(run.start),
                           "pid": _pid(run.worker), "tid": tids[lane]})
            events.append({"name": "data", "cat": "data", "ph": "f", "bp": "e", "id": next_flow, "ts": ts,
                           "pid": _pid(move.target), "tid": t})
            next_flow += 1
    for op in logs.stored:
        events.append({"name": op.how, "cat": "store", "ph": "X", "ts": us(op.start),
                       "dur": round(max(op.stop - op.start, 0.0) * 1e6, 3), "pid": _pid(op.worker),
                       "tid": tid(op.worker, "store"), "args": {"key": op.key, "bytes": op.nbytes}})
    for sample in logs.memory:
        events.append({"name": "memory", "cat": "memory", "ph": "C", "ts": us(sample.time),
                       "pid": _pid(sample.worker), "args": {"used": sample.used, "spilled": sample.spilled}})
    return events


def _pid(worker: int) -> int:
    return worker + 1


def _meta(name: str, pid: int, tid: int | None, value: Any, key: str = "name") -> dict[str, Any]:
    event: dict[str, Any] = {"name": name, "ph": "M", "pid": pid, "args": {key: value}}
    if tid is not None:
        event["tid"] = tid
    return event


def write_json(trace: dict[str, Any], path: str | os.PathLike[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(trace, f, separators=(",", ":"))

"""Chrome Trace Event JSON, for ui.perfetto.dev and chrome://tracing.

Layout: one trace *process* per worker (trace pid = worker id + 1: Perfetto keeps pid 0
for the kernel's idle process), one trace *thread* per processor lane (see
``Logs.lanes``: slices on one thread must nest, and a thread pool runs tasks side by
side). Each run is a complete event (``ph: "X"``, microseconds from the moment logging
began); each dependency edge is a flow (``ph: "s"`` on the dependency's last run,
``ph: "f"`` on the dependent's first run), drawn as an arrow. Flow events carry the
``ts``, ``pid``, ``tid`` and ``cat`` of the slice they belong to, which is how both
Perfetto and Chrome's viewer bind a flow to its slice.
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
    for worker in sorted({lane.worker for lane in tids}):
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

    for flow_id, (dep, task) in enumerate(logs.edges, start=1):
        if dep not in last or task not in first:
            continue  # one side never ran (failed upstream, cancelled)
        for ph, (lane, run) in (("s", last[dep]), ("f", first[task])):
            event = {"name": "dependency", "cat": CATEGORY, "ph": ph, "id": flow_id,
                     "ts": us(run.start), "pid": _pid(run.worker), "tid": tids[lane]}
            if ph == "f":
                event["bp"] = "e"  # bind to the enclosing slice, not the next one
            events.append(event)
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"producer": "aiodagger", "tasks": len(logs.tasks)}}


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

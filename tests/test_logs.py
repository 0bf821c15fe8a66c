"""enable_logging / fetch_logs, and the exports: Chrome trace, Gantt PNG, DOT."""

from __future__ import annotations

import asyncio
import io
import json
import re
import struct
import threading
import warnings

import pytest

import aiodagger as dagger
from aiodagger.logs import EventLog, Ran, Spawned, logging_enabled
from tests.helpers import add, ainc, boom, inc, sleep_then


@pytest.fixture(autouse=True)
def logging_off_after():
    yield
    dagger.disable_logging()


def event_logs(cluster):
    return [i for i in cluster._scheduler.instruments if isinstance(i, EventLog)]


async def nap(seconds, value):
    await asyncio.sleep(seconds)
    return value


def diamond_and_more():
    """A graph with known edges: returns (tasks, expected edges as id pairs)."""
    a = dagger.spawn(inc, 1)
    b = dagger.spawn(ainc, a)
    c = dagger.spawn(sleep_then, 0.01, a)
    d = dagger.spawn(add, b, c)
    e = dagger.spawn(sum, [a, b, c, d])
    naps = [dagger.spawn(nap, 0.02, i) for i in range(3)]  # overlapping coroutines
    tasks = [a, b, c, d, e, *naps]
    edges = {(a.id, b.id), (a.id, c.id), (b.id, d.id), (c.id, d.id),
             (a.id, e.id), (b.id, e.id), (c.id, e.id), (d.id, e.id)}
    return tasks, edges


async def test_off_by_default_and_off_again(dagger_cluster):
    assert dagger_cluster._scheduler.instruments == []  # the hot path's empty-list test
    dagger.enable_logging()
    assert len(event_logs(dagger_cluster)) == 1
    dagger.enable_logging()  # idempotent
    assert len(event_logs(dagger_cluster)) == 1
    await dagger.spawn(inc, 1)
    dagger.disable_logging()
    assert dagger_cluster._scheduler.instruments == []
    await dagger.spawn(inc, 2)
    logs = await dagger.fetch_logs()  # what was recorded stays readable
    assert list(logs.tasks.values()) == ["inc"]


async def test_records_a_graph(dagger_cluster):
    dagger.enable_logging()
    tasks, edges = diamond_and_more()
    failing = dagger.options(retries=1).spawn(boom)
    downstream = dagger.spawn(inc, failing)
    await dagger.wait([*tasks, failing, downstream])
    logs = await dagger.fetch_logs()
    assert set(logs.edges) >= edges
    assert set(logs.edges) - edges == {(failing.id, downstream.id)}
    assert logs.states[tasks[-1].id] == "finished"
    assert logs.states[failing.id] == "failed" and logs.states[downstream.id] == "failed"
    runs = {}
    for run in logs.runs:
        runs.setdefault(run.task, []).append(run)
    assert [r.ok for r in runs[failing.id]] == [False, False]  # two attempts
    assert downstream.id not in runs  # never ran
    assert all(r.stop >= r.start >= logs.origin for r in logs.runs)
    assert {r.processor.split("(")[0] for r in logs.runs} == {"AsyncProc", "ThreadProc"}
    # overlapping coroutines each get their own timeline row
    nap_rows = {lane.row for lane, run in logs.lanes() if run.name == "nap"}
    assert len(nap_rows) == 3


async def test_applies_to_clusters_started_while_enabled():
    dagger.enable_logging()
    assert logging_enabled()
    async with dagger.Cluster(threads=1) as c1:
        assert len(event_logs(c1)) == 1
        await dagger.spawn(inc, 1)
    dagger.disable_logging()
    assert not logging_enabled()
    async with dagger.Cluster(threads=1) as c2:
        assert c2._scheduler.instruments == []
        with pytest.raises(RuntimeError, match="enable_logging"):
            await dagger.fetch_logs()
    logs = await dagger.fetch_logs(c1)  # a closed cluster keeps its log
    assert [type(e).__name__ for e in logs] == ["Spawned", "Ran", "Done"]


async def test_fetch_without_a_cluster_says_what_to_do():
    with pytest.raises(RuntimeError, match="no cluster is running"):
        await dagger.fetch_logs()


async def test_clear_drains(dagger_cluster):
    dagger.enable_logging()
    await dagger.spawn(inc, 1)
    first = await dagger.fetch_logs(clear=True)
    await dagger.spawn(inc, 2)
    second = await dagger.fetch_logs()
    assert len(first) == 3 and len(second) == 3
    assert not set(first.tasks) & set(second.tasks)


def test_background_cluster_fetched_from_other_loops():
    with dagger.Cluster(threads=2) as cluster:
        dagger.enable_logging()

        async def main(i):
            await dagger.gather(*[dagger.spawn(inc, i) for _ in range(5)])
            return await dagger.fetch_logs()

        counts = [len(asyncio.run(main(i)).tasks) for i in range(3)]
        assert counts == [5, 10, 15]
        assert threading.get_ident() != cluster._scheduler.loop_thread_id


# -- Chrome trace ------------------------------------------------------------------------

async def test_chrome_trace_structure(dagger_cluster, tmp_path):
    dagger.enable_logging()
    tasks, edges = diamond_and_more()
    await dagger.gather(*tasks)
    logs = await dagger.fetch_logs()
    path = tmp_path / "trace.json"
    returned = logs.to_chrome_trace(path)
    trace = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert trace == json.loads(json.dumps(returned))
    events = trace["traceEvents"]
    assert {e["ph"] for e in events} == {"M", "X", "s", "f"}

    slices = [e for e in events if e["ph"] == "X"]
    assert sorted(e["args"]["task"] for e in slices) == sorted(t.id for t in tasks)
    for e in slices:
        assert isinstance(e["name"], str) and e["cat"] == "task"
        assert isinstance(e["ts"], int | float) and e["ts"] >= 0
        assert isinstance(e["dur"], int | float) and e["dur"] >= 0
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int) and e["pid"] > 0

    # every row used is named, and slices on one row never partly overlap
    names = {(e["name"], e["pid"], e.get("tid")) for e in events if e["ph"] == "M"}
    rows = {(e["pid"], e["tid"]) for e in slices}
    for pid, tid in rows:
        assert ("thread_name", pid, tid) in names and ("process_name", pid, None) in names
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in slices if (e["pid"], e["tid"]) == (pid, tid))
        for (_s1, e1), (s2, e2) in zip(spans, spans[1:], strict=False):
            assert s2 >= e1 or e2 <= e1, "overlapping slices on one thread"
    meta = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
    # real threads: the pool's, and the loop's for coroutines
    assert any(m.startswith("aiodagger-w0-thread") for m in meta) and any(m.startswith("event loop") for m in meta)

    # one flow per dependency edge: an "s" on the dependency's slice, an "f" on the dependent's
    by_id = {e["args"]["task"]: e for e in slices}
    flows: dict[int, dict[str, dict]] = {}
    for e in events:
        if e["ph"] in "sf" and len(e["ph"]) == 1:
            flows.setdefault(e["id"], {})[e["ph"]] = e
    assert len(flows) == len(edges)
    pairs = set()
    for flow in flows.values():
        assert set(flow) == {"s", "f"} and flow["f"]["bp"] == "e"
        ends = []
        for ph in "sf":
            e = flow[ph]
            owner = [s for s in slices if (s["pid"], s["tid"], s["ts"], s["cat"]) ==
                     (e["pid"], e["tid"], e["ts"], e["cat"])]
            assert len(owner) == 1, "a flow event must sit on exactly one slice"
            ends.append(owner[0]["args"]["task"])
        pairs.add(tuple(ends))
        assert by_id[ends[0]]["ts"] + by_id[ends[0]]["dur"] <= by_id[ends[1]]["ts"] + 1  # dep ran first
    assert pairs == edges


# -- Gantt -------------------------------------------------------------------------------

def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


async def test_gantt_png(dagger_cluster, tmp_path):
    dagger.enable_logging()
    tasks, _ = diamond_and_more()
    failing = dagger.spawn(boom)
    await dagger.wait([*tasks, failing])
    logs = await dagger.fetch_logs()
    path = tmp_path / "timeline.png"
    fig = logs.gantt(path, title="a small graph")
    data = path.read_bytes()
    width, height = png_size(data)
    assert width >= 800 and height >= 200
    assert len(data) > 10_000
    assert data.endswith(b"IEND\xaeB`\x82")
    ax = fig.axes[0]
    assert ax.get_title() == "a small graph"
    assert {t.get_text() for t in ax.get_legend().get_texts()} >= {"inc", "nap", "raised"}
    buf = io.BytesIO()
    logs.gantt(buf)  # a file object works too (e.g. for IPython.display.Image)
    assert png_size(buf.getvalue()) == (width, height)


async def test_gantt_of_many_overlapping_coroutines_labels_per_processor(dagger_cluster):
    dagger.enable_logging()
    await dagger.gather(*[dagger.spawn(nap, 0.05, i) for i in range(60)])
    fig = (await dagger.fetch_logs()).gantt()
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["worker 0: event loop (60 rows)"]


# -- DOT ---------------------------------------------------------------------------------

NODE = re.compile(r"^  t(\d+) \[label=\"(.*?)\", ")
EDGE = re.compile(r"^  t(\d+) -> t(\d+);$")


async def test_dot_one_node_per_task_one_edge_per_dependency(dagger_cluster):
    dagger.enable_logging()
    tasks, edges = diamond_and_more()
    await dagger.gather(*tasks)
    dot = (await dagger.fetch_logs()).to_dot()
    assert dot.startswith("digraph aiodagger {\n") and dot.endswith("}\n")
    lines = dot.splitlines()
    nodes = [int(m[1]) for line in lines if (m := NODE.match(line))]
    found = [(int(m[1]), int(m[2])) for line in lines if (m := EDGE.match(line))]
    assert sorted(nodes) == sorted(t.id for t in tasks)
    assert len(found) == len(edges) and set(found) == edges
    assert f't{tasks[0].id} [label="inc\\n#{tasks[0].id} finished"' in dot


async def test_dot_quotes_names_and_marks_tasks_from_before_logging(dagger_cluster):
    early = dagger.spawn(inc, 1)
    await early
    dagger.enable_logging()
    odd = dagger.options(name='say "hi"\\now').spawn(inc, early)
    await odd
    dot = (await dagger.fetch_logs()).to_dot()
    assert 'label="say \\"hi\\"\\\\now\\n#' in dot
    assert f"t{early.id} [label=\"#{early.id}\\n(spawned before logging)\"" in dot
    assert f"t{early.id} -> t{odd.id};" in dot


def test_record_types_are_plain_tuples():
    s = Spawned(1, "f", (), 0.0)
    r = Ran(1, "f", 0, "ThreadProc(worker=0, threads=1)", 1.0, 2.0, True)
    assert s.dependencies == () and r.stop - r.start == 1.0
    assert dagger.Logs([s, r], 0.0).tasks == {1: "f"}


# -- from worker processes: threads, moves, spills, memory, summary --------------------------
def _ones(n):
    import numpy as np

    return np.ones(n)


def _sum_of(a):
    return float(a.sum())


def _fails(x):
    raise ValueError(f"no {x}")


async def test_trace_and_summary_of_a_cluster_with_worker_processes(tmp_path):
    import time

    async with dagger.Cluster(processes=2, threads=1, memory_limit="48MiB", heartbeat_interval=0.2) as c:
        dagger.enable_logging()
        w1, w2 = sorted(w.id for w in c.workers if w.id != 0)
        on = {w: dagger.options(scope=dagger.scope(worker=w)) for w in (w1, w2)}
        t0 = time.perf_counter()
        arrays = [on[w1].spawn(_ones, 2 << 20) for _ in range(4)]  # 16 MiB each: w1 spills
        sums = [on[w2].spawn(_sum_of, a) for a in arrays]  # each array moves to w2
        bad = on[w2].spawn(_fails, 1)
        assert await asyncio.wait_for(dagger.gather(*sums), 60) == [float(2 << 20)] * 4
        await bad.wait()
        await asyncio.sleep(0.5)  # a few memory samples
        t1 = time.perf_counter()
        logs = await dagger.fetch_logs()
    origin = logs.origin
    trace = logs.to_chrome_trace(tmp_path / "trace.json")
    assert json.loads((tmp_path / "trace.json").read_text()) == trace
    events = trace["traceEvents"]
    meta = {(e["name"], e["pid"], e.get("tid")): e["args"] for e in events if e["ph"] == "M"}
    procs = {pid: a["name"] for (name, pid, _), a in meta.items() if name == "process_name"}
    assert {f"worker {w1}", f"worker {w2}"} <= set(procs.values())
    threads = {(pid, tid): a["name"] for (name, pid, tid), a in meta.items() if name == "thread_name"}
    tasks = [e for e in events if e["ph"] == "X" and e["cat"] == "task"]
    # every task once, on a real thread of the worker it ran on, within the run's bounds
    assert sorted(e["args"]["task"] for e in tasks) == sorted(t.id for t in [*arrays, *sums, bad]), [
        (r.task, r.worker, r.thread, r.ok) for r in logs.runs]
    for e in tasks:
        assert threads[(e["pid"], e["tid"])].startswith("aiodagger-w0-thread")  # a worker's pool thread
        assert procs[e["pid"]] in (f"worker {w1}", f"worker {w2}")
        assert (t0 - origin) * 1e6 <= e["ts"] <= e["ts"] + e["dur"] <= (t1 - origin) * 1e6
    ran_on = {e["args"]["task"]: procs[e["pid"]] for e in tasks}
    assert all(ran_on[a.id] == f"worker {w1}" for a in arrays) and all(ran_on[s.id] == f"worker {w2}" for s in sums)
    # dependency flows: one per edge, from the array's slice to its sum's
    flows: dict[int, dict[str, dict]] = {}
    for e in events:
        if e["ph"] in ("s", "f"):
            flows.setdefault(e["id"], {})[e["ph"]] = e
    by_ts = {(e["pid"], e["tid"], e["ts"]): e for e in events if e["ph"] == "X"}
    deps = set()
    moved = set()
    for flow in flows.values():
        start, end = by_ts[(flow["s"]["pid"], flow["s"]["tid"], flow["s"]["ts"])], by_ts[
            (flow["f"]["pid"], flow["f"]["tid"], flow["f"]["ts"])]
        if flow["s"]["name"] == "dependency":
            deps.add((start["args"]["task"], end["args"]["task"]))
        else:  # data: from the run that made the value to its arrival on w2
            assert flow["s"]["name"] == "data" and end["cat"] == "data"
            moved.add((start["args"]["task"], end["args"]["key"], procs[end["pid"]]))
    assert deps == {(a.id, s.id) for a, s in zip(arrays, sums, strict=True)}
    assert moved == {(a.id, a.id, f"worker {w2}") for a in arrays}
    data_in = [e for e in events if e["ph"] == "X" and e["cat"] == "data"]
    assert all(e["args"]["bytes"] >= 16 << 20 and threads[(e["pid"], e["tid"])] == "data in" for e in data_in)
    # the store's work and memory counters
    stores = [e for e in events if e["ph"] == "X" and e["cat"] == "store"]
    assert any(e["name"] == "spilled" and procs[e["pid"]] == f"worker {w1}" for e in stores)
    counters = [e for e in events if e["ph"] == "C"]
    assert {procs[e["pid"]] for e in counters} >= {f"worker {w1}", f"worker {w2}"}
    assert all(set(e["args"]) == {"used", "spilled"} for e in counters)
    # the summary: per function, most time first
    rows = logs.summary()
    by_fn = {r["function"]: r for r in rows}
    assert by_fn["_ones"]["count"] == 4 and by_fn["_sum_of"]["count"] == 4
    assert by_fn["_fails"]["count"] == 1 and by_fn["_fails"]["failures"] == 1 and by_fn["_ones"]["failures"] == 0
    assert all(r["max_s"] >= r["mean_s"] > 0 and abs(r["total_s"] - r["mean_s"] * r["count"]) < 1e-9 for r in rows)
    assert [r["total_s"] for r in rows] == sorted((r["total_s"] for r in rows), reverse=True)
    text = str(rows)
    assert text.splitlines()[0].split() == ["function", "count", "total_s", "mean_s", "max_s", "failures"]
    assert len(text.splitlines()) == 2 + len(rows) and "_sum_of" in text
    # the Gantt chart has rows for both workers' threads
    fig = logs.gantt(tmp_path / "g.png")
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert any(lb.startswith(f"worker {w1}: aiodagger") for lb in labels)
    assert any(lb.startswith(f"worker {w2}: aiodagger") for lb in labels)
    assert png_size((tmp_path / "g.png").read_bytes())[0] >= 800


async def test_dot_parses(dagger_cluster):
    import pydot

    dagger.enable_logging()
    tasks, edges = diamond_and_more()
    await dagger.wait(tasks)
    dot = (await dagger.fetch_logs()).to_dot()
    with warnings.catch_warnings():  # pydot calls pyparsing's old names
        warnings.simplefilter("ignore", DeprecationWarning)
        (graph,) = pydot.graph_from_dot_data(dot)
    nodes = {n.get_name() for n in graph.get_nodes()} - {"node", "edge", "graph"}
    assert nodes == {f"t{t.id}" for t in tasks}
    assert {(e.get_source(), e.get_destination()) for e in graph.get_edges()} == {
        (f"t{a}", f"t{b}") for a, b in edges}

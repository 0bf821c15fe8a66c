"""Authenticated but hostile records, fuzzed: a worker that passed the handshake sends
what a buggy worker (or one of another version) could, and the cluster must stay whole.

Each example connects a fake worker (tests/test_hostile_records.py) over real TCP, gets
a task placed on it, and sends it one to three messages drawn from the protocol's own
types (comm/protocol.py): records shaped right, then mutated (wrong types, wrong field
counts, unknown statuses and ops, stale or impossible attempts, parts that do not add
up, buffers missing or extra, duplicated records and registrations, huge and negative
numbers and ids, non-finite floats). After each example:

- no exception escaped on the cluster's loop (its exception handler) or was logged as
  an error by aiodagger;
- the task placed on the fake worker ended, within a bounded wait, with a value or a
  typed error (the fake worker is closed to make sure it ends);
- the scheduler's estimates stayed finite numbers (they price every later placement);
- an honest task on a real worker still runs, with the right value, and the fake
  worker is gone from ``cluster.workers``.

Hypothesis draws from the chaos seed, so ``AIODAGGER_CHAOS_SEED`` replays a run.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import math
import traceback
from collections.abc import Callable
from typing import Any

import cloudpickle
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

import aiodagger as dagger
from aiodagger.comm import protocol as P
from aiodagger.comm.handshake import new_token
from aiodagger.taskoptions import TaskOptions
from tests.test_hostile_records import FakeWorker
from tests.workers import WorkerProcesses, block, digest, write_token

pytestmark = pytest.mark.timeout(600)

EXAMPLES = 800
WAIT = 20.0
BLOCK = 256 << 10  # past the inline limit: it stays on the worker that made it
HELD_SEED = 7
HELD_SHA = hashlib.sha256(bytes([HELD_SEED]) * BLOCK).hexdigest()


class FuzzError(Exception):
    """An error a fuzzed completion may carry: a legitimate outcome of its task."""


TALLY: collections.Counter[str] = collections.Counter()


def event(what: str) -> None:
    """Counted, and printed at the end: what the examples did (hypothesis' own
    statistics do not reach a test that calls a @given function itself)."""
    TALLY[what] += 1


def double(x):
    return 2 * x


# -- values ------------------------------------------------------------------------------
HUGE = st.sampled_from([2**31, 2**40 - 1, 2**40, 2**53 + 1, 2**63 - 1, 2**64 - 1, -(2**63)])
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, 1e-6, 0.5, 1e300, -1.0]))
ANY_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), FLOATS,
                     st.text(max_size=12), st.binary(max_size=12))
ANY = st.recursive(ANY_LEAF, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=12)


def ids_near(*keys: int) -> st.SearchStrategy[int]:
    """Ids that mean something here (and their negatives: chunk keys), small and huge ones."""
    return st.one_of(st.sampled_from([k for key in keys for k in (key, -key, key + 1)]),
                     st.integers(-3, 3), HUGE)


def payloads(kind: str) -> st.SearchStrategy[list[bytes]]:
    """The parts of a value or an error: well made, or garbage."""
    garbage = st.lists(st.binary(max_size=16), min_size=1, max_size=3)
    if kind == "error":
        return st.one_of(st.just([P.dumps_error(FuzzError("from a fuzzed worker"))]), garbage)
    made = st.integers().map(lambda v: [P.dumps(v)[0]])
    return st.one_of(made, garbage)


# -- messages a worker may send, shaped right ----------------------------------------------
Frame = tuple[dict[str, Any], list[bytes]]


@st.composite
def finished(draw, key: int, attempt: int, other_ids: st.SearchStrategy[int]) -> tuple[list[Any], list[bytes]]:
    status = draw(st.sampled_from(["ok", "ok", "error", "missing", "cancelled"]))
    parts: list[bytes] = []
    if status in ("ok", "error") and draw(st.booleans()):
        parts = draw(payloads(status))
    missing = draw(st.lists(st.tuples(other_ids, st.lists(other_ids, max_size=3)), max_size=3)) \
        if status == "missing" else []
    # mostly what an honest worker would send about the task it runs, or not far off
    times = st.one_of(st.floats(0.0, 10.0), st.floats(0.0, 10.0), FLOATS)
    record = [draw(st.one_of(st.just(key), st.just(key), other_ids)),
              draw(st.one_of(st.just(attempt), st.just(attempt), st.just(attempt + 1),
                             st.integers(-2, 3), HUGE)),
              status, draw(st.one_of(st.integers(0, 1 << 20), HUGE.filter(lambda n: n >= 0))),
              draw(times), draw(times), len(parts), [list(m) for m in missing]]
    return record, parts


@st.composite
def done(draw, key: int, attempt: int, other_ids: st.SearchStrategy[int]) -> Frame:
    records, buffers = [], []
    for record, parts in draw(st.lists(finished(key, attempt, other_ids), min_size=1, max_size=3)):
        records.append(record)
        buffers += parts
    if draw(st.booleans()):  # the same record twice in one batch
        records.append(list(records[0]))
        buffers += buffers[:records[0][6]]
    memory = draw(st.lists(st.one_of(st.integers(0, 1 << 30), HUGE.filter(lambda n: n >= 0)),
                           min_size=4, max_size=4))
    return {"op": "done", "a": [records, memory]}, buffers


@st.composite
def spawn(draw, other_ids: st.SearchStrategy[int], fake_id: int) -> Frame:
    records, buffers = [], []
    for _ in range(draw(st.integers(1, 2))):
        base = fake_id * P.ID_SPACE  # its own ids lie above this
        key = draw(st.one_of(st.just(base + 1), st.just(base + 7), st.just(base), other_ids))
        if draw(st.booleans()):
            parts = [cloudpickle.dumps(double), cloudpickle.dumps(TaskOptions()),
                     P.dumps_args("double", (draw(st.integers(0, 100)),), {}, False)[0]]
        else:
            parts = draw(st.lists(st.binary(max_size=16), min_size=3, max_size=4))
        records.append([key, draw(st.binary(min_size=1, max_size=8)), len(parts), draw(st.booleans())])
        buffers += parts
    return {"op": "spawn", "a": [records]}, buffers


def heartbeat() -> st.SearchStrategy[Frame]:
    """Stats as a worker sends them (its memory counters among them), or anything."""
    counters = ("memory_used", "spilled_bytes", "spill_errors", "running")
    count = st.one_of(st.integers(0, 1 << 40), st.integers(0, 1 << 40), st.integers(0, 1 << 40), ANY_LEAF)
    counts = st.fixed_dictionaries({name: count for name in counters}, optional={"used": ANY_LEAF})
    stats = st.one_of(counts, st.dictionaries(st.sampled_from([*counters, "x"]), ANY_LEAF, max_size=6))
    return stats.map(lambda s: ({"op": "heartbeat", "a": [s]}, []))


def id_list(op: str, other_ids: st.SearchStrategy[int]) -> st.SearchStrategy[Frame]:
    return st.lists(other_ids, max_size=5).map(lambda ids: ({"op": op, "a": [ids]}, []))


def streams(other_ids: st.SearchStrategy[int]) -> st.SearchStrategy[Frame]:
    """Stream messages as a worker sends them, about streams it does not run (the scheduler
    stops such a producer, drops its values and ends such a reader)."""
    def items(key: int, first: int, n: int) -> Frame:
        return {"op": "stream-items", "a": [key, first, n, []]}, [P.dumps(list(range(n)))[0]]
    return st.one_of(
        other_ids.map(lambda key: ({"op": "stream-open", "a": [key]}, [])),
        st.builds(items, other_ids, st.integers(0, 5), st.integers(1, 4)),
        st.builds(lambda key, reader, n, done: ({"op": "stream-ack", "a": [key, reader, n, done]}, []),
                  other_ids, st.integers(-3, 1 << 40), st.integers(0, 1 << 40), st.booleans()),
    )


def not_taken_here() -> st.SearchStrategy[Frame]:
    """Ops a worker never sends (a second register among them), and ops that do not exist."""
    ops = sorted(set(P.message_types()) - {"done", "holding", "heartbeat", "spawn", "forget",
                                           "cancel-spawned", "stream-open", "stream-items",
                                           "stream-ack"})
    register = st.just({"op": "register", "req": 7,
                        "a": ["again", 1, "h", 1, "tcp://127.0.0.1:9", None]})
    other = st.builds(lambda op, a: {"op": op, "a": a},
                      st.one_of(st.sampled_from(ops), st.text(max_size=10)), st.lists(ANY, max_size=4))
    reply = st.builds(lambda to, a: {"op": "reply", "reply_to": to, "a": a}, ANY_LEAF, st.lists(ANY, max_size=3))
    return st.one_of(register, other, reply).map(lambda h: (h, []))


def right_done(key: int, attempt: int) -> st.SearchStrategy[Frame]:
    """The completion an honest worker would send for the task it runs."""
    def frame(value: int, seconds: float) -> Frame:
        payload, _ = P.dumps(value)
        record = [key, attempt, "ok", len(payload), 1.0, seconds, 1, []]
        return {"op": "done", "a": [[record], [len(payload), 0, 0, 0]]}, [payload]
    return st.builds(frame, st.integers(), st.floats(0.0, 1.0))


def messages(key: int, attempt: int, fake_id: int, held: int) -> st.SearchStrategy[Frame]:
    other_ids = ids_near(key, fake_id * P.ID_SPACE + 1, held)
    return st.one_of(
        right_done(key, attempt), done(key, attempt, other_ids), done(key, attempt, other_ids),
        spawn(other_ids, fake_id), heartbeat(),
        id_list("holding", other_ids), id_list("forget", other_ids), id_list("cancel-spawned", other_ids),
        streams(other_ids), not_taken_here(),
    )


# -- mutations -----------------------------------------------------------------------------
def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a header that holds a value."""
    found = [path] if path else []
    if isinstance(node, list):
        for i, item in enumerate(node):
            found += _paths(item, (*path, i))
    elif isinstance(node, dict):
        for k, item in node.items():
            found += _paths(item, (*path, k))
    return found


def _at(node: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        node = node[step]
    return node


@st.composite
def mutated(draw, frame: Frame) -> Frame:
    header, buffers = frame
    header = cloudpickle.loads(cloudpickle.dumps(header))  # a deep copy
    buffers = list(buffers)
    how = draw(st.sampled_from(["none", "none", "leaf", "drop", "extra", "req", "buffers"]))
    event(f"mutation: {how}")
    paths = _paths(header)
    if how == "leaf" and paths:
        path = draw(st.sampled_from(paths))
        _at(header, path[:-1])[path[-1]] = draw(ANY)
    elif how in ("drop", "extra"):
        lists = [p for p in paths if isinstance(_at(header, p), list)]
        if lists:
            target = _at(header, draw(st.sampled_from(lists)))
            if how == "drop" and target:
                del target[draw(st.integers(0, len(target) - 1))]
            elif how == "extra":
                target.append(draw(ANY))
    elif how == "req":
        header["req"] = draw(ANY_LEAF)
    elif how == "buffers":
        if buffers and draw(st.booleans()):
            del buffers[draw(st.integers(0, len(buffers) - 1))]
        else:
            buffers.append(draw(st.binary(max_size=16)))
    return header, buffers


# -- the harness -----------------------------------------------------------------------------
class StopFuzzing(BaseException):
    """The first failing example ends the run (not an Exception: hypothesis lets it through)."""


class Watch(logging.Handler):
    """Errors aiodagger logged, and exceptions that reached the loop's handler."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.errors.append(self.format(record))

    def loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.errors.append(f"on the loop: {context.get('message')}: {context.get('exception')!r}")

    def take(self) -> list[str]:
        errors, self.errors = self.errors, []
        return errors


def finite_estimates(cluster: dagger.Cluster) -> list[str]:
    """Estimates of the scheduler that are not finite non-negative numbers."""
    sched = cluster._scheduler
    bad = [f"runtime {v!r} of {k!r}" for k, v in sched.runtimes._table.items()
           if not (math.isfinite(v) and v >= 0)]
    if sched.dist is not None:
        bad += [f"backlog {w.backlog_s!r} of worker {w.id}" for w in sched.dist.workers.values()
                if not math.isfinite(w.backlog_s)]
    return bad


def outcome(task: dagger.DTask[Any]) -> str:
    """How the task on the fake worker ended: it must end, with a value or a typed error."""
    try:
        task.fetch(timeout=WAIT)
    except (dagger.DaggerError, FuzzError):
        return "a typed error"
    except RuntimeError as exc:  # an error record whose payload cannot be loaded here
        assert "cannot be loaded in this process" in str(exc), repr(exc)
        return "an error that could not be loaded"
    return "a value"


class Fuzzing:
    """One cluster with one real worker, and a fake worker per example."""

    def __init__(self, cluster: dagger.Cluster, watch: Watch) -> None:
        self.cluster = cluster
        self.watch = watch
        self.frames: list[Frame] = []
        self.real_id = -1
        self.honest = dagger.options()
        self.held: dagger.DTask[Any] | None = None

    def on_loop(self, make: Callable[[], Any], timeout: float = WAIT) -> Any:
        async def call() -> Any:
            return await make()
        return asyncio.run_coroutine_threadsafe(call(), self.cluster.loop).result(timeout)

    def join(self, workers: WorkerProcesses, real: Any) -> None:
        """Wait for the real worker, and give it a result to hold that fuzzed ids name."""
        (info,) = self.on_loop(lambda: workers.wait_joined(self.cluster, [real]), 60)
        self.real_id = info.id
        self.honest = dagger.options(scope=dagger.scope(worker=info.id))
        self.held = held = self.honest.spawn(block, BLOCK, HELD_SEED)
        self.on_loop(held.wait)

    def example(self, data: st.DataObject) -> None:
        cluster, held = self.cluster, self.held
        assert held is not None
        self.frames = []
        fake = FakeWorker(cluster)
        self.on_loop(fake.connect)
        fake.endpoint.handlers = {
            **fake.endpoint.handlers,
            P.Get: lambda msg, buffers: (P.Items([], list(msg.keys), []), []),
            P.Stats: lambda msg, buffers: (P.StatsReply({}), []),
            P.Replicate: lambda msg, buffers: (P.Ack(), []),
            P.TaskDone: lambda msg, buffers: None,
            P.Put: lambda msg, buffers: None,
            P.StreamCredit: lambda msg, buffers: None,
            P.StreamEnd: lambda msg, buffers: None,
        }
        retries = data.draw(st.integers(0, 1), label="retries")
        task = dagger.options(scope=dagger.scope(worker=fake.id), retries=retries).spawn(double, 21)
        try:
            run = self.on_loop(lambda: asyncio.wait_for(fake.runs.get(), WAIT))
            (record,) = run.tasks
            self.frames = data.draw(st.lists(messages(record.key, record.attempt, fake.id, held.id)
                                             .flatmap(mutated), min_size=1, max_size=3), label="frames")
            self.on_loop(lambda: send(fake, self.frames))
            event("the cluster closed the connection" if fake.serving.done() else "the connection stayed open")
        finally:
            self.on_loop(fake.close)
        event(f"the task ended with {outcome(task)}")

        x = data.draw(st.integers(0, 1000), label="honest")
        assert self.honest.spawn(double, x).fetch(timeout=WAIT) == 2 * x
        assert dagger.spawn(double, x).fetch(timeout=WAIT) == 2 * x
        _, made = self.honest.spawn(digest, held).fetch(timeout=WAIT)
        assert [(size, sha) for _, size, sha in made] == [(BLOCK, HELD_SHA)]
        self.on_loop(lambda: wait_for(lambda: {w.id for w in cluster.workers} == {0, self.real_id}))
        errors = self.watch.take()
        assert not errors, "\n".join(errors)
        assert not self.on_loop(lambda: on_the_loop(finite_estimates, cluster))


def test_hostile_records_from_an_authenticated_worker(tmp_path, no_leaks, seed):
    workers = WorkerProcesses(tmp_path)
    watch = Watch()
    logging.getLogger("aiodagger").addHandler(watch)
    try:
        with dagger.Cluster(threads=1, listen="tcp://127.0.0.1:0", token=new_token(),
                            heartbeat_interval=0.2, heartbeat_timeout=5.0) as cluster:
            loop = cluster.loop
            loop.call_soon_threadsafe(loop.set_exception_handler, watch.loop_exception)
            real = workers.start(cluster.address, write_token(tmp_path, cluster.token), threads=1)
            fuzzing = Fuzzing(cluster, watch)
            fuzzing.join(workers, real)

            @hypothesis_seed(seed)
            # Neither shrinking nor replaying: each example changes the cluster it runs
            # on, so a failing one run again is another experiment. It is reported as
            # drawn, with what was sent, and ends the run.
            @settings(max_examples=EXAMPLES, deadline=None, database=None,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(data=st.data())
            def one_example(data: st.DataObject) -> None:
                try:
                    fuzzing.example(data)
                except Exception:  # noqa: BLE001 - reported as drawn, with what was sent
                    errors = "\n".join(watch.take())
                    raise StopFuzzing(f"{traceback.format_exc()}\nframes sent: {fuzzing.frames!r}\n"
                                      f"errors logged: {errors or 'none'}") from None

            TALLY.clear()
            try:
                one_example()
            except StopFuzzing as stop:
                pytest.fail(str(stop), pytrace=False)
            finally:
                print("\n".join(f"{n:5d}  {what}" for what, n in sorted(TALLY.items())))
    finally:
        logging.getLogger("aiodagger").removeHandler(watch)
        workers.stop_all()


async def send(fake: FakeWorker, frames: list[Frame]) -> None:
    for header, buffers in frames:
        op = header.get("op")
        known = isinstance(op, str) and (op in P.message_types() or op == "reply")
        event(f"sent {op!r}" if known else "sent an unknown op")
        fake.send_raw(header, buffers)
    await asyncio.sleep(0.05)  # time to read them, and to close the connection


async def on_the_loop(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, called on the loop that owns what it reads."""
    return fn(*args)


async def wait_for(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "not within the time allowed"
        await asyncio.sleep(0.01)

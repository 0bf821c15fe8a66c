"""The wire protocol: every message and record round-trips through a real frame, every
malformed one is a ProtocolError naming what is wrong, Batch splits within a frame's
limits, and an Endpoint over a real connection dispatches, replies and ends only the
connection that sent something it does not take."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import re
import warnings

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiodagger.comm import protocol as P
from aiodagger.comm.framing import MAX_BUFFERS, PREFIX, FrameParser, encode_frame, open_comm
from aiodagger.comm.handshake import client_handshake, new_token
from aiodagger.comm.protocol import (
    Ack,
    Answer,
    Attach,
    Batch,
    Blocked,
    Cancel,
    CancelSpawned,
    Dep,
    Done,
    DoneValues,
    Endpoint,
    Events,
    Finished,
    Forget,
    Found,
    FunctionDef,
    Functions,
    Get,
    Heartbeat,
    Holder,
    Holding,
    Item,
    Items,
    Listen,
    Lookup,
    Memory,
    Missing,
    MoveEvent,
    Oversized,
    Publish,
    Put,
    Register,
    Registered,
    Release,
    Replicate,
    Run,
    RunEvent,
    RunPlain,
    RunTask,
    Shared,
    Shutdown,
    Spawn,
    SpawnTask,
    Stats,
    StatsReply,
    StoreEvent,
    StreamAck,
    StreamCredit,
    StreamEnd,
    StreamItems,
    StreamOpen,
    TaskDone,
    ValueDef,
    Values,
    decode,
    encode,
    message_types,
    split_parts,
)
from aiodagger.comm.server import Listener
from aiodagger.errors import ProtocolError

# When a hypothesis test fails, hypothesis imports libcst to suggest a patch, and that
# import warns (DeprecationWarning, from mypy_extensions); with warnings as errors the
# report of the failure itself is lost. Imported once here, that warning ignored.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    with contextlib.suppress(ImportError):
        import hypothesis.extra._patching  # noqa: F401

# -- realistic values ------------------------------------------------------------------
FN = hashlib.sha256(b"def f(x): return x + 1").digest()
ADDR = "tcp://127.0.0.1:40123"
ADDR6 = "tcp://[::1]:8786"
NAME = "tâche-名前-🚀"
BIG = 2**64 - 1          # the largest msgpack unsigned int
NEG = -(2**63)           # the smallest msgpack signed int
SPAWNED = (3 << 40) + 17  # a task spawned on worker 3


def parts(*sizes: int) -> list[bytes]:
    return [bytes([n % 251]) * n for n in sizes]


# One or more realistic instances of every message, with the buffers it travels with.
SAMPLES: list[tuple[object, list[bytes]]] = [
    (Register(NAME, 4242, "höst.example", 8, ADDR, 16 << 30), []),
    (Register("w", 1, "h", 1, ADDR6, None), []),
    (Register("w", 1, "h", 1, ADDR, None, [3, -4, 2**40]), []),
    (Register("w", 1, "h", 1, ADDR, None, [], [0, 3]), []),
    (Register("w", 1, "h", 1, ADDR, None, [], [], 12345.678), []),
    (Register("w", 1, "h", 1, ADDR, None, [], [], 0.0, {"db": 4.0, "GPU": 1}), []),
    (Listen(True), []),
    (Listen(False), []),
    (Events([RunEvent(7, 0, "aiodagger-w1-thread-0")], [MoveEvent(8, 1 << 20, 2, 1.5, 1.75)],
            [StoreEvent(9, 4096, "spilled", 2.0, 2.5), StoreEvent(-3, 0, "loaded", 3.0, 3.0)]), []),
    (Events([], [], []), []),
    (Registered(0), []),
    (Blocked(0), []),
    (Blocked(3), []),
    (Registered(2**31), []),
    (Heartbeat({}), []),
    (Heartbeat({"memory_used": 123, "spilled_bytes": BIG, "ratio": 0.5, "name": NAME,
                "tags": [1, "x", None, True, -2.5], 7: b"\x00\xff", "nested": {"a": []}}), []),
    (Functions([FunctionDef(FN), FunctionDef(b"")]), parts(10, 3)),
    (Functions([]), []),
    (Values([ValueDef(-5, 2), ValueDef(NEG, 1)]), parts(1, 2, 3)),
    (Values([]), []),
    (Run([RunTask(SPAWNED, NAME, FN, "thread", 0, 3,
                  [Dep(-7, [Holder(1, ADDR), Holder(2, ADDR6)]), Dep(8, [])],
                  True, True, [-7, 8, BIG], True),
          RunTask(1, "", b"", "async", 2**40, 1, [], False, False, []),
          RunTask(2, "", b"", "thread", 0, 1, [], False, True, [1, -3, BIG], False, [1, BIG], -7)]),
     parts(5, 6, 7, 8, 9)),
    (Run([]), []),
    (Done([Finished(1, 0, "ok", BIG, 12345.678, 0.25, 2, []),
           Finished(2, 1, "error", 0, 0, 0.0, 1, []),
           Finished(-3, 0, "missing", 0, 1.5, 2, 0, [Missing(-9, [1, 2]), Missing(NEG, [])]),
           Finished(4, 0, "cancelled", 0, 0.0, 0.0, 0, []),
           Finished(6, 2, "dropped", 0, 0.0, 0.0, 0, []),
           Finished(5, 0, "ok", 24, 1e-9, 1e9, 0, []),
           Finished(7, 0, "value", 5, 0.0, 0.0, 1, [])],
          Memory(2**40, BIG, 3, 5)), parts(9, 1, 40, 5)),
    (Done([], Memory(0, 0, 0, 0)), []),
    (RunPlain([1, SPAWNED, BIG], [FN, b""], [NAME, ""], [0, 1, 0], [0, 2**40, 3], [0, -7, BIG]), parts(30)),
    (RunPlain([], [], [], [], [], []), parts(5)),
    (DoneValues([1, NEG], [0, 3], [12345.678, -2.5], [0.0, 1e9], Memory(2**40, BIG, 3, 5)), parts(9)),
    (DoneValues([], [], [], [], Memory(0, 0, 0, 0)), parts(1)),
    (Holding([-1, 2, NEG, BIG]), []),
    (Holding([]), []),
    (Cancel([SPAWNED, 1]), []),
    (Release([BIG, NEG]), []),
    (Put(-4), parts(5, 100_000)),  # the second is read in place by the parser
    (Put(SPAWNED), parts(0)),
    (Get([1, -2, BIG]), []),
    (Get([]), []),
    (Get([4], "boot:37:1"), []),
    (Items([Item(1, 2), Item(-2, 1)], [BIG], [NEG], [Oversized(7, BIG)], []), parts(3, 4, 5)),
    (Items([Item(1, 1)], [], [], [], [Shared(-3, "/dev/shm/aiodagger-shm-1-w@0123abcd/v-3", BIG)]), parts(3)),
    (Items([], [1, 2], [], [], []), []),
    (Stats(), []),
    (StatsReply({"rss": 1 << 30, "workers": {"a": [1, 2]}, "名前": None}), []),
    (Ack(), []),
    (Replicate([Dep(-1, [Holder(0, ADDR)]), Dep(NEG, [])]), []),
    (Replicate([]), []),
    (Shutdown(), []),
    (Spawn([SpawnTask(SPAWNED, FN, 3, False), SpawnTask(SPAWNED + 1, FN, 5, True)]),
     parts(*range(1, 9))),
    (Spawn([]), []),
    (TaskDone(SPAWNED, "finished", [], ""), parts(7, 8)),
    (TaskDone(SPAWNED, "finished", [Holder(3, ADDR), Holder(4, ADDR6)], ""), []),
    (TaskDone(1, "failed", [], "ZeroDivisionError: ✗"), parts(40)),
    (TaskDone(2, "cancelled", [], "cancelled by the caller"), []),
    (Forget([SPAWNED]), []),
    (CancelSpawned([]), []),
    (Attach(NAME, 4242, "höst.example"), []),
    (Publish("results/2026", 2**40 + 1), []),
    (Publish("gone", 0), []),
    (Answer(""), []),
    (Answer("'x' is already published"), []),
    (Lookup("results/2026"), []),
    (Found(-(2**40 + 3), []), []),
    (Found(0, ["a", "b"]), []),
    (StreamOpen(SPAWNED), []),
    (StreamCredit(7, 0), []),
    (StreamCredit(7, BIG), []),
    (StreamCredit(7, -1), []),
    (StreamItems(7, 0, 1, []), parts(12)),
    (StreamItems(SPAWNED, BIG, 4096, [1, 2, 3]), parts(30, 100_000, 0)),
    (StreamAck(7, 1, 0, False), []),
    (StreamAck(7, 2, BIG, True), []),
    (StreamEnd(7, "finished", [1, 2]), []),
    (StreamEnd(7, "error", [3]), parts(40)),
]

RECORD_TYPES = {Holder, Dep, FunctionDef, ValueDef, RunTask, Missing, Finished, Memory, Item, Oversized, Shared,
                SpawnTask, RunEvent, MoveEvent, StoreEvent}


def sample_id(sample) -> str:
    msg, buffers = sample
    return f"{type(msg).__name__}-{SAMPLES.index(sample)}"


def takes_any_buffers(msg) -> bool:
    """The messages whose buffer count is the sender's choice (at least one): a value's
    pickle and its buffers, sent by itself."""
    return type(msg) in (Put, StreamItems) or (type(msg) is TaskDone and msg.status == "finished"
                                              and not msg.holders)


# -- the wire ----------------------------------------------------------------------------
def over_the_wire(header: dict, buffers=()) -> tuple[dict, list]:
    """One frame through the real encoder and parser: what the peer's decode() sees."""
    parser = FrameParser()
    data = b"".join(bytes(p) for p in encode_frame(header, buffers))
    pos = 0
    while pos < len(data):
        target = parser.get_buffer()
        n = min(len(target), len(data) - pos)
        target[:n] = data[pos:pos + n]
        parser.advance(n)
        pos += n
    (frame,) = parser.frames
    return frame


def wire_decode(header: dict, nbuffers: int = 0):
    """decode() of a header as it arrives: msgpack lists where tuples were sent."""
    got, _ = over_the_wire(header)
    return decode(got, nbuffers)


def assert_same(got, want, path="msg") -> None:
    """Equal, and of the same types all the way down: records come back as records."""
    assert type(got) is type(want), f"{path}: {type(got).__name__}, not {type(want).__name__}"
    if isinstance(want, tuple):
        assert len(got) == len(want), path
        names = getattr(want, "_fields", range(len(want)))
        for name, g, w in zip(names, got, want, strict=True):
            assert_same(g, w, f"{path}.{name}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, dict):
        assert list(got) == list(want), path
        for key in want:
            assert_same(got[key], want[key], f"{path}[{key!r}]")
    else:
        assert got == want, path


def record_types_in(value) -> set[type]:
    found: set[type] = set()
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        if type(value) not in message_types().values():
            found.add(type(value))
    if isinstance(value, list | tuple):
        for item in value:
            found |= record_types_in(item)
    return found


# -- round trips -----------------------------------------------------------------------
def test_every_message_type_has_a_round_trip_sample():
    """A new op without a sample here fails: every message type is round-tripped below."""
    types = message_types()
    assert all(cls.OP == op for op, cls in types.items())
    assert {type(msg) for msg, _ in SAMPLES} == set(types.values())


def test_every_record_type_has_a_round_trip_sample():
    """Every record class of the protocol module appears, nested, in some sample."""
    declared = {obj for obj in vars(P).values()
                if isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")
                and obj not in message_types().values()}
    assert declared == RECORD_TYPES
    assert set().union(*(record_types_in(msg) for msg, _ in SAMPLES)) == RECORD_TYPES


@pytest.mark.parametrize("sample", SAMPLES, ids=sample_id)
def test_message_round_trips_through_a_frame(sample):
    """encode -> frame bytes -> parser -> decode gives back the message, typed all the way down."""
    msg, buffers = sample
    header, got = over_the_wire(encode(msg), buffers)
    assert header["op"] == msg.OP and set(header) == {"op", "a"}
    assert_same(decode(header, len(got)), msg)
    assert [bytes(b) for b in got] == buffers


@pytest.mark.parametrize("sample", SAMPLES, ids=sample_id)
def test_message_round_trips_through_msgpack(sample):
    """The header alone through msgpack, packed and unpacked exactly as the wire does."""
    msg, buffers = sample
    raw = msgpack.packb(encode(msg), use_bin_type=True)
    header = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    assert_same(decode(header, len(buffers)), msg)


@pytest.mark.parametrize("reply", [Registered(7), Items([Item(-1, 1)], [2], [], [], []),
                                   StatsReply({"a": 1}), Ack()], ids=lambda m: type(m).__name__)
def test_reply_decodes_as_the_type_its_request_expects(reply):
    """A reply's header says op "reply": decode(header, n, cls) checks it as ``cls``."""
    nbuffers = sum(i.nparts for i in reply.items) if type(reply) is Items else 0
    header, _ = over_the_wire({"op": "reply", "reply_to": 3, "a": reply})
    assert_same(decode(header, nbuffers, type(reply)), reply)


def test_requests_name_their_reply_types():
    """Each request says what its reply decodes as; one-way messages have none."""
    replies = {cls: cls.REPLY for cls in message_types().values() if cls.REPLY is not None}
    assert replies == {Register: Registered, Get: Items, Stats: StatsReply, Replicate: Ack,
                       Attach: Registered, Publish: Answer, Lookup: Found}


def test_split_parts_gives_each_record_its_own_buffers():
    """Each record gets the next ``nparts`` buffers, in order; a record with none gets none."""
    (done, buffers), = [s for s in SAMPLES if type(s[0]) is Done and s[0].results]
    header, got = over_the_wire(encode(done), buffers)
    msg = decode(header, len(got))
    split = [(rec.key, [bytes(b) for b in bufs]) for rec, bufs in split_parts(msg.results, got)]
    assert split == [(1, buffers[0:2]), (2, buffers[2:3]), (-3, []), (4, []), (6, []), (5, []), (7, buffers[3:4])]
    (run, run_buffers), = [s for s in SAMPLES if type(s[0]) is Run and s[0].tasks]
    assert [(t.key, list(b)) for t, b in split_parts(run.tasks, run_buffers)] == [
        (SPAWNED, run_buffers[:3]), (1, run_buffers[3:4]), (2, run_buffers[4:])]
    assert list(split_parts([], [])) == []


# -- malformed messages ------------------------------------------------------------------
RUN_TASK = [5, "f", b"h", "thread", 0, 1, [], False, False, [], False, [], 0]
FINISHED = [5, 0, "ok", 10, 1.0, 0.5, 0, []]
MEMORY = [0, 0, 0, 0]
HOLDER = [1, ADDR]


def run(*tasks, nbuffers=1):
    return {"op": "run", "a": [list(tasks)]}, nbuffers


def done(*results, memory=MEMORY, nbuffers=0):
    return {"op": "done", "a": [list(results), memory]}, nbuffers


def with_field(base: list, i: int, value) -> list:
    out = list(base)
    out[i] = value
    return out


# A value of a wrong type for each field of RunTask and Finished.
WRONG_RUN_TASK = ["5", b"f", "h", None, 1.5, "1", {}, 1, None, [1, "2"], 0, [True], 1.5]
WRONG_FINISHED = [None, "0", b"ok", -1, "1.0", None, 1.5, {}]

MALFORMED = [
    # wrong field count, of a message and of its records
    ("RunTask 12 fields", *run(RUN_TASK[:-1]), r"malformed RunTask: expected 13 fields"),
    ("RunTask 14 fields", *run([*RUN_TASK, 0]), r"malformed RunTask: expected 13 fields"),
    ("Finished 7 fields", *done(FINISHED[:-1]), r"malformed Finished: expected 8 fields"),
    ("Memory 3 fields", *done(memory=[0, 0, 0]), r"malformed Memory: expected 4 fields"),
    ("Get no fields", {"op": "get", "a": []}, 0, r"malformed Get: expected 2 fields"),
    ("Get 3 fields", {"op": "get", "a": [[1], "", [2]]}, 0, r"malformed Get: expected 2 fields"),
    ("Get.shm bytes", {"op": "get", "a": [[1], b"k"]}, 0, r"malformed Get: field shm is bytes"),
    ("Stats a field", {"op": "stats", "a": [1]}, 0, r"malformed Stats: expected 0 fields"),
    ("Done 1 field", {"op": "done", "a": [[]]}, 0, r"malformed Done: expected 2 fields"),
    # a wrong type in each field of RunTask and Finished
    *[(f"RunTask.{field}", *run(with_field(RUN_TASK, i, WRONG_RUN_TASK[i])),
       rf"malformed RunTask: field {field} is")
      for i, field in enumerate(RunTask._fields)],
    *[(f"Finished.{field}", *done(with_field(FINISHED, i, WRONG_FINISHED[i])),
       rf"malformed Finished: field {field} is")
      for i, field in enumerate(Finished._fields)],
    # bool is not taken for an int, a count or a float
    ("RunTask.key bool", *run(with_field(RUN_TASK, 0, True)), r"RunTask: field key is bool True"),
    ("RunTask.nparts bool", *run(with_field(RUN_TASK, 5, True)), r"RunTask: field nparts is bool"),
    ("Finished.size bool", *done(with_field(FINISHED, 3, False)), r"Finished: field size is bool"),
    ("Finished.start bool", *done(with_field(FINISHED, 4, True)), r"Finished: field start is bool"),
    ("Holder.worker bool", *run(with_field(RUN_TASK, 6, [[1, [[True, ADDR]]]])),
     r"malformed Holder: field worker is bool"),
    ("Get keys bool", {"op": "get", "a": [[1, True], ""]}, 0, r"malformed Get: field keys is bool"),
    ("Registered bool", {"op": "registered", "a": [False]}, 0,
     r"malformed Registered: field worker_id is bool"),
    ("Register.memory_limit bool", {"op": "register", "a": ["w", 1, "h", 1, ADDR, False, [], [], 0.0, {}]}, 0,
     r"malformed Register: field memory_limit is bool"),
    ("Register.memory_limit str", {"op": "register", "a": ["w", 1, "h", 1, ADDR, "16G", [], [], 0.0, {}]}, 0,
     r"malformed Register: field memory_limit is str"),
    ("Blocked negative", {"op": "blocked", "a": [-1]}, 0, r"malformed Blocked: -1 threads"),
    ("Register.holds str", {"op": "register", "a": ["w", 1, "h", 1, ADDR, None, ["7"], [], 0.0, {}]}, 0,
     r"malformed Register: field holds"),
    ("Register.resources list", {"op": "register", "a": ["w", 1, "h", 1, ADDR, None, [], [], 0.0, []]}, 0,
     r"malformed Register: field resources is list"),
    ("Register.gpus str", {"op": "register", "a": ["w", 1, "h", 1, ADDR, None, [], ["0"], 0.0, {}]}, 0,
     r"malformed Register: field gpus"),
    ("Register.clock nan", {"op": "register", "a": ["w", 1, "h", 1, ADDR, None, [], [], float("nan"), {}]}, 0,
     r"malformed Register: clock nan"),
    ("MoveEvent inverted", {"op": "events", "a": [[], [[1, 10, 2, 5.0, 4.0]], []]}, 0,
     r"malformed MoveEvent: from 5.0 to 4.0"),
    ("StoreEvent kind", {"op": "events", "a": [[], [], [[1, 10, "burnt", 1.0, 2.0]]]}, 0,
     r"malformed StoreEvent: unknown kind 'burnt'"),
    ("RunEvent thread int", {"op": "events", "a": [[[1, 0, 5]], [], []]}, 0,
     r"malformed RunEvent: field thread"),
    # negative counts
    ("RunTask.nparts -1", *run(with_field(RUN_TASK, 5, -1)), r"RunTask: field nparts is int -1"),
    ("Finished.nparts -1", *done(with_field(FINISHED, 6, -1)), r"Finished: field nparts is int -1"),
    ("ValueDef.nparts -1", {"op": "values", "a": [[[1, -1]]]}, 0, r"ValueDef: field nparts is int"),
    ("Item.nparts -1", {"op": "items", "a": [[[1, -1]], [], [], [], []]}, 0, r"Item: field nparts is int"),
    ("SpawnTask.nparts -1", {"op": "spawn", "a": [[[1, b"h", -1, False]]]}, 0,
     r"SpawnTask: field nparts is int"),
    ("Memory.running -1", *done(memory=[0, 0, 0, -1]), r"Memory: field running is int -1"),
    # statuses that do not exist
    ("Finished status", *done(with_field(FINISHED, 2, "weird")),
     r"malformed Finished: unknown status 'weird'"),
    ("TaskDone status", {"op": "task-done", "a": [1, "done", [], ""]}, 0,
     r"malformed TaskDone: unknown status 'done'"),
    # times that are no times: the run-time estimates learn from them
    ("Finished.seconds -1", *done(with_field(FINISHED, 5, -1.0)), r"malformed Finished: .* took -1.0 s"),
    ("Finished.seconds inf", *done(with_field(FINISHED, 5, math.inf)), r"malformed Finished: .* took inf s"),
    ("Finished.seconds nan", *done(with_field(FINISHED, 5, math.nan)), r"malformed Finished: .* took nan s"),
    ("Finished.start -inf", *done(with_field(FINISHED, 4, -math.inf)), r"malformed Finished: .* at -inf"),
    # parts that cannot make a whole record
    ("RunTask no parts", *run(with_field(RUN_TASK, 5, 0), nbuffers=0), r"malformed RunTask: 0 part"),
    ("RunTask callbacks, 1 part", *run(with_field(RUN_TASK, 7, True)), r"malformed RunTask: 1 part"),
    ("SpawnTask 2 parts", {"op": "spawn", "a": [[[1, b"h", 2, False]]]}, 2,
     r"malformed SpawnTask: 2 part"),
    ("ValueDef no parts", {"op": "values", "a": [[[1, 0]]]}, 0, r"malformed ValueDef"),
    ("Item no parts", {"op": "items", "a": [[[1, 0]], [], [], []]}, 0, r"malformed Item"),
    ("Finished error 0 parts", *done(with_field(FINISHED, 2, "error")),
     r"malformed Finished: status 'error' with 0 part"),
    ("Finished value 0 parts", *done(with_field(FINISHED, 2, "value")),
     r"malformed Finished: status 'value' with 0 part"),
    ("Finished missing 1 part", *done(with_field(FINISHED, 2, "missing")[:6] + [1, []], nbuffers=1),
     r"malformed Finished: status 'missing' with 1 part"),
    ("Finished cancelled 2 parts",
     *done(with_field(FINISHED, 2, "cancelled")[:6] + [2, []], nbuffers=2),
     r"malformed Finished: status 'cancelled' with 2 part"),
    ("Finished dropped 1 part", *done(with_field(FINISHED, 2, "dropped")[:6] + [1, []], nbuffers=1),
     r"malformed Finished: status 'dropped' with 1 part"),
    # columns that do not line up, a function past those sent, times that are no times
    ("RunPlain keys without attempts", {"op": "run-plain", "a": [[1, 2], [b"h"], ["f"], [0, 0], [0], [0, 0]]},
     1, r"malformed RunPlain: columns of unequal lengths \(2 keys\)"),
    ("RunPlain names without fns", {"op": "run-plain", "a": [[1], [b"h"], [], [0], [0], [0]]},
     1, r"malformed RunPlain: columns of unequal lengths"),
    ("RunPlain which past fns", {"op": "run-plain", "a": [[1], [b"h"], ["f"], [1], [0], [0]]},
     1, r"malformed RunPlain: a task names a function past the 1 sent"),
    ("RunPlain which -1", {"op": "run-plain", "a": [[1], [b"h"], ["f"], [-1], [0], [0]]},
     1, r"malformed RunPlain: field which is int -1"),
    ("RunPlain attempt -1", {"op": "run-plain", "a": [[1], [b"h"], ["f"], [0], [-1], [0]]},
     1, r"malformed RunPlain: field attempts is int -1"),
    ("RunPlain without its arguments", {"op": "run-plain", "a": [[1], [b"h"], ["f"], [0], [0], [0]]},
     0, r"run-plain announces 1 buffer\(s\) and came with 0"),
    ("DoneValues keys without starts", {"op": "done-values", "a": [[1], [0], [], [0.0], [0, 0, 0, 0]]},
     1, r"malformed DoneValues: columns of unequal lengths \(1 keys\)"),
    ("DoneValues seconds nan", {"op": "done-values", "a": [[1], [0], [0.0], [math.nan], [0, 0, 0, 0]]},
     1, r"malformed DoneValues: .* took nan s"),
    ("DoneValues start inf", {"op": "done-values", "a": [[1], [0], [math.inf], [0.0], [0, 0, 0, 0]]},
     1, r"malformed DoneValues: a run that started at inf"),
    ("DoneValues seconds -1", {"op": "done-values", "a": [[1], [0], [0.0], [-1.0], [0, 0, 0, 0]]},
     1, r"malformed DoneValues: .* took -1.0 s"),
    ("DoneValues memory nil", {"op": "done-values", "a": [[], [], [], [], None]},
     1, r"malformed Memory: expected 4 fields"),
    # a task held for inputs it does not read, or for itself
    ("RunTask waits for what it does not read", *run(with_field(with_field(RUN_TASK, 9, [1]), 11, [2])),
     r"malformed RunTask: task 5 waits for \[2\]"),
    ("RunTask waits for itself", *run(with_field(with_field(RUN_TASK, 9, [5]), 11, [5])),
     r"malformed RunTask: task 5 waits for \[5\]"),
    # buffers that do not match what the records announce
    ("run 2 parts, 1 buffer", *run(with_field(RUN_TASK, 5, 2), nbuffers=1),
     r"run announces 2 buffer\(s\) and came with 1"),
    ("run 1 part, 2 buffers", *run(RUN_TASK, nbuffers=2), r"run announces 1 buffer\(s\) and came with 2"),
    ("functions 2 defs, 3 buffers", {"op": "functions", "a": [[[b"a"], [b"b"]]]}, 3,
     r"functions announces 2 buffer"),
    ("done ok 2 parts, 0 buffers", *done(with_field(FINISHED, 6, 2)), r"done announces 2 buffer"),
    ("items 1 part, 0 buffers", {"op": "items", "a": [[[1, 1]], [], [], [], []]}, 0, r"items announces 1"),
    ("put without buffers", {"op": "put", "a": [1]}, 0, r"put came without the buffers"),
    ("get with a buffer", {"op": "get", "a": [[1], ""]}, 1, r"get announces 0 buffer\(s\) and came with 1"),
    ("ack with a buffer", {"op": "ack", "a": []}, 1, r"ack announces 0 buffer"),
    ("task-done cancelled, 1 buffer", {"op": "task-done", "a": [1, "cancelled", [], ""]}, 1,
     r"task-done announces 0 buffer"),
    ("task-done finished remotely, 1 buffer", {"op": "task-done", "a": [1, "finished", [HOLDER], ""]},
     1, r"task-done announces 0 buffer"),
    ("task-done finished, no value", {"op": "task-done", "a": [1, "finished", [], ""]}, 0,
     r"task-done came without the buffers"),
    ("task-done failed, no error", {"op": "task-done", "a": [1, "failed", [], ""]}, 0,
     r"task-done (came without the buffers|announces 1 buffer)"),
    # "failed" carries exactly one part, its error, whatever the holders say
    ("task-done failed with holders, no error", {"op": "task-done", "a": [1, "failed", [HOLDER], ""]},
     0, r"task-done (came without the buffers|announces 1 buffer)"),
    ("task-done failed, 2 buffers", {"op": "task-done", "a": [1, "failed", [], ""]}, 2,
     r"task-done announces 1 buffer\(s\) and came with 2"),
    # ops that do not exist
    ("unknown op", {"op": "nope", "a": []}, 0, r"unknown op 'nope'"),
    ("empty op", {"op": "", "a": []}, 0, r"unknown op ''"),
    ("a reply without its type", {"op": "reply", "reply_to": 1, "a": []}, 0, r"unknown op 'reply'"),
    # "a" missing, or not a list
    ("get without a", {"op": "get"}, 0, r"malformed Get: expected 2 fields in a list, got tuple"),
    ("stats without a", {"op": "stats"}, 0, r"malformed Stats: expected 0 fields in a list"),
    ("a is a map", {"op": "get", "a": {"keys": [1]}}, 0, r"malformed Get: .* got dict"),
    ("a is a str", {"op": "holding", "a": "1"}, 0, r"malformed Holding: .* got str"),
    ("a is nil", {"op": "shutdown", "a": None}, 0, r"malformed Shutdown: .* got NoneType"),
    ("a is an int", {"op": "cancel", "a": 5}, 0, r"malformed Cancel: .* got int"),
    ("a is bytes", {"op": "release", "a": b"\x91\x01"}, 0, r"malformed Release: .* got bytes"),
    # nested records malformed
    ("Run.tasks a map", {"op": "run", "a": [{"x": 1}]}, 0, r"malformed Run: field tasks is dict"),
    ("RunTask not a list", {"op": "run", "a": [[5]]}, 0, r"malformed RunTask: expected 13 fields"),
    ("Dep.holders a str", *run(with_field(RUN_TASK, 6, [[1, "x"]])), r"malformed Dep: field holders"),
    ("Dep 1 field", *run(with_field(RUN_TASK, 6, [[1]])), r"malformed Dep: expected 2 fields"),
    ("Holder 1 field", *run(with_field(RUN_TASK, 6, [[1, [[1]]]])), r"malformed Holder: expected 2"),
    ("Holder.address int", *run(with_field(RUN_TASK, 6, [[1, [[1, 2]]]])),
     r"malformed Holder: field address is int 2"),
    ("Done.memory nil", *done(memory=None), r"malformed Memory: expected 4 fields .* got NoneType"),
    ("Missing.holders str", *done(FINISHED[:2] + ["missing"] + FINISHED[3:7] + [[[1, ["1"]]]]),
     r"malformed Missing: field holders is str '1'"),
    ("Replicate Holder 3 fields", {"op": "replicate", "a": [[[1, [[1, ADDR, 3]]]]]}, 0,
     r"malformed Holder: expected 2 fields"),
    ("Items.items not records", {"op": "items", "a": [[1], [], [], [], []]}, 0, r"malformed Item: expected 2"),
    ("Items.missing a str", {"op": "items", "a": [[], "12", [], [], []]}, 0, r"malformed Items: field missing"),
    ("Shared 2 fields", {"op": "items", "a": [[], [], [], [], [[1, "/dev/shm/x"]]]}, 0,
     r"malformed Shared: expected 3 fields"),
    ("SpawnTask.refs int", {"op": "spawn", "a": [[[1, b"h", 3, 1]]]}, 3,
     r"malformed SpawnTask: field refs is int 1"),
    ("FunctionDef.hash str", {"op": "functions", "a": [[["h"]]]}, 1,
     r"malformed FunctionDef: field hash is str"),
    ("ValueDef 1 field", {"op": "values", "a": [[[1]]]}, 1, r"malformed ValueDef: expected 2"),
    ("Heartbeat.stats a list", {"op": "heartbeat", "a": [[1, 2]]}, 0,
     r"malformed Heartbeat: field stats is list"),
    ("TaskDone.holders records", {"op": "task-done", "a": [1, "cancelled", [[1, b"a"]], ""]}, 0,
     r"malformed Holder: field address is bytes"),
    ("StreamItems no values", {"op": "stream-items", "a": [1, 0, 0, []]}, 1,
     r"malformed StreamItems: no values"),
    ("StreamItems without its batch", {"op": "stream-items", "a": [1, 0, 3, []]}, 0,
     r"stream-items came without the buffers"),
    ("StreamItems.first negative", {"op": "stream-items", "a": [1, -1, 3, []]}, 1,
     r"malformed StreamItems: field first is int -1"),
    ("StreamCredit below -1", {"op": "stream-credit", "a": [1, -2]}, 0,
     r"malformed StreamCredit: limit -2"),
    ("StreamAck.done int", {"op": "stream-ack", "a": [1, 2, 3, 1]}, 0,
     r"malformed StreamAck: field done is int 1"),
    ("StreamEnd unknown status", {"op": "stream-end", "a": [1, "cancelled", []]}, 0,
     r"malformed StreamEnd: unknown status 'cancelled'"),
    ("StreamEnd error without it", {"op": "stream-end", "a": [1, "error", [2]]}, 0,
     r"stream-end announces 1 buffer\(s\) and came with 0"),
]


@pytest.mark.parametrize("header, nbuffers, match", [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed_message_is_a_protocol_error(header, nbuffers, match):
    """Each malformed message raises ProtocolError naming the record and field, nothing else."""
    with pytest.raises(ProtocolError, match=match):
        wire_decode(header, nbuffers)


def test_decode_refuses_an_op_that_is_not_a_string():
    """decode() itself checks the op's type (a header may come from elsewhere than the
    frame parser, which checks it too): ProtocolError, not a TypeError from the table."""
    with pytest.raises(ProtocolError, match="op must be a string, got list"):
        decode({"op": [1], "a": []}, 0)


def nested(depth: int) -> bytes:
    """A msgpack array nested ``depth`` deep around an empty one, built by hand: msgpack's
    packer refuses such depth, a hostile peer's bytes need not."""
    return b"\x91" * depth + b"\x90"


@pytest.mark.parametrize("op", ["get", "run", "heartbeat"])
def test_deeply_nested_field_is_a_protocol_error(op):
    """A field nested as deep as msgpack allows is reported as ProtocolError, not RecursionError."""
    head = b"\x82" + msgpack.packb("op") + msgpack.packb(op) + msgpack.packb("a") + nested(1020)
    frame = PREFIX.pack(b"AG", 0, len(head)) + head
    parser = FrameParser()
    parser.get_buffer()[:len(frame)] = frame
    parser.advance(len(frame))
    (header, _), = parser.frames
    with pytest.raises(ProtocolError, match=r"malformed (Get|RunTask|Heartbeat)"):
        decode(header, 0)


def test_valid_edge_values_are_taken():
    """The edges of each type are valid: nil memory limit, zero counts, an int for a float
    (a worker's thread count is the exception: at least one)."""
    assert wire_decode({"op": "register", "a": ["", 0, "", 1, "", None, [], [], 0.0, {}]}).memory_limit is None
    with pytest.raises(ProtocolError, match="threads >= 1"):
        wire_decode({"op": "register", "a": ["", 0, "", 0, "", None, [], [], 0.0, {}]})
    msg = wire_decode({"op": "done", "a": [[[0, 0, "ok", 0, 0, 0, 0, []]], MEMORY]})
    assert msg.results[0].start == 0 and type(msg.results[0]) is Finished
    task = wire_decode({"op": "run", "a": [[[5, "f", b"h", "thread", 0, 2, [], True, False, [], True, [], 0]]]}, 2)
    assert task.tasks[0].callbacks is True and task.tasks[0].nparts == 2
    assert task.tasks[0].files is True


# -- fuzzing the record decoders ---------------------------------------------------------
def fuzz(examples: int, deadline_ms: int = 1000) -> settings:
    return settings(max_examples=examples, deadline=deadline_ms, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.integers(-3, 3)
           | st.floats(allow_nan=False) | st.text(max_size=8) | st.binary(max_size=16)
           | st.sampled_from(["ok", "error", "missing", "cancelled", "finished", "failed",
                              "thread", ""]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=8)
OPS = sorted(message_types())


def field_lists(op: str):
    """Values for "a": sometimes anything, often a list of the message's field count."""
    n = len(message_types()[op]._fields)
    return st.lists(values, min_size=n, max_size=n) | values


def decodes_or_refuses(header: dict, nbuffers: int):
    """The property: decode() returns a message of the header's op, or raises ProtocolError."""
    try:
        got, _ = over_the_wire(header)
    except ProtocolError:
        return None  # not a frame the peer's parser accepts (e.g. a header past its limit)
    try:
        msg = decode(got, nbuffers)
    except ProtocolError:
        return None
    assert type(msg) is message_types()[header["op"]]
    # what was taken is well formed: it survives a round trip unchanged
    assert_same(wire_decode(encode(msg), nbuffers), msg)
    return msg


@fuzz(300)
@given(data=st.data(), nbuffers=st.integers(0, 4))
def test_random_fields_for_every_op(data, nbuffers):
    """Random msgpack values as "a" of every known op: a message of that op, or ProtocolError."""
    op = data.draw(st.sampled_from(OPS), label="op")
    decodes_or_refuses({"op": op, "a": data.draw(field_lists(op), label="a")}, nbuffers)


def node_paths(node, prefix=()):
    yield prefix
    if isinstance(node, list):
        for i, child in enumerate(node):
            yield from node_paths(child, (*prefix, i))


def node_at(a, path):
    for i in path:
        a = a[i]
    return a


def mutate(data, a):
    """One edit of a message's field list: a node replaced by a random value or wrapped in
    a list, an element dropped from or appended to a list."""
    path = data.draw(st.sampled_from(list(node_paths(a))), label="path")
    kind = data.draw(st.sampled_from(["replace", "wrap", "drop", "append"]), label="kind")
    if kind in ("drop", "append"):
        target = node_at(a, path if isinstance(node_at(a, path), list) else path[:-1])
        if not isinstance(target, list):
            return a
        if kind == "append":
            target.append(data.draw(values, label="value"))
        elif target:
            del target[data.draw(st.integers(0, len(target) - 1), label="index")]
        return a
    new = data.draw(values, label="value") if kind == "replace" else [node_at(a, path)]
    if not path:
        return new
    node_at(a, path[:-1])[path[-1]] = new
    return a


@fuzz(400)
@given(data=st.data())
def test_mutated_valid_messages(data):
    """Valid messages of every type with their field lists edited: the message, or ProtocolError."""
    msg, buffers = data.draw(st.sampled_from(SAMPLES), label="sample")
    header, _ = over_the_wire(encode(msg))  # plain lists, as they come off the wire
    a = header["a"]
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        a = mutate(data, a)
    decodes_or_refuses({"op": msg.OP, "a": a}, len(buffers))


def check_buffer_count(msg, nbuffers: int, sent: int) -> None:
    """decode() takes ``msg`` with ``nbuffers`` buffers only if that is what it announces."""
    header, _ = over_the_wire(encode(msg))
    if nbuffers == sent or (takes_any_buffers(msg) and nbuffers >= 1):
        assert_same(decode(header, nbuffers), msg)
    else:
        with pytest.raises(ProtocolError, match=r"buffer"):
            decode(header, nbuffers)


@pytest.mark.parametrize("sample", SAMPLES, ids=sample_id)
def test_buffer_counts_next_to_the_announced_one(sample):
    """One buffer less or more than announced, none, or a frame's worth: ProtocolError."""
    msg, buffers = sample
    for nbuffers in {-1, 0, 1, len(buffers) - 1, len(buffers), len(buffers) + 1, MAX_BUFFERS}:
        check_buffer_count(msg, nbuffers, len(buffers))


@fuzz(200)
@given(sample=st.sampled_from(SAMPLES),
       nbuffers=st.integers(-(2**63), 2**63) | st.integers(0, 2 * MAX_BUFFERS))
def test_random_buffer_counts(sample, nbuffers):
    """A valid message is taken only with the buffers its records announce."""
    msg, buffers = sample
    check_buffer_count(msg, nbuffers, len(buffers))


# -- Batch -------------------------------------------------------------------------------
def task(key: int, nparts: int = 1) -> RunTask:
    return RunTask(key, f"t{key}", FN, "thread", 0, nparts, [], False, False, [])


def sent(batch: Batch) -> list[tuple[object, list]]:
    """The batch's messages as the peer decodes them."""
    out = []
    for msg, buffers in batch.take():
        header, got = over_the_wire(encode(msg), buffers)
        out.append((decode(header, len(got)), got))
    return out


def test_batch_splits_at_the_frame_buffer_limit():
    """5,000 one-part records: two frames within MAX_BUFFERS, in order, each decodable."""
    batch = Batch(Run)
    for key in range(5000):
        batch.add(task(key), [key.to_bytes(2, "big")])
    frames = sent(batch)
    assert [len(msg.tasks) for msg, _ in frames] == [MAX_BUFFERS, 5000 - MAX_BUFFERS]
    assert all(len(buffers) <= MAX_BUFFERS for _, buffers in frames)
    pairs = [(t.key, bytes(b[0])) for msg, buffers in frames for t, b in split_parts(msg.tasks, buffers)]
    assert pairs == [(key, key.to_bytes(2, "big")) for key in range(5000)]


def test_batch_never_splits_a_record():
    """Records of several parts fill a frame up to the limit; the one that would pass it starts the next."""
    batch = Batch(Run)
    for key in range(4):
        batch.add(task(key, 1500), [b"x"] * 1500)
    frames = sent(batch)
    assert [[t.key for t in msg.tasks] for msg, _ in frames] == [[0, 1], [2, 3]]
    assert [len(b) for _, b in frames] == [3000, 3000]
    batch.add(task(9, MAX_BUFFERS), [b"y"] * MAX_BUFFERS)  # exactly a frame's worth fits
    assert [len(b) for _, b in sent(batch)] == [MAX_BUFFERS]


def test_batch_splits_at_batch_bytes(monkeypatch):
    """Past BATCH_BYTES the frame is sealed; a record bigger than that goes alone, whole."""
    monkeypatch.setattr(P, "BATCH_BYTES", 100)
    batch = Batch(Run)
    batch.add(task(1), [b"a" * 40])
    batch.add(task(2), [memoryview(b"b" * 60)])           # 100: still within
    batch.add(task(3), [b"c" * 1])                        # 101: a new frame
    batch.add(task(4, 2), [b"d" * 150, bytearray(10)])    # alone, never split
    batch.add(task(5), [b"e" * 5])
    frames = sent(batch)
    assert [[t.key for t in msg.tasks] for msg, _ in frames] == [[1, 2], [3], [4], [5]]
    assert [[len(b) for b in bufs] for _, bufs in frames] == [[40, 60], [1], [150, 10], [5]]


def test_batch_records_without_parts_stay_in_the_current_frame():
    """Records with no parts never seal a frame, and keep their place among the others."""
    batch = Batch(lambda results: Done(results, Memory(1, 2, 3, 4)))
    batch.add(Finished(1, 0, "cancelled", 0, 0.0, 0.0, 0, []))
    batch.add(Finished(2, 0, "ok", 3, 0.0, 0.0, 1, []), [b"abc"])
    batch.add(Finished(3, 0, "missing", 0, 0.0, 0.0, 0, [Missing(-1, [2])]))
    ((msg, buffers),) = sent(batch)
    assert [r.key for r in msg.results] == [1, 2, 3] and msg.memory == Memory(1, 2, 3, 4)
    assert [bytes(b) for b in buffers] == [b"abc"]


def test_batch_seals_a_frame_at_batch_records(monkeypatch):
    """Records without parts count toward BATCH_RECORDS, so no header outgrows its limit."""
    monkeypatch.setattr(P, "BATCH_RECORDS", 3)
    batch = Batch(lambda results: Done(results, Memory(0, 0, 0, 0)))
    for key in range(7):
        batch.add(Finished(key, 0, "ok", 8, 0.0, 0.0, 0, []))
    frames = sent(batch)
    assert [[r.key for r in msg.results] for msg, _ in frames] == [[0, 1, 2], [3, 4, 5], [6]]


def test_take_empties_the_batch():
    """take() hands everything over once: the batch is false and empty after."""
    batch = Batch(Holding)
    assert not batch and batch.take() == []
    batch.add(1)
    batch.add(2)
    assert batch
    assert batch.take() == [(Holding([1, 2]), [])]
    assert not batch and batch.take() == []
    batch.add(3)
    assert batch.take() == [(Holding([3]), [])]


def test_one_record_past_the_buffer_limit_is_a_value_error():
    """A record of more than MAX_BUFFERS parts cannot be sent: ValueError, nothing lost."""
    batch = Batch(Run)
    batch.add(task(1), [b"a"])
    too_many = rf"one record with {MAX_BUFFERS + 1} buffers cannot fit in a frame \(at most {MAX_BUFFERS}\)"
    with pytest.raises(ValueError, match=too_many):
        batch.add(task(2, MAX_BUFFERS + 1), [b"b"] * (MAX_BUFFERS + 1))
    batch.add(task(3), [b"c"])
    frames = sent(batch)
    assert [t.key for msg, _ in frames for t in msg.tasks] == [1, 3]
    assert [bytes(b) for _, bufs in frames for b in bufs] == [b"a", b"c"]


# -- Endpoint over a real connection -----------------------------------------------------
class Server:
    """A Listener whose connections are Endpoints; ``tables(endpoint)`` is each one's handlers."""

    def __init__(self, tables) -> None:
        self.tables = tables
        self.token = new_token()
        self.listener = Listener(self._handle, self.token)
        self.ended: asyncio.Queue[BaseException] = asyncio.Queue()  # what ended each connection

    async def _handle(self, comm, info) -> None:
        endpoint = Endpoint(comm)
        endpoint.handlers = self.tables(endpoint)
        try:
            await endpoint.serve()
        except BaseException as exc:
            self.ended.put_nowait(exc)
            raise
        finally:
            await endpoint.close()

    async def next_end(self) -> BaseException:
        return await asyncio.wait_for(self.ended.get(), 10)

    @contextlib.asynccontextmanager
    async def connect(self, handlers=None):
        """A client Endpoint, served in the background: (endpoint, its serve() task)."""
        comm = await open_comm("127.0.0.1", self.listener.port)
        await asyncio.wait_for(client_handshake(comm, self.token, {}), 10)
        endpoint = Endpoint(comm, handlers)
        serving = asyncio.ensure_future(endpoint.serve())
        try:
            yield endpoint, serving
        finally:
            await endpoint.close()
            await asyncio.gather(serving, return_exceptions=True)


@pytest.fixture
async def start_server():
    servers: list[Server] = []

    async def start(tables) -> Server:
        server = Server(tables)
        await server.listener.start("127.0.0.1", 0)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.listener.close()


STORE = {1: [b"pickle-1", b"buffer"], -2: [b"p", bytes(200_000)], 3: [b"three"]}


def serve_get(msg: Get, buffers):
    """A data server's get: the values it holds, their parts in item order."""
    items, out = [], []
    for key in msg.keys:
        if key in STORE:
            items.append(Item(key, len(STORE[key])))
            out += STORE[key]
    return Items(items, [k for k in msg.keys if k not in STORE], [], [], []), out


async def test_request_gets_its_typed_reply_with_buffers(start_server):
    """Get -> Items over loopback: the reply is an Items with each item's parts."""
    server = await start_server(lambda ep: {Get: serve_get})
    async with server.connect() as (client, _):
        reply, buffers = await client.request(Get([1, 99, -2, 3]), timeout=10)
        assert type(reply) is Items and all(type(i) is Item for i in reply.items)
        assert reply == Items([Item(1, 2), Item(-2, 2), Item(3, 1)], [99], [], [], [])
        got = {item.key: [bytes(b) for b in bufs] for item, bufs in split_parts(reply.items, buffers)}
        assert got == STORE
        reply, buffers = await client.request(Get([]), timeout=10)
        assert reply == Items([], [], [], [], []) and buffers == []


async def test_awaitable_reply_is_awaited_while_serving_goes_on(start_server):
    """A request handler may return an awaitable; messages after it are handled meanwhile."""
    pending: list[asyncio.Future] = []

    async def slow_stats(msg, buffers):
        await asyncio.sleep(0.01)
        return StatsReply({"slow": True}), ()

    def get_later(msg, buffers):
        pending.append(asyncio.get_running_loop().create_future())
        return pending[-1]  # settled by the release that follows

    def release(msg, buffers):
        pending.pop(0).set_result((Items([Item(k, 1) for k in msg.keys], [], [], [], []), [b"v"] * len(msg.keys)))

    server = await start_server(lambda ep: {Stats: slow_stats, Get: get_later, Release: release})
    async with server.connect() as (client, _):
        assert await client.request(Stats(), timeout=10) == (StatsReply({"slow": True}), [])
        waiting = asyncio.ensure_future(client.request(Get([5]), timeout=10))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        await client.send(Release([5]))
        reply, buffers = await asyncio.wait_for(waiting, 10)
        assert reply == Items([Item(5, 1)], [], [], [], []) and [bytes(b) for b in buffers] == [b"v"]


async def test_one_way_messages_reach_their_handler_in_order(start_server):
    """One-way messages are handled in the order sent, each with its buffers."""
    seen: list[tuple] = []
    finished = asyncio.Event()

    def on_holding(msg, buffers):
        seen.append(("holding", msg.keys))

    def on_put(msg, buffers):
        seen.append(("put", msg.key, [bytes(b) for b in buffers]))

    server = await start_server(lambda ep: {Holding: on_holding, Put: on_put,
                                            Shutdown: lambda m, b: finished.set()})
    async with server.connect() as (client, _):
        for i in range(200):
            client.send_nowait(Holding([i, -i]))
            if i % 50 == 0:
                await client.send(Put(i), [b"value", bytes(i)])
        client.send_nowait(Shutdown())
        await asyncio.wait_for(finished.wait(), 10)
    want = []
    for i in range(200):
        want.append(("holding", [i, -i]))
        if i % 50 == 0:
            want.append(("put", i, [b"value", bytes(i)]))
    assert seen == want


async def test_slow_one_way_handler_does_not_hold_up_the_next(start_server):
    """A one-way handler's awaitable runs as a task: the next message is handled meanwhile."""
    second = asyncio.Event()
    first_done = asyncio.Event()

    async def wait_for_second():
        await second.wait()
        first_done.set()

    server = await start_server(lambda ep: {Put: lambda m, b: wait_for_second(),
                                            Holding: lambda m, b: second.set()})
    async with server.connect() as (client, _):
        await client.send(Put(1), [b"big value"])
        await client.send(Holding([1]))
        await asyncio.wait_for(first_done.wait(), 10)


async def assert_only_that_connection_ends(server: Server, other, send_bad) -> BaseException:
    """Sends something bad on a new connection: it alone ends; ``other`` and new ones work."""
    async with server.connect() as (bad, bad_serving):
        await send_bad(bad)
        ended = await server.next_end()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(bad_serving, 10)
        assert bad.closed
    reply, _ = await other.request(Get([3]), timeout=10)
    assert reply == Items([Item(3, 1)], [], [], [], [])
    async with server.connect() as (fresh, _):
        assert (await fresh.request(Get([1]), timeout=10))[0].items == [Item(1, 2)]
    return ended


async def test_message_not_in_the_table_ends_only_that_connection(start_server):
    """A message type the table lacks is a ProtocolError for that connection alone."""
    server = await start_server(lambda ep: {Get: serve_get})
    async with server.connect() as (other, _):
        ended = await assert_only_that_connection_ends(
            server, other, lambda bad: bad.send(Heartbeat({"memory_used": 1})))
        assert isinstance(ended, ProtocolError)
        assert "'heartbeat', which is not taken here" in str(ended)


@pytest.mark.parametrize("header, nbuffers, match", [
    ({"op": "get", "a": [["x"], ""]}, 0, r"malformed Get: field keys is str 'x'"),
    ({"op": "get", "a": [[1], ""], "req": 1}, 1, r"get announces 0 buffer"),
    ({"op": "run", "a": [[[1, "f"]]]}, 0, r"malformed RunTask: expected 13 fields"),
    ({"op": "no-such-op", "a": []}, 0, r"unknown op 'no-such-op'"),
], ids=["bad-field", "bad-buffers", "bad-record", "unknown-op"])
async def test_malformed_message_ends_only_that_connection(start_server, header, nbuffers, match):
    """A valid frame holding a malformed message ends that connection alone, with ProtocolError."""
    server = await start_server(lambda ep: {Get: serve_get})
    async with server.connect() as (other, _):
        ended = await assert_only_that_connection_ends(
            server, other, lambda bad: bad.comm.send(header, [b"x"] * nbuffers))
    assert isinstance(ended, ProtocolError), repr(ended)
    assert re.search(match, str(ended)), str(ended)


async def test_handler_table_change_takes_effect_mid_connection(start_server):
    """A connection must register first; registering swaps the table for the next message."""
    registered = []

    def tables(endpoint):
        def register(msg, buffers):
            registered.append(msg.name)
            endpoint.handlers = {Get: serve_get}  # from now on: no second registration
            return Registered(len(registered)), ()
        return {Register: register}

    server = await start_server(tables)
    async with server.connect() as (early, _):
        with pytest.raises(ConnectionError):
            await early.request(Get([1]), timeout=10)  # before registering: not taken
        assert "'get', which is not taken here" in str(await server.next_end())
    async with server.connect() as (client, _):
        reply, _ = await client.request(Register(NAME, 1, "h", 1, ADDR, None), timeout=10)
        assert reply == Registered(1) and registered == [NAME]
        assert (await client.request(Get([3]), timeout=10))[0] == Items([Item(3, 1)], [], [], [], [])
        with pytest.raises(ConnectionError):
            await client.request(Register("again", 1, "h", 1, ADDR, None), timeout=10)
        assert "'register', which is not taken here" in str(await server.next_end())
    assert registered == [NAME]


async def test_request_without_req_is_a_protocol_error(start_server):
    """A request op sent without "req" cannot be answered: ProtocolError, that connection only."""
    server = await start_server(lambda ep: {Get: serve_get})
    async with server.connect() as (other, _):
        ended = await assert_only_that_connection_ends(
            server, other, lambda bad: bad.comm.send({"op": "get", "a": [[1]]}))
    assert isinstance(ended, ProtocolError), repr(ended)


async def test_one_way_message_sent_as_a_request_is_a_protocol_error(start_server):
    """A one-way op carrying "req" has no reply to give: ProtocolError, that connection only."""
    server = await start_server(lambda ep: {Get: serve_get, Holding: lambda m, b: None})
    async with server.connect() as (bad, _):
        await bad.comm.send({"op": "holding", "a": [[1]], "req": 1000})
        with pytest.raises(ConnectionError):
            await bad.request(Get([1]), timeout=10)  # the connection must not go on
        ended = await server.next_end()
    assert isinstance(ended, ProtocolError), repr(ended)


async def test_reply_to_that_is_not_a_request_id_is_a_protocol_error(start_server):
    """A reply whose reply_to is no request id (a list) ends the connection with ProtocolError."""
    def tables(endpoint):
        def bad_get(msg, buffers):
            endpoint.comm.send_nowait({"op": "reply", "reply_to": [1], "a": []})
            return Items([], [], [], []), ()
        return {Get: bad_get}

    server = await start_server(tables)
    async with server.connect() as (client, serving):
        with pytest.raises(ConnectionError):
            await client.request(Get([1]), timeout=10)  # pending while the bad reply comes
        with pytest.raises(ProtocolError):
            await asyncio.wait_for(serving, 10)

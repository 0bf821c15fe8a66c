"""An authenticated but buggy worker: every record it sends is checked whole before the
scheduler changes any state. A bad one closes that connection (ProtocolError); the
tasks placed there fail with WorkerLostError (or run again within their retries); the
cluster goes on. A record of an older attempt is ignored, never applied to the current."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

import cloudpickle
import msgpack
import psutil
import pytest

import aiodagger as dagger
from aiodagger.comm import protocol as P
from aiodagger.comm.framing import encode_frame, open_comm
from aiodagger.comm.handshake import client_handshake, new_token
from aiodagger.comm.server import parse_address
from aiodagger.taskoptions import TaskOptions

WAIT = 20


def double(x):
    return 2 * x


class FakeWorker:
    """A worker process as a test writes it: it registers, then answers as told."""

    def __init__(self, cluster: dagger.Cluster) -> None:
        self.cluster = cluster
        self.runs: asyncio.Queue = asyncio.Queue()
        self.endpoint: P.Endpoint | None = None
        self.serving: asyncio.Future | None = None
        self.id = -1

    async def connect(self, threads: int = 1) -> None:
        host, port = parse_address(self.cluster.address)
        comm = await open_comm(host, port)
        await client_handshake(comm, self.cluster.token, {"role": "worker"})
        self.endpoint = P.Endpoint(comm, {
            P.Functions: lambda msg, buffers: None,
            P.Values: lambda msg, buffers: None,
            P.Run: lambda msg, buffers: self.runs.put_nowait(msg),
            # tiny tasks come in columns: seen here as the records they stand for
            P.RunPlain: lambda msg, buffers: self.runs.put_nowait(P.plain_as_run(msg, buffers)[0]),
            P.Heartbeat: lambda msg, buffers: None,
            P.Release: lambda msg, buffers: None,
            P.Cancel: lambda msg, buffers: None,
            P.Shutdown: lambda msg, buffers: None,
        })
        self.serving = asyncio.ensure_future(self.endpoint.serve())
        reply, _ = await self.endpoint.request(
            P.Register("fake", os.getpid(), socket.gethostname(), threads,
                       "tcp://127.0.0.1:9", None), timeout=WAIT)
        self.id = reply.worker_id

    def send_raw(self, header: dict, buffers: list = ()) -> None:
        """A frame as the peer chooses to write it, checked by nobody on this side."""
        assert self.endpoint is not None
        self.endpoint.comm.transport.writelines(encode_frame(header, buffers))

    async def closed_by_the_cluster(self) -> bool:
        assert self.serving is not None
        await asyncio.wait_for(asyncio.gather(self.serving, return_exceptions=True), WAIT)
        return True

    async def close(self) -> None:
        if self.endpoint is not None:
            await self.endpoint.close()
        if self.serving is not None:
            self.serving.cancel()
            await asyncio.gather(self.serving, return_exceptions=True)


def done_header(results: list, memory=(0, 0, 0, 0)) -> dict:
    return {"op": "done", "a": [results, list(memory)]}


@pytest.fixture
async def cluster():
    async with dagger.Cluster(threads=1, listen="tcp://127.0.0.1:0", token=new_token()) as c:
        yield c


@pytest.fixture
async def fake(cluster):
    worker = FakeWorker(cluster)
    await worker.connect()
    yield worker
    await worker.close()


async def placed_on(fake: FakeWorker, retries: int = 0):
    task = dagger.options(scope=dagger.scope(worker=fake.id), retries=retries).spawn(double, 21)
    run = await asyncio.wait_for(fake.runs.get(), WAIT)
    (record,) = run.tasks
    return task, record


BAD_DONE = {
    "unknown status": lambda r: ([[r.key, r.attempt, "weird", 0, 0.0, 0.0, 0, []]], []),
    "a buffer missing": lambda r: ([[r.key, r.attempt, "ok", 8, 0.0, 0.0, 1, []]], []),
    "a string for seconds": lambda r: ([[r.key, r.attempt, "ok", 8, 0.0, "0.1", 0, []]], []),
    "an error without its part": lambda r: ([[r.key, r.attempt, "error", 0, 0.0, 0.0, 0, []]], []),
    "more buffers than parts": lambda r: ([[r.key, r.attempt, "ok", 8, 0.0, 0.0, 1, []]],
                                          [b"x", b"y"]),
}


@pytest.mark.parametrize("case", list(BAD_DONE))
async def test_a_bad_completion_closes_the_connection_and_fails_the_task(cluster, fake, case):
    """The record is refused whole: the task is neither finished with garbage nor left
    running; it fails with WorkerLostError, and the cluster goes on."""
    task, record = await placed_on(fake)
    results, buffers = BAD_DONE[case](record)
    fake.send_raw(done_header(results), buffers)
    assert await fake.closed_by_the_cluster()
    with pytest.raises(dagger.WorkerLostError):
        await asyncio.wait_for(task, WAIT)
    assert await asyncio.wait_for(dagger.spawn(double, 4), WAIT) == 8
    assert [w.id for w in cluster.workers] == [0]


async def test_a_completion_of_another_attempt_is_not_applied(cluster, fake):
    """A record naming an attempt that is not the one running is ignored; the right one,
    sent after it, still finishes the task."""
    task, record = await placed_on(fake)
    value, parts = P.dumps(42)
    stale = P.Finished(record.key, record.attempt + 7, "ok", 8, 0.0, 0.0, 1 + len(parts), [])
    fake.endpoint.send_nowait(P.Done([stale], P.Memory(0, 0, 0, 0)), [value, *parts])
    await asyncio.sleep(0.2)
    assert not task.done()
    right = P.Finished(record.key, record.attempt, "ok", 8, 0.0, 0.0, 1 + len(parts), [])
    fake.endpoint.send_nowait(P.Done([right], P.Memory(0, 0, 0, 0)), [value, *parts])
    assert await asyncio.wait_for(task, WAIT) == 42


async def test_values_in_columns_finish_their_tasks_or_fail_them_clearly(cluster, fake):
    """A DoneValues of another attempt is ignored, the right one finishes its task; one
    whose values do not match its keys fails those tasks saying so, never with a wrong
    value."""
    task, record = await placed_on(fake)
    memory = P.Memory(0, 0, 0, 0)
    fake.endpoint.send_nowait(P.DoneValues([record.key], [record.attempt + 1], [0.0], [0.0], memory),
                              [P.dumps_plain([41])])
    await asyncio.sleep(0.2)
    assert not task.done()
    fake.endpoint.send_nowait(P.DoneValues([record.key], [record.attempt], [0.0], [0.5], memory),
                              [P.dumps_plain([42])])
    assert await asyncio.wait_for(task, WAIT) == 42
    task, record = await placed_on(fake)
    fake.endpoint.send_nowait(P.DoneValues([record.key], [record.attempt], [0.0], [0.0], memory),
                              [P.dumps_plain([1, 2])])
    with pytest.raises(ValueError, match="1 values announced, 2 sent"):
        await asyncio.wait_for(task, WAIT)
    assert [w.id for w in cluster.workers] == [0, fake.id]


async def test_registering_twice_on_one_connection_is_refused(cluster, fake):
    """A second register on a connection is a ProtocolError: one connection, one worker."""
    fake.send_raw({"op": "register", "req": 99,
                   "a": ["again", os.getpid(), "h", 1, "tcp://127.0.0.1:9", None]})
    assert await fake.closed_by_the_cluster()
    await asyncio.sleep(0.1)
    assert [w.id for w in cluster.workers] == [0]


async def test_a_worker_with_no_threads_is_refused(cluster):
    """threads=0 would divide the scheduler's load estimate by zero: refused at register."""
    worker = FakeWorker(cluster)
    try:
        with pytest.raises((ConnectionError, asyncio.TimeoutError)):
            await worker.connect(threads=0)
        assert [w.id for w in cluster.workers] == [0]
        assert await asyncio.wait_for(dagger.spawn(double, 5), WAIT) == 10
    finally:
        await worker.close()


def test_the_bad_records_are_well_formed_frames():
    """The cases above reach the protocol's checks, not the frame parser's: each is a
    valid msgpack header."""
    for make in BAD_DONE.values():
        results, _ = make(P.RunTask(1, "f", b"h", "thread", 0, 1, [], False, False, []))
        header = msgpack.unpackb(msgpack.packb(done_header(results)), strict_map_key=False)
        assert header["op"] == "done"


def _checksum(a):
    return float(a.sum())


async def test_an_input_nobody_can_reach_fails_its_task_after_bounded_tries():
    """A holder that claims a result but cannot be reached (its data server address is
    dead): the worker that needs it says so, the result is computed again, and after a
    bounded number of tries the task fails with WorkerLostError; it is not sent back to
    the same worker thousands of times a second."""
    async with dagger.Cluster(processes=1, threads=1, listen="tcp://127.0.0.1:0",
                              token=new_token()) as cluster:
        (real,) = [w.id for w in cluster.workers if w.id != 0]
        fake = FakeWorker(cluster)
        produced = []

        def answer(msg, buffers):
            for record in msg.tasks:  # "done, and I keep it": a value nobody can fetch
                produced.append(record.key)
                fake.endpoint.send_nowait(P.Done(
                    [P.Finished(record.key, record.attempt, "ok", 1 << 20, 0.0, 0.0, 0, [])],
                    P.Memory(0, 0, 0, 0)))

        await fake.connect()
        fake.endpoint.handlers = {**fake.endpoint.handlers, P.Run: answer,
                                  P.RunPlain: lambda msg, buffers: answer(*P.plain_as_run(msg, buffers))}
        try:
            source = dagger.options(scope=dagger.scope(worker=fake.id)).spawn(double, 1)
            user = dagger.options(scope=dagger.scope(worker=real)).spawn(_checksum, source)
            with pytest.raises(dagger.WorkerLostError, match="could not get its input"):
                await asyncio.wait_for(user, 60)
            assert 2 <= len(produced) <= 7  # recomputed a bounded number of times
        finally:
            await fake.close()


def _connections(local_port: int, remote_port: int) -> list:
    return [c for c in psutil.Process().net_connections("tcp")
            if c.laddr and c.laddr.port == local_port and c.raddr and c.raddr.port == remote_port]


async def test_a_silent_worker_is_cut_off_at_once_even_with_a_frame_stuck_on_its_way():
    """A worker that stops reading and answering is declared lost at the heartbeat
    timeout, and the cluster drops its connection there and then, with the 32 MiB frame
    it could not deliver: a graceful close would keep the socket, and the frame, for as
    long as TCP keeps a dead link open (minutes)."""
    async with dagger.Cluster(threads=1, listen="tcp://127.0.0.1:0", token=new_token(),
                              heartbeat_interval=0.1, heartbeat_timeout=1.0) as cluster:
        fake = FakeWorker(cluster)
        await fake.connect()
        try:
            fake.endpoint.comm.transport.pause_reading()
            link = (parse_address(cluster.address)[1],
                    fake.endpoint.comm.transport.get_extra_info("sockname")[1])
            assert _connections(*link)
            task = dagger.options(scope=dagger.scope(worker=fake.id)).spawn(len, bytes(32 << 20))
            with pytest.raises(dagger.WorkerLostError, match="not a byte from it for 1 s"):
                await asyncio.wait_for(task, WAIT)
            deadline = asyncio.get_running_loop().time() + 2
            while _connections(*link):
                assert asyncio.get_running_loop().time() < deadline, _connections(*link)
                await asyncio.sleep(0.02)
            assert await asyncio.wait_for(dagger.spawn(double, 4), WAIT) == 8
        finally:
            await fake.close()


def _spawn_frame(keys: list[int]) -> tuple[dict, list]:
    records, buffers = [], []
    for i, key in enumerate(keys):
        parts = [cloudpickle.dumps(double), cloudpickle.dumps(TaskOptions()),
                 P.dumps_args("double", (i,), {}, False)[0]]
        records.append([key, b"h", len(parts), i == 0])
        buffers += parts
    return {"op": "spawn", "a": [records]}, buffers


BAD_SPAWN_KEYS = {
    "the same key twice": lambda base, placed: [[base + 1, base + 1]],
    "a key used before": lambda base, placed: [[base + 1], [base + 1]],
    "a key lower than the last": lambda base, placed: [[base + 2], [base + 1]],
    "a key of the scheduler's own": lambda base, placed: [[placed]],
    "a key of another worker": lambda base, placed: [[base + P.ID_SPACE + 1]],
    "a negative key": lambda base, placed: [[-5]],
}


@pytest.mark.parametrize("case", list(BAD_SPAWN_KEYS))
async def test_a_spawned_task_must_bring_a_key_of_its_own(cluster, fake, case):
    """Tasks spawned in worker N have ids from N << 40 up, each new: a worker that sends
    a key it used before, or one outside its range, is refused (its connection closed)
    before any of its tasks is made. Two tasks with one id wedged the scheduler: its
    ready heap compared them, and raised on the loop."""
    task, record = await placed_on(fake)
    for keys in BAD_SPAWN_KEYS[case](fake.id * P.ID_SPACE, record.key):
        fake.send_raw(*_spawn_frame(keys))
    # at once, not at the heartbeat timeout (10 s) of a worker that answers nothing
    await asyncio.wait_for(fake.closed_by_the_cluster(), 3)
    with pytest.raises(dagger.WorkerLostError):
        await asyncio.wait_for(task, WAIT)
    assert await asyncio.wait_for(dagger.spawn(double, 4), WAIT) == 8
    assert [w.id for w in cluster.workers] == [0]
    deadline = asyncio.get_running_loop().time() + WAIT
    while cluster.tasks_in_flight:  # no task of it left "running" on a worker that is gone
        assert asyncio.get_running_loop().time() < deadline, cluster.tasks_in_flight
        await asyncio.sleep(0.02)


async def test_a_run_reported_cancelled_that_nobody_cancelled_is_not_left_running(cluster, fake):
    """A worker says it cancelled a run the cluster never cancelled: the run is over all
    the same, so the task runs again within its retries, then fails with WorkerLostError.
    (It was left "running" for good, even once that worker had gone.)"""
    task, record = await placed_on(fake, retries=1)
    for attempt in (0, 1):
        assert record.attempt == attempt
        fake.endpoint.send_nowait(P.Done([P.Finished(record.key, record.attempt, "cancelled",
                                                     0, 0.0, 0.0, 0, [])], P.Memory(0, 0, 0, 0)))
        if attempt == 0:  # run again, on the only worker its scope admits
            (record,) = (await asyncio.wait_for(fake.runs.get(), WAIT)).tasks
    with pytest.raises(dagger.WorkerLostError, match="nobody asked for"):
        await asyncio.wait_for(task, WAIT)
    assert [w.id for w in cluster.workers] == [0, fake.id]  # a bad run, not a bad worker


async def test_a_run_reported_dropped_that_was_never_held_is_not_run_again_for_good(cluster, fake):
    """A worker says it dropped a held task (an input it waited for ended without a
    result) for a task it was sent to run, not held: the run is over, the task runs again
    within its retries, then fails, rather than being sent back again and again."""
    task, record = await placed_on(fake, retries=1)
    assert record.waits == []
    for attempt in (0, 1):
        assert record.attempt == attempt
        fake.endpoint.send_nowait(P.Done([P.Finished(record.key, record.attempt, "dropped",
                                                     0, 0.0, 0.0, 0, [])], P.Memory(0, 0, 0, 0)))
        if attempt == 0:
            (record,) = (await asyncio.wait_for(fake.runs.get(), WAIT)).tasks
    with pytest.raises(dagger.WorkerLostError, match="held none by that id"):
        await asyncio.wait_for(task, WAIT)
    assert [w.id for w in cluster.workers] == [0, fake.id]


@pytest.mark.parametrize("counter", [float("inf"), -5, 1.5, "7", None])
async def test_heartbeat_counters_that_are_not_counts_are_ignored(cluster, fake, counter, caplog):
    """A heartbeat's memory counters are taken only when each is a count (an int >= 0),
    as in a completion; else the last ones stay. Infinity raised an
    OverflowError out of the handler (logged as an error, the connection dropped), and a
    negative count was shown in ``cluster.workers``."""
    stats = {"memory_used": 10, "spilled_bytes": 0, "spill_errors": 0, "running": 1}
    fake.endpoint.send_nowait(P.Heartbeat(stats))
    fake.endpoint.send_nowait(P.Heartbeat({**stats, "memory_used": counter}))
    await asyncio.sleep(0.2)
    assert not fake.serving.done()
    (info,) = [w for w in cluster.workers if w.id == fake.id]
    assert (info.memory_used, info.tasks_running) == (10, 0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

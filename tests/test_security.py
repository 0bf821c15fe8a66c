"""A listening cluster under attack: whatever a peer sends, only its own connection
suffers, nothing it sends is unpickled before it authenticates, and the cluster goes
on running tasks, on a worker that joins afterwards too."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import os
import pickle
import random
import resource
import secrets
import socket
import struct

import msgpack
import psutil
import pytest

import aiodagger as dagger
from aiodagger.comm.framing import DEFAULT_MAX_FRAME, MAX_HEADER, encode_frame, open_comm
from aiodagger.comm.handshake import PROTOCOL_VERSION, client_handshake, new_token
from aiodagger.comm.server import Listener, parse_address
from aiodagger.comm.tokens import MIN_TOKEN_BITS, entropy_bits
from aiodagger.errors import AuthenticationError, ProtocolError
from tests.slowloris import Flood
from tests.workers import WorkerProcesses, pid_of, token_exposure, write_token

pytestmark = pytest.mark.timeout(60)

PREFIX = struct.Struct("!2sHI")
CLOSE_TIMEOUT = 5.0


class Canary:
    """Unpickling this opens (creates) a file: proof that a payload was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def canary_pickle(path) -> bytes:
    return pickle.dumps(Canary(str(path)), protocol=5)


def raw_frame(header: dict, buffers=()) -> bytes:
    return b"".join(bytes(p) for p in encode_frame(header, buffers))


def hello() -> dict:
    return {"op": "hello", "version": PROTOCOL_VERSION, "nonce": os.urandom(32), "info": {}}


@pytest.fixture
def workers(tmp_path):
    procs = WorkerProcesses(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture
async def cluster(tmp_path):
    async with dagger.Cluster(threads=2, listen="tcp://127.0.0.1:0", token=new_token()) as c:
        yield c


def host_port(cluster) -> tuple[str, int]:
    return parse_address(cluster.address)


async def send_raw_and_expect_close(cluster, data: bytes) -> None:
    """Send ``data`` on a fresh plain connection; the cluster must close it.

    The bytes are written before the cluster's loop has even accepted the connection
    (a blocking socket, on the loop the cluster runs on), so they are waiting when it
    does: the most hostile timing, as a flood of connections produces.
    """
    sock = socket.create_connection(host_port(cluster), timeout=CLOSE_TIMEOUT)
    try:
        sock.sendall(data)
    except ConnectionError:
        sock.close()
        return
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        # Read whatever the server says ("refused", a challenge) up to the close.
        await asyncio.wait_for(reader.read(), CLOSE_TIMEOUT)
    except ConnectionError:
        pass  # reset by the server: closed as well
    except TimeoutError:
        pytest.fail(f"the cluster kept the connection open for {CLOSE_TIMEOUT} s after {data[:40]!r}")
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


async def expect_closed(comm) -> None:
    try:
        await asyncio.wait_for(comm.closed_event.wait(), CLOSE_TIMEOUT)
    except TimeoutError:
        pytest.fail(f"the peer kept the connection open for {CLOSE_TIMEOUT} s")


# -- attacks before authentication -------------------------------------------------------------

async def attack_http(cluster, canary):
    await send_raw_and_expect_close(cluster, b"GET / HTTP/1.1\r\nHost: cluster\r\n\r\n")


async def attack_random_bytes(cluster, canary):
    await send_raw_and_expect_close(cluster, random.Random(7).randbytes(16 << 10))


async def attack_absurd_header_length(cluster, canary):
    await send_raw_and_expect_close(cluster, PREFIX.pack(b"AG", 0, 0xFFFFFFFF) + b"\x00" * 64)


async def attack_absurd_buffer_count(cluster, canary):
    await send_raw_and_expect_close(cluster, PREFIX.pack(b"AG", 0xFFFF, 4) + b"\x00" * 64)


async def attack_absurd_buffer_length(cluster, canary):
    head = msgpack.packb(hello())
    data = PREFIX.pack(b"AG", 1, len(head)) + struct.pack("!Q", 2**64 - 1) + head
    await send_raw_and_expect_close(cluster, data)


async def attack_buffer_in_first_frame(cluster, canary):
    """A buffer within the cluster's frame limit, announced before authentication: the
    handshake limits (no buffers at all) must apply from the first byte, or an
    unauthenticated peer makes the cluster allocate (and zero) up to the frame limit."""
    head = msgpack.packb(hello())
    data = PREFIX.pack(b"AG", 1, len(head)) + struct.pack("!Q", 32 << 20) + head
    await send_raw_and_expect_close(cluster, data)


async def attack_wrong_token(cluster, canary):
    host, port = host_port(cluster)
    comm = await open_comm(host, port)
    try:
        with pytest.raises(AuthenticationError):
            await client_handshake(comm, "not-the-token", {"role": "worker"}, timeout=CLOSE_TIMEOUT)
    finally:
        comm.close()


async def attack_wrong_proof(cluster, canary):
    """A client that ignores the server's proof and answers the challenge with a made-up one:
    the server itself must refuse it and hang up."""
    host, port = host_port(cluster)
    comm = await open_comm(host, port)
    try:
        comm.send_nowait(hello())
        challenge, _ = await asyncio.wait_for(comm.recv(), CLOSE_TIMEOUT)
        assert challenge["op"] == "challenge"
        comm.send_nowait({"op": "auth", "proof": os.urandom(32)})
        refused, _ = await asyncio.wait_for(comm.recv(), CLOSE_TIMEOUT)
        assert refused["op"] == "refused" and "token" in refused["reason"]
        await expect_closed(comm)
    finally:
        comm.close()


async def attack_pickle_raw(cluster, canary):
    await send_raw_and_expect_close(cluster, canary_pickle(canary))


async def attack_pickle_as_first_frame(cluster, canary):
    frame = raw_frame({"op": "put", "a": [-1]}, [canary_pickle(canary)])
    await send_raw_and_expect_close(cluster, frame)


async def attack_pickle_in_hello(cluster, canary):
    await send_raw_and_expect_close(cluster, raw_frame(hello(), [canary_pickle(canary)]))


async def attack_pickle_in_header_field(cluster, canary):
    data = raw_frame({**hello(), "info": {"blob": canary_pickle(canary)}})
    data += raw_frame({"op": "auth", "proof": canary_pickle(canary)[:32]})
    await send_raw_and_expect_close(cluster, data)


async def attack_pickle_instead_of_auth(cluster, canary):
    host, port = host_port(cluster)
    comm = await open_comm(host, port)
    try:
        comm.send_nowait(hello())
        challenge, _ = await asyncio.wait_for(comm.recv(), CLOSE_TIMEOUT)
        assert challenge["op"] == "challenge"
        comm.transport.write(raw_frame({"op": "functions", "a": [[[b"h"]]]},
                                       [canary_pickle(canary)]))
        await expect_closed(comm)
    finally:
        comm.close()


async def attack_register_without_handshake(cluster, canary):
    frame = raw_frame({"op": "register", "req": 1,
                       "a": ["intruder", 1, "host", 1, "tcp://127.0.0.1:9", None]})
    await send_raw_and_expect_close(cluster, frame)


ATTACKS = [
    attack_http, attack_random_bytes, attack_absurd_header_length, attack_absurd_buffer_count,
    attack_absurd_buffer_length, attack_buffer_in_first_frame, attack_wrong_token,
    attack_wrong_proof, attack_pickle_raw, attack_pickle_as_first_frame, attack_pickle_in_hello,
    attack_pickle_in_header_field, attack_pickle_instead_of_auth, attack_register_without_handshake,
]


def test_canary_payload_is_live(tmp_path):
    """The payload the attacks send does create its file when unpickled."""
    probe = tmp_path / "probe"
    pickle.loads(canary_pickle(probe)).close()
    assert probe.exists()


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda f: f.__name__.removeprefix("attack_"))
async def test_attack_before_authentication_is_cut_off(cluster, tmp_path, attack):
    canary = tmp_path / "canary"
    await attack(cluster, canary)
    assert not canary.exists()
    assert [w.id for w in cluster.workers] == [0]  # nobody joined
    assert await dagger.gather(*(dagger.spawn(pow, i, 2) for i in range(5))) == [0, 1, 4, 9, 16]


async def test_cluster_serves_a_worker_after_all_attacks_at_once(cluster, tmp_path, workers):
    canary = tmp_path / "canary"
    await asyncio.wait_for(asyncio.gather(*(attack(cluster, canary) for attack in ATTACKS)), 30)
    assert not canary.exists()
    assert [w.id for w in cluster.workers] == [0]

    proc = workers.start(cluster.address, write_token(tmp_path, cluster.token))
    (info,) = await workers.wait_joined(cluster, [proc])
    assert info.pid == proc.pid and info.status == "running"
    on_worker = dagger.options(scope=dagger.scope(worker=info.id))
    here = dagger.options(scope=dagger.scope(worker=0))
    assert await asyncio.wait_for(dagger.gather(*(on_worker.spawn(pid_of) for _ in range(4))), 20) \
        == [proc.pid] * 4
    assert await asyncio.wait_for(here.spawn(pid_of), 20) == os.getpid()
    squares = [dagger.spawn(pow, i, 2) for i in range(10)]
    assert await asyncio.wait_for(dagger.gather(*squares), 20) == [i * i for i in range(10)]
    assert not canary.exists()


# -- bad frames after authentication -----------------------------------------------------------

def frame_unknown_op(canary) -> bytes:
    return raw_frame({"op": "frobnicate", "req": 1})


def frame_unknown_op_with_pickle(canary) -> bytes:
    return raw_frame({"op": "frobnicate"}, [canary_pickle(canary)])


def frame_oversized(canary) -> bytes:
    # Only the announcement is sent: the limit must bite before anything is allocated.
    head = msgpack.packb({"op": "put", "a": [-1]})
    return PREFIX.pack(b"AG", 1, len(head)) + struct.pack("!Q", DEFAULT_MAX_FRAME + 1) + head


def frame_oversized_header(canary) -> bytes:
    return PREFIX.pack(b"AG", 0, MAX_HEADER + 1) + b"\x80" * 64


def frame_header_not_a_map(canary) -> bytes:
    head = msgpack.packb(["op", "run"])
    return PREFIX.pack(b"AG", 0, len(head)) + head


def frame_op_not_a_string(canary) -> bytes:
    head = msgpack.packb({"op": 7})
    return PREFIX.pack(b"AG", 0, len(head)) + head


def frame_bad_magic(canary) -> bytes:
    return b"XX" + raw_frame({"op": "heartbeat"})[2:]


BAD_FRAMES = [
    frame_unknown_op, frame_unknown_op_with_pickle, frame_oversized, frame_oversized_header,
    frame_header_not_a_map, frame_op_not_a_string, frame_bad_magic,
]


@pytest.mark.parametrize("target", ["scheduler", "worker"])
@pytest.mark.parametrize("make_frame", BAD_FRAMES, ids=lambda f: f.__name__.removeprefix("frame_"))
async def test_bad_frame_after_authentication_closes_only_that_connection(
        cluster, tmp_path, workers, make_frame, target):
    """An authenticated peer that sends an oversized frame, an unknown op or a malformed
    header loses its connection; the workers already there and the cluster go on. The
    target is the cluster's listener, or a worker's data server (where peers fetch chunks)."""
    proc = workers.start(cluster.address, write_token(tmp_path, cluster.token))
    (info,) = await workers.wait_joined(cluster, [proc])
    on_worker = dagger.options(scope=dagger.scope(worker=info.id))
    assert await asyncio.wait_for(on_worker.spawn(pid_of), 20) == proc.pid

    canary = tmp_path / "canary"
    host, port = parse_address(cluster.address if target == "scheduler" else info.address)
    comm = await open_comm(host, port)
    try:
        await client_handshake(comm, cluster.token, {"role": "peer"}, timeout=CLOSE_TIMEOUT)
        comm.transport.write(make_frame(canary))
        await expect_closed(comm)
    finally:
        comm.close()

    assert not canary.exists()
    (still,) = [w for w in cluster.workers if w.id != 0]
    assert (still.id, still.pid, still.status) == (info.id, proc.pid, "running")
    assert await asyncio.wait_for(dagger.gather(*(on_worker.spawn(pid_of) for _ in range(3))), 20) \
        == [proc.pid] * 3
    assert proc.poll() is None


@pytest.mark.parametrize("make_frame", [frame_unknown_op, frame_header_not_a_map],
                         ids=["unknown_op", "header_not_a_map"])
async def test_worker_hangs_up_on_a_scheduler_that_sends_a_bad_frame(tmp_path, workers, make_frame):
    """The worker's side of the same rule: its connection to the scheduler is closed on a
    bad frame from there (it then reconnects, as after any lost connection)."""
    token = new_token()
    sessions: asyncio.Queue = asyncio.Queue()

    async def scheduler(comm, info):
        header, _ = await comm.recv()
        assert header["op"] == "register"
        await comm.send({"op": "reply", "reply_to": header["req"], "a": [1]})
        await sessions.put(comm)
        await comm.closed_event.wait()

    listener = Listener(scheduler, token)
    await listener.start("127.0.0.1", 0)
    try:
        proc = workers.start(listener.address, write_token(tmp_path, token))
        first = await asyncio.wait_for(sessions.get(), 30)
        first.transport.write(make_frame(tmp_path / "canary"))
        await expect_closed(first)
        second = await asyncio.wait_for(sessions.get(), 30)  # the worker is back
        assert not second.closed and proc.poll() is None
    finally:
        await listener.close()


async def test_worker_with_the_wrong_token_says_so_in_one_line_and_exits(cluster, tmp_path, workers):
    """Another try would be refused the same way: no reconnecting, no traceback; one line
    that says why, and a failing exit status."""
    proc = workers.start(cluster.address, write_token(tmp_path, new_token()))
    assert await workers.wait_exit(proc, 30) == 1, workers.output(proc)
    (line,) = workers.errors(proc).splitlines()
    assert line.startswith("aiodagger worker: cannot join the cluster at ") and line.endswith("wrong token")
    assert [w.id for w in cluster.workers] == [0]


async def test_worker_refuses_a_weak_token_for_a_cluster_on_the_network(tmp_path, workers):
    """Such a cluster would refuse it too; and the worker's own data server, on all
    interfaces, would run the code of whoever guesses it. Refused before connecting (the
    address below routes nowhere: a worker that tried would retry there forever)."""
    proc = workers.start("tcp://192.0.2.10:8786", write_token(tmp_path, "s3cret-token"))
    assert await workers.wait_exit(proc, 30) == 1, workers.output(proc)
    (line,) = workers.errors(proc).splitlines()
    assert "too easy to guess" in line and "secrets.token_urlsafe(32)" in line


async def test_subprocess_workers_keep_the_token_out_of_reach_of_tasks():
    """The token reaches a subprocess worker through a pipe: a task there finds it
    neither in its environment, nor in the one its process started with, nor on the
    command line, nor in the environment of a process it starts."""
    async with dagger.Cluster(processes=1, threads=1) as cluster:
        exposure = await asyncio.wait_for(dagger.spawn(token_exposure, cluster.token), 60)
        assert exposure == dict.fromkeys(exposure, False)
        assert await asyncio.wait_for(dagger.spawn(pid_of), 60) != os.getpid()


async def test_a_token_in_the_environment_leaves_it_when_the_worker_has_read_it(cluster, tmp_path, workers):
    """$AIODAGGER_TOKEN is taken out of the worker's environment, so tasks and what they
    start do not inherit it (the environment the process started with still shows it:
    --token-file is the way that leaves no trace)."""
    proc = workers.start(cluster.address, None, env_token=cluster.token)
    (info,) = await workers.wait_joined(cluster, [proc])
    on_worker = dagger.options(scope=dagger.scope(worker=info.id))
    exposure = await asyncio.wait_for(on_worker.spawn(token_exposure, cluster.token), 60)
    assert exposure == {"os.environ": False, "/proc/self/environ": True, "/proc/self/cmdline": False,
                        "child's environment": False}


async def test_client_handshake_limits_apply_before_the_server_speaks():
    """The client's side of buffer_in_first_frame: a server that is not ours (a wrong
    address, or someone in the middle of plain TCP) pushes a frame announcing a large
    buffer the moment we connect. The client has not authenticated the server yet, so
    the handshake limits must refuse it at once, not allocate it and wait for it."""
    head = msgpack.packb({"op": "challenge"})
    push = PREFIX.pack(b"AG", 1, len(head)) + struct.pack("!Q", 32 << 20) + head

    async def impostor(reader, writer):
        writer.write(push)
        try:
            await reader.read()
        except ConnectionError:
            pass
        writer.close()

    server = await asyncio.start_server(impostor, "127.0.0.1", 0)
    try:
        comm = await open_comm("127.0.0.1", server.sockets[0].getsockname()[1])
        try:
            with pytest.raises(ProtocolError):
                await client_handshake(comm, new_token(), {"role": "worker"}, timeout=CLOSE_TIMEOUT)
        finally:
            comm.close()
            await asyncio.wait_for(comm.wait_closed(), CLOSE_TIMEOUT)
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), CLOSE_TIMEOUT)


# -- refusing to listen on the network without a token ------------------------------------------

@pytest.mark.parametrize("listen", [
    "tcp://0.0.0.0:0", "tcp://:8786", "tcp://[::]:8786", "tcp://10.231.7.1:8786", "192.0.2.10:8786",
])
@pytest.mark.parametrize("token", [None, ""])
def test_network_listen_without_token_is_refused(listen, token):
    with pytest.raises(ValueError, match=r"needs token=\.\.\..*127\.0\.0\.1"):
        dagger.Cluster(listen=listen, token=token)


@pytest.mark.parametrize("listen", ["tcp://127.0.0.1:0", "tcp://localhost:0", "tcp://[::1]:0"])
def test_loopback_listen_without_token_is_allowed(listen):
    cluster = dagger.Cluster(listen=listen)
    assert cluster.state == "new"


WEAK_TOKENS = [
    "a", "s3cret-token", "Tr0ub4dor&3", "correct horse battery staple", "password123password123password123",
    "x" * 64, "ab" * 64, "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    secrets.token_hex(8), secrets.token_urlsafe(12),
]


@pytest.mark.parametrize("token", WEAK_TOKENS)
def test_network_listen_with_a_weak_token_is_refused(token):
    """A listener on the network answers token guesses; one that can be guessed is as
    good as none. The error says what is wrong and how to make a good one."""
    with pytest.raises(ValueError, match=r"too easy to guess: about \d+ bits") as refused:
        dagger.Cluster(listen="tcp://0.0.0.0:0", token=token)
    message = str(refused.value)
    assert "at least 128" in message and 'secrets.token_urlsafe(32)' in message
    assert entropy_bits(token) < MIN_TOKEN_BITS
    assert dagger.Cluster(listen="tcp://127.0.0.1:0", token=token).state == "new"  # local: allowed


@pytest.mark.parametrize("make", [new_token, lambda: secrets.token_urlsafe(32), lambda: secrets.token_hex(32),
                                  lambda: secrets.token_urlsafe(24)],
                         ids=["new_token", "token_urlsafe(32)", "token_hex(32)", "token_urlsafe(24)"])
def test_random_tokens_of_24_bytes_or_more_are_strong_enough(make):
    assert min(entropy_bits(make()) for _ in range(2000)) >= MIN_TOKEN_BITS
    assert dagger.Cluster(listen="tcp://0.0.0.0:0", token=make()).state == "new"


# -- floods before authentication -------------------------------------------------------------

MiB = 1 << 20


async def _echo_listener(token, **limits):
    async def echo(comm, info):
        while True:
            header, buffers = await comm.recv()
            await comm.send({"op": "echo", "n": header.get("n")}, buffers)

    listener = Listener(echo, token, **limits)
    await listener.start("127.0.0.1", 0)
    return listener


async def _echoes(port: int, token: str, host: str = "127.0.0.1", tries: int = 3) -> None:
    """An honest client connects, authenticates and is answered (a client reconnects
    when a flood crowds it out, as workers do)."""
    for attempt in range(tries):
        comm = await open_comm(host, port)
        try:
            await client_handshake(comm, token, {}, timeout=CLOSE_TIMEOUT)
            await comm.send({"op": "ping", "n": attempt})
            assert (await asyncio.wait_for(comm.recv(), CLOSE_TIMEOUT))[0]["n"] == attempt
            return
        except (ConnectionError, TimeoutError):
            if attempt == tries - 1:
                raise
        finally:
            comm.close()
            await asyncio.wait_for(comm.wait_closed(), CLOSE_TIMEOUT)


async def _until(condition, timeout: float, what: str, sample=None) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if sample is not None:
            sample()
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"{what} within {timeout} s")
        await asyncio.sleep(0.02)


async def test_a_flood_of_idle_connections_is_bounded():
    """2,000 connections that never say a word: the handshakes under way stay at the
    cap, memory grows by a few MiB at most (it was 525 MiB: a 256 KiB zeroed buffer
    each), an honest client still gets in, and every descriptor is given back after."""
    token = new_token()
    listener = await _echo_listener(token, handshake_timeout=60)  # they stay until we end them
    me = psutil.Process()
    peak = 0

    def sample():
        nonlocal peak
        peak = max(peak, listener.pending)

    try:
        async with Flood([listener.port], "--connections", "300"):  # the allocator's steady state
            await _until(lambda: listener.accepted >= 300, 30, "300 connections were not accepted")
        await _until(lambda: listener.pending == 0, 10, "the warm-up's handshakes did not end")
        gc.collect()
        fds, rss, accepted = me.num_fds(), me.memory_info().rss, listener.accepted
        async with Flood([listener.port], "--connections", "2000"):
            await _until(lambda: listener.accepted - accepted >= 2000, 30,
                         "2,000 connections were not accepted", sample)
            grown = me.memory_info().rss - rss
            assert listener.pending == listener.max_pending == 128
            assert listener.dropped >= 2000 - 128
            await _echoes(listener.port, token)  # drops one of the idle, and gets in
            sample()
        assert peak <= listener.max_pending
        assert grown <= 8 * MiB, f"RSS grew by {grown / MiB:.1f} MiB for 2,000 idle connections"
        await _until(lambda: listener.pending == 0 and me.num_fds() <= fds, 15,
                     f"descriptors did not come back ({me.num_fds()} open, {fds} before)")
    finally:
        await listener.close()


def _non_loopback_address() -> str | None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if ipaddress.ip_address(address).is_loopback else address


async def test_one_remote_host_holds_a_few_handshakes_at_most():
    """Past 8 handshakes under way from one remote address, its connections are closed
    at once (loopback is exempt: every local process, the cluster's own workers first,
    shares it, and the global cap covers it)."""
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    token = new_token()

    async def echo(comm, info):
        await comm.closed_event.wait()

    listener = Listener(echo, token, handshake_timeout=60)
    await listener.start(address, 0)
    try:
        async with Flood([listener.port], "--host", address, "--source", address, "--connections", "200"):
            await _until(lambda: listener.accepted >= 200, 30, "200 connections were not accepted")
            assert listener.pending == listener.pending_from(address) == listener.max_pending_per_host == 8
            assert listener.refused == 192 and listener.dropped == 0
        await _until(lambda: listener.pending == 0, 15, "the handshakes did not end")
    finally:
        await listener.close()


async def test_garbage_from_many_connections_is_logged_once(caplog):
    """One line per interval for connections rejected before authentication, saying how
    many more there were; not a line (or two) each."""
    listener = await _echo_listener(new_token())
    try:
        with caplog.at_level(logging.INFO, logger="aiodagger"):
            for _ in range(40):
                reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
                writer.write(b"GET / HTTP/1.1\r\n\r\n")
                try:
                    assert await asyncio.wait_for(reader.read(), CLOSE_TIMEOUT) == b""
                except ConnectionError:
                    pass
                writer.close()
                await writer.wait_closed()
            await _until(lambda: listener.rejected == 40, 10, "40 connections were not rejected")
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "rejected connection" in warnings[0], warnings
    finally:
        await listener.close()


async def test_running_out_of_descriptors_logs_one_line_without_traceback(caplog):
    """asyncio's loop logs every accept that fails for want of a descriptor, traceback
    and all (1,548 records in 3.5 s here). While a listener is open: one line per
    interval, and the loop's exception handler is left as the user set it."""
    token = new_token()
    listener = await _echo_listener(token)
    loop = asyncio.get_running_loop()
    handler = loop.get_exception_handler()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            async with Flood([listener.port], "--connections", "300", "--wait") as flood:
                resource.setrlimit(resource.RLIMIT_NOFILE, (psutil.Process().num_fds() + 2, hard))
                try:
                    flood.go()
                    await asyncio.sleep(2.5)
                finally:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                await flood.opened()
        storm = [r for r in caplog.records if "out of system resource" in r.getMessage()]
        assert len(storm) <= 1 and all(r.exc_info is None for r in storm), [r.getMessage() for r in storm]
        assert loop.get_exception_handler() is handler
        await _echoes(listener.port, token)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        await listener.close()

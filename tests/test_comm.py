"""The wire: frames, out-of-band buffers, the handshake, and what bad peers get."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import socket
import struct

import numpy as np
import pytest

from aiodagger.comm.framing import (
    MIN_MAX_FRAME,
    STAGING_SIZE,
    Comm,
    FrameParser,
    encode_frame,
    open_comm,
)
from aiodagger.comm.handshake import PROTOCOL_VERSION, client_handshake, new_token
from aiodagger.comm.serialize import dumps, loads
from aiodagger.comm.server import Listener, is_loopback, parse_address
from aiodagger.errors import AuthenticationError, FrameTooLargeError, ProtocolError


async def _echo_listener(token):
    async def echo(comm, info):
        while True:
            header, buffers = await comm.recv()
            await comm.send({"op": "echo", "info": info, "n": header.get("n")}, buffers)

    listener = Listener(echo, token)
    await listener.start("127.0.0.1", 0)
    return listener


async def _client(listener, token, info=None):
    comm = await open_comm("127.0.0.1", listener.port)
    await client_handshake(comm, token, info or {"who": "test"})
    return comm


async def test_frames_round_trip_with_large_buffer():
    token = new_token()
    listener = await _echo_listener(token)
    try:
        comm = await _client(listener, token)
        array = np.arange(3_000_000, dtype=np.float64)  # 24 MB: read in place, sent in slices
        payload, buffers = dumps({"x": array, "small": [1, 2]})
        assert len(buffers) == 1 and buffers[0].nbytes == array.nbytes  # not inside the pickle
        for n in range(3):
            await comm.send({"op": "data", "n": n}, [payload, *buffers])
        for n in range(3):
            header, got = await asyncio.wait_for(comm.recv(), 10)
            assert header == {"op": "echo", "info": {"who": "test"}, "n": n}
            obj = loads(got[0], got[1:])
            assert np.array_equal(obj["x"], array) and obj["small"] == [1, 2]
        comm.close()
    finally:
        await listener.close()


async def test_many_small_frames_in_one_read():
    token = new_token()
    listener = await _echo_listener(token)
    try:
        comm = await _client(listener, token)
        for n in range(2000):
            comm.send_nowait({"op": "tiny", "n": n})
        got = [(await asyncio.wait_for(comm.recv(), 10))[0]["n"] for _ in range(2000)]
        assert got == list(range(2000))
        comm.close()
    finally:
        await listener.close()


async def test_wrong_token_is_rejected_and_listener_survives():
    token = new_token()
    listener = await _echo_listener(token)
    try:
        bad = await open_comm("127.0.0.1", listener.port)
        with pytest.raises(AuthenticationError):
            await client_handshake(bad, "not-the-token", {})
        bad.close()
        good = await _client(listener, token)
        await good.send({"op": "ping", "n": 1})
        assert (await asyncio.wait_for(good.recv(), 5))[0]["n"] == 1
        good.close()
        assert listener.rejected == 1
    finally:
        await listener.close()


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\n\r\n",
    struct.pack("!2sHI", b"AG", 0, 0xFFFFFFFF),  # absurd header length
    struct.pack("!2sHI", b"AG", 60000, 4),  # absurd buffer count
    struct.pack("!2sHI", b"AG", 0, 3) + b"\xc1\xc1\xc1",  # not msgpack
])
async def test_garbage_closes_only_that_connection(garbage):
    token = new_token()
    listener = await _echo_listener(token)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(garbage)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the listener
        writer.close()
        await writer.wait_closed()
        good = await _client(listener, token)
        await good.send({"op": "ping", "n": 2})
        assert (await asyncio.wait_for(good.recv(), 5))[0]["n"] == 2
        good.close()
    finally:
        await listener.close()


async def test_pickle_before_authentication_is_never_loaded(tmp_path):
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    token = new_token()
    listener = await _echo_listener(token)
    try:
        payload, buffers = dumps(Evil())
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        for part in encode_frame({"op": "hello", "version": 1, "nonce": b"x" * 32}, [payload]):
            writer.write(bytes(part))
        await writer.drain()
        await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await writer.wait_closed()
        assert not canary.exists()
    finally:
        await listener.close()


def test_parser_rejects_oversized_frame():
    parser = FrameParser(max_frame=1000)
    frame = b"".join(bytes(p) for p in encode_frame({"op": "x"}, [b"a" * 2000]))
    buf = parser.get_buffer()
    buf[:len(frame)] = frame
    with pytest.raises(ProtocolError, match="exceeds"):
        parser.advance(len(frame))


def test_parser_handles_byte_by_byte_delivery():
    parser = FrameParser()
    frames = b"".join(bytes(p) for n in range(3)
                      for p in encode_frame({"op": "x", "n": n}, [bytes(range(n * 50))] * n))
    for byte in frames:
        parser.get_buffer()[0] = byte
        parser.advance(1)
    got = list(parser.frames)
    assert [h["n"] for h, _ in got] == [0, 1, 2]
    assert [bytes(b) for b in got[2][1]] == [bytes(range(100))] * 2


def test_addresses():
    assert parse_address("tcp://10.0.0.1:8786") == ("10.0.0.1", 8786)
    assert parse_address("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError):
        parse_address("tcp://host")
    with pytest.raises(ValueError):
        parse_address("udp://host:1")
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and not is_loopback("0.0.0.0")


async def test_small_frames_wait_for_a_big_frame_being_sent_in_slices():
    """send_nowait() while send() is between the slices of a big frame queues the small
    frames behind it, in order: written at once, they would land inside the big one."""
    token = new_token()
    got: asyncio.Queue = asyncio.Queue()

    async def collect(comm, info):
        while True:
            await got.put(await comm.recv())

    listener = Listener(collect, token)
    await listener.start("127.0.0.1", 0)
    try:
        comm = await _client(listener, token)
        big = np.arange(8_000_000, dtype=np.float64)  # 64 MB: many slices, the socket fills
        sending = asyncio.ensure_future(comm.send({"op": "big"}, [big]))
        for _ in range(200):
            if comm._midframe:
                break
            await asyncio.sleep(0)
        assert comm._midframe, "the big frame went out without waiting: nothing to test"
        for n in range(5):
            comm.send_nowait({"op": "small", "n": n})
        await asyncio.wait_for(sending, 30)
        header, buffers = await asyncio.wait_for(got.get(), 30)
        assert header == {"op": "big"} and np.array_equal(np.frombuffer(buffers[0], np.float64), big)
        smalls = [(await asyncio.wait_for(got.get(), 10))[0] for _ in range(5)]
        assert smalls == [{"op": "small", "n": n} for n in range(5)]
        comm.close()
    finally:
        await listener.close()


def test_a_value_travels_with_a_bounded_number_of_buffers():
    """Past MAX_OUT_OF_BAND buffers a value's arrays go in band: any value fits one frame."""
    from aiodagger.comm.serialize import MAX_OUT_OF_BAND, dumps_args

    value = [np.full(3, i) for i in range(5000)]
    payload, buffers = dumps(value)
    assert len(buffers) == MAX_OUT_OF_BAND
    assert all(np.array_equal(a, b) for a, b in zip(loads(payload, buffers), value, strict=True))
    payload, buffers, _ = dumps_args("t", (value,), {})
    assert len(buffers) == MAX_OUT_OF_BAND


@pytest.mark.parametrize("server_limit, client_limit", [(MIN_MAX_FRAME, 4 * MIN_MAX_FRAME),
                                                        (4 * MIN_MAX_FRAME, MIN_MAX_FRAME)],
                         ids=["server-smaller", "client-smaller"])
async def test_each_end_sends_no_frame_larger_than_the_smaller_max_frame(server_limit, client_limit):
    """The handshake tells each end the other's max_frame: a frame past the smaller one is
    refused by its sender, whole, with FrameTooLargeError naming its size and the option;
    the connection goes on (the peer would have closed it at the frame's first bytes)."""
    token = new_token()
    refused: asyncio.Queue = asyncio.Queue()

    async def echo_or_refuse(comm, info):
        while True:
            header, buffers = await comm.recv()
            try:
                await comm.send({"op": "echo"}, buffers * header["times"])
            except FrameTooLargeError as exc:
                await refused.put(exc)
                await comm.send({"op": "refused"})

    listener = Listener(echo_or_refuse, token, max_frame=server_limit)
    await listener.start("127.0.0.1", 0)
    try:
        comm = await open_comm("127.0.0.1", listener.port, max_frame=client_limit)
        await client_handshake(comm, token, {})
        assert comm.limit == MIN_MAX_FRAME and comm.peer_max_frame == server_limit
        half = b"x" * (MIN_MAX_FRAME // 2)
        with pytest.raises(FrameTooLargeError, match=f"{3 * len(half)} bytes.*max_frame={MIN_MAX_FRAME}"):
            await comm.send({"op": "echo", "times": 1}, [half] * 3)
        with pytest.raises(FrameTooLargeError):
            comm.send_nowait({"op": "echo", "times": 1}, [half] * 3)
        await comm.send({"op": "echo", "times": 3}, [half])  # 1.5 MiB back: refused there
        header, _ = await asyncio.wait_for(comm.recv(), 10)
        assert header["op"] == "refused"
        error = await asyncio.wait_for(refused.get(), 10)
        assert (error.size, error.limit) == (3 * len(half), MIN_MAX_FRAME)
        await comm.send({"op": "echo", "times": 2}, [half])  # exactly the limit: it passes
        header, buffers = await asyncio.wait_for(comm.recv(), 10)
        assert header["op"] == "echo" and sum(len(b) for b in buffers) == MIN_MAX_FRAME
        comm.close()
    finally:
        await listener.close()


# -- the handshake: the client proves first ---------------------------------------------------

def _hello(version=PROTOCOL_VERSION) -> dict:
    return {"op": "hello", "version": version, "nonce": secrets.token_bytes(32), "info": {}}


async def test_server_proves_nothing_before_the_client_has():
    """The challenge carries no proof: a server that answered a hello with an HMAC over
    the client's nonce let anyone test token guesses offline (a dictionary token fell in
    925 guesses). A wrong proof then gets a refusal, and nothing computed with the token."""
    token = new_token()
    listener = await _echo_listener(token)
    try:
        comm = await open_comm("127.0.0.1", listener.port)
        comm.send_nowait(_hello())
        challenge, _ = await asyncio.wait_for(comm.recv(), 5)
        assert challenge["op"] == "challenge" and challenge["version"] == PROTOCOL_VERSION == 9
        assert set(challenge) == {"op", "version", "nonce", "salt"}
        comm.send_nowait({"op": "auth", "proof": secrets.token_bytes(32)})
        refused, _ = await asyncio.wait_for(comm.recv(), 5)
        assert refused == {"op": "refused", "reason": "wrong token"}
        await asyncio.wait_for(comm.closed_event.wait(), 5)
        comm.close()
    finally:
        await listener.close()


async def test_proofs_are_keyed_by_scrypt_of_the_token():
    """What a recorded handshake gives an attacker: proofs keyed by scrypt(token, salt),
    so that every guess costs one scrypt, not one HMAC."""
    token = new_token()
    salt = secrets.token_bytes(16)
    server_nonce = secrets.token_bytes(32)
    seen: asyncio.Future = asyncio.get_running_loop().create_future()

    async def recorder(reader, writer):
        parser = FrameParser()
        for part in encode_frame({"op": "challenge", "version": PROTOCOL_VERSION,
                                  "nonce": server_nonce, "salt": salt}):
            writer.write(bytes(part))
        while len(parser.frames) < 2:
            data = await reader.read(4096)
            if not data:
                break
            parser.get_buffer()[:len(data)] = data
            parser.advance(len(data))
        seen.set_result([header for header, _ in parser.frames])
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(recorder, "127.0.0.1", 0)
    try:
        comm = await open_comm("127.0.0.1", server.sockets[0].getsockname()[1])
        with pytest.raises((ConnectionError, AuthenticationError)):
            await client_handshake(comm, token, {}, timeout=5)  # the recorder never welcomes it
        comm.close()
        hello, auth = await asyncio.wait_for(seen, 5)
        await asyncio.wait_for(comm.wait_closed(), 5)
        key = hashlib.scrypt(token.encode(), salt=salt, n=1 << 13, r=8, p=1, dklen=32)
        transcript = hello["nonce"] + server_nonce + salt
        assert auth["proof"] == hmac.new(key, b"client" + transcript, hashlib.sha256).digest()
        assert auth["proof"] != hmac.new(token.encode(), b"client" + transcript, hashlib.sha256).digest()
    finally:
        server.close()
        await server.wait_closed()


async def test_client_trusts_nothing_from_a_server_that_does_not_prove_the_token():
    """A server that does not know the token gets the client's proof but cannot answer
    it: its welcome is refused before the connection leaves the handshake limits."""
    done: asyncio.Future = asyncio.get_running_loop().create_future()

    async def impostor(reader, writer):
        writer.write(b"".join(bytes(p) for p in encode_frame(
            {"op": "challenge", "version": PROTOCOL_VERSION, "nonce": secrets.token_bytes(32),
             "salt": secrets.token_bytes(16)})))
        await reader.read(1)
        writer.write(b"".join(bytes(p) for p in encode_frame(
            {"op": "welcome", "proof": secrets.token_bytes(32)})))
        try:
            await reader.read()
        except ConnectionError:
            pass
        writer.close()
        await writer.wait_closed()
        done.set_result(None)

    server = await asyncio.start_server(impostor, "127.0.0.1", 0)
    try:
        comm = await open_comm("127.0.0.1", server.sockets[0].getsockname()[1])
        with pytest.raises(AuthenticationError, match="failed to prove"):
            await client_handshake(comm, new_token(), {}, timeout=5)
        assert not comm.is_authenticated and comm.closed
        await asyncio.wait_for(done, 5)
    finally:
        server.close()
        await server.wait_closed()


async def test_a_client_of_protocol_version_2_is_refused():
    token = new_token()
    listener = await _echo_listener(token)
    try:
        comm = await open_comm("127.0.0.1", listener.port)
        comm.send_nowait(_hello(version=2))
        refused, _ = await asyncio.wait_for(comm.recv(), 5)
        assert refused["op"] == "refused" and "protocol version 9 required" in refused["reason"]
        comm.close()
    finally:
        await listener.close()


async def test_buffers_stay_small_until_the_peer_has_authenticated():
    """A connection's staging area is a few KiB until the handshake is over (2,000 idle
    connections cost 525 MiB when each got the full 256 KiB), then the full size."""
    token = new_token()
    served: asyncio.Future = asyncio.get_running_loop().create_future()

    async def handler(comm, info):
        served.set_result(comm)
        await comm.closed_event.wait()

    listener = Listener(handler, token)
    await listener.start("127.0.0.1", 0)
    try:
        comm = await open_comm("127.0.0.1", listener.port)
        assert len(comm.parser._staging) <= 8 << 10
        await client_handshake(comm, token, {})
        server_side = await asyncio.wait_for(served, 5)
        assert len(comm.parser._staging) == len(server_side.parser._staging) == STAGING_SIZE
        comm.close()
    finally:
        await listener.close()


async def test_frames_piling_up_during_the_handshake_close_the_connection():
    """During the handshake at most two frames are ever in flight; a peer that streams
    more (each parsed and queued, none read) is cut off instead of filling memory."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    comm = Comm()
    try:
        await loop.connect_accepted_socket(comm.protocol, ours)
        theirs.sendall(b"".join(bytes(p) for _ in range(100) for p in encode_frame(_hello())))
        await asyncio.wait_for(comm.closed_event.wait(), 5)
        assert not comm.parser.frames
        with pytest.raises(ProtocolError, match="during the handshake"):
            await comm.recv()
    finally:
        comm.close()
        theirs.close()

"""The frame parser fed hostile bytes: random streams and valid frames with bytes flipped,
cut, inserted or appended, arriving in random pieces. Whatever comes, the parser raises
ProtocolError or waits for more; it never raises anything else, never asks for a
zero-length write (a hang, on a real transport), and never allocates more than the
bytes it was given plus its limits allow. Valid frames in any pieces come out intact.
Every frame that comes out goes on to the protocol's decoder, which returns a message of
the frame's op or raises ProtocolError."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiodagger.comm.framing import FrameParser, encode_frame
from aiodagger.comm.protocol import decode, encode, message_types
from aiodagger.errors import ProtocolError
from tests.test_protocol import SAMPLES

pytestmark = pytest.mark.timeout(120)

MAX_FRAME = 2048
MAX_HEADER = 1024
MAX_BUFFERS = 8


def fuzz(examples: int, deadline_ms: int = 1000) -> settings:
    return settings(max_examples=examples, deadline=deadline_ms, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
           | st.floats(allow_nan=False) | st.text(max_size=16) | st.binary(max_size=32))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=6)
OPS = sorted(message_types())
headers = st.fixed_dictionaries(
    {"op": st.text(min_size=1, max_size=12) | st.sampled_from(OPS)},
    optional={"req": st.integers(0, 2**32), "value": values, "nonce": st.binary(min_size=16, max_size=64),
              "a": values | st.lists(values, max_size=3)},
)
small_buffers = st.lists(st.binary(max_size=700), max_size=4)  # sometimes past MAX_FRAME in all


def frame_bytes(header, buffers) -> bytes:
    return b"".join(bytes(p) for p in encode_frame(header, buffers))


frames = st.builds(frame_bytes, headers, small_buffers)

# Positions as big numbers are taken modulo the length; small ones hit the prefix and
# the buffer lengths, where a flipped bit matters most.
positions = st.integers(0, 24) | st.integers(0, 1 << 20)
# Fields of the prefix, as (offset, size): buffer count, header length, buffer lengths.
FIELDS = [(2, 2), (4, 4), (8, 8), (16, 8), (24, 8)]
mutations = st.one_of(
    st.tuples(st.just("field"), st.sampled_from(FIELDS),
              st.integers(0, 2**64 - 1) | st.integers(0, 4 * MAX_FRAME) | st.integers(0, 1 << 26)),
    st.tuples(st.just("xor"), positions, st.integers(1, 255)),
    st.tuples(st.just("truncate"), positions),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("insert"), positions, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), positions, st.integers(1, 16)),
)
splits = st.lists(st.integers(1, 400), min_size=1, max_size=16)


def mutate(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for op in ops:
        if op[0] == "field":
            (offset, size), value = op[1], op[2]
            if len(buf) >= offset + size:
                buf[offset:offset + size] = (value % (1 << 8 * size)).to_bytes(size, "big")
            continue
        at = op[1] % (len(buf) + 1) if op[0] != "extend" else 0
        if op[0] == "xor" and buf:
            buf[at % len(buf)] ^= op[2]
        elif op[0] == "truncate":
            del buf[at:]
        elif op[0] == "extend":
            buf += op[1]
        elif op[0] == "insert":
            buf[at:at] = op[2]
        elif op[0] == "delete":
            del buf[at:at + op[2]]
    return bytes(buf)


def small_parser() -> FrameParser:
    return FrameParser(max_frame=MAX_FRAME, max_header=MAX_HEADER, max_buffers=MAX_BUFFERS)


def feed(parser: FrameParser, data: bytes, pieces: list[int]) -> None:
    """Deliver ``data`` as a transport would: in pieces, each written where get_buffer() says."""
    pos, i = 0, 0
    while pos < len(data):
        end = min(len(data), pos + pieces[i % len(pieces)])
        i += 1
        while pos < end:
            target = parser.get_buffer()
            assert len(target) > 0, "get_buffer() returned no room: the transport would spin"
            n = min(len(target), end - pos)
            target[:n] = data[pos:pos + n]
            parser.advance(n)
            pos += n


def feed_hostile(data: bytes, pieces: list[int]) -> None:
    parser = small_parser()
    tracemalloc.start()
    try:
        try:
            feed(parser, data, pieces)
        except ProtocolError:
            pass  # the connection would be closed here
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Memory follows the bytes received, never the lengths the bytes announce: at most a
    # frame's buffers (MAX_FRAME), decoded headers (msgpack objects, a few dozen bytes
    # per input byte at worst) and the bookkeeping of the frames.
    assert peak < 256 * 1024 + 64 * len(data) + 2 * MAX_FRAME, peak
    for header, buffers in parser.frames:
        assert isinstance(header, dict) and isinstance(header.get("op"), str)
        assert len(buffers) <= MAX_BUFFERS and sum(len(b) for b in buffers) <= MAX_FRAME
        decode_or_refuse(header, buffers)


def decode_or_refuse(header, buffers) -> None:
    """A frame that came out: the protocol's decoder makes it a message of its op, or refuses it."""
    try:
        msg = decode(header, len(buffers))
    except ProtocolError:
        return  # the connection would be closed here
    assert type(msg) is message_types()[header["op"]]


@fuzz(100)
@given(data=st.binary(max_size=4096), pieces=splits)
def test_random_bytes(data, pieces):
    feed_hostile(data, pieces)


@fuzz(100)
@given(data=st.binary(min_size=1, max_size=64), pieces=splits)
def test_random_bytes_after_magic(data, pieces):
    """Past the magic number, so the lengths and the header are what is random."""
    feed_hostile(b"AG" + data, pieces)


@fuzz(150)
@given(stream=st.lists(st.tuples(frames, st.lists(mutations, max_size=4)), min_size=1, max_size=4),
       pieces=splits)
def test_mutated_frames(stream, pieces):
    feed_hostile(b"".join(mutate(frame, ops) for frame, ops in stream), pieces)


# Buffer sizes around the parser's thresholds: read in place (64 KiB), larger than its
# staging area (256 KiB).
big_buffers = st.lists(st.one_of(st.binary(max_size=64),
                                 st.builds(lambda n, b: bytes([b]) * n,
                                           st.sampled_from([65535, 65536, 70000, 262144, 300000]),
                                           st.integers(0, 255))),
                       max_size=3)


@fuzz(40, deadline_ms=2000)
@given(stream=st.lists(st.tuples(headers, big_buffers), min_size=1, max_size=3),
       pieces=st.lists(st.integers(1, 16) | st.integers(1024, 100_000), min_size=1, max_size=8))
def test_valid_frames_in_any_pieces_come_out_intact(stream, pieces):
    parser = FrameParser(max_frame=1 << 20, max_header=MAX_HEADER, max_buffers=MAX_BUFFERS)
    feed(parser, b"".join(frame_bytes(h, b) for h, b in stream), pieces)
    got = list(parser.frames)
    assert [h for h, _ in got] == [h for h, _ in stream]
    assert [[bytes(x) for x in b] for _, b in got] == [list(b) for _, b in stream]


# Every message of the protocol, as the bytes of its frame (those within the small limits).
protocol_frames = st.sampled_from([
    frame_bytes(encode(msg), buffers) for msg, buffers in SAMPLES
    if len(buffers) <= MAX_BUFFERS and sum(len(b) for b in buffers) <= MAX_FRAME])


@fuzz(200)
@given(stream=st.lists(st.tuples(protocol_frames, st.lists(mutations, max_size=3)), min_size=1, max_size=3),
       pieces=splits)
def test_mutated_protocol_messages(stream, pieces):
    """Valid messages of every op with bytes flipped, cut or inserted: parsed, then decoded."""
    feed_hostile(b"".join(mutate(frame, ops) for frame, ops in stream), pieces)


@fuzz(60)
@given(stream=st.lists(protocol_frames, min_size=1, max_size=4), pieces=splits)
def test_protocol_messages_in_any_pieces_decode(stream, pieces):
    """Unmutated, every message of the protocol comes out of the parser and decodes as its op."""
    parser = small_parser()
    feed(parser, b"".join(stream), pieces)
    assert len(parser.frames) == len(stream)
    for header, buffers in parser.frames:
        assert type(decode(header, len(buffers))) is message_types()[header["op"]]

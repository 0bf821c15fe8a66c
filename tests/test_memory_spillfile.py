"""The spill file format: round trips, no extra copies, and damage detected on read."""

from __future__ import annotations

import dataclasses
import errno
import os
import pickle
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import xxhash

from aiodagger.comm import serialize
from aiodagger.errors import DaggerError
from aiodagger.memory import spillfile
from aiodagger.memory.spillfile import SpillCorruptedError
from tests.memory_disks import private_dir, tmpfs

MiB = 2**20


@pytest.fixture
def directory():
    with private_dir() as path:
        yield path


@dataclasses.dataclass
class Point:
    x: int
    y: list


def _arrays():
    c = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    return {
        "float64": np.linspace(0, 1, 50),
        "int8": np.arange(-100, 100, dtype=np.int8),
        "complex": np.array([1 + 2j, -3j], dtype=np.complex128),
        "bool": np.array([True, False, True]),
        "big-endian": np.arange(10, dtype=">i4"),
        "datetime": np.array(["2024-01-01", "2025-06-30"], dtype="M8[ns]"),
        "structured": np.array([(1, 2.5), (3, 4.5)], dtype=[("a", "i2"), ("b", "f8")]),
        "unicode": np.array(["ab", "cdé"]),
        "object": np.array([{"k": 1}, None, "s"], dtype=object),
        "0-d": np.array(3.25),
        "empty": np.empty((0, 7)),
        "non-contiguous": c[:, ::2, 1:],
        "strided-1d": np.arange(100)[::3],
        "fortran": np.asfortranarray(c),
        "transposed": c.T,
        "readonly": np.frombuffer(b"\x01\x02\x03\x04", dtype=np.uint8),
    }


@pytest.mark.parametrize("name", list(_arrays()))
def test_numpy_round_trip(directory, name):
    a = _arrays()[name]
    path = directory / "chunk.spill"
    size = spillfile.dump(path, a)
    assert size == path.stat().st_size
    b = spillfile.load(path)
    assert type(b) is np.ndarray
    assert b.dtype == a.dtype and b.shape == a.shape
    assert b.tolist() == a.tolist()
    if a.ndim > 1:
        assert b.flags.f_contiguous == a.flags.f_contiguous
        assert b.flags.c_contiguous == a.flags.c_contiguous or not a.flags.c_contiguous


@pytest.mark.parametrize("value", [
    b"", b"raw bytes \x00\xff", bytearray(b"mutable"), None, 42, "text", (1, "two", 3.0),
    {"nested": [np.arange(5), {"deep": np.ones((2, 2))}]},
    Point(1, [np.zeros(3)]),
])
def test_object_round_trip(directory, value):
    path = directory / "chunk.spill"
    spillfile.dump(path, value)
    back = spillfile.load(path)
    assert type(back) is type(value)
    assert pickle.dumps(back) == pickle.dumps(value)


def test_closures_round_trip_by_value(directory):
    k = 7
    path = directory / "f.spill"
    spillfile.dump(path, lambda x: x * k)
    assert spillfile.load(path)(6) == 42


def test_arrays_come_back_writable_when_they_were(directory):
    path = directory / "a.spill"
    spillfile.dump(path, np.zeros(10))
    back = spillfile.load(path)
    back[0] = 1  # usable in place, as a task expects


def test_large_array_is_written_without_a_copy_and_read_into_one_allocation(directory):
    a = np.full(32 * MiB // 8, 3.5)
    path = directory / "big.spill"
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        spillfile.dump(path, a)
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        back = spillfile.load(path)
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert write_peak < MiB, f"writing allocated {write_peak} bytes: a copy of the array?"
    assert a.nbytes <= read_peak < a.nbytes + MiB, f"reading allocated {read_peak} bytes"
    assert np.array_equal(back, a)


def test_file_layout_is_header_then_pickle_then_buffers(directory):
    a = np.arange(1000, dtype=np.uint16)
    payload, buffers = serialize.dumps(a)
    path = directory / "layout.spill"
    spillfile.write_parts(path, payload, buffers)
    data = path.read_bytes()
    magic, version, flags, nparts = struct.unpack_from("<8sHHI", data)
    assert (magic, version, flags, nparts) == (b"ADGSPILL", 2, 0, 2)
    table = [struct.unpack_from("<QQ", data, 16 + 16 * i) for i in range(nparts)]
    xxh3 = xxhash.xxh3_64_intdigest
    assert table == [(len(payload), xxh3(payload)), (a.nbytes, xxh3(buffers[0]))]
    head = 16 + 16 * nparts
    assert struct.unpack_from("<Q", data, head)[0] == xxh3(data[:head])
    assert data[head + 8:] == payload + a.tobytes()


async def test_async_write_read_and_read_raw(directory):
    a = np.arange(10_000, dtype=np.float32).reshape(100, 100)
    path = directory / "async.spill"
    size = await spillfile.write(path, a)
    assert size == path.stat().st_size
    assert np.array_equal(await spillfile.read(path), a)
    payload, buffers = await spillfile.read_raw(path)
    expected_payload, expected_buffers = serialize.dumps(a)
    assert bytes(payload) == expected_payload
    assert [bytes(b) for b in buffers] == [bytes(b) for b in expected_buffers]
    assert np.array_equal(serialize.loads(payload, buffers), a)


def _spill(directory: Path) -> tuple[Path, int, int]:
    """A file with a pickle and one 4000-byte buffer; returns it and where the parts start."""
    path = directory / "victim.spill"
    payload, buffers = serialize.dumps(np.arange(1000, dtype=np.int32))
    spillfile.write_parts(path, payload, buffers)
    header = 16 + 16 * 2 + 8
    return path, header, header + len(payload)


@pytest.mark.parametrize(("where", "message"), [
    ("magic", "not a spill file"),
    ("nparts", "header"),
    ("table", "header checksum"),
    ("header-checksum", "header checksum"),
    ("pickle", "checksum mismatch in the pickle"),
    ("buffer", "checksum mismatch in buffer 0"),
    ("last-byte", "checksum mismatch in buffer 0"),
])
def test_a_flipped_byte_is_detected(directory, where, message):
    path, header, buffer_at = _spill(directory)
    offset = {"magic": 0, "nparts": 12, "table": 20, "header-checksum": header - 2,
              "pickle": header + 3, "buffer": buffer_at + 100, "last-byte": -1}[where]
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(data)
    with pytest.raises(SpillCorruptedError, match=message) as info:
        spillfile.load(path)
    assert info.value.path == str(path)


@pytest.mark.parametrize("keep", [0, 5, 16, 30, "header", "pickle", "minus-one"])
def test_a_truncated_file_is_detected(directory, keep):
    path, header, buffer_at = _spill(directory)
    size = path.stat().st_size
    keep = {"header": header, "pickle": buffer_at, "minus-one": size - 1}.get(keep, keep)
    os.truncate(path, keep)
    with pytest.raises(SpillCorruptedError, match="truncated"):
        spillfile.load(path)


def test_trailing_bytes_are_detected(directory):
    path, _, _ = _spill(directory)
    with path.open("ab") as f:
        f.write(b"junk")
    with pytest.raises(SpillCorruptedError, match="trailing bytes"):
        spillfile.load(path)


def test_another_format_version_is_named(directory):
    path, header, _ = _spill(directory)
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, 8, 99)
    struct.pack_into("<Q", data, header - 8, spillfile.checksum(data[:header - 8]))
    path.write_bytes(data)
    with pytest.raises(SpillCorruptedError, match="format version 99"):
        spillfile.load(path)


def test_a_missing_file_is_an_oserror(directory):
    with pytest.raises(FileNotFoundError):
        spillfile.load(directory / "nothing.spill")


def test_spill_corrupted_error_survives_pickle():
    err = SpillCorruptedError("spill file 'x': truncated", path="/tmp/x", key=("chunk", 3))
    err.add_note("chunk ('chunk', 3) is dropped")
    try:
        raise err from OSError(errno.EIO, "I/O error")
    except SpillCorruptedError as raised:
        back = pickle.loads(pickle.dumps(raised))
    assert isinstance(back, DaggerError)
    assert (str(back), back.path, back.key) == (str(err), "/tmp/x", ("chunk", 3))
    assert back.__notes__ == err.__notes__
    assert isinstance(back.__cause__, OSError) and back.__cause__.errno == errno.EIO


def test_not_part_of_the_public_surface():
    import aiodagger

    assert not hasattr(aiodagger, "SpillCorruptedError")


def test_a_full_disk_raises_and_leaves_no_partial_file():
    with tmpfs("16m") as disk:
        big = np.ones(20 * MiB // 8)
        with pytest.raises(OSError) as info:
            spillfile.dump(disk / "too-big.spill", big)
        assert info.value.errno == errno.ENOSPC
        assert list(disk.iterdir()) == []

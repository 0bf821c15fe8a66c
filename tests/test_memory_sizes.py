"""Memory limits as users write them, and chunk sizes."""

from __future__ import annotations

import threading
import time

import numpy as np
import psutil
import pytest

from aiodagger.memory import parse_memory_limit, sizeof

GiB = 2**30
MiB = 2**20


@pytest.mark.parametrize(("value", "expected"), [
    (None, None),
    (1, 1),
    (123_456_789, 123_456_789),
    (np.int64(4096), 4096),
    ("256MiB", 256 * MiB),
    ("8GiB", 8 * GiB),
    ("1.5GB", 1_500_000_000),
    ("500MB", 500_000_000),
    ("500mb", 500_000_000),
    (" 2 GiB ", 2 * GiB),
    ("64kB", 64_000),
    ("3KiB", 3 * 1024),
    ("1TiB", 2**40),
    ("2TB", 2 * 10**12),
    ("1PiB", 2**50),
    ("100", 100),
    ("100B", 100),
    (".5GiB", GiB // 2),
])
def test_parse_memory_limit_forms(value, expected):
    result = parse_memory_limit(value)
    assert result == expected
    assert result is None or type(result) is int


@pytest.mark.parametrize("fraction", [0.5, 1.0, 0.01])
def test_parse_memory_limit_fraction_of_system_memory(fraction):
    total = psutil.virtual_memory().total
    assert parse_memory_limit(fraction) == int(fraction * total)


@pytest.mark.parametrize(("value", "error"), [
    ("8 gigs", ValueError),
    ("GiB", ValueError),
    ("", ValueError),
    ("-1GB", ValueError),
    ("1e9", ValueError),
    ("0MiB", ValueError),
    ("1.5 GB GB", ValueError),
    (0, ValueError),
    (-5, ValueError),
    (0.0, ValueError),
    (1.5, ValueError),
    (-0.25, ValueError),
    (float("nan"), ValueError),
    (True, TypeError),
    ([1], TypeError),
    (b"1GB", TypeError),
])
def test_parse_memory_limit_errors_name_the_value_and_the_forms(value, error):
    with pytest.raises(error) as info:
        parse_memory_limit(value)
    message = str(info.value)
    assert repr(value) in message
    assert "'256MiB'" in message and "None" in message, message


def test_a_float_above_one_explains_fractions():
    with pytest.raises(ValueError, match=r"fraction of system memory"):
        parse_memory_limit(2.0)


@pytest.mark.parametrize("dtype", ["u1", "i4", "<f8", ">f4", "c16", "?", "M8[ns]"])
def test_sizeof_numpy_arrays_is_nbytes(dtype):
    a = np.zeros((3, 5, 7), dtype=dtype)
    assert sizeof(a) == a.nbytes == 105 * np.dtype(dtype).itemsize
    assert sizeof(a[:, ::2]) == a[:, ::2].nbytes
    assert sizeof(np.asfortranarray(a)) == a.nbytes
    assert sizeof(a[0, 0, 0]) == np.dtype(dtype).itemsize  # numpy scalar


def test_sizeof_buffers_are_their_lengths():
    assert sizeof(b"x" * 1000) == 1000
    assert sizeof(bytearray(2048)) == 2048
    assert sizeof(memoryview(np.zeros((4, 4)))) == 128
    assert sizeof(b"") == 0


def test_sizeof_subclasses_resolve_like_their_bases():
    class Tagged(np.ndarray):
        pass

    class Blob(bytes):
        pass

    assert sizeof(np.zeros(10).view(Tagged)) == 80
    assert sizeof(Blob(b"abc")) == 3


def test_sizeof_small_builtins_are_small():
    for value in (0, 2**70, 1.5, 3j, True, None, "abc"):
        assert 0 < sizeof(value) < 100
    assert sizeof("x" * 10_000) >= 10_000


def test_sizeof_falls_back_to_the_pickled_size():
    parts = [np.ones(1000), np.ones(500)]
    assert 12_000 <= sizeof({"a": parts, "b": (1, 2)}) < 13_000
    assert sizeof(list(range(1000))) > 1000
    # unpicklable: counted shallowly instead of failing
    assert sizeof(threading.Lock()) > 0


def test_sizeof_never_pickles_an_array():
    class NoPickle(np.ndarray):
        def __reduce_ex__(self, protocol):
            raise AssertionError("sizeof pickled an array")

    assert sizeof(np.zeros(100).view(NoPickle)) == 800


def test_sizeof_is_cheap_for_the_common_cases():
    values = [np.zeros(1 << 20), b"x" * 4096, 7, 1.0, "s", None]
    n = 20_000
    started = time.perf_counter()
    for _ in range(n):
        for v in values:
            sizeof(v)
    per_call = (time.perf_counter() - started) / (n * len(values))
    assert per_call < 5e-6, f"{per_call * 1e6:.2f} µs per call"

"""The device tier of ChunkStore (memory/device.py): values on a GPU counted per device,
moved to RAM under a limit or on request, and spilled to disk from there.

These tests run on the CPU. There is no GPU on the machines that run this suite, so
the device arrays are a test double: :class:`FakeDeviceArray` wraps a numpy array and
says which device it is on, and :class:`FakeGPU` gives the store the three functions
of a :class:`~aiodagger.memory.DeviceTier` for it. Everything else is real: the store,
its threads, its spill files on disk. The copy to host can be held (``FakeGPU.gate``)
to look at a chunk while its move is in flight.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import threading
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from aiodagger.comm import protocol as P
from aiodagger.memory import ChunkStore, DeviceTier
from tests.memory_disks import private_dir

KiB = 1 << 10


class FakeDeviceArray:
    """Stands for a cupy array: host data said to live on ``device``."""

    def __init__(self, data: np.ndarray, device: int = 0) -> None:
        self.data = data
        self.device = device


def dev(nbytes: int, device: int = 0, seed: int = 0) -> FakeDeviceArray:
    return FakeDeviceArray(np.arange(nbytes, dtype=np.uint8) + np.uint8(seed % 256), device)


class FakeGPU:
    """A DeviceTier for FakeDeviceArray that records every copy to host.

    ``gate`` holds copies until it is set (set from the start); ``started`` is released
    once per copy as it begins; a copy of a value in ``failing`` raises what it maps to.
    """

    def __init__(self) -> None:
        self.copies: list[tuple[FakeDeviceArray, Any, str]] = []  # those that succeeded
        self.attempts: list[FakeDeviceArray] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Semaphore(0)
        self.failing: dict[int, BaseException] = {}  # by id() of the value
        self.tier = DeviceTier(device_of=self.device_of, nbytes=self.nbytes, to_host=self.to_host)

    @staticmethod
    def device_of(value: Any) -> int | None:
        return value.device if isinstance(value, FakeDeviceArray) else None

    @staticmethod
    def nbytes(value: FakeDeviceArray) -> int:
        return int(value.data.nbytes)

    def to_host(self, value: FakeDeviceArray, stream: Any) -> np.ndarray:
        self.attempts.append(value)
        self.started.release()
        assert self.gate.wait(10), "the test never let the copy go"
        if id(value) in self.failing:
            raise self.failing[id(value)]
        self.copies.append((value, stream, threading.current_thread().name))
        return value.data.copy()

    async def wait_started(self, n: int = 1) -> None:
        for _ in range(n):
            async with asyncio.timeout(10):
                while not self.started.acquire(blocking=False):
                    await asyncio.sleep(0.002)


@pytest.fixture
def base():
    """The parent of the spill directories; the stores must leave nothing of theirs in it."""
    with private_dir() as path:
        yield path
        left = [p.name for p in path.iterdir() if p.name.startswith("aiodagger-spill-")]
        assert not left, f"spill directories left behind: {left}"


@pytest.fixture
def gpu() -> FakeGPU:
    return FakeGPU()


def store_for(gpu: FakeGPU, base: Path, memory_limit: Any = None, **kwargs: Any) -> ChunkStore:
    """A store that counts its chunks only (thresholds independent of this process's RSS)."""
    return ChunkStore(memory_limit, spill_dir=base, monitor_interval=None,
                      device_tier=gpu.tier, **kwargs)


async def until(condition, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.002)


def settled(store: ChunkStore) -> bool:
    """No move to host in flight."""
    return store.stats()["device_moving"] == 0


def on_device(store: ChunkStore, keys) -> set:
    return {k for k in keys if isinstance(store.peek_in_memory(k), FakeDeviceArray)}


async def test_device_values_count_per_device_and_not_in_ram(gpu, base):
    async with store_for(gpu, base) as store:
        dropped = []
        store.on_drop = dropped.append
        store.put("h", b"x" * 100)
        a = dev(1000)
        store.put("a", a)
        store.put("b", dev(2000))
        store.put("c", dev(500, device=1))
        stats = store.stats()
        assert stats["used"] == 100 and stats["chunks_in_memory"] == 1
        assert store.device_used == stats["device_used"] == {0: 3000, 1: 500}
        assert stats["chunks"] == 4 and stats["device_chunks"] == 3
        assert stats["device_limit"] is None and stats["device_spilled_bytes"] == 0
        # Read as they are: no limit, so nothing moves.
        assert await store.get("a") is a
        assert not store.swap("a", a, a.data)  # a host array is not the same place
        assert store.delete("b")
        assert dropped == ["b"]
        assert store.device_used == {0: 1000, 1: 500}
        store.put("a", np.zeros(300, np.uint8))  # replaced by a host value
        store.put("h", dev(700, device=1))  # and the other way round
        assert store.device_used == {0: 0, 1: 1200}
        assert store.used == 300
        assert store.stats()["device_chunks"] == 2
        assert gpu.copies == []


async def test_the_least_recently_used_move_first(gpu, base):
    async with store_for(gpu, base, device_limit=3000) as store:
        for key in "abc":
            store.put(key, dev(1000))
        await store.get("a")
        store.put("d", dev(1000))
        await until(lambda: settled(store))
        assert on_device(store, "abcd") == {"a", "c", "d"}
        store.put("e", dev(1000))
        await until(lambda: settled(store))
        assert on_device(store, "abcde") == {"a", "d", "e"}
        await store.get("a")
        store.put("f", dev(1000))
        await until(lambda: settled(store))
        assert on_device(store, "abcdef") == {"a", "e", "f"}
        assert store.device_used == {0: 3000}
        assert store.device_spilled_bytes == 3000 and store.stats()["device_moves"] == 3


async def test_a_pinned_value_is_not_moved(gpu, base):
    async with store_for(gpu, base, device_limit=2000) as store:
        a = dev(1000)
        store.put("a", a)
        store.put("b", dev(1000))
        store.pin("a")
        store.put("c", dev(1000))  # a is the oldest, but pinned: b goes
        await until(lambda: settled(store))
        assert on_device(store, "abc") == {"a", "c"}
        store.put("d", dev(1000))
        await until(lambda: settled(store))
        assert on_device(store, "abcd") == {"a", "d"}
        # Asked for everything, free_device still leaves the pinned one.
        assert await store.free_device(0, 10**9) == 1000
        assert on_device(store, "abcd") == {"a"}
        assert await store.free_device(0, 1) == 0
        assert a not in gpu.attempts  # not even copied
        store.unpin("a")
        assert await store.free_device(0, 1) == 1000
        assert on_device(store, "abcd") == set()


async def test_a_value_pinned_while_it_moves_stays_on_its_device(gpu, base):
    async with store_for(gpu, base, device_limit=1000) as store:
        gpu.gate.clear()
        a = dev(1000)
        store.put("a", a)
        store.put("b", dev(1000))
        await gpu.wait_started()
        store.pin("a")  # a task reads it on the device from now on
        gpu.gate.set()
        await until(lambda: settled(store) and len(gpu.copies) == 2)
        # a's copy is dropped; b, the next oldest, goes in its place.
        assert gpu.attempts[0] is a
        assert on_device(store, "ab") == {"a"} and await store.get("a") is a
        assert store.device_used == {0: 1000} and store.used == 1000
        assert store.device_spilled_bytes == 1000
        store.unpin("a")  # within the limit: it stays
        store.put("c", dev(1000))  # over it: a is the oldest unpinned now
        await until(lambda: settled(store))
        assert on_device(store, "abc") == {"c"}


async def test_the_limit_holds_after_every_put(gpu, base):
    limit = 4000
    rng = random.Random(5)
    async with store_for(gpu, base, device_limit=limit) as store:
        expected, streams = {}, {}
        for i in range(60):
            device = rng.choice((0, 1))
            value = dev(rng.randrange(100, 1500), device, seed=i)
            expected[i] = value.data.copy()
            streams[i] = value, f"stream-{i}"
            store.put(i, value, stream=f"stream-{i}")
            if rng.random() < 0.3:
                await store.get(rng.randrange(i + 1))
            stats = store.stats()
            # What is not on its way out already fits under the limit, at once.
            for d, used in stats["device_used"].items():
                assert used - store._devices._moving.get(d, 0) <= limit, (i, d, stats)
            if rng.random() < 0.5:
                await until(lambda: settled(store))
                assert all(used <= limit for used in store.device_used.values())
        await until(lambda: settled(store))
        assert all(used <= limit for used in store.device_used.values())
        assert all(used > limit // 2 for used in store.device_used.values())
        # Each copy was ordered on the stream its value was put with.
        stream_of = {id(value): stream for value, stream in streams.values()}
        assert gpu.copies and all(stream == stream_of[id(value)] for value, stream, _ in gpu.copies)
        for i, data in expected.items():
            got = await store.get(i)
            got = got.data if isinstance(got, FakeDeviceArray) else got
            assert np.array_equal(got, data)
        # Every byte is counted once: on a device or in RAM.
        assert sum(store.device_used.values()) + store.used == sum(d.nbytes for d in expected.values())


async def test_copies_follow_the_producers_stream_off_the_loop(gpu, base):
    async with store_for(gpu, base) as store:
        stream = object()
        store.put("a", dev(1000), stream=stream)
        store.put("b", dev(1000))
        assert await store.free_device(0, 2000) == 2000
        streams = {id(value): s for value, s, _ in gpu.copies}
        assert len(streams) == 2 and stream in streams.values() and None in streams.values()
        assert all(thread.startswith("aiodagger-device-") for _, _, thread in gpu.copies)
        assert threading.current_thread().name not in {t for _, _, t in gpu.copies}


async def test_free_device_frees_what_is_asked(gpu, base):
    async with store_for(gpu, base) as store:
        for i in range(5):
            store.put(("g0", i), dev(1000, seed=i))
        store.put("other", dev(1000, device=1))
        assert await store.free_device(0, 2500) == 3000  # whole values, oldest first
        assert on_device(store, [("g0", i) for i in range(5)]) == {("g0", 3), ("g0", 4)}
        assert store.device_used == {0: 2000, 1: 1000}
        assert await store.free_device(0, 10**9) == 2000  # all there is
        assert await store.free_device(0, 1) == 0
        assert await store.free_device(7, 1) == 0  # a device it holds nothing of
        assert store.device_used == {0: 0, 1: 1000}
        assert store.used == 5000
        stats = store.stats()
        assert stats["device_spilled_bytes"] == 5000 and stats["device_moves"] == 5
        with pytest.raises(TypeError, match="device number"):
            await store.free_device("0", 1)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="start at 0"):
            await store.free_device(-1, 1)


async def test_free_device_counts_the_moves_already_in_flight(gpu, base):
    async with store_for(gpu, base, device_limit=1000) as store:
        gpu.gate.clear()
        store.put("a", dev(1000))
        store.put("b", dev(1000))  # a starts moving
        await gpu.wait_started()
        freeing = asyncio.create_task(store.free_device(0, 1000))
        await asyncio.sleep(0.05)
        assert not freeing.done()  # it waits for a's move rather than moving b as well
        gpu.gate.set()
        async with asyncio.timeout(10):
            assert await freeing == 1000
        assert on_device(store, "ab") == {"b"}


async def test_a_moved_value_spills_to_disk_and_loads_back_equal(gpu, base):
    size = 64 * KiB
    async with store_for(gpu, base, "512KiB", device_limit=4 * size) as store:
        originals = {}
        for i in range(24):
            value = dev(size, seed=i)
            originals[i] = value.data.copy()
            store.put(i, value)
        await until(lambda: settled(store) and not store.stats()["writing"]
                    and store.used <= store.stats()["spill_threshold"])
        assert store.device_used == {0: 4 * size}
        assert store.device_spilled_bytes == 20 * size
        assert store.spilled_bytes >= 10 * size
        assert sorted(store.directory.glob("*.spill"))
        assert store.stats()["chunks"] == 24
        for i, data in originals.items():
            got = await store.get(i)
            if isinstance(got, FakeDeviceArray):
                assert i >= 20  # the newest stayed on the device
                got = got.data
            assert isinstance(got, np.ndarray) and np.array_equal(got, data)
        assert store.stats()["loads"] > 0


async def test_a_moving_value_stays_readable_and_is_counted_once(gpu, base):
    async with store_for(gpu, base, device_limit=1000) as store:
        gpu.gate.clear()
        a = dev(1000, seed=1)
        store.put("a", a)
        store.put("b", dev(1000, seed=2))
        await gpu.wait_started()
        # In flight: still the device value, still on the device, not yet in RAM.
        assert await store.get("a") is a
        assert store.device_used == {0: 2000} and store.used == 0
        assert store.stats()["device_moving"] == 1000
        gpu.gate.set()
        await until(lambda: settled(store))
        got = await store.get("a")
        assert isinstance(got, np.ndarray) and np.array_equal(got, a.data)
        assert store.device_used == {0: 1000} and store.used == 1000


async def test_bytes_on_their_way_out_are_not_moved_twice_over(gpu, base):
    async with store_for(gpu, base, device_limit=2000) as store:
        gpu.gate.clear()
        a = dev(1000)
        store.put("a", a)
        store.put("b", dev(1000))
        store.put("c", dev(1000))  # 1000 over: a starts moving
        await gpu.wait_started()
        store.pin("c")
        store.unpin("c")  # the limit is checked again, with a's move in flight
        await asyncio.sleep(0.05)
        assert gpu.attempts == [a] and store.stats()["device_moving"] == 1000
        gpu.gate.set()
        await until(lambda: settled(store))
        assert on_device(store, "abc") == {"b", "c"}


async def test_a_value_deleted_or_replaced_while_it_moves_is_not_brought_back(gpu, base):
    async with store_for(gpu, base, device_limit=1000) as store:
        gpu.gate.clear()
        for key in "abc":
            store.put(key, dev(1000))
        await gpu.wait_started(2)  # a and b are moving
        store.delete("a")
        store.put("b", b"new value")
        assert store.device_used == {0: 1000} and store.used == len(b"new value")
        gpu.gate.set()
        await until(lambda: settled(store))
        assert "a" not in store and await store.get("b") == b"new value"
        assert store.device_used == {0: 1000} and store.used == len(b"new value")
        assert store.device_spilled_bytes == 0 and len(store) == 2


async def test_a_failed_copy_leaves_the_value_on_its_device(gpu, base, caplog):
    caplog.set_level(logging.WARNING, logger="aiodagger.memory")
    async with store_for(gpu, base, device_limit=1000) as store:
        a = dev(1000)
        gpu.failing[id(a)] = RuntimeError("cudaErrorIllegalAddress")
        store.put("a", a)
        store.put("b", dev(1000))
        await until(lambda: settled(store) and len(gpu.attempts) == 2)
        # Failed, so it stays readable where it is; b went instead.
        assert await store.get("a") is a and on_device(store, "ab") == {"a"}
        assert store.device_used == {0: 1000}
        stats = store.stats()
        assert stats["device_move_errors"] == 1 and "cudaErrorIllegalAddress" in stats["device_last_error"]
        assert "stays on the device" in caplog.text
        store.pin("a")
        store.unpin("a")  # movable again, as far as pins go
        store.put("c", dev(1000))  # but a is not tried again: c goes
        await until(lambda: settled(store) and len(gpu.attempts) == 3)
        assert on_device(store, "abc") == {"a"} and gpu.attempts.count(a) == 1


async def test_close_waits_for_the_moves_in_flight(gpu, base):
    store = store_for(gpu, base, device_limit=1000)
    await store.start()
    gpu.gate.clear()
    store.put("a", dev(1000))
    store.put("b", dev(1000))
    await gpu.wait_started()
    closing = asyncio.create_task(store.close())
    await asyncio.sleep(0.05)
    assert not closing.done()
    gpu.gate.set()
    async with asyncio.timeout(10):
        await closing
    assert len(gpu.copies) == 1  # the copy ended before the threads were stopped
    assert store.state.value == "closed"  # and no thread left: see conftest


async def test_unspillable_device_values_stay_on_their_device(gpu, base):
    async with store_for(gpu, base, device_limit=1000) as store:
        store.put("a", dev(1000), spillable=False)
        store.put("b", dev(1000))
        await until(lambda: settled(store))
        assert on_device(store, "ab") == {"a"}
        assert await store.free_device(0, 10**9) == 0


async def test_a_host_only_store_never_asks_more_than_device_of(base):
    calls = []

    def device_of(value):
        calls.append("device_of")
        return None

    def never(*args):
        raise AssertionError("a host value was treated as a device value")

    tier = DeviceTier(device_of=device_of, nbytes=never, to_host=never)
    async with ChunkStore("1MiB", spill_dir=base, monitor_interval=None, device_tier=tier) as store:
        for i in range(40):
            store.put(i, np.zeros(64 * KiB, np.uint8))
        await until(lambda: not store.stats()["writing"] and store.spilled_bytes > 0)
        assert calls == ["device_of"] * 40
        assert store.stats()["device_used"] == {} and store._devices._executor is None


async def test_the_default_tier_never_imports_cupy(base):
    if "cupy" in sys.modules:
        pytest.skip("cupy is imported in this process already")
    async with ChunkStore(None, spill_dir=base, monitor_interval=None) as store:
        store.put("a", np.zeros(10))
        store.put("b", b"x")
        assert store.device_used == {}
    assert "cupy" not in sys.modules


async def test_device_figures_travel_in_a_heartbeat(gpu, base):
    async with store_for(gpu, base) as store:
        store.put("a", dev(1000, device=0))
        store.put("b", dev(500, device=3))
        await store.free_device(3, 1)
        raw = msgpack.packb(P.encode(P.Heartbeat(store.stats())), use_bin_type=True)
        header = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        stats = P.decode(header, 0).stats
        assert stats["device_used"] == {0: 1000, 3: 0}
        assert stats["device_spilled_bytes"] == 500


@pytest.mark.parametrize("limit", [0.5, "half"])
def test_a_bad_device_limit_says_what_to_write(limit):
    with pytest.raises((TypeError, ValueError), match="device_limit=.*bytes per device"):
        ChunkStore(None, device_limit=limit)

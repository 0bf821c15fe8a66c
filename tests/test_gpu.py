"""GPU support (aiodagger/gpu/): the parts that need no device run everywhere; the rest
needs cupy and a CUDA device, and is skipped with the reason otherwise.

The waiter pool, the stream pool and the readiness bookkeeping take any object with
the methods they call (``synchronize()``/``done``, ``wait_event()``); without a GPU
the tests below drive them with small stand-ins of that shape, the only way to run
them on a machine that has no device.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time

import pytest

import aiodagger as dagger
from aiodagger.gpu import arrays
from aiodagger.gpu import discovery as devices
from aiodagger.gpu.proc import _stepped
from aiodagger.gpu.streams import Made, Readiness, StreamPool, wait_for_inputs
from aiodagger.gpu.waiters import WaiterPool

pytestmark = pytest.mark.timeout(60)


class Gate:
    """Something to wait on: ``synchronize()`` returns once ``fire()`` was called."""

    def __init__(self, error: BaseException | None = None) -> None:
        self._fired = threading.Event()
        self.error = error
        self.calls = 0

    @property
    def done(self) -> bool:
        return self._fired.is_set()

    def fire(self) -> None:
        self._fired.set()

    def synchronize(self) -> None:
        self.calls += 1
        self._fired.wait(30)
        if self.error is not None:
            raise self.error


# -- the waiter pool ------------------------------------------------------------------------
async def test_waiter_resolves_after_synchronize_and_keeps_the_loop_free():
    pool = WaiterPool(threads=2)
    try:
        gate = Gate()
        fut = pool.wait(gate)
        ticks = 0
        for _ in range(20):  # the loop keeps running while the waiter thread blocks
            await asyncio.sleep(0.005)
            ticks += 1
        assert not fut.done() and ticks == 20
        gate.fire()
        assert await asyncio.wait_for(fut, 5) is gate
        assert gate.calls == 1 and pool.waited == 1
    finally:
        assert pool.close()


async def test_waiter_done_object_resolves_without_a_thread():
    pool = WaiterPool(threads=1)
    gate = Gate()
    gate.fire()
    fut = pool.wait(gate)
    assert fut.done() and fut.result() is gate
    assert gate.calls == 0 and pool.waited == 0
    assert pool.close()


async def test_waiter_error_is_the_futures_exception():
    pool = WaiterPool(threads=1)
    try:
        gate = Gate(error=RuntimeError("cudaErrorIllegalAddress: an illegal memory access"))
        fut = pool.wait(gate)
        gate.fire()
        with pytest.raises(RuntimeError, match="illegal memory access"):
            await asyncio.wait_for(fut, 5)
    finally:
        assert pool.close()


async def test_a_hung_wait_holds_one_thread_only_and_never_the_close():
    pool = WaiterPool(threads=2)
    hung = Gate()
    pool.wait(hung)  # never fires
    quick = Gate()
    fut = pool.wait(quick)
    quick.fire()
    assert await asyncio.wait_for(fut, 5) is quick  # served by the other thread
    t0 = time.monotonic()
    assert pool.close(timeout=0.2) is False  # reported, not waited for
    assert time.monotonic() - t0 < 2
    hung.fire()  # let the daemon thread end
    late = pool.wait(Gate())
    with pytest.raises(RuntimeError, match="closed"):
        await late


async def test_idle_waiter_threads_end_and_come_back():
    pool = WaiterPool(threads=2, idle_exit=0.05)
    gate = Gate()
    gate_fut = pool.wait(gate)
    gate.fire()
    await asyncio.wait_for(gate_fut, 5)
    deadline = time.monotonic() + 5
    while pool._threads and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not pool._threads, "idle waiter threads were left parked"
    again = Gate()
    fut = pool.wait(again)
    again.fire()
    assert await asyncio.wait_for(fut, 5) is again
    assert pool.close()


async def test_many_waits_from_many_coroutines():
    pool = WaiterPool(threads=3)
    try:
        gates = [Gate() for _ in range(50)]
        futs = [pool.wait(g) for g in gates]
        for g in reversed(gates):
            g.fire()
        done = await asyncio.wait_for(asyncio.gather(*futs), 10)
        assert done == gates
    finally:
        assert pool.close()


async def test_public_synchronize_takes_anything_with_synchronize():
    gate = Gate()
    threading.Timer(0.05, gate.fire).start()
    assert await asyncio.wait_for(dagger.gpu.synchronize(gate), 5) is gate
    with pytest.raises(TypeError, match="cupy Stream or Event"):
        await dagger.gpu.synchronize(42)


# -- streams and readiness ------------------------------------------------------------------
class FakeStream:
    def __init__(self, n: int) -> None:
        self.n = n
        self.waited: list[object] = []

    def wait_event(self, event: object) -> None:
        self.waited.append(event)

    def __repr__(self) -> str:
        return f"stream{self.n}"


def test_stream_pool_hands_out_the_least_busy_and_grows_to_its_size():
    made = iter(range(100))
    pool = StreamPool(lambda: FakeStream(next(made)), size=3)
    a = pool.acquire()
    pool.release(a)
    assert pool.acquire() is a  # an idle stream is reused, not a new one made
    b, c = pool.acquire(), pool.acquire()
    assert len({a, b, c}) == 3 and pool.busy() == [1, 1, 1]
    d = pool.acquire()  # all taken and at size: shares the least busy
    assert d in (a, b, c) and sorted(pool.busy()) == [1, 1, 2]
    pool.release(b)
    assert pool.acquire() is b
    with pytest.raises(ValueError, match="not a stream of this pool"):
        pool.release(FakeStream(99))
    with pytest.raises(ValueError):
        StreamPool(lambda: None, size=0)


class Value:
    """A result: anything weakly referenceable."""


def test_readiness_follows_its_values_and_waits_only_across_streams():
    ready = Readiness()
    s1, s2 = FakeStream(1), FakeStream(2)
    x, y = Value(), Value()
    ready.note(x, Made(0, s1, "ev-x"))
    ready.note(y, Made(0, s2, "ev-y"))
    assert ready.of(x) == Made(0, s1, "ev-x") and len(ready) == 2
    assert wait_for_inputs([x, y, Value()], s2, ready) == 1
    assert s2.waited == ["ev-x"]  # y was made on s2 itself: stream order covers it
    del x
    gc.collect()
    assert len(ready) == 1 and ready.of(y) is not None
    ready.note(3, Made(0, s1, "ev"))  # not weakly referenceable: not recorded
    assert ready.of(3) is None


# -- device and stream current around each step of a coroutine -----------------------------
class Current:
    """Stands for cupy's thread-wide current device/stream: entered and exited."""

    def __init__(self) -> None:
        self.depth = 0
        self.entries = 0

    def __enter__(self) -> Current:
        self.depth += 1
        self.entries += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1


async def test_stepped_enters_its_contexts_around_each_step_only():
    current = Current()
    seen_inside, seen_outside = [], []

    async def gpu_task():
        for _ in range(3):
            seen_inside.append(current.depth)
            await asyncio.sleep(0)
        return "done"

    async def neighbour():
        for _ in range(3):
            seen_outside.append(current.depth)
            await asyncio.sleep(0)

    result, _ = await asyncio.gather(_stepped(gpu_task(), (current,)), neighbour())
    assert result == "done"
    assert seen_inside == [1, 1, 1] and seen_outside == [0, 0, 0]
    assert current.depth == 0 and current.entries == 4  # three awaits: four steps


async def test_stepped_passes_errors_and_cancellation_through():
    current = Current()

    async def fails():
        await asyncio.sleep(0)
        raise KeyError("inside")

    with pytest.raises(KeyError, match="inside"):
        await _stepped(fails(), (current,))
    assert current.depth == 0

    caught = []

    async def slow():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            caught.append(current.depth)
            raise

    t = asyncio.ensure_future(_stepped(slow(), (current,)))
    await asyncio.sleep(0.01)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert caught == [1] and current.depth == 0


# -- Cluster(gpus=...) and the scope -----------------------------------------------------------
@pytest.mark.parametrize("bad, error, match", [
    ("all", ValueError, "only string taken is 'auto'"),
    (-1, ValueError, "cannot be negative"),
    ([0, 0], ValueError, "named twice"),
    ([0, -2], ValueError, "device numbers are ints"),
    (True, ValueError, "gpus='auto'"),
    (1.5, TypeError, "takes 'auto', a count or a list"),
])
def test_cluster_gpus_is_checked(bad, error, match):
    with pytest.raises(error, match=match):
        dagger.Cluster(gpus=bad)


def test_choose_devices():
    assert devices.choose("auto", [0, 1]) == [0, 1]
    assert devices.choose(0, [0, 1]) == []
    assert devices.choose(1, [0, 1]) == [0]
    assert devices.choose((1,), [0, 1]) == [1]
    with pytest.raises(ValueError, match=r"sees 2 CUDA devices \(0, 1\); ask for gpus='auto' or at most 2"):
        devices.choose(3, [0, 1])
    with pytest.raises(ValueError, match=r"device\(s\) \[2\] not seen"):
        devices.choose((0, 2), [0, 1])
    assert devices.parse_kind("gpu") == ("gpu", None)
    assert devices.parse_kind("gpu-async:3") == ("gpu-async", 3)
    with pytest.raises(ValueError):
        devices.parse_kind("thread")


@pytest.mark.skipif(devices.missing_reason() is None, reason="this machine has a GPU")
async def test_asking_for_a_gpu_that_is_not_there_fails_the_start_and_says_why():
    why = devices.missing_reason()
    with pytest.raises(ValueError, match=r"Cluster\(gpus=1\): this worker sees no CUDA device") as info:
        async with dagger.Cluster(gpus=1):
            pass
    assert why in str(info.value)
    with pytest.raises(RuntimeError, match="exited before joining"):
        async with dagger.Cluster(processes=1, gpus=[0]):
            pass


@pytest.mark.skipif(devices.missing_reason() is None, reason="this machine has a GPU")
@pytest.mark.parametrize("processes", [0, 1])
async def test_gpu_scope_device_0_is_not_a_cpu_thread(processes):
    async with dagger.Cluster(processes=processes, threads=1) as c:
        for gpu in (0, True):
            t = dagger.options(scope=dagger.scope(gpu=gpu)).spawn(sum, [1, 2])
            with pytest.raises(dagger.NoProcessorError, match=r"scope\(gpu=") as info:
                await asyncio.wait_for(t, 30)
            assert "ThreadProc" in str(info.value)  # what exists is named
        assert all(not any(p.startswith("GPUProc") for p in w.processors) for w in c.workers)
        assert await dagger.spawn(sum, [1, 2]) == 3


def test_without_cupy_no_value_is_a_device_array():
    import numpy as np

    a = np.arange(3)
    assert not arrays.is_device_array(a) and arrays.device_nbytes(a) == 0
    assert arrays.array_module(a) is np
    assert arrays.to_host(a) is a
    args, kwargs = arrays.map_arrays((a, [a, 1], {"k": a}), {"x": 2}, lambda v: v)
    assert args[0] is a and kwargs == {"x": 2}


def test_map_arrays_rebuilds_only_what_changed():
    keep = [1, 2]
    args, kwargs = arrays.map_arrays((keep, ("a", 3), {"n": 4}), {"m": [5]},
                                     lambda v: v * 10 if type(v) is int and v > 2 else v)
    assert args[0] is keep
    assert args[1] == ("a", 30) and args[2] == {"n": 40} and kwargs == {"m": [50]}


# -- on a GPU --------------------------------------------------------------------------------
needs_gpu = pytest.mark.skipif(devices.missing_reason() is not None,
                               reason=f"needs a GPU: {devices.missing_reason()}")


@needs_gpu
@pytest.mark.parametrize("processes", [0, 1])
async def test_gpu_tasks_keep_results_on_the_device(processes):
    import cupy
    import numpy as np

    def on_device(a):
        assert isinstance(a, cupy.ndarray)  # numpy input moved to the device
        assert cupy.cuda.get_current_stream() != cupy.cuda.Stream.null
        return a * 2

    def is_numpy(a):
        return type(a).__module__, float(a.sum())

    async with dagger.Cluster(processes=processes, threads=1) as c:
        assert any(p.startswith("GPUProc") for w in c.workers for p in w.processors) or processes == 0
        gpu = dagger.options(scope=dagger.scope(gpu=0))
        x = gpu.spawn(on_device, np.arange(1000.0))
        y = gpu.spawn(on_device, x)  # device to device: an event waited for on the stream
        host = dagger.spawn(is_numpy, y)  # a CPU task gets numpy
        assert await asyncio.wait_for(host, 60) == ("numpy", 4 * float(np.arange(1000.0).sum()))


@needs_gpu
async def test_async_gpu_task_and_synchronize():
    import cupy

    async def kernel(n):
        a = cupy.arange(n, dtype=cupy.float64)
        await dagger.gpu.synchronize()
        return float(a.sum())

    async with dagger.Cluster(threads=1):
        t = dagger.options(scope=dagger.scope(gpu=True)).spawn(kernel, 1 << 20)
        assert await asyncio.wait_for(t, 60) == float((1 << 20) * ((1 << 20) - 1) / 2)


@needs_gpu
async def test_cuda_error_is_the_tasks_exception():
    import cupy

    def bad():
        raw = cupy.RawKernel(r'extern "C" __global__ void f(int* p) { p[1 << 30] = 1; }', "f")
        raw((1,), (1,), (cupy.zeros(1, dtype=cupy.int32),))

    async with dagger.Cluster(processes=1, threads=1):
        t = dagger.options(scope=dagger.scope(gpu=True)).spawn(bad)
        with pytest.raises(Exception, match="(?i)illegal|cuda"):
            await asyncio.wait_for(t, 60)


# -- end to end on tests/fakecupy (cupy's API over numpy: see its docstring) ------------------
FAKE_DIR = str(__import__("pathlib").Path(__file__).parent / "fakecupy")


@pytest.fixture
def fake_cupy(monkeypatch):
    """The stand-in cupy, for this process and the worker processes it starts."""
    import sys

    assert "cupy" not in sys.modules or getattr(sys.modules["cupy"], "FAKE", None) is not None, \
        "a real cupy is loaded: these tests are for machines without one"
    monkeypatch.syspath_prepend(FAKE_DIR)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([FAKE_DIR, os.environ.get("PYTHONPATH", "")]))
    sys.modules.pop("cupy", None)
    devices._probe.cache_clear()
    import cupy

    yield cupy
    sys.modules.pop("cupy", None)
    devices._probe.cache_clear()


def _stream_and_type(a):
    import cupy

    return type(a).__module__, cupy.cuda.get_current_stream() is not cupy.cuda.Stream.null, a.device.id


def _double(a):
    return a * 2


def _host_sum(a):
    return type(a).__name__, float(a.sum())


@pytest.mark.parametrize("processes", [0, 1])
async def test_fake_gpu_end_to_end(fake_cupy, monkeypatch, processes):
    import numpy as np

    monkeypatch.setenv("FAKECUPY_DEVICES", "2")
    async with dagger.Cluster(processes=processes, threads=1) as c:
        gpu = dagger.options(scope=dagger.scope(gpu=True))
        # a numpy input arrives as a device array, with a pool stream current
        assert await asyncio.wait_for(gpu.spawn(_stream_and_type, np.ones(4)), 30) == ("cupy", True, 0)
        on1 = dagger.options(scope=dagger.scope(gpu=1)).spawn(_stream_and_type, np.ones(4))
        assert (await asyncio.wait_for(on1, 30))[2] == 1  # device 1, as the scope said
        x = gpu.spawn(_double, np.arange(5.0))
        y = gpu.spawn(_double, x)  # device to device
        assert await asyncio.wait_for(dagger.spawn(_host_sum, y), 30) == ("ndarray", 40.0)  # a CPU task: numpy
        got = await y
        assert isinstance(got, fake_cupy.ndarray if processes == 0 else np.ndarray)  # across processes: numpy
        assert got.tolist() == [0.0, 4.0, 8.0, 12.0, 16.0]
        procs = [p for w in c.workers for p in w.processors if p.startswith("GPUProc")]
        assert len(procs) == 2, c.workers  # one per device, on the worker that runs tasks
        with pytest.raises(dagger.NoProcessorError, match="GPUProc"):
            await asyncio.wait_for(dagger.options(scope=dagger.scope(gpu=2)).spawn(_double, 1), 30)


async def test_fake_gpu_async_task_has_its_stream_around_each_step(fake_cupy):
    async def kernel():
        cupy = __import__("cupy")
        first = cupy.cuda.get_current_stream()
        await asyncio.sleep(0.01)
        assert cupy.cuda.get_current_stream() is first is not cupy.cuda.Stream.null
        return "ok"

    async with dagger.Cluster(threads=1):
        t = dagger.options(scope=dagger.scope(gpu=0)).spawn(kernel)
        while not t.done():
            assert fake_cupy.cuda.get_current_stream() is fake_cupy.cuda.Stream.null  # the loop's own
            await asyncio.sleep(0.002)
        assert await t == "ok"


async def test_fake_gpu_completion_waits_for_the_event_without_blocking_the_loop(fake_cupy):
    fake_cupy.FAKE.event_delay = 0.3
    try:
        async with dagger.Cluster(threads=1):
            t0 = time.monotonic()
            t = dagger.options(scope=dagger.scope(gpu=0)).spawn(_double, 3)
            ticks = 0
            while not t.done():
                await asyncio.sleep(0.01)
                ticks += 1
            assert await t == 6
            assert time.monotonic() - t0 >= 0.3 and ticks >= 10
    finally:
        fake_cupy.FAKE.event_delay = 0.0


async def test_fake_gpu_cuda_error_is_the_tasks_exception(fake_cupy):
    async with dagger.Cluster(threads=1):
        fake_cupy.FAKE.event_error = RuntimeError("cudaErrorIllegalAddress: an illegal memory access was encountered")
        t = dagger.options(scope=dagger.scope(gpu=0)).spawn(_double, 3)
        with pytest.raises(RuntimeError, match="illegal memory access"):
            await asyncio.wait_for(t, 30)
        assert await dagger.options(scope=dagger.scope(gpu=0)).spawn(_double, 4) == 8  # the device goes on


async def test_fake_gpu_out_of_memory_runs_once_more(fake_cupy):
    import numpy as np

    async with dagger.Cluster(threads=1) as c:
        gpu = dagger.options(scope=dagger.scope(gpu=0))
        fake_cupy.FAKE.oom_next = 1
        assert (await asyncio.wait_for(gpu.spawn(_double, np.ones(3)), 30)).tolist() == [2.0, 2.0, 2.0]
        proc = c._local.gpu_procs()[0]
        assert proc.retried == 1
        fake_cupy.FAKE.oom_next = 2  # out of memory again on the second run: the task fails
        with pytest.raises(MemoryError, match="Out of memory"):
            await asyncio.wait_for(gpu.spawn(_double, np.ones(3)), 30)
        assert proc.retried == 2


async def test_fake_gpu_count_beyond_the_devices_fails_the_start(fake_cupy, monkeypatch):
    monkeypatch.setenv("FAKECUPY_DEVICES", "1")
    with pytest.raises(ValueError, match=r"Cluster\(gpus=2\): this worker sees 1 CUDA device \(0\)"):
        async with dagger.Cluster(gpus=2):
            pass
    async with dagger.Cluster(gpus=0, threads=1) as c:  # none asked for: no GPU processor
        with pytest.raises(dagger.NoProcessorError):
            await asyncio.wait_for(dagger.options(scope=dagger.scope(gpu=0)).spawn(_double, 1), 30)
        assert not any(p.startswith("GPUProc") for w in c.workers for p in w.processors)


def _made_where():
    cupy = __import__("cupy")
    return {"on_gpu_stream": cupy.cuda.get_current_stream() is not cupy.cuda.Stream.null}


def _read(m):
    return m["on_gpu_stream"]


async def test_fake_gpu_mutable_made_under_a_gpu_scope_is_made_on_the_gpu(fake_cupy):
    async with dagger.Cluster(threads=1):
        on_gpu = dagger.mutable(_made_where, scope=dagger.scope(gpu=0))
        on_cpu = dagger.mutable(_made_where)
        assert await asyncio.wait_for(dagger.spawn(_read, on_gpu), 30) is True
        assert await asyncio.wait_for(dagger.spawn(_read, on_cpu), 30) is False


def _zeros_here():
    cupy = __import__("cupy")
    return cupy.asarray(__import__("numpy").zeros(3))


def _current_device(m):
    cupy = __import__("cupy")
    m += 1  # in place: must be the mutable's own array, on its own device
    return cupy.cuda.Device().id, m.device.id


async def test_fake_gpu_any_gpu_task_runs_where_its_device_input_lives(fake_cupy, monkeypatch):
    monkeypatch.setenv("FAKECUPY_DEVICES", "2")
    async with dagger.Cluster(threads=1):
        tile = dagger.mutable(_zeros_here, scope=dagger.scope(gpu=1))
        anygpu = dagger.options(scope=dagger.scope(gpu=True))
        for _ in range(4):
            assert await asyncio.wait_for(anygpu.spawn(_current_device, tile), 30) == (1, 1)
        t = dagger.options(scope=dagger.scope(gpu=1)).spawn(lambda m: m.tolist(), tile)
        assert await asyncio.wait_for(t, 30) == [4.0, 4.0, 4.0]  # every change made in place


def _device_ones(n):
    cupy = __import__("cupy")
    return cupy.asarray(__import__("numpy").ones(n))


async def test_fake_gpu_results_past_the_device_limit_move_to_host(fake_cupy):
    async with dagger.Cluster(processes=1, threads=1, gpu_memory_limit=20_000) as c:
        gpu = dagger.options(scope=dagger.scope(gpu=0))
        kept = [gpu.spawn(_device_ones, 1000) for _ in range(6)]  # 8,000 bytes each
        await asyncio.wait_for(dagger.wait(kept), 30)
        (wid,) = [w.id for w in c.workers if w.id != 0]
        deadline = time.monotonic() + 20
        while True:
            stats = (await c.worker_stats())[wid]
            if stats["device_spilled_bytes"] >= 4 * 8000 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert stats["device_used"] in ({0: 16000}, {"0": 16000}) and stats["device_spilled_bytes"] == 32000
        sums = await asyncio.wait_for(dagger.gather(*[dagger.spawn(_host_sum, t) for t in kept]), 30)
        assert sums == [("ndarray", 1000.0)] * 6  # moved or not, every value is whole


async def test_fake_gpu_out_of_memory_moves_stored_results_to_host_first(fake_cupy):
    import numpy as np

    async with dagger.Cluster(threads=1, memory_limit="1GiB") as c:
        gpu = dagger.options(scope=dagger.scope(gpu=0))
        kept = [gpu.spawn(_device_ones, 1000) for _ in range(3)]
        await asyncio.wait_for(dagger.wait(kept), 30)
        store = c._local.store
        assert store.device_used == {0: 24000} and store.device_spilled_bytes == 0
        fake_cupy.FAKE.oom_next = 1
        assert (await asyncio.wait_for(gpu.spawn(_double, np.ones(2)), 30)).tolist() == [2.0, 2.0]
        # what the allocation asked for (16 bytes) is freed: the oldest result moves
        assert store.device_spilled_bytes == 8000 and store.device_used == {0: 16000}
        assert [float((await t).sum()) for t in kept] == [1000.0] * 3


@pytest.mark.timeout(300)
def test_the_gpu_card_runs_on_the_stand_in():
    """benchmarks/gpu.py end to end (its figures mean nothing here: the work is numpy's)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([FAKE_DIR, str(root)])}
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--rounds", "1", "--quick"], cwd=root,
                         env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    for card in ("G1 small kernels, stream pool", "one shared stream", "G2 copy/compute",
                 "G3 device → host spill", "G4 await latency"):
        assert card in out.stdout


def test_the_gpu_card_says_why_without_a_device():
    import subprocess
    import sys
    from pathlib import Path

    if devices.missing_reason() is None:
        pytest.skip("this machine has a GPU")
    root = Path(__file__).parent.parent
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu"], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "needs a CUDA device" in out.stderr

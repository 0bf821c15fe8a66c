"""GPUProc: runs GPU-scoped tasks on one device of a worker.

A sync function runs on one of the device's few threads, an ``async def`` on the
worker's loop; either way with the device current and a stream of the device's pool
current (for a coroutine, around each of its steps: other coroutines on the loop never
see it). Inputs on the host are moved to the device on that stream; inputs made by GPU
tasks on other streams are waited for on the device (:mod:`.streams`). After the work,
a blocking-sync event is recorded; the task completes when a waiter thread sees it fire
(:mod:`.waiters`), so a CUDA error in the work is the task's exception and the loop
never blocks. A task that runs out of device memory gets cupy's cached blocks and,
through the worker's store, device-held results moved to host, then runs once more.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import types
from collections.abc import Callable, Coroutine, Generator
from concurrent.futures import ThreadPoolExecutor
from time import perf_counter
from typing import TYPE_CHECKING, Any

from ..task import DTask
from ..worker.execute import run_async, run_sync
from .arrays import cupy_module, is_device_array, map_arrays, to_device
from .streams import DEFAULT_STREAMS, Made, StreamPool, readiness, wait_for_inputs
from .waiters import waiters

if TYPE_CHECKING:
    from ..interfaces import ProcessorOwner

__all__ = ["GPUProc"]

logger = logging.getLogger(__name__)

# Threads per device for sync functions: one launches while another waits in a host
# call (a cupy reduction returning a Python scalar, say), and more would only contend.
DEFAULT_THREADS = 2

FreeDevice = Callable[[int, int], Coroutine[Any, Any, int]]


class GPUProc:
    """One CUDA device of a worker, as a processor."""

    kind = "gpu"

    def __init__(self, worker_id: int, device: int, owner: ProcessorOwner, context: contextvars.Context,
                 *, threads: int = DEFAULT_THREADS, streams: int | None = None,
                 free_device: FreeDevice | None = None) -> None:
        cupy = cupy_module()
        if cupy is None:
            raise RuntimeError("a GPU processor needs cupy: pip install 'aiodagger[gpu]'")
        self._cupy = cupy
        self.worker_id = worker_id
        self.device = device
        self._owner = owner
        self._loop = owner.loop
        self._context = context
        self._free_device = free_device

        def new_stream() -> Any:
            with cupy.cuda.Device(device):
                return cupy.cuda.Stream(non_blocking=True)

        if streams is None:  # AIODAGGER_GPU_STREAMS=1: one shared stream per device, as Dagger.jl
            streams = int(os.environ.get("AIODAGGER_GPU_STREAMS", DEFAULT_STREAMS))
        self.streams = StreamPool(new_stream, streams)
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix=f"aiodagger-gpu{device}")
        self.thread = f"GPU {device}"  # the lane observers draw its runs on
        self.running = 0
        self.retried = 0  # tasks run again after running out of device memory

    def __repr__(self) -> str:
        return f"GPUProc(worker={self.worker_id}, device={self.device})"

    def submit(self, task: DTask[Any]) -> None:
        self.running += 1
        task._handle = self._loop.create_task(self._run(task, task._attempts), context=self._context)

    async def _run(self, task: DTask[Any], attempt: int) -> None:
        timed = self._owner.timed
        start = perf_counter()
        try:
            try:
                value = await self._attempt(task)
            except self._cupy.cuda.memory.OutOfMemoryError as exc:
                freed = await self._make_room(exc)
                logger.info("%r: %s ran out of device memory; %d bytes freed, running it again",
                            self, task._describe(), freed)
                self.retried += 1
                value = await self._attempt(task)
            ok = True
        except BaseException as exc:  # noqa: BLE001 - a task's failure is its result
            value, ok = exc, False
        self.running -= 1
        self._owner.complete(task, attempt, ok, value, start, perf_counter() - start if timed else 0.0, self)

    async def _attempt(self, task: DTask[Any]) -> Any:
        if task._kind == "gpu-async":
            value, made = await self._run_coroutine(task)
        else:
            value, made = await self._loop.run_in_executor(self._threads, self._call, task)
        await waiters().wait(made.event, self._loop)
        map_arrays((value,), {}, lambda v: self._note(v, made))
        return value

    def _note(self, value: Any, made: Made) -> Any:
        if is_device_array(value):
            readiness.note(value, made)
        return value

    def _inputs(self, stream: Any) -> Callable[[tuple[Any, ...], dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any]]]:
        """What moves a task's arguments here: host arrays copied on ``stream``, device
        inputs from other streams waited for on the device."""
        device = self.device
        waits: list[Any] = []

        def move(value: Any) -> Any:
            if is_device_array(value) and value.device.id == device:
                waits.append(value)
                return value
            return to_device(value, device, stream)

        def convert(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
            args, kwargs = map_arrays(args, kwargs, move)
            wait_for_inputs(waits, stream, readiness)
            return args, kwargs

        return convert

    def _call(self, task: DTask[Any]) -> tuple[Any, Made]:
        """On a device thread: run a sync function with the device and a stream current."""
        cupy = self._cupy
        stream = self.streams.acquire()
        try:
            with cupy.cuda.Device(self.device), stream:
                value = run_sync(task, self._inputs(stream))
                event = cupy.cuda.Event(block=True, disable_timing=True)
                event.record(stream)
        finally:
            self.streams.release(stream)
        return value, Made(self.device, stream, event)

    async def _run_coroutine(self, task: DTask[Any]) -> tuple[Any, Made]:
        cupy = self._cupy
        stream = self.streams.acquire()
        device = cupy.cuda.Device(self.device)
        try:
            value = await _stepped(run_async(task, self._inputs(stream)), (device, stream))
            with device:
                event = cupy.cuda.Event(block=True, disable_timing=True)
                event.record(stream)
        finally:
            self.streams.release(stream)
        return value, Made(self.device, stream, event)

    async def _make_room(self, exc: BaseException) -> int:
        """Free device memory after ``exc`` (out of memory): cupy's cached blocks, then
        results the worker's store holds on this device (moved to host)."""
        cupy = self._cupy

        def drop_cached() -> int:
            with cupy.cuda.Device(self.device):
                pool = cupy.get_default_memory_pool()
                before = pool.total_bytes()
                pool.free_all_blocks()
                return int(before - pool.total_bytes())

        freed = await self._loop.run_in_executor(self._threads, drop_cached)
        if self._free_device is not None:
            wanted = int(getattr(exc, "size", 0) or 0) or (1 << 62)
            freed += await self._free_device(self.device, wanted)
        return freed

    async def close(self, timeout: float | None = None) -> bool:
        """Stop the device threads (running tasks were cancelled by the worker); False if
        some thread was still in user code at the timeout, left to finish on its own."""
        loop = self._loop
        done = loop.run_in_executor(None, self._threads.shutdown, True)
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            logger.warning("%r: a GPU task still ran %s s after its worker began to stop; left behind",
                           self, timeout)
            return False
        return True


@types.coroutine
def _stepped(coro: Coroutine[Any, Any, Any], contexts: tuple[Any, ...]) -> Generator[Any, Any, Any]:
    """Drive ``coro`` with ``contexts`` (a cupy device and stream) entered around each
    step only: cupy's current device and stream belong to the thread, which is the loop
    thread, shared with every other coroutine."""
    value: Any = None
    error: BaseException | None = None
    while True:
        for c in contexts:
            c.__enter__()
        try:
            yielded = coro.throw(error) if error is not None else coro.send(value)
        except StopIteration as stop:
            return stop.value
        finally:
            for c in reversed(contexts):
                c.__exit__(None, None, None)
        try:
            value, error = (yield yielded), None
        except BaseException as exc:  # noqa: BLE001 - handed to the coroutine, as await does
            value, error = None, exc

"""W0, cold start: one fresh interpreter per run, timed from its launch to its first result.

The parent side is :func:`run_cold`, which peers' ``w0`` methods call. The child
side is this module run as a script::

    python -m benchmarks.coldstart SYSTEM [--loop asyncio|uvloop]

It imports the system, starts it with two worker processes, runs ``inc(1)`` and
prints ``RESULT <json>`` as soon as the value arrives; then it shuts the system
down (not timed) and exits. It also prints ``STAGE <name> <perf_counter>`` lines:
``time.perf_counter`` reads a system-wide monotonic clock (CLOCK_MONOTONIC on
Linux), so the parent can split the figure into interpreter start-up, the
library import, the system's start and the first task.

The module imports nothing heavy at the top, so that the interpreter start-up
stage is the interpreter's own.
"""

from __future__ import annotations

import time

_T_MAIN = time.perf_counter()  # the first line that runs in the child

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.workloads import PROCESS_WORKERS, inc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent  # the repository root, for PYTHONPATH

# The parts of the figure, in order: each is the time from the previous mark.
STAGES = ("python", "import", "start", "first task")

_STDERR_TAIL = 4000  # bytes of a failed child's stderr kept for the error


# -- the child -------------------------------------------------------------------------


def _mark(stage: str) -> None:
    print(f"STAGE {stage} {time.perf_counter()!r}", flush=True)


def _result(value: object) -> None:
    print(f"RESULT {json.dumps(value)} {time.perf_counter()!r}", flush=True)


async def _aiodagger() -> None:
    import aiodagger as dagger

    _mark("import")
    async with dagger.Cluster(processes=PROCESS_WORKERS):
        _mark("start")
        _result(await dagger.spawn(inc, 1))


async def _dask() -> None:
    import logging

    import distributed

    _mark("import")
    async with (
        distributed.LocalCluster(
            n_workers=PROCESS_WORKERS,
            threads_per_worker=1,
            processes=True,
            asynchronous=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        distributed.Client(cluster, asynchronous=True) as client,
    ):
        _mark("start")
        _result(await client.submit(inc, 1, pure=False))


def _ray() -> None:
    import logging

    import ray

    _mark("import")
    # address="local": always a new local instance, never one found on the machine.
    ray.init(
        address="local",
        num_cpus=PROCESS_WORKERS,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
    )
    try:
        _mark("start")
        _result(ray.get(ray.remote(inc).remote(1)))
    finally:
        ray.shutdown()


def _process_pool() -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    _mark("import")
    # fork where there is one: the cheapest way to two worker processes, as a floor should be.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(PROCESS_WORKERS, mp_context=context) as pool:
        _mark("start")
        _result(pool.submit(inc, 1).result())


_ASYNC: dict[str, Callable[[], object]] = {"aiodagger": _aiodagger, "dask": _dask}
_SYNC: dict[str, Callable[[], None]] = {"ray": _ray, "process-pool": _process_pool}
SYSTEMS = (*_ASYNC, *_SYNC)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.coldstart")
    p.add_argument("system", choices=SYSTEMS)
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = p.parse_args(argv)
    print(f"STAGE python {_T_MAIN!r}", flush=True)
    if args.system in _SYNC:
        _SYNC[args.system]()
        return
    coro = _ASYNC[args.system]()
    assert asyncio.iscoroutine(coro)
    if args.loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(coro)
    else:
        asyncio.run(coro)


# -- the parent ------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """The environment of a child: this checkout importable, Ray quiet."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def _kill_group(pgid: int) -> None:
    """Kill what is left of a child's process group (its worker processes)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def run_cold(system: str) -> tuple[object, float, dict[str, float]]:
    """Launch a child for ``system``; return (its result, seconds to it, stages in seconds).

    The child runs on the same kind of event loop as the caller. It runs in a
    session of its own, so that whatever it leaves behind (worker processes of a
    child that failed or was cancelled) is killed with its group.
    """
    running = type(asyncio.get_running_loop()).__module__
    loop = "uvloop" if running.startswith("uvloop") else "asyncio"
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.coldstart",
        system,
        "--loop",
        loop,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=child_env(),
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    stderr = asyncio.ensure_future(proc.stderr.read())
    try:
        marks: dict[str, float] = {}
        found: tuple[object, float] | None = None
        while found is None:
            line = await proc.stdout.readline()
            if not line:
                break
            t_read = time.perf_counter()
            parts = line.decode(errors="replace").split()
            if len(parts) == 3 and parts[0] == "STAGE":
                marks[parts[1]] = float(parts[2])
            elif len(parts) == 3 and parts[0] == "RESULT":
                marks["first task"] = float(parts[2])
                found = (json.loads(parts[1]), t_read - t0)
        await proc.stdout.read()  # whatever it prints while shutting down
        rc = await proc.wait()
        err = (await stderr)[-_STDERR_TAIL:].decode(errors="replace").strip()
        if found is None:
            raise RuntimeError(f"the child exited with status {rc} before a result: {err}")
        if rc != 0:
            raise RuntimeError(f"the child exited with status {rc} after its result: {err}")
        value, seconds = found
        return value, seconds, _stages(t0, marks)
    finally:
        stderr.cancel()
        if proc.returncode is None:
            _kill_group(proc.pid)
            await proc.wait()
        _kill_group(proc.pid)  # stragglers of a child that exited


def _stages(t0: float, marks: dict[str, float]) -> dict[str, float]:
    """Durations between consecutive marks; empty if any is missing or out of order."""
    out: dict[str, float] = {}
    prev = t0
    for name in STAGES:
        t = marks.get(name)
        if t is None or t < prev:
            return {}
        out[name] = t - prev
        prev = t
    return out


if __name__ == "__main__":
    main()

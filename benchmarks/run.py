"""Run the workloads on aiodagger and its peers in one process and compare them.

    python -m benchmarks.run [--only W1,W2] [--repeat N] [--rounds R] [--peers a,b,...]
                             [--markdown PATH]

Each peer is started once per setup (in this process; with two worker
processes; not at all for the cold start, whose runs are fresh interpreters),
runs every selected workload of that setup (one warm-up run, then N timed
repeats), and is shut down before anything else starts, so peers never compete
for the machine. With ``--rounds R`` all of that happens R times, the order of
the peers alternating from round to round, and each figure is the median of the
repeats of every round: on a shared machine whose speed drifts over minutes, the
peers then sample the same stretches of time. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import faulthandler
import gc
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import machine, report
from benchmarks.peers import PEERS, REFERENCE, make_peer
from benchmarks.peers.base import Peer, Timed, Unavailable, WorkloadRun
from benchmarks.report import Result
from benchmarks.workloads import WORKLOADS, Workload

log = logging.getLogger("benchmarks")

# What a run without --only selects: workloads too long for it (G10M) run when named.
DEFAULT_WORKLOADS = [key for key, w in WORKLOADS.items() if w.default]

# Starting Ray takes seconds and more on a busy machine; stopping should not.
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0
# How much longer than an asyncio timeout the hard watchdog waits. It is for a
# peer that blocks the event loop itself, where asyncio timeouts cannot fire.
WATCHDOG_GRACE_S = 60.0


def _csv(choices: Sequence[str], what: str) -> Any:
    def parse(value: str) -> list[str]:
        items = [item.strip() for item in value.split(",") if item.strip()]
        lookup = {c.lower(): c for c in choices}
        unknown = [item for item in items if item.lower() not in lookup]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(unknown) or '(none given)'}; "
                f"choose from {','.join(choices)}"
            )
        wanted = {lookup[item.lower()] for item in items}
        # Canonical order, whatever the order given: tables from different runs line up.
        return [c for c in choices if c in wanted]

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Compare aiodagger with its peers on the same workloads, in one run.",
    )
    p.add_argument(
        "--only",
        type=_csv(list(WORKLOADS), "workload"),
        default=DEFAULT_WORKLOADS,
        metavar="W1,W2",
        help=f"workloads to run (default: all of {','.join(DEFAULT_WORKLOADS)}; "
        f"{','.join(k for k in WORKLOADS if k not in DEFAULT_WORKLOADS)} only when named)",
    )
    p.add_argument(
        "--peers",
        type=_csv(list(PEERS), "peer"),
        default=list(PEERS),
        metavar="NAMES",
        help=f"systems to run (default: all of {','.join(PEERS)})",
    )
    p.add_argument(
        "--repeat", type=int, default=3, metavar="N", help="timed repeats per figure (default 3)"
    )
    p.add_argument(
        "--rounds", type=int, default=1, metavar="R",
        help="run the whole comparison R times, the peers taking turns; figures pool the "
        "repeats of every round (default 1)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds one run of one workload may take before the peer is given up (default 120)",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        metavar="X",
        help="multiply every workload's size (tasks, links, array length) by X, "
        "for quick runs (default 1; W0 is not scaled)",
    )
    p.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop every system runs on (default asyncio)",
    )
    p.add_argument("--markdown", type=Path, metavar="PATH", help="write the results section here")
    p.add_argument("-v", "--verbose", action="store_true", help="log each repeat and tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.rounds < 1:
        p.error("--repeat and --rounds must be at least 1")
    if args.timeout <= 0 or args.scale <= 0:
        p.error("--timeout and --scale must be positive")
    return args


def _scaled(keys: Sequence[str], scale: float) -> list[Workload]:
    out = []
    for k in keys:
        w = WORKLOADS[k]
        out.append(dataclasses.replace(w, n=max(1, round(w.n * scale))) if w.scalable else w)
    return out


class _Watchdog:
    """Kill the process, with every thread's traceback, if a step overruns badly."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        faulthandler.dump_traceback_later(self.seconds, exit=True)

    def __exit__(self, *exc: object) -> None:
        faulthandler.cancel_dump_traceback_later()


async def measure(
    system: str, run: WorkloadRun, w: Workload, repeat: int, timeout: float
) -> tuple[Result, bool]:
    """Warm up once, time ``repeat`` runs; returns the result and whether the peer is still usable."""
    result = Result(w.key, system)
    expected = w.expected(w.n)
    timeout = max(timeout, w.min_timeout)
    for i in range(repeat + 1):
        # Collect the previous run's garbage now, so it is not charged to this run.
        gc.collect()
        what = "warm-up" if i == 0 else f"repeat {i}/{repeat}"
        stages: dict[str, float] = {}
        try:
            with _Watchdog(timeout + WATCHDOG_GRACE_S):
                t0 = time.perf_counter()
                async with asyncio.timeout(timeout):
                    value = await run(w)
                elapsed = time.perf_counter() - t0
            if isinstance(value, Timed):  # the run timed its own region
                value, elapsed, stages = value.value, value.seconds, value.stages
        except TimeoutError:
            result.note = f"timed out after {timeout:g} s ({what})"
            return result, False
        except Exception as exc:
            log.debug("%s %s failed", system, w.key, exc_info=True)
            result.note = f"error in {what} ({type(exc).__name__}: {exc})"
            return result, True
        if value != expected:
            result.note = f"wrong result in {what}"
            return result, True
        fig = w.metric.figure(elapsed, w.n)
        if i > 0:
            result.samples.append(fig)
            for stage, seconds in stages.items():
                result.stages.setdefault(stage, []).append(seconds)
        log.debug("%s %s %s: %s %s", w.key, system, what, report.figure(fig, w.metric), w.metric.unit)
    median = result.median or 0.0
    log.info("%s %-16s %12s %s", w.key, system, report.figure(median, w.metric), w.metric.unit)
    return result, True


async def bench_peer(
    name: str, workloads: Sequence[Workload], repeat: int, timeout: float
) -> list[Result]:
    """Run every workload on ``name``: one start per setup, workloads in order."""
    groups: dict[str, list[tuple[Workload, WorkloadRun | str]]] = {}
    probe = make_peer(name)  # never started: only asked what it runs, and in which setup
    for w in workloads:
        run = probe.runner(w)
        if run is not None:  # None: the peer has nothing to do with w, no row
            groups.setdefault(probe.setup_of(w), []).append((w, run))
    results: list[Result] = []
    for setup, items in groups.items():
        applicable = [w for w, run in items if not isinstance(run, str)]
        # Rows that only say why a workload does not apply need no start.
        results += [Result(w.key, name, note=run) for w, run in items if isinstance(run, str)]
        if applicable:
            log.info("%s: starting (%s)", name, setup)
            results += await _bench_setup(name, setup, applicable, repeat, timeout)
    return results


async def _bench_setup(
    name: str, setup: str, workloads: Sequence[Workload], repeat: int, timeout: float
) -> list[Result]:
    """Start ``name`` in ``setup`` once, run ``workloads`` on it, stop it."""
    peer: Peer = make_peer(name)
    note = ""
    try:
        with _Watchdog(START_TIMEOUT_S + WATCHDOG_GRACE_S):
            async with asyncio.timeout(START_TIMEOUT_S):
                await peer.start(setup)
    except Unavailable as exc:
        note = str(exc)
    except TimeoutError:
        note = f"start timed out after {START_TIMEOUT_S:g} s"
    except Exception as exc:
        log.debug("%s failed to start", name, exc_info=True)
        note = f"start failed ({type(exc).__name__}: {exc})"
    results: list[Result] = []
    try:
        if note:
            # Said at once, not only in the table: a long run should not hide it.
            print(f"{name}: {note}", flush=True)
            return [Result(w.key, name, note=note) for w in workloads]
        usable = True
        for w in workloads:
            run = peer.runner(w)
            if run is None or isinstance(run, str):  # not for a peer that said it has w
                results.append(Result(w.key, name, note=run or "not implemented"))
            elif not usable:
                # Work from the timed-out run may still be in flight and would skew this one.
                results.append(Result(w.key, name, note="skipped (an earlier run timed out)"))
            else:
                result, usable = await measure(name, run, w, repeat, timeout)
                result.note = "; ".join(n for n in (peer.notes.get(w.key, ""), result.note) if n)
                results.append(result)
        return results
    finally:
        await _stop(name, peer)
        gc.collect()


async def _stop(name: str, peer: Peer) -> None:
    try:
        with _Watchdog(STOP_TIMEOUT_S + WATCHDOG_GRACE_S):
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await peer.stop()
    except Exception as exc:  # a peer that stops badly must not cost the other rows
        log.warning("%s did not stop cleanly: %s: %s", name, type(exc).__name__, exc)


async def bench(args: argparse.Namespace) -> list[Result]:
    workloads = _scaled(args.only, args.scale)
    pooled: dict[tuple[str, str], Result] = {}
    for round_ in range(args.rounds):
        if args.rounds > 1:
            log.info("round %d of %d", round_ + 1, args.rounds)
        peers = args.peers if round_ % 2 == 0 else args.peers[::-1]
        for name in peers:
            for result in await bench_peer(name, workloads, args.repeat, args.timeout):
                _pool(pooled, result)
    # Table order: by workload, then system in the order given.
    order = {w.key: i for i, w in enumerate(workloads)}
    systems = {name: i for i, name in enumerate(args.peers)}
    return sorted(pooled.values(), key=lambda r: (order[r.workload], systems.get(r.system, 0)))


def _pool(pooled: dict[tuple[str, str], Result], result: Result) -> None:
    """Add one round's ``result`` to the figure of its workload and system."""
    key = (result.workload, result.system)
    into = pooled.get(key)
    if into is None:
        pooled[key] = result
        return
    into.samples += result.samples
    for stage, seconds in result.stages.items():
        into.stages.setdefault(stage, []).extend(seconds)
    if result.note and result.note not in into.note:
        into.note = "; ".join(n for n in (into.note, result.note) if n)


def _run_loop(args: argparse.Namespace) -> list[Result]:
    if args.loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            sys.exit("--loop uvloop: uvloop is not installed")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(bench(args))
    return asyncio.run(bench(args))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.WARNING, stream=sys.stderr)
    log.setLevel(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)

    command = machine.command_line()
    results = _run_loop(args)
    info = machine.describe(args.loop)
    if args.scale != 1.0:
        info["Scale"] = f"workload sizes × {args.scale:g} (W0 is not scaled)"

    print()
    print(f"Command: {command}")
    for label, value in info.items():
        print(f"{label + ':':<12} {value}")
    print()
    repeats = args.repeat * args.rounds
    print(report.text_table(results, repeats, REFERENCE))
    print()
    print(report.legend(repeats, REFERENCE, args.rounds))

    if args.markdown is not None:
        section = report.markdown_section(results, repeats, REFERENCE, command, info, args.rounds)
        report.write_markdown(args.markdown, section)
        print(f"\nWrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What an open dashboard costs the scheduler's loop on a large graph.

    python -m benchmarks.dashboard_lag                   # 100,000 tasks at 20,000 a second
    python -m benchmarks.dashboard_lag --rate 0          # spawned as fast as one thread can
    python -m benchmarks.dashboard_lag --processes 2     # on 2 subprocess workers
    python -m benchmarks.dashboard_lag --no-browser      # an aiohttp websocket reader, no chromium

The same graph (``--tasks`` tiny ``inc`` tasks and one ``add`` per thousand of them,
spawned from a thread in groups of a thousand at ``--rate`` tasks a second) runs three
times on a fresh cluster each: with nothing attached; with a no-op Instrument (what the
scheduler's own event path costs, whoever listens); and with a dashboard and a page open
on it (Debian's chromium through Playwright, else a websocket reader). Each run measures
the loop's lag with the dashboard's timer (lag = when it ran - when it was due, here
every 10 ms), from the first spawn to the last result. The dashboard run also times the
dashboard's own callbacks on the loop (its updates), and the page measures its main
thread's lag the same way (a 50 ms interval). Target: p99 under 20 ms with the page open.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
from typing import Any

import aiodagger as dagger
from aiodagger.dashboard.state import LagMonitor
from aiodagger.scheduler.events import Instrument

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The page's own main-thread lag: a 50 ms interval's lateness, kept in the page.
PAGE_LAG_JS = """() => { window.__lags = []; let due = performance.now() + 50;
  setInterval(() => { const now = performance.now(); window.__lags.push(Math.max(0, now - due));
  due = now + 50; }, 50); }"""


def inc(x: int) -> int:
    return x + 1


def add(*xs: int) -> int:
    return sum(xs)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def run_graph(cluster: dagger.Cluster, tasks: int, rate: float) -> tuple[float, LagMonitor]:
    """Spawn the graph from this (non-loop) thread, a thousand at a time at ``rate``
    tasks a second (0: at once), and wait for its sums."""
    monitor = LagMonitor(interval=0.01, keep=1_000_000)
    loop = cluster.loop
    loop.call_soon_threadsafe(monitor.start, loop)
    start = time.perf_counter()
    sums = []
    for group in range(0, tasks, 1000):
        if rate:
            time.sleep(max(0.0, start + group / rate - time.perf_counter()))
        leaves = [dagger.spawn(inc, i) for i in range(group, min(tasks, group + 1000))]
        sums.append(dagger.spawn(add, *leaves))
    results = [s.fetch(timeout=600) for s in sums]
    elapsed = time.perf_counter() - start
    loop.call_soon_threadsafe(monitor.stop)
    assert sum(results) == tasks * (tasks + 1) // 2, "wrong result"
    return elapsed, monitor


def report(label: str, tasks: int, elapsed: float, monitor: LagMonitor, extra: str = "") -> None:
    lags = [1000 * s for s in monitor.recent]
    print(f"{label:<28} {tasks + tasks // 1000:>7} tasks in {elapsed:6.2f} s  "
          f"loop lag p50 {percentile(lags, 0.5):6.2f} ms  p99 {percentile(lags, 0.99):6.2f} ms  "
          f"max {max(lags, default=0):7.2f} ms  ({len(lags)} samples){extra}", flush=True)


class WebsocketReader:
    """A page stand-in: reads every update on a thread of its own."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.updates = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._read()), daemon=True)

    async def _read(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session, session.ws_connect(self.url + "ws") as ws:
            while not self._stop.is_set():
                try:
                    await ws.receive_json(timeout=0.5)
                    self.updates += 1
                except TimeoutError:
                    pass

    def __enter__(self) -> WebsocketReader:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def timed_callbacks() -> list[float]:
    """Durations of the dashboard's own work on the loop (building and sending updates)."""
    from aiodagger.dashboard import server

    durations: list[float] = []
    broadcast = server.Dashboard._broadcast

    def timed(self: Any) -> None:
        t0 = time.perf_counter()
        broadcast(self)
        durations.append(time.perf_counter() - t0)

    server.Dashboard._broadcast = timed  # type: ignore[method-assign]
    return durations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=20_000, help="tasks spawned a second (0: at once)")
    parser.add_argument("--processes", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args()
    kw = {"processes": args.processes, "threads": args.threads}
    print(f"{args.tasks} tasks at {args.rate or 'max'} tasks/s, processes={args.processes}, "
          f"threads={args.threads}", flush=True)

    with dagger.Cluster(**kw) as cluster:
        run_graph(cluster, 2000, 0)  # warm-up: threads, workers, imports
        elapsed, monitor = run_graph(cluster, args.tasks, args.rate)
        report("nothing attached", args.tasks, elapsed, monitor)

    with dagger.Cluster(**kw) as cluster:
        run_graph(cluster, 2000, 0)
        cluster._scheduler.attach(Instrument())
        elapsed, monitor = run_graph(cluster, args.tasks, args.rate)
        report("no-op instrument", args.tasks, elapsed, monitor)

    own = timed_callbacks()
    browser = not args.no_browser and os.path.exists(CHROMIUM)
    with dagger.Cluster(**kw, dashboard="127.0.0.1:0") as cluster:
        url = cluster.dashboard_url
        assert url is not None
        run_graph(cluster, 2000, 0)
        if browser:
            from playwright.sync_api import sync_playwright

            with sync_playwright() as pw:
                chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = chromium.new_page(viewport={"width": 1400, "height": 1100})
                page.goto(url)
                page.wait_for_selector('#workers tr[data-worker-id="0"]')
                page.evaluate(PAGE_LAG_JS)
                own.clear()
                elapsed, monitor = run_graph(cluster, args.tasks, args.rate)
                page_lags = page.evaluate("() => window.__lags")
                t0 = time.perf_counter()
                page.evaluate("() => document.querySelectorAll('#progress .fn').length")
                answer = 1000 * (time.perf_counter() - t0)
                chromium.close()
            label = "dashboard + chromium page"
            extra = (f"\n{'':<28} page: main-thread lag p99 {percentile(page_lags, 0.99):.1f} ms, "
                     f"answered in {answer:.1f} ms")
        else:
            with WebsocketReader(url) as reader:
                own.clear()
                elapsed, monitor = run_graph(cluster, args.tasks, args.rate)
            label = "dashboard + ws reader"
            extra = f"\n{'':<28} {reader.updates} updates read"
        extra += (f"; the dashboard's own updates: {len(own)}, longest "
                  f"{1000 * max(own, default=0):.2f} ms")
        report(label, args.tasks, elapsed, monitor, extra)


if __name__ == "__main__":
    main()

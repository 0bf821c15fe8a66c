"""aiodagger/dashboard: the server on a real port, read by aiohttp's client and by a real
headless Chromium (Debian's, driven by Playwright), with the requests it must refuse."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

import aiodagger as dagger
from aiodagger.cluster import current_cluster, shutdown_default_cluster
from aiodagger.dashboard.state import DashboardState

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "Zq3v8Kx1-Tn5Wm0pLr7YcB2dHf6Js9Ge4Au"  # random, well above the 128-bit floor
CHROMIUM = "/usr/bin/chromium"
# Chromium as root in a sandbox-less container, and on a machine with no network: the
# flags that keep it from trying to reach Google's services at start.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def nap(seconds):
    time.sleep(seconds)
    return seconds


def add(*values):
    return sum(values)


def fails(x):
    raise ValueError(f"bad input {x}")


def metrics(text: str) -> dict[str, dict[tuple, float]]:
    """/metrics parsed by prometheus-client: sample name -> {labels: value}."""
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


async def until(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := await predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.05)
    return value


# -- the server ----------------------------------------------------------------------------


async def test_page_assets_and_metrics_count_what_ran():
    async with dagger.Cluster(threads=2, dashboard="127.0.0.1:0") as cluster:
        url = cluster.dashboard_url
        assert url is not None and url.startswith("http://127.0.0.1:") and url.endswith("/")
        tasks = [dagger.spawn(nap, 0.001) for _ in range(30)]
        bad = [dagger.spawn(fails, i) for i in range(2)]
        await dagger.wait(tasks + bad)
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as r:
                assert r.status == 200 and r.content_type == "text/html"
                page = await r.text()
                assert "default-src 'none'" in r.headers["Content-Security-Policy"]
            for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
                async with session.get(url + "static/" + name) as r:
                    assert r.status == 200 and r.content_type == kind
                    asset = await r.text()
                # offline: the page loads nothing from elsewhere
                assert "https://" not in asset and "url(http" not in asset and "fetch(" not in asset
            assert 'src="static/dashboard.js"' in page and "http" not in page
            async with session.get(url + "static/../index.html") as r:
                assert r.status == 404
            async with session.get(url + "metrics") as r:
                assert r.status == 200 and r.content_type == "text/plain"
                m = metrics(await r.text())
            async with session.get(url + "api/state") as r:
                state = await r.json()
    assert m["aiodagger_tasks_spawned_total"][()] == 32
    assert m["aiodagger_tasks_done_total"][(("state", "finished"),)] == 30
    assert m["aiodagger_tasks_done_total"][(("state", "failed"),)] == 2
    assert m["aiodagger_task_duration_seconds_count"][()] == 32
    assert m["aiodagger_task_duration_seconds_bucket"][(("le", "+Inf"),)] == 32
    assert m["aiodagger_tasks_in_flight"][()] == 0
    assert m["aiodagger_workers"][()] == 1
    assert m["aiodagger_worker_memory_used_bytes"].keys() == {(("worker", "0"),)}
    assert (("worker", "0"),) in m["aiodagger_worker_spilled_bytes"]
    assert m["aiodagger_event_loop_lag_seconds_count"][()] >= 0
    assert "aiodagger_bytes_moved_total" in m
    # the errors carry their tracebacks; the progress rows their counts
    assert {e["error"] for e in state["errors"]} == {"ValueError: bad input 0", "ValueError: bad input 1"}
    assert all("Traceback" in e["traceback"] and "in fails" in e["traceback"] for e in state["errors"])
    (row,) = [f for f in state["functions"] if f["name"] == "nap"]
    assert (row["spawned"], row["finished"], row["waiting"]) == (30, 30, 0)


async def test_closing_the_cluster_closes_the_port_and_detaches():
    cluster = dagger.Cluster(threads=1, dashboard="127.0.0.1:0")
    async with cluster:
        port = int(cluster.dashboard_url.rsplit(":", 1)[1].strip("/"))
        attached = [i for i in cluster._scheduler.instruments if isinstance(i, DashboardState)]
        assert len(attached) == 1
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(cluster.dashboard_url + "ws") as ws:
                assert (await ws.receive_json(timeout=5))["type"] == "hello"
                # the cluster closes with a page open: the page is told, not left hanging
                await cluster.close()
                msg = await ws.receive(timeout=5)
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert cluster._sched.instruments == []
    assert cluster.dashboard_url is None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    left = [t for t in asyncio.all_tasks() if t.get_name() == "aiodagger-dashboard"]
    assert not left


async def test_without_a_dashboard_nothing_is_attached():
    async with dagger.Cluster(threads=1) as cluster:
        await dagger.spawn(add, 1, 2)
        assert cluster.dashboard_url is None
        assert cluster._scheduler.instruments == []
        assert not [t for t in asyncio.all_tasks() if t.get_name() == "aiodagger-dashboard"]


async def test_websocket_sends_batched_updates_while_a_graph_runs():
    async with dagger.Cluster(threads=2, dashboard="127.0.0.1:0") as cluster:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(cluster.dashboard_url + "ws") as ws:
                hello = await ws.receive_json(timeout=5)
                assert hello["type"] == "hello" and hello["workers"][0]["id"] == 0
                start = time.monotonic()
                leaves = [dagger.spawn(nap, 0.002) for _ in range(120)]
                sums = [dagger.spawn(add, *leaves[i:i + 10]) for i in range(0, 120, 10)]
                total = dagger.spawn(add, *sums)
                runs, updates, graph = {}, 0, None
                while True:
                    msg = await ws.receive_json(timeout=5)
                    updates += 1
                    runs.update((r[0], r) for r in msg["runs"])
                    graph = msg.get("graph", graph)
                    nodes = {n[0]: n for n in graph or ()}
                    if (msg["totals"]["finished"] == 133 and len(runs) == 133
                            and nodes.get(total.id, [None] * 4)[3] == "finished"):
                        break
                elapsed = time.monotonic() - start
                assert await total == pytest.approx(120 * 0.002)
    # batched: a few messages a second, never one per task
    assert updates <= elapsed / 0.25 + 3, (updates, elapsed)
    assert {r[2] for r in runs.values()} == {"nap", "add"}
    assert all(r[3] == 0 and r[4].startswith(("ThreadProc", "AsyncProc")) and r[5] <= r[6]
               for r in runs.values())
    assert nodes[total.id][2] == [s.id for s in sums]  # its edges


# -- refusals ------------------------------------------------------------------------------


async def test_foreign_origin_and_host_are_refused():
    async with dagger.Cluster(threads=1, dashboard="127.0.0.1:0") as cluster:
        url = cluster.dashboard_url
        port = url.rsplit(":", 1)[1].strip("/")
        async with aiohttp.ClientSession() as session:
            async with session.get(url, headers={"Origin": "http://evil.example"}) as r:
                assert r.status == 403
            async with session.get(url + "metrics", headers={"Origin": "null"}) as r:
                assert r.status == 403
            # DNS rebinding: evil.example re-pointed at 127.0.0.1 still sends its own name
            async with session.get(url, headers={"Host": f"evil.example:{port}"}) as r:
                assert r.status == 403
            async with session.get(url, headers={"Host": "127.0.0.1:1"}) as r:
                assert r.status == 403
            for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
                async with session.get(url, headers={"Host": host, "Origin": f"http://{host}"}) as r:
                    assert r.status == 200, host
            # cross-site websocket hijacking: a foreign page's handshake carries its Origin
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(url + "ws", origin="http://evil.example")
            assert refused.value.status == 403
            async with session.ws_connect(url + "ws", origin=f"http://127.0.0.1:{port}") as ws:
                assert (await ws.receive_json(timeout=5))["type"] == "hello"


async def test_a_non_loopback_bind_needs_the_token():
    with pytest.raises(ValueError, match=r"dashboard=.*token="):
        dagger.Cluster(dashboard="0.0.0.0:0")
    with pytest.raises(ValueError, match="too easy to guess"):
        dagger.Cluster(dashboard="0.0.0.0:0", token="hunter2")
    # Bound on every interface; reached here through loopback only (this test sends
    # nothing to another address), under the rule for a non-loopback bind.
    async with dagger.Cluster(threads=1, dashboard="0.0.0.0:0", token=TOKEN) as cluster:
        assert cluster.token == TOKEN
        url = cluster.dashboard_url
        assert url.endswith(f"/?token={TOKEN}")
        base = url.split("?", 1)[0]
        jar = aiohttp.CookieJar(unsafe=True)  # keeps cookies of IP-address hosts
        async with aiohttp.ClientSession(cookie_jar=jar) as session:
            for path in ("", "metrics", "api/state"):
                async with session.get(base + path) as r:
                    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
                async with session.get(base + path, params={"token": TOKEN[:-1] + "x"}) as r:
                    assert r.status == 403
                async with session.get(base + path,
                                       headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                    assert r.status == 200, path
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(base + "ws")
            assert refused.value.status == 401
            async with session.get(base + "static/dashboard.js") as r:
                assert r.status == 200  # the package's own script: no secret in it
            async with session.get(url) as r:
                assert r.status == 200
                cookie = r.headers["Set-Cookie"]
                assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN in cookie
            async with session.get(base + "metrics") as r:  # now with the cookie
                assert r.status == 200
            async with session.ws_connect(base + "ws?token=" + TOKEN) as ws:
                assert (await ws.receive_json(timeout=5))["type"] == "hello"


async def test_bad_addresses_are_errors_that_name_the_option():
    for bad in ("nonsense", "127.0.0.1", "127.0.0.1:99999", "http://127.0.0.1:8787"):
        with pytest.raises(ValueError, match=r"Cluster\(dashboard="):
            dagger.Cluster(dashboard=bad)
    with pytest.raises(TypeError, match=r"Cluster\(dashboard=.*HOST:PORT"):
        dagger.Cluster(dashboard=8787)  # type: ignore[arg-type]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cluster = dagger.Cluster(threads=1, dashboard=f"127.0.0.1:{port}")
        with pytest.raises(OSError, match=rf"Cluster\(dashboard='127.0.0.1:{port}'\): cannot listen"):
            async with cluster:
                pass
        assert cluster.state == "closed"


def test_the_environment_gives_the_default_cluster_a_dashboard(monkeypatch):
    monkeypatch.setenv("AIODAGGER_DASHBOARD", "127.0.0.1:0")
    try:
        assert dagger.spawn(add, 2, 3).fetch(timeout=10) == 5
        url = current_cluster().dashboard_url
        assert url is not None
        with urllib.request.urlopen(url + "api/state", timeout=10) as r:
            state = json.load(r)
        assert state["totals"]["finished"] == 1
    finally:
        shutdown_default_cluster()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)
    monkeypatch.setenv("AIODAGGER_DASHBOARD", "here")
    with pytest.raises(ValueError, match="AIODAGGER_DASHBOARD='here'"):
        dagger.spawn(add, 1)


# -- a real browser ------------------------------------------------------------------------


def browser_skip_reason() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is missing: Debian's chromium (.ci/browser-setup installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; the test extra has it)"
    return None


@pytest.mark.timeout(180)
@pytest.mark.skipif(browser_skip_reason() is not None, reason=str(browser_skip_reason()))
def test_the_page_in_chromium_follows_the_cluster(tmp_path):
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with dagger.Cluster(processes=2, threads=2, dashboard="127.0.0.1:0") as cluster, \
            sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1180})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.goto(cluster.dashboard_url)
            ids = {w.id for w in cluster.workers}
            assert len(ids) == 3
            for wid in ids:
                page.wait_for_selector(f'#workers tr[data-worker-id="{wid}"]', timeout=10_000)
            assert page.locator("#conn").inner_text() == "live"

            # a graph: a failing check, 200 sleeps, sums of ten, and the total
            check = dagger.spawn(fails, 7)
            leaves = [dagger.spawn(nap, 0.1) for _ in range(200)]  # about 5 s on 4 threads
            sums = [dagger.spawn(add, *leaves[i:i + 10]) for i in range(0, 200, 10)]
            total = dagger.spawn(add, *sums)
            page.wait_for_function(
                "() => +document.getElementById('stream').dataset.runs > 0", timeout=20_000)
            page.wait_for_function(
                "() => { const r = document.querySelector('#progress .fn[data-fn=\"nap\"]');"
                " return r && +r.dataset.done >= 60; }", timeout=20_000)
            page.wait_for_selector("#errors details.error", timeout=10_000)
            # mid-run: the stream, the bars and the graph all in motion
            page.screenshot(path=tmp_path / "dashboard.png")
            if os.environ.get("AIODAGGER_UPDATE_SCREENSHOT") == "1":
                (ROOT / "docs").mkdir(exist_ok=True)
                shutil.copy(tmp_path / "dashboard.png", ROOT / "docs" / "dashboard.png")
            assert total.fetch(timeout=60) == pytest.approx(20.0)
            page.wait_for_function(
                "() => { const r = document.querySelector('#progress .fn[data-fn=\"nap\"]');"
                " return r && r.dataset.done === '200'; }", timeout=20_000)
            assert "ValueError: bad input 7" in page.locator("#errors").inner_text()
            assert isinstance(check.exception(), ValueError)
            assert page.locator("#graph circle").count() == 200  # the last 200 tasks
            page.wait_for_selector(f'#graph circle.st-finished[data-task="{total.id}"]', timeout=10_000)
            page.screenshot(path=tmp_path / "dashboard-done.png", full_page=True)

            # a worker killed: it leaves the page, and its replacement (a new id) joins
            victim = max((w for w in cluster.workers if w.id != 0), key=lambda w: w.id)
            os.kill(victim.pid, signal.SIGKILL)
            page.wait_for_selector(f'#workers tr[data-worker-id="{victim.id}"]', state="detached",
                                   timeout=30_000)
            deadline = time.monotonic() + 30
            while len(cluster.workers) < 3 and time.monotonic() < deadline:
                time.sleep(0.1)
            new = {w.id for w in cluster.workers} - ids
            assert new, "no replacement worker joined"
            page.wait_for_selector(f'#workers tr[data-worker-id="{min(new)}"]', timeout=10_000)
            assert page.locator("#workers tbody tr").count() == 3
        finally:
            browser.close()
    assert not problems, problems

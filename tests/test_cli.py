"""The command line, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_and_checks_its_answers():
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-m", "aiodagger", "demo", "--size", "256", "--block", "64",
         "--requests", "20", "--ooc-chunks", "32", "--ooc-chunk-mib", "8", "--ooc-limit", "128MiB"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "blocked matmul 256x256" in proc.stdout
    assert proc.stdout.count("-> OK") == 3
    assert "out of core: 256 MiB of chunks" in proc.stdout
    assert "all checks passed" in proc.stdout
    assert proc.stderr == ""


def test_demo_rejects_bad_sizes():
    proc = subprocess.run([sys.executable, "-m", "aiodagger", "demo", "--size", "100", "--block", "64"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "multiple of --block" in proc.stderr


def _lines(proc):
    """A queue that gets ``proc``'s stdout lines as they come (None at its end)."""
    import queue
    import threading

    lines = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _wait_for_line(lines, prefix, timeout=30):
    import queue

    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no {prefix!r} line within {timeout} s") from None
        assert line is not None, f"the process ended before printing {prefix!r}"
        if line.startswith(prefix):
            return line[len(prefix):].strip()


def test_scheduler_command_takes_workers_and_serves_its_dashboard(tmp_path):
    import json
    import os
    import secrets
    import signal
    import time
    import urllib.request

    token = tmp_path / "token.txt"
    token.write_text(secrets.token_urlsafe(32))
    env = {k: v for k, v in os.environ.items() if k != "AIODAGGER_TOKEN"}
    sched = subprocess.Popen([sys.executable, "-m", "aiodagger", "scheduler", "--listen", "tcp://127.0.0.1:0",
                              "--token-file", str(token), "--dashboard", "127.0.0.1:0"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    worker = None
    try:
        lines = _lines(sched)
        address = _wait_for_line(lines, "aiodagger scheduler: workers join at ")
        url = _wait_for_line(lines, "aiodagger scheduler: dashboard at ")
        assert address.startswith("tcp://127.0.0.1:") and url.startswith("http://127.0.0.1:")
        worker = subprocess.Popen([sys.executable, "-m", "aiodagger", "worker", address, "--token-file", str(token),
                                   "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, env=env)
        deadline = time.monotonic() + 30
        while True:  # the worker shows up on the dashboard
            with urllib.request.urlopen(url.rstrip("/") + "/api/state", timeout=10) as r:
                state = json.load(r)
            ids = [w["id"] for w in state["workers"]]
            if len(ids) == 2:
                break
            assert time.monotonic() < deadline, state
            time.sleep(0.2)
        sched.send_signal(signal.SIGTERM)
        assert sched.wait(timeout=30) == 0, sched.stderr.read()
    finally:
        for proc in (worker, sched):
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
                for pipe in (proc.stdout, proc.stderr):
                    if pipe is not None:
                        pipe.close()


def test_scheduler_command_needs_a_token():
    import os

    env = {k: v for k, v in os.environ.items() if k != "AIODAGGER_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "aiodagger", "scheduler", "--listen", "tcp://127.0.0.1:0"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1 and "no token; pass --token-file FILE" in proc.stderr


async def test_worker_reads_its_token_from_stdin_and_lives_on():
    """``--token-fd 0``: the token on stdin (as an SSH launcher writes it), which the
    worker closes once read. Its next socket took descriptor 0, and libuv aborted the
    worker (exit 134) the moment that socket closed."""
    import asyncio
    import os
    import secrets

    import aiodagger as dagger

    token = secrets.token_urlsafe(32)
    env = {k: v for k, v in os.environ.items() if k != "AIODAGGER_TOKEN"}
    async with dagger.Cluster(listen="tcp://127.0.0.1:0", token=token, threads=1) as cluster:
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aiodagger", "worker", cluster.address, "--token-fd", "0", "--threads", "1",
            stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
        try:
            worker.stdin.write(token.encode())
            worker.stdin.close()
            deadline = asyncio.get_running_loop().time() + 30
            while len(cluster.workers) < 2:
                assert asyncio.get_running_loop().time() < deadline, "the worker did not join"
                await asyncio.sleep(0.05)
            (wid,) = [w.id for w in cluster.workers if w.id != 0]
            for _ in range(3):  # fetches open and close connections to its data server
                t = dagger.options(scope=dagger.scope(worker=wid)).spawn(os.getpid)
                assert await asyncio.wait_for(t, 30) == worker.pid
        finally:
            if worker.returncode is None:
                worker.terminate()
            _, err = await asyncio.wait_for(worker.communicate(), 30)
    assert worker.returncode in (0, -15), err.decode()
    assert b"Assertion" not in err

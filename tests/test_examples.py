"""The examples run as a user runs them."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

import aiodagger as dagger
from examples import quickstart

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def test_every_example_is_run_by_a_test():
    # quickstart and script here; fastapi_app, aiohttp_app and notebook in their own files
    assert sorted(p.name for p in EXAMPLES.iterdir() if not p.name.startswith((".", "__"))) == [
        "aiohttp_app.py", "arrays.ipynb", "datadeps.py", "fastapi_app.py", "notebook.ipynb", "quickstart.py",
        "script.py", "streaming_files.py"]


@pytest.mark.parametrize("script, expected", [
    ("quickstart.py", ["total with tax: 165", "failed upstream: fetch_price -> KeyError"]),
    ("script.py", ["sum of squares: 285"]),
    ("datadeps.py", ["datadeps: c[:3] = [1.0, 2.0, 3.0]", "tiled matmul matches numpy: True",
                     "mutable on worker 1: [3.0, 3.0, 3.0, 3.0]", "histogram counts: 100 from 2 pieces"]),
    ("streaming_files.py", ["values streamed: 1000 mean: 4.5", "file: grid.npy trace: 30.0"]),
])
def test_example_runs(script, expected):
    proc = subprocess.run([sys.executable, "-W", "error", str(EXAMPLES / script)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == expected
    assert proc.stderr == ""


async def test_quickstart_functions_on_the_fixture_cluster(dagger_cluster):
    prices = [dagger.spawn(quickstart.fetch_price, item) for item in (1, 2, 3)]
    total = dagger.spawn(quickstart.checkout, prices)
    assert await dagger.spawn(quickstart.add, total, 1) == 61
    assert dagger_cluster.tasks_in_flight == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("script", ["fastapi_app.py", "aiohttp_app.py"])
def test_server_example_runs_as_a_script(script, tmp_path):
    port = free_port()
    err_path = tmp_path / "stderr"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-W", "error", str(EXAMPLES / script)],
                                env={**os.environ, "PORT": str(port)},
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, err_path.read_text()
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/squares/10", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server never answered"
                time.sleep(0.05)
        assert r.json() == {"n": 10, "sum": 285}
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    # uvicorn logs its lifecycle at INFO on stderr; nothing else may appear there
    assert [line for line in err_path.read_text().splitlines() if not line.startswith("INFO:")] == []

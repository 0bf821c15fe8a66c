"""aiodagger behaves on whatever loop it is given, however many loops come and go.

Also covered elsewhere: importing touches no loop policy (test_cluster.py), uvicorn's
uvloop (test_fastapi_example.py), the notebook kernel's running loop (test_notebook.py).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = """
import asyncio
import sys

import uvloop

import aiodagger as dagger


def square(x):
    return x * x


async def main(i):
    async with dagger.Cluster(threads=2) as cluster:
        assert cluster.loop is asyncio.get_running_loop()
        tasks = [dagger.spawn(square, j) for j in range(10)]
        await dagger.progress(tasks, desc=f"run {i}")
        seen = [t async for t in dagger.progress(tasks, bar=False)]
        logs = await dagger.fetch_logs()
        assert len(logs.tasks) == 10, logs
        return sum([await t for t in seen])


dagger.enable_logging()
run = uvloop.run if sys.argv[1] == "uvloop" else asyncio.run
print([run(main(i)) for i in range(3)])
# and the default cluster, from plain code, after all those loops have closed
print(dagger.spawn(square, 12).fetch(timeout=10))
"""


@pytest.mark.parametrize("runner", ["asyncio", "uvloop"])
def test_sequential_runs_each_with_its_cluster(runner, tmp_path):
    script = tmp_path / "runs.py"
    script.write_text(textwrap.dedent(SCRIPT))
    # -X dev: unclosed resources, never-awaited coroutines and slow callbacks are reported
    proc = subprocess.run([sys.executable, "-X", "dev", "-W", "error", str(script), runner],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[285, 285, 285]", "144"]
    bars = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert bars and all(line.startswith("run ") for line in bars), proc.stderr  # only the bars
    assert {line.split(":")[0] for line in bars} == {"run 0", "run 1", "run 2"}

"""The pytest plugin (aiodagger.testing), loaded through its pytest11 entry point."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import aiodagger as dagger
from tests.helpers import ainc, inc


async def test_dagger_cluster_is_a_running_in_process_cluster(dagger_cluster):
    assert isinstance(dagger_cluster, dagger.Cluster) and dagger_cluster.state == "running"
    t = dagger.spawn(inc, 1)
    assert t._sched is dagger_cluster._scheduler
    assert await dagger.spawn(ainc, t) == 3
    assert [w.id for w in dagger_cluster.workers] == [0]


def run_pytest(tmp_path, test_source: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pytest.ini").write_text(textwrap.dedent("""
        [pytest]
        asyncio_mode = strict
        asyncio_default_fixture_loop_scope = function
        filterwarnings = error
    """))
    (tmp_path / "test_user.py").write_text(textwrap.dedent(test_source))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )


def test_a_users_suite_gets_the_fixtures_from_the_entry_point(tmp_path):
    # strict mode: the fixtures must not depend on the project's asyncio_mode = auto
    proc = run_pytest(tmp_path, """
        import pytest
        import aiodagger as dagger

        def double(x):
            return 2 * x

        @pytest.mark.asyncio
        async def test_on_the_fixture(dagger_cluster):
            assert await dagger.spawn(double, 21) == 42
            assert dagger_cluster.tasks_in_flight == 0

        @pytest.mark.asyncio
        async def test_closed_after(dagger_cluster):
            test_closed_after.cluster = dagger_cluster

        def test_was_closed():
            assert test_closed_after.cluster.state == "closed"
    """)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 passed" in proc.stdout


def test_both_fixtures_are_listed_with_their_docs(tmp_path):
    proc = run_pytest(tmp_path, "", "--fixtures")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "dagger_cluster -- " in out and "dagger_process_cluster -- " in out
    assert "two subprocess workers" in out
    assert "aiodagger/testing.py" in out


async def test_dagger_process_cluster_runs_tasks_in_two_other_processes(dagger_process_cluster):
    import os

    import aiodagger as dagger

    workers = dagger_process_cluster.workers
    assert len(workers) == 3 and workers[0].pid == os.getpid()
    pids = await dagger.gather(*[dagger.spawn(os.getpid) for _ in range(8)])
    assert set(pids) <= {w.pid for w in workers[1:]}

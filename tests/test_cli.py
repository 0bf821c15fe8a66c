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

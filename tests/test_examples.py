"""The examples run as a user runs them."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize("script, expected", [
    ("quickstart.py", ["total with tax: 165", "failed upstream: fetch_price -> KeyError"]),
    ("script.py", ["sum of squares: 285"]),
])
def test_example_runs(script, expected):
    proc = subprocess.run([sys.executable, "-W", "error", str(EXAMPLES / script)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == expected
    assert proc.stderr == ""

"""benchmarks/instructions.py: W3 counted in instructions under valgrind."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from benchmarks import instructions

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("system", instructions.SYSTEMS)
def test_the_counted_child_runs_w3_and_checks_its_result(system):
    done = subprocess.run([sys.executable, "-m", "benchmarks.instructions", "--child", system,
                           "--tasks", "500", "--rounds", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed (apt install valgrind)")
def test_instructions_a_task_repeat_and_leave_start_up_out():
    valgrind = shutil.which("valgrind")
    assert valgrind is not None
    first = instructions.per_task("aiodagger", 1000, 2, valgrind)
    again = instructions.per_task("aiodagger", 1000, 2, valgrind)
    floor = instructions.per_task("asyncio", 1000, 2, valgrind)
    # Start-up (some 10^9 instructions) is left out: a task is tens of thousands.
    assert 10_000 < floor < 200_000 and 10_000 < first < 400_000, (first, floor)
    assert abs(first - again) / first < 0.03, (first, again)
    assert first > floor  # a DTask is an asyncio Task and more


def test_no_valgrind_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setattr(instructions.shutil, "which", lambda _name: None)
    assert instructions.main([]) == 2
    assert "apt install valgrind" in capsys.readouterr().err

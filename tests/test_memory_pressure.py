"""Thresholds and gates (memory/pressure.py) and the process's memory (memory/process.py)."""

from __future__ import annotations

import asyncio
import logging
import platform
import sys

import psutil
import pytest

from aiodagger.memory import process
from aiodagger.memory.pressure import Pressure

MiB = 2**20


def make(limit=100 * MiB):
    return Pressure(limit, 0.6, 0.8, "w1")


def test_thresholds_are_fractions_of_the_limit():
    p = make()
    assert (p.spill_at, p.pause_at) == (60 * MiB, 80 * MiB)
    assert p.excess(70 * MiB) == 10 * MiB and p.excess(10 * MiB) < 0
    p.unmanaged = 55 * MiB
    assert p.excess(10 * MiB) == 5 * MiB  # unmanaged memory counts against the limit


def test_no_limit_never_closes_a_gate():
    p = make(None)
    assert p.excess(10**15) == 0
    p.update(10**15, spilling=True, pinned=True, disabled_by=None)
    assert p.admitted.is_set() and p.loads_go.is_set() and not p.paused and not p.overrun


@pytest.mark.parametrize(("used", "spilling", "pinned", "paused", "overrun", "loads"), [
    (70, True, False, False, False, True),    # under the pause threshold: all open
    (90, True, False, True, False, False),    # spilling makes room: work and loads wait
    (90, False, True, True, False, True),     # room when pins go: work waits, loads go
    (90, False, False, False, True, True),    # no way to make room: everything goes
])
def test_gates(used, spilling, pinned, paused, overrun, loads):
    p = make()
    p.update(used * MiB, spilling=spilling, pinned=pinned, disabled_by=None)
    assert (p.paused, p.overrun) == (paused, overrun)
    assert p.admitted.is_set() is not paused
    assert p.loads_go.is_set() is loads


def test_overrun_warns_once_and_names_the_cause(caplog):
    caplog.set_level(logging.WARNING, logger="aiodagger.memory")
    p = make()
    err = OSError(28, "No space left on device")
    for _ in range(3):
        p.update(90 * MiB, spilling=False, pinned=False, disabled_by=err)
        p.update(10 * MiB, spilling=False, pinned=False, disabled_by=err)
    [record] = caplog.records
    assert "w1" in record.getMessage() and "No space left" in record.getMessage()


async def test_waiters_go_when_the_gate_opens():
    p = make()
    p.update(90 * MiB, spilling=True, pinned=False, disabled_by=None)
    admitted = asyncio.create_task(p.wait_admitted())
    load = asyncio.create_task(p.wait_load())
    await asyncio.sleep(0.02)
    assert not admitted.done() and not load.done()
    p.update(50 * MiB, spilling=True, pinned=False, disabled_by=None)
    async with asyncio.timeout(5):
        await asyncio.gather(admitted, load)


async def test_open_gates_releases_everyone():
    p = make()
    p.update(90 * MiB, spilling=True, pinned=True, disabled_by=None)
    waiter = asyncio.create_task(p.wait_admitted())
    await asyncio.sleep(0)
    p.open_gates()
    async with asyncio.timeout(5):
        await waiter


def test_bad_fractions_are_named():
    with pytest.raises(ValueError, match="spill_fraction <= pause_fraction"):
        Pressure(100, 0.9, 0.8, "w")
    with pytest.raises(ValueError, match="pause_fraction=1.5"):
        Pressure(100, 0.6, 1.5, "w")


def test_sample_reads_rss_and_derives_unmanaged():
    p = make()
    p.sample(used=0)
    assert p.rss == p.peak_rss > 0
    assert p.unmanaged == p.rss
    p.sample(used=10**15)  # more counted than resident (pages never touched): not negative
    assert p.unmanaged == 0
    p.stop_sampling()
    assert p.rss is None and p.peak_rss > 0


def test_rss_follows_touched_memory():
    import mmap

    # Fresh pages for sure: an array could come from heap memory freed by an earlier test,
    # resident already (seen in CI, after other tests: RSS rose 56 MiB for 64).
    before = process.rss()
    block = mmap.mmap(-1, 64 * MiB)
    for offset in range(0, 64 * MiB, mmap.PAGESIZE):
        block[offset] = 1
    assert process.rss() - before >= 60 * MiB
    assert abs(process.rss() - psutil.Process().memory_info().rss) < 8 * MiB
    block.close()


def test_trim_heap_runs_where_glibc_is():
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert process.trim_heap() is True if glibc else process.trim_heap() in (True, False)

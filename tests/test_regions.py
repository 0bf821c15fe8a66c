"""Datadeps regions: ordering by declared accesses, exact aliasing, copy-back, errors, nesting."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aiodagger as dagger
from aiodagger.errors import UpstreamError
from tests.test_aliasing import _bytes_of


# -- task functions (module level: worker processes import them) -----------------------
def scale_add(x, k, j):
    x *= k
    x += j


def fill(x, v):
    x[...] = v


def total(x):
    return float(np.sum(x))


def append_to(log, item):
    log.append(item)


def read_into(dst, src):
    dst[...] = src


def pid_and_fill(x, v):
    x[...] = v
    return os.getpid()


def scribble_on_input(x, out):
    x[...] = -1  # declared In: this write must not come back
    out[...] = 7


def boom(x):
    raise KeyError("boom in a region")


class Probe:
    """Counts how many tasks use it at once (tasks on pool threads of one process)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.inside = 0
        self.most = 0

    def visit(self, seconds=0.03):
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
        time.sleep(seconds)
        with self.lock:
            self.inside -= 1


def probed_write(probe, x, _tag=None):
    probe.visit()
    x += 1


def meet(barrier, x):
    barrier.wait()  # raises BrokenBarrierError if the other task is not running too
    x += 1


@pytest.fixture
async def threads4():
    async with dagger.Cluster(threads=4) as c:
        yield c


@pytest.fixture
async def procs():
    async with dagger.Cluster(processes=2, threads=2) as c:
        yield c


# -- ordering ---------------------------------------------------------------------------
async def test_reads_and_writes_are_ordered_as_declared(threads4):
    a = np.zeros(4)
    out1, out2 = np.zeros(4), np.zeros(4)
    async with dagger.datadeps() as dd:
        dd.spawn(fill, dagger.Out(a), 1.0)             # W
        dd.spawn(read_into, dagger.Out(out1), a)       # R (bare: In) after W
        dd.spawn(scale_add, dagger.InOut(a), 10, 0)    # W after that R, and after W
        dd.spawn(read_into, dagger.Out(out2), dagger.In(a))
    assert out1.tolist() == [1.0] * 4
    assert out2.tolist() == [10.0] * 4
    assert a.tolist() == [10.0] * 4


async def test_tasks_on_disjoint_column_views_run_at_the_same_time(threads4):
    a = np.zeros((6, 8))
    barrier = threading.Barrier(2, timeout=5)
    async with dagger.datadeps() as dd:
        dd.spawn(meet, barrier, dagger.InOut(a[:, 0]))
        dd.spawn(meet, barrier, dagger.InOut(a[:, 1]))
    assert a[:, :2].tolist() == [[1.0, 1.0]] * 6


@pytest.mark.parametrize("views", [
    lambda a: (a, a[2:3, 5:6]),                  # a view and its base
    lambda a: (a[1:4], a[3:6]),                  # overlapping slices
    lambda a: (a.reshape(8, 6)[0], a[0]),        # one buffer, two shapes
    lambda a: (a.T, a[:, 3]),                    # a transpose and a column
])
async def test_views_sharing_a_byte_never_run_together(threads4, views):
    a = np.zeros((6, 8))
    probe = Probe()
    first, second = views(a)
    async with dagger.datadeps() as dd:
        for _ in range(3):
            dd.spawn(probed_write, probe, dagger.InOut(first))
            dd.spawn(probed_write, probe, dagger.InOut(second))
    assert probe.most == 1


async def test_interleaved_strided_views_do_not_wait_for_each_other(threads4):
    a = np.zeros((6, 8))
    barrier = threading.Barrier(2, timeout=5)
    async with dagger.datadeps() as dd:
        dd.spawn(meet, barrier, dagger.InOut(a[:, ::2]))
        dd.spawn(meet, barrier, dagger.InOut(a[:, 1::2]))
    assert (a == 1).all()


async def test_other_objects_order_by_identity(threads4):
    log, other = [], []
    async with dagger.datadeps() as dd:
        for i in range(20):
            dd.spawn(append_to, dagger.InOut(log), i)
        dd.spawn(append_to, dagger.InOut(other), "x")
    assert log == list(range(20))  # one list: its writes in spawn order


async def test_dtask_and_chunk_arguments(threads4):
    made = dagger.spawn(np.zeros, 3)
    chunk = await dagger.put(np.ones(3))
    async with dagger.datadeps() as dd:
        dd.spawn(scale_add, dagger.InOut(made), 1, 5)
        dd.spawn(scale_add, dagger.InOut(chunk), 2, 0)
        seen = dd.spawn(total, made)
        both = dd.spawn(np.add, made, chunk)
    assert await seen == 15.0
    assert (await both).tolist() == [7.0] * 3


async def test_await_and_plain_spawn_inside_a_region(threads4):
    a = np.zeros(3)
    release = threading.Event()

    def wait_for_plain(x):
        assert release.wait(5), "the plain task was held back by the region"
        x += 1

    async with dagger.datadeps() as dd:
        dd.spawn(wait_for_plain, dagger.InOut(a))
        # Outside the ordering: it runs although a region task writing `a` is waiting.
        await asyncio.wait_for(dagger.spawn(release.set), 5)
        t = dd.spawn(total, a)
        assert await asyncio.wait_for(t, 5) == 3.0


# -- errors -------------------------------------------------------------------------------
async def test_first_failure_raised_at_exit_dependents_upstream_independent_run(threads4):
    a, b = np.zeros(2), np.zeros(2)
    with pytest.raises(KeyError, match="boom in a region"):
        async with dagger.datadeps() as dd:
            bad = dd.spawn(boom, dagger.InOut(a))
            after_bad = dd.spawn(scale_add, dagger.InOut(a), 1, 1)
            independent = dd.spawn(scale_add, dagger.InOut(b), 1, 1)
    assert isinstance(after_bad.exception(), UpstreamError)
    assert bad.exception() is not None
    assert independent.state == "finished" and b.tolist() == [1.0, 1.0]
    assert a.tolist() == [0.0, 0.0]


async def test_body_error_waits_for_the_tasks_then_propagates(threads4):
    a = np.zeros(2)

    def slow(x):
        time.sleep(0.2)
        x += 1

    with pytest.raises(ZeroDivisionError):
        async with dagger.datadeps() as dd:
            dd.spawn(slow, dagger.InOut(a))
            raise ZeroDivisionError("the body failed")
    assert a.tolist() == [1.0, 1.0]  # the task finished before the region let go


async def test_bad_input_is_refused_with_what_to_do(threads4):
    with pytest.raises(RuntimeError, match="inside `async with dagger.datadeps"):
        dagger.In(np.zeros(2))
    async with dagger.datadeps() as dd:
        with pytest.raises(TypeError, match="only as direct arguments of dd.spawn"):
            dagger.spawn(total, dagger.In(np.zeros(2)))
        with pytest.raises(TypeError, match="only as direct arguments of dd.spawn"):
            dd.spawn(total, [dagger.In(np.zeros(2))])
        with pytest.raises(TypeError, match="int values cannot be changed in place"):
            dd.spawn(total, dagger.Out(5))
        with pytest.raises(TypeError, match="not another annotation"):
            dagger.In(dagger.Out(np.zeros(2)))
    with pytest.raises(RuntimeError, match="has exited"):
        dd.spawn(total, np.zeros(2))
    with pytest.raises(RuntimeError, match="entered once"):
        async with dd:
            pass


def test_sync_region():
    with dagger.Cluster(threads=2):
        a = np.zeros(3)
        with dagger.datadeps() as dd:
            dd.spawn(scale_add, dagger.InOut(a), 1, 2)
            dd.spawn(scale_add, dagger.InOut(a), 3, 0)
        assert a.tolist() == [6.0] * 3
        with pytest.raises(KeyError), dagger.datadeps() as dd:
            dd.spawn(boom, dagger.InOut(a))


# -- other processes ----------------------------------------------------------------------
async def test_written_arguments_come_back_from_other_processes(procs):
    a = np.zeros((4, 6))
    async with dagger.datadeps() as dd:
        pids = [dd.spawn(pid_and_fill, dagger.Out(a[:, j]), j) for j in range(6)]
        for j in range(6):
            dd.spawn(scale_add, dagger.InOut(a[:, j]), 2, 1)
        t = dd.spawn(total, a)
    assert {await p for p in pids} - {os.getpid()}, "the tasks ran here, not in the workers"
    assert os.getpid() not in {await p for p in pids}
    expected = np.tile(np.arange(6) * 2.0 + 1, (4, 1))
    assert (a == expected).all()
    assert await t == expected.sum()


async def test_only_written_arguments_are_copied_back(procs):
    x, out = np.zeros(3), np.zeros(3)
    async with dagger.datadeps() as dd:
        dd.spawn(scribble_on_input, dagger.In(x), dagger.Out(out))
    assert x.tolist() == [0.0] * 3
    assert out.tolist() == [7.0] * 3


async def test_plain_objects_come_back_too(procs):
    log, state = [], {"n": 0}

    def bump(d, lst):
        d["n"] += 1
        lst.append(d["n"])

    async with dagger.datadeps() as dd:
        for _ in range(5):
            dd.spawn(bump, dagger.InOut(state), dagger.InOut(log))
    assert state == {"n": 5} and log == [1, 2, 3, 4, 5]


async def test_remote_failure_keeps_its_type_and_writes_nothing_back(procs):
    a = np.zeros(2)
    with pytest.raises(KeyError, match="boom in a region"):
        async with dagger.datadeps() as dd:
            t = dd.spawn(boom, dagger.InOut(a))
            later = dd.spawn(scale_add, dagger.InOut(a), 1, 1)
    with pytest.raises(KeyError):
        await t
    assert isinstance(later.exception(), UpstreamError)
    assert a.tolist() == [0.0, 0.0]


def region_in_a_task(n):
    a = np.zeros(n)
    with dagger.datadeps() as dd:
        pids = [dd.spawn(pid_and_fill, dagger.Out(a[i:i + 1]), i) for i in range(n)]
        dd.spawn(scale_add, dagger.InOut(a), 2, 0)
    return a.tolist(), {p.fetch() for p in pids}, os.getpid()


async def region_in_an_async_task(n):
    log = []
    async with dagger.datadeps() as dd:
        for i in range(n):
            dd.spawn(append_to, dagger.InOut(log), i)
    return log


async def test_regions_nest_in_tasks_on_their_worker(procs):
    values, pids, parent = await asyncio.wait_for(dagger.spawn(region_in_a_task, 4), 30)
    assert values == [0.0, 2.0, 4.0, 6.0]
    assert pids == {parent} and parent != os.getpid()
    assert await asyncio.wait_for(dagger.spawn(region_in_an_async_task, 10), 30) == list(range(10))


# -- against sequential execution ---------------------------------------------------------
SHAPES = [(6, 8), (24,), (4, 3, 5)]


@st.composite
def view_specs(draw):
    base = draw(st.integers(0, len(SHAPES) - 1))
    n = int(np.prod(SHAPES[base]))
    reshape = draw(st.sampled_from([None, *[(c, n // c) for c in (2, 3, 4) if n % c == 0]]))
    shape = reshape or SHAPES[base]
    index = []
    for size in shape:
        start = draw(st.integers(0, size - 1))
        stop = draw(st.integers(start + 1, size))
        index.append(slice(start, stop, draw(st.integers(1, 3))))
    transpose = len(shape) > 1 and draw(st.booleans())
    return base, reshape, tuple(index), transpose


def make_view(bases, spec):
    base, reshape, index, transpose = spec
    v = bases[base]
    if reshape is not None:
        v = v.reshape(reshape)
    v = v[index]
    return v.T if transpose else v


def step(mode, k, x, out=None):
    if mode == "read":
        out[0] = float(np.sum(x))
    else:
        if mode == "inout":
            x *= 3
        x += k


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(view_specs(), st.sampled_from(["read", "out", "inout"])), min_size=1, max_size=12))
def test_a_region_computes_what_sequential_execution_does(ops):
    def fresh():
        return [np.arange(np.prod(s), dtype=np.float64).reshape(s) for s in SHAPES]

    expected_bases, bases = fresh(), fresh()
    expected_reads = []
    for k, (spec, mode) in enumerate(ops):
        out = np.zeros(1)
        step(mode, k, make_view(expected_bases, spec), out)
        expected_reads.append(out[0])

    reads = [np.zeros(1) for _ in ops]
    views = [make_view(bases, spec) for spec, _ in ops]
    with dagger.Cluster(threads=4):
        with dagger.datadeps() as dd:
            tasks = []
            for k, ((_, mode), view, out) in enumerate(zip(ops, views, reads, strict=True)):
                access = {"read": dagger.In, "out": dagger.Out, "inout": dagger.InOut}[mode]
                tasks.append(dd.spawn(step, mode, k, access(view), dagger.Out(out)))
    for got, want in zip(bases, expected_bases, strict=True):
        np.testing.assert_array_equal(got, want)
    assert [r[0] for r in reads] == pytest.approx(
        [r if mode == "read" else 0.0 for r, (_, mode) in zip(expected_reads, ops, strict=True)])
    # A task waits directly only for earlier tasks it shares a byte with, one of them
    # writing: tasks whose accesses share no byte are free to overlap in time.
    touched = [_bytes_of(v) for v in views]
    before: list[set[int]] = []  # the earlier tasks each one is ordered after
    for i, task in enumerate(tasks):
        direct = [tasks.index(earlier) for earlier in task._opts.after]
        for j in direct:
            assert touched[i] & touched[j]
            assert not ops[i][1] == ops[j][1] == "read"
        before.append(set(direct).union(*(before[j] for j in direct)))
        # ...and after every earlier one it conflicts with (through others, perhaps).
        for j in range(i):
            if touched[i] & touched[j] and not ops[i][1] == ops[j][1] == "read":
                assert j in before[i], (ops[j], ops[i])


async def test_a_file_argument_is_read_by_its_task(threads4, tmp_path):
    f = await dagger.tofile(np.arange(3.0), tmp_path / "x.npy")
    out = np.zeros(3)
    async with dagger.datadeps() as dd:
        dd.spawn(read_into, dagger.Out(out), f)
    assert out.tolist() == [0.0, 1.0, 2.0]

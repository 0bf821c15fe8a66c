"""The workloads, defined once and shared by every peer.

Each peer implements a workload as a method named after its key in lower case
(``w1``, ``w2``...), so a new workload is one entry here plus one method per peer
that supports it; a peer without the method gets no row (or an 'n/a' row with the
reason, if it names one).

A workload says what its figure is (:class:`Metric`): microseconds per task,
tasks per second, GB/s or seconds, and whether higher or lower is better. It also
says which ``setup`` its peers must be started in: all workloads of one setup run
on one start of a peer (``local``: the caller's process and its threads;
``processes``: two worker processes; ``cold``: nothing started, every run is a
fresh interpreter).

The task functions live at module level on purpose: systems that ship functions
to other processes (Ray, Dask's worker processes, aiodagger's subprocess
workers) pickle them by reference, which needs an importable name. This module
imports numpy only inside the functions that need it, so that the cold-start
child process imports nothing it would not otherwise import.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# -- task functions ----------------------------------------------------------------------


def inc(x: int) -> int:
    """The unit of work for the sync workloads: small enough that overhead dominates."""
    return x + 1


async def sleep0_identity(i: int) -> int:
    """The unit of work for the async workloads: one trip through the event loop."""
    await asyncio.sleep(0)
    return i


def make_array(n: int) -> Any:
    """W5's payload: ``n`` float64 values 0, 1, ..., n-1 (8n bytes)."""
    import numpy as np

    return np.arange(n, dtype=np.float64)


def array_sum(a: Any) -> float:
    """W5's consumer. The sum of 0..n-1 is exact in float64 while it is below 2**53."""
    return float(a.sum())


def arange_sum(n: int) -> float:
    return float(n * (n - 1) // 2)


def make_chunk(i: int, nbytes: int) -> Any:
    """W6's payload: ``nbytes`` of float64, every value ``i``."""
    import numpy as np

    return np.full(nbytes // 8, float(i))


def chunk_sum(a: Any) -> float:
    return float(a.sum())


def bump_block(a: Any) -> Any:
    """DD-plain's task: the block comes in as the previous task's value, goes out changed."""
    a += 1.0
    return a


def bump_in_place(a: Any) -> None:
    """DD's task: the block is written in place, as ``InOut`` declares."""
    a += 1.0


# W7: a binary tree of additions over 1,024 leaves of 1 MiB each (2,047 tasks).
W7_VALUES = 2**20 // 8


def tree_leaf(i: int) -> Any:
    import numpy as np

    return np.full(W7_VALUES, float(i))


def tree_add(a: Any, b: Any) -> Any:
    return a + b


def tree_expected(n: int) -> float:
    leaves = (n + 1) // 2
    return float(leaves * (leaves - 1) // 2)


def tree_levels(n: int) -> int:
    """How many leaves a tree of ``n`` tasks has (n = 2 * leaves - 1)."""
    return (n + 1) // 2


def fib_step(a: Any, b: Any) -> Any:
    """W2b's node: the mean of the previous two results (vectors of 10 floats), a
    Fibonacci-shaped graph whose values stay finite."""
    return 0.5 * (a + b)


def fib_start() -> tuple[Any, Any]:
    import numpy as np

    return np.zeros(10), np.ones(10)


def fib_expected(n: int) -> float:
    """The last node's first value, computed the plain way (rounded to 6 digits)."""
    a, b = 0.0, 1.0
    for _ in range(n - 2):
        a, b = b, 0.5 * (a + b)
    return float(f"{b:.6e}")


def fan_sum(*values: Any) -> Any:
    """W2b-f's last task: the sum of its inputs (one vector of 10 floats each)."""
    total = values[0].copy()
    for v in values[1:]:
        total += v
    return total


def fan_inputs(nodes: list[Any]) -> list[Any]:
    """W2b-f's fan-in: every second node of the chain, and the last (50,001 of 100,000)."""
    return [*nodes[::2], nodes[-1]] if len(nodes) % 2 == 0 else nodes[::2]


def fan_expected(n: int) -> float:
    """W2b-f's sum's first value, computed the plain way (rounded to 6 digits)."""
    ys = [0.0, 1.0]
    for _ in range(n - 2):
        ys.append(0.5 * (ys[-2] + ys[-1]))
    return float(f"{sum(fan_inputs(ys)):.6e}")


# G10k, G1M, G10M: a tree reduction, every FAN tasks gathered by one (benchmarks/graphscale.py).
FAN = 100


def tree_total(*values: int) -> int:
    """A reducer of the G workloads' tree: the sum of its inputs."""
    return sum(values)


def graph_tasks(n: int) -> int:
    """How many tasks the G workloads' tree over ``n`` leaves has (benchmarks.graphscale):
    full groups of FAN reduced level by level, the partial groups carried up to one root."""
    tasks, carry = n, 0
    while True:
        width = n + carry
        if width <= 1:
            return tasks
        full, rest = divmod(n, FAN)
        tasks += full
        # the partial group of this level and what came up from below: one task if > 1
        left = rest + carry
        n, carry = full, (1 if left > 1 else left)
        tasks += 1 if left > 1 else 0


def graph_expected(n: int) -> int:
    """The root's value: the sum of inc(i) for i < n."""
    return n * (n + 1) // 2


DD_BLOCKS = 100
DD_BLOCK_VALUES = 8


def dd_expected(n: int) -> float:
    """Every task adds 1 to each value of its block, starting from zeros."""
    return float(n * DD_BLOCK_VALUES)


def lazy(name: str) -> Callable[[int], Any]:
    """An expected-value function of benchmarks/arrayruns.py, imported when first called
    (it imports numpy, which the cold-start child must not)."""
    def expected(n: int) -> Any:
        from benchmarks import arrayruns

        return getattr(arrayruns, name)(n)
    return expected


def spill_expected(n: int) -> float:
    return float(sum(i * (W6_CHUNK // 8) for i in range(n)))


async def stream_values(n: int) -> Any:
    """W7's producer: ``n`` small values, 0..n-1, as they are made."""
    for i in range(n):
        yield i


def stream_values_sync(n: int) -> Any:
    """W7's producer where the system streams from a sync generator (Ray)."""
    # Not `yield from range(n)`: Ray's executor calls send() on the generator, which a
    # range iterator delegated to does not have.
    for i in range(n):  # noqa: UP028
        yield i


async def stream_sum(values: Any) -> tuple[int, int]:
    """W7's reader: how many values came, and their sum."""
    count = total = 0
    async for v in values:
        count += 1
        total += v
    return count, total


def stream_expected(n: int) -> tuple[int, int]:
    return n, n * (n - 1) // 2


# -- what a figure is --------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """How one run's elapsed time becomes the figure reported, and which way is better.

    Ratios against the reference system are always of *cost*, so that above 1×
    means slower than the reference whatever the unit: the figure's ratio for a
    lower-is-better unit (µs, s), its inverse for a higher-is-better one (tasks/s, GB/s).
    """

    unit: str  # as printed after the figure: "µs/task", "tasks/s", "GB/s", "s"
    higher_is_better: bool
    figure: Callable[[float, int], float]  # (elapsed seconds, n) -> figure
    digits: int = 1  # decimals printed for small figures

    @property
    def better(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"

    def cost_ratio(self, figure: float, reference: float) -> float:
        """How many times the reference's cost this figure's cost is (>1: slower)."""
        return reference / figure if self.higher_is_better else figure / reference

    def meets(self, figure: float, target: float) -> bool:
        return figure >= target if self.higher_is_better else figure <= target


def per_unit_us(unit: str) -> Metric:
    """Microseconds per task (per link...): lower is better."""
    return Metric(f"µs/{unit}", False, lambda s, n: s / n * 1e6)


TASKS_PER_S = Metric("tasks/s", True, lambda s, n: n / s, digits=0)
# n is the number of float64 values moved: 8n bytes, in decimal GB per second.
GB_PER_S = Metric("GB/s", True, lambda s, n: 8 * n / s / 1e9, digits=2)
SECONDS = Metric("s", False, lambda s, n: s, digits=3)
VALUES_PER_S = Metric("values/s", True, lambda s, n: n / s, digits=0)
# The G workloads: n is the tree's leaves; the figure counts every task of the tree.
GRAPH_TASKS_PER_S = Metric("tasks/s", True, lambda s, n: graph_tasks(n) / s, digits=0)


@dataclass(frozen=True)
class Relative:
    """A goal against another workload's figure for the same system in the same run:
    this workload's cost at most ``within`` times that one's."""

    key: str
    within: float
    what: str  # how the goal names the other workload: "W6 on a subprocess worker"

    @property
    def text(self) -> str:
        return f"within {self.within:g}× of {self.what}"


@dataclass(frozen=True)
class StageGoal:
    """A goal on one of the measurements a run reports besides its figure (a stage of
    its ``Timed``, by name): at most or at least ``bound``, or a cost within ``within``
    times the same measurement of workload ``key`` in the same run."""

    stage: str  # "spawn tasks/s", "B/task pending"
    higher_is_better: bool
    bound: float | None = None
    key: str | None = None
    within: float = 1.0

    @property
    def text(self) -> str:
        if self.key is not None:
            return f"within {self.within:g}× of {self.key}'s"
        op = "≥" if self.higher_is_better else "≤"
        return f"{op} {self.bound:,g}"

    def cost_ratio(self, value: float, reference: float) -> float:
        return reference / value if self.higher_is_better else value / reference


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    n: int  # what --scale multiplies: tasks, links, float64 values...
    metric: Metric
    description: str
    expected: Callable[[int], Any]  # n -> the result a correct run returns
    setup: str = "local"  # what a peer is started as for it: local, processes, cold
    # aiodagger's target: a figure in the metric's unit, or the name of a system
    # whose figure in the same run aiodagger must match or beat.
    target: float | str | None = None
    # With a system as the target: the share of its figure to reach (W6: 0.75, at most
    # three quarters of Dask's time; W5-tcp: at least Dask's rate, 1.0).
    target_factor: float = 1.0
    scalable: bool = True  # False: --scale leaves n alone
    # Every repeat's "peak RSS GiB" measurement must stay at or under this, for every
    # system that reports it (W6: the memory limit holds).
    peak_rss_gib: float | None = None
    # aiodagger's goal against another of its own figures in the same run.
    relative: Relative | None = None
    # aiodagger's goals on measurements besides the figure (Timed stages).
    stage_goals: tuple[StageGoal, ...] = ()
    # False: run only when named in --only (too long for a default run).
    default: bool = True
    # Seconds one run may take at least, whatever --timeout says (a run known to be long).
    min_timeout: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.key} {self.title}"

    @property
    def target_text(self) -> str:
        if self.target is None:
            return ""
        op = "≥" if self.metric.higher_is_better else "≤"
        if isinstance(self.target, str):
            times = "" if self.target_factor == 1.0 else f"{self.target_factor:g}× "
            return f"{op} {times}{self.target} in the same run"
        return f"{op} {self.target:,g} {self.metric.unit}"


# The setups, in the order a peer is started in them. spill-local: W6's memory limit
# on the system in this process (aiodagger's worker 0); processes-tcp: processes, with
# aiodagger's shared memory turned off (W5-tcp).
SETUPS = ("cold", "local", "processes", "processes-tcp", "spill", "spill-local")

# Subprocess workers in the `processes` and `cold` setups.
PROCESS_WORKERS = 2

W5_VALUES = 256 * 2**20 // 8  # 256 MiB of float64
# W6: one worker process limited to 1 GiB, 24 chunks of 128 MiB kept referenced.
W6_CHUNK = 128 * 2**20
W6_LIMIT = "1GiB"
# Limit + one chunk + 200 MiB, in GiB: where a worker's peak RSS must stay.
W6_PEAK_RSS_GIB = (2**30 + W6_CHUNK + 200 * 2**20) / 2**30
# W6L: 8 GiB, well past the kernel's dirty-page limit on a machine of tens of GiB.
W6L_CHUNKS = 64
# W7: how far a producer may run ahead of its reader, in values, in every system.
S1_WINDOW = 1024

WORKLOADS: dict[str, Workload] = {
    w.key: w
    for w in (
        Workload(
            key="W0",
            title="cold start, 2 worker processes",
            n=1,
            metric=SECONDS,
            description=(
                "Cold start to the first result with 2 subprocess workers: each run is a fresh "
                "interpreter that imports the system, starts it with 2 worker processes, runs "
                "`inc(1)` and prints the result; the figure is the time from launching that "
                "interpreter to reading the result, so it includes Python start-up and imports. "
                "Closing the system afterwards is not timed."
            ),
            expected=lambda n: 2,
            setup="cold",
            target=0.5,
            scalable=False,
        ),
        Workload(
            key="W1",
            title="independent sync tasks",
            n=10_000,
            metric=per_unit_us("task"),
            description=(
                "10,000 independent sync `inc(i)` tasks, all spawned, then all gathered. "
                "Measures per-task scheduling overhead for thread-pool work."
            ),
            expected=lambda n: [i + 1 for i in range(n)],
        ),
        Workload(
            key="W1-log",
            title="W1 with logging on",
            n=10_000,
            metric=per_unit_us("task"),
            description=(
                "W1 with `dagger.enable_logging()` for the run: every task's events recorded "
                "(spawned, ready, dispatched, ran on which thread, done). Goal: at most twice "
                "W1's figure (W1 is 4.8-5.3 µs/task on this machine)."
            ),
            expected=lambda n: [i + 1 for i in range(n)],
            target=10,
        ),
        Workload(
            key="W2",
            title="dependency chain",
            n=1_000,
            metric=per_unit_us("link"),
            description=(
                "A 1,000-link chain `t = spawn(inc, t)`, starting from `inc(0)`; only the "
                "last task is awaited. Measures dependency-resolution latency: nothing "
                "runs in parallel, so every link pays the full hand-off."
            ),
            expected=lambda n: n,
        ),
        Workload(
            key="W2b",
            title="two-input chain (Fibonacci-shaped)",
            n=100_000,
            metric=per_unit_us("node"),
            description=(
                "100,000 nodes `y[k] = f(y[k-2], y[k-1])` on vectors of 10 floats, each node a "
                "task taking the previous two results; only the last is awaited. Measures "
                "dependency hand-off when tasks have more than one input. Floor: the same "
                "additions in a plain Python loop."
            ),
            expected=fib_expected,
            target=10,
        ),
        Workload(
            key="W2b-f",
            title="two-input chain with a 50,001-input fan-in",
            n=100_000,
            metric=per_unit_us("node"),
            description=(
                "W2b's 100,000 nodes, then one task summing every second node's result and "
                "the last one's (a fan-in of 50,001 inputs); only that sum is awaited. Measures "
                "the chain's hand-off while one task waits on half of it, and a task with "
                "50,001 inputs."
            ),
            expected=fan_expected,
        ),
        Workload(
            key="W2b-p",
            title="two-input chain on 2 worker processes",
            n=100_000,
            metric=SECONDS,
            description=(
                "W2b with 2 subprocess workers: every node's inputs are results held in a "
                "worker process. The figure is the whole chain's time (goal: 3 s for 100,000 nodes)."
            ),
            expected=fib_expected,
            setup="processes",
            target=3.0,
        ),
        Workload(
            key="W3",
            title="async def tasks",
            n=10_000,
            metric=per_unit_us("task"),
            description=(
                "10,000 `async def` tasks that `await asyncio.sleep(0)` and return i, all "
                "spawned, then all gathered. Measures per-task overhead for coroutine work "
                "that runs on the event loop."
            ),
            expected=lambda n: list(range(n)),
        ),
        Workload(
            key="W4",
            title="tiny tasks on 2 worker processes",
            n=5_000,
            metric=TASKS_PER_S,
            description=(
                "5,000 independent sync `inc(i)` tasks on 2 subprocess workers, all spawned, "
                "then all gathered. Measures task throughput when every task crosses a "
                "process boundary."
            ),
            expected=lambda n: [i + 1 for i in range(n)],
            setup="processes",
            target=15_000,
        ),
        Workload(
            key="W5",
            title="256 MiB worker-to-worker",
            n=W5_VALUES,
            metric=GB_PER_S,
            description=(
                "A 256 MiB float64 array made on worker process 1 and summed on worker "
                "process 2. The array is made first and waited for without fetching it; "
                "the timed region is the dependent sum, from the array existing on worker 1 "
                "to the sum arriving, so the figure is 256 MiB over the transfer plus the sum. "
                "On one machine aiodagger hands it through shared memory, as Ray does."
            ),
            expected=arange_sum,
            setup="processes",
            target="ray",
        ),
        Workload(
            key="W5-tcp",
            title="W5 over TCP (AIODAGGER_SHM=0)",
            n=W5_VALUES,
            metric=GB_PER_S,
            description=(
                "W5 with shared memory turned off (`AIODAGGER_SHM=0` in the workers' "
                "environment), so the array crosses a loopback TCP connection as it would "
                "between machines; Dask's W5 is TCP too, and `tcp-socket` is the floor."
            ),
            expected=arange_sum,
            setup="processes-tcp",
            target="dask",
        ),
        Workload(
            key="W6",
            title="spill: 24 × 128 MiB through a 1 GiB worker",
            n=24,
            metric=SECONDS,
            description=(
                "One worker process with a 1 GiB memory limit makes 24 chunks of 128 MiB "
                "(3 GiB), all kept referenced, then sums every chunk and the sums. The figure "
                "is the wall time; the note gives GiB spilled, the spill rate (bytes written "
                "over the time with a spill write in flight), the raw write bandwidth of the "
                "same disk measured in the same run (1 GiB in 64 MiB writes, then fsync), and "
                "the worker's peak RSS (sampled every 10 ms): it must stay under the limit + "
                "one chunk + 200 MiB (1.32 GiB). Dask runs with the same limit."
            ),
            expected=spill_expected,
            setup="spill",
            target="dask",
            target_factor=0.75,
            scalable=False,
            peak_rss_gib=W6_PEAK_RSS_GIB,
        ),
        Workload(
            key="W6-0",
            title="spill on worker 0: 24 × 128 MiB through a 1 GiB in-process worker",
            n=24,
            metric=SECONDS,
            description=(
                "W6 on worker 0, the caller's own process, instead of a worker process: "
                "`Cluster(threads=2, memory_limit=\"1GiB\")`, no `processes=`. The same 24 "
                "chunks of 128 MiB, the same checks and the same measurements as W6. The peak "
                "RSS is this process's: the caller is the worker, so the 1.32 GiB bound holds "
                "the caller's own memory (interpreter, libraries, what the run keeps) and the "
                "worker's together, as worker 0's memory limit counts the whole process. The "
                "note also gives its median over W6's in the same run. aiodagger only: no "
                "peer has a comparable in-process variant."
            ),
            expected=spill_expected,
            setup="spill-local",
            scalable=False,
            peak_rss_gib=W6_PEAK_RSS_GIB,
            relative=Relative("W6", 1.2, "W6 on a subprocess worker"),
        ),
        Workload(
            key="W6L",
            title=f"spill to a lagging disk: {W6L_CHUNKS} × 128 MiB through a 1 GiB worker",
            n=W6L_CHUNKS,
            metric=SECONDS,
            description=(
                "W6 with 8 GiB: the producer outruns the disk. Spill writes go to the page "
                "cache until the kernel's dirty-page limit (vm.dirty_ratio, by default 20 % "
                "of available memory: about 4.6 GB on a 24 GiB machine); past it every write "
                "waits for the disk, so the spill rate falls to the disk's. The worker must "
                "then take new tasks only as fast as the disk drains memory (dask/distributed"
                "#4424 is the failure where it does not): its peak RSS must stay under the "
                "same 1.32 GiB as in W6. The note gives the same measurements as W6's."
            ),
            expected=spill_expected,
            setup="spill",
            target="dask",
            scalable=False,
            peak_rss_gib=W6_PEAK_RSS_GIB,
        ),
        Workload(
            key="W7",
            title="tree reduction of 2,047 tasks on 1 MiB arrays",
            n=2_047,
            metric=SECONDS,
            description=(
                "1,024 tasks each make a 1 MiB float64 array, then a binary tree of 1,023 "
                "`a + b` tasks adds them up; only the root is fetched (its first value "
                "checked). Measures a wide-then-narrowing graph whose inputs are medium-sized "
                "arrays: scheduling plus keeping results where their consumers run."
            ),
            expected=tree_expected,
            target=0.3,
            scalable=False,
        ),
        Workload(
            key="W7-p",
            title="W7 on 2 worker processes",
            n=2_047,
            metric=SECONDS,
            description="W7 with 2 subprocess workers: arrays move between processes as the tree narrows.",
            expected=tree_expected,
            setup="processes",
            target=1.0,
            scalable=False,
        ),
        Workload(
            key="LA-mm",
            title="matmul 4096² in 512² blocks",
            n=1,
            metric=SECONDS,
            description=(
                "C = A @ B for two 4096×4096 float64 matrices in 512×512 blocks, made on the "
                "workers first (not timed); timed until every block of C exists. numpy: the "
                "whole matrices in this process. BLAS threads as the environment sets them, "
                "the same for every system (OPENBLAS_NUM_THREADS)."
            ),
            expected=lazy("expected_matmul"),
            target="dask",
            scalable=False,
        ),
        Workload(
            key="LA-chol",
            title="tiled Cholesky 4096²",
            n=1,
            metric=SECONDS,
            description=(
                "The lower Cholesky factor of a 4096×4096 symmetric positive-definite matrix "
                "(4096 on the diagonal plus ones) in 512×512 tiles: aiodagger's datadeps region "
                "over tiles, dask.array.linalg.cholesky, numpy's on the whole matrix."
            ),
            expected=lazy("expected_chol"),
            target="dask",
            scalable=False,
        ),
        Workload(
            key="LA-solve",
            title="solve 4096² (pivoted LU)",
            n=1,
            metric=SECONDS,
            description=(
                "x with A x = 1 for LA-chol's matrix in 512×512 tiles, by a pivoted LU "
                "(aiodagger's solve, dask.array.linalg.solve, numpy.linalg.solve)."
            ),
            expected=lazy("expected_solve"),
            target="dask",
            scalable=False,
        ),
        Workload(
            key="ST",
            title="stencil: 5-point Laplacian, 8192² in 1024² blocks, 10 steps",
            n=1,
            metric=SECONDS,
            description=(
                "Ten explicit heat steps on an 8192×8192 float64 grid in 1024×1024 blocks, each "
                "a map_overlap with a one-cell halo and zero boundary (aiodagger's and "
                "dask.array's); numpy pads and steps the whole grid."
            ),
            expected=lazy("expected_stencil"),
            target="dask",
            scalable=False,
        ),
        Workload(
            key="DD",
            title="datadeps: InOut tasks on 100 disjoint blocks",
            n=10_000,
            metric=per_unit_us("task"),
            description=(
                f"A datadeps region of 10,000 tiny `dd.spawn(bump_in_place, InOut(block))` tasks "
                f"over {DD_BLOCKS} disjoint rows of one array ({DD_BLOCK_VALUES} float64 each), "
                "round-robin; the figure is from the region's start to its exit. Measures what "
                "ordering by declared accesses costs (finding the conflicting earlier task by "
                "exact aliasing) on top of spawning. aiodagger only: the peers have no datadeps."
            ),
            expected=dd_expected,
            relative=Relative("DD-plain", 2.0, "plain spawn of the same graph"),
        ),
        Workload(
            key="DD-plain",
            title="the same graph with plain spawn",
            n=10_000,
            metric=per_unit_us("task"),
            description=(
                f"DD's graph written by hand: {DD_BLOCKS} chains `t[b] = spawn(bump_block, t[b])`, "
                "round-robin, 10,000 tasks in all, every chain's end gathered. The reference for "
                "DD's overhead."
            ),
            expected=dd_expected,
        ),
        Workload(
            key="G10k",
            title="a tree of 10,101 tasks: spawn, memory, run",
            n=10_000,
            metric=GRAPH_TASKS_PER_S,
            description=(
                "A tree reduction: 10,000 leaves `inc(i)`, every 100 summed by one task, every "
                "100 of those by another, up to one root (10,101 tasks), spawned as it is built "
                "(the caller holds at most 100 handles per level), then only the root awaited. "
                "The figure is the run rate: tasks per second from the first await to the root's "
                "value. The note gives the spawn rate (tasks per second while spawning, nothing "
                "awaited) and the bytes per pending task (the allocators' bytes in use after "
                "spawning minus before, over the tasks; see benchmarks/graphscale.py). The "
                "reference for G1M."
            ),
            expected=graph_expected,
        ),
        Workload(
            key="G1M",
            title="a tree of 1,010,101 tasks: spawn, memory, run",
            n=1_000_000,
            metric=GRAPH_TASKS_PER_S,
            description=(
                "G10k's tree over 1,000,000 leaves (1,010,101 tasks), measured the same way. "
                "Goals: at most 1 KiB per pending task, and spawn and run rates within 1.5× of "
                "G10k's in the same run: per-task costs that do not grow with the graph."
            ),
            expected=graph_expected,
            relative=Relative("G10k", 1.5, "G10k's run rate"),
            stage_goals=(
                StageGoal("spawn tasks/s", True, key="G10k", within=1.5),
                StageGoal("B/task pending", False, bound=1024),
            ),
        ),
        Workload(
            key="G10M",
            title="a tree of 10,101,011 tasks completes (opt-in)",
            n=10_000_000,
            metric=SECONDS,
            description=(
                "G10k's tree over 10,000,000 leaves (10,101,011 tasks). The figure is the wall "
                "time from the first spawn to the root's value; the note adds the spawn and run "
                "rates and seconds, the bytes per pending task and this process's peak RSS "
                "(sampled every 20 ms). Not in a default run (minutes, and about 7 GiB): name "
                "it, `--only G10M --repeat 1`."
            ),
            expected=graph_expected,
            stage_goals=(StageGoal("B/task pending", False, bound=1024),),
            default=False,
            min_timeout=1800.0,
        ),
        Workload(
            key="S1",
            title="streaming worker to worker",
            n=100_000,
            metric=VALUES_PER_S,
            description=(
                "100,000 small values (the ints 0..n-1) from a streaming producer on worker "
                f"process 1 to a reader on worker process 2 that counts and sums them, the "
                f"producer never more than {S1_WINDOW:,} values ahead of the reader "
                f"(aiodagger `spawn_streaming(..., buffer={S1_WINDOW})`). The figure is values "
                "per second from starting the stream to the reader's result. Floor: an "
                f"`asyncio.Queue(maxsize={S1_WINDOW})` between two coroutines in one process."
            ),
            expected=stream_expected,
            setup="processes",
            target=100_000,
        ),
    )
}

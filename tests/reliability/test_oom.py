"""A real out-of-memory kill: a worker moved into a memory cgroup with a limit of a few
tens of MiB runs a task that allocates past it, and the kernel kills that worker, and
only it. The cluster's process and the other workers live on; the task fails with
WorkerLostError, naming the worker, once its retries are spent; every other task ends
with its right value; the cgroup is gone afterwards. Once with `aiodagger worker`
processes, once with a worker process the cluster started (which it replaces).

Needs root and a cgroup v1 memory controller; skipped otherwise.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import time

import psutil
import pytest

import aiodagger as dagger
from aiodagger.comm.handshake import new_token
from aiodagger.memory import spilldir
from tests.reliability.cgroups import MemoryCgroup, memory_cgroups_unavailable
from tests.workers import WorkerProcesses, block, digest, pid_of, write_token

UNAVAILABLE = memory_cgroups_unavailable()
pytestmark = [pytest.mark.timeout(180), pytest.mark.skipif(bool(UNAVAILABLE), reason=str(UNAVAILABLE))]

LIMIT = 48 << 20
HOG = 512 << 20
BLOCK = 256 << 10  # past the inline limit: results stay on the worker that made them
WAIT = 60


def hog(nbytes: int) -> int:
    """Touch ``nbytes`` of fresh memory, a page at a time: past its cgroup's limit the
    kernel kills this process before the return."""
    held = []
    step = 8 << 20
    for _ in range(0, nbytes, step):
        chunk = bytearray(step)
        chunk[::4096] = b"x" * (step // 4096)
        held.append(chunk)
    return len(held)


def slow_block(size: int, seed: int, seconds: float) -> tuple[int, bytes]:
    time.sleep(seconds)
    return block(size, seed)


def expected(size: int, seed: int) -> tuple[int, str]:
    return size, hashlib.sha256(bytes([seed]) * size).hexdigest()


def honest_work(rng: random.Random, n: int):
    """Blocks made anywhere (some on workers about to die) and digested elsewhere:
    ``(tasks, what each must answer)``."""
    anywhere = dagger.options(retries=3)
    seeds = [rng.randrange(256) for _ in range(n)]
    blocks = [anywhere.spawn(slow_block, BLOCK, s, rng.uniform(0.5, 1.5)) for s in seeds]
    digests = [anywhere.spawn(digest, b) for b in blocks]
    return digests, [[expected(BLOCK, s)] for s in seeds]


async def check_honest(digests, want) -> None:
    results = await asyncio.wait_for(dagger.gather(*digests), WAIT)
    assert [[(size, sha) for _, size, sha in made] for _, made in results] == want


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def busy(cluster, ids) -> bool:
    """Whether each worker in ``ids`` has tasks to lose."""
    return all(w.tasks_running for w in cluster.workers if w.id in ids)


async def wait_until(predicate, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        await asyncio.sleep(0.05)


async def test_the_kernel_kills_only_the_worker_past_its_limit(tmp_path, no_leaks, seed):
    """Two `aiodagger worker` processes in a 48 MiB cgroup, one outside. A task that may
    run on either of the two (retries=1) kills the first, then the second; the third
    worker and the cluster finish the other work."""
    rng = random.Random(seed)
    workers = WorkerProcesses(tmp_path)
    spill = tmp_path / "spill"  # not the shared temp dir, where any worker starting cleans up
    with MemoryCgroup(LIMIT) as cgroup:
        try:
            async with dagger.Cluster(threads=1, listen="tcp://127.0.0.1:0", token=new_token()) as cluster:
                token_file = write_token(tmp_path, cluster.token)
                doomed = [workers.start(cluster.address, token_file, "--spill-dir", str(spill), threads=2)
                          for _ in range(2)]
                spare = workers.start(cluster.address, token_file, "--spill-dir", str(spill), threads=2)
                infos = await workers.wait_joined(cluster, [*doomed, spare])
                for proc in doomed:
                    cgroup.add(proc.pid)
                assert sorted(cgroup.pids()) == sorted(p.pid for p in doomed)
                doomed_ids = {info.id for info in infos[:2]}

                digests, want = honest_work(rng, 12)
                await wait_until(lambda: busy(cluster, doomed_ids), "work reaching the doomed workers")
                hogging = dagger.options(retries=1, scope=dagger.scope(workers=doomed_ids)).spawn(hog, HOG)
                with pytest.raises(dagger.WorkerLostError) as caught:
                    await asyncio.wait_for(hogging, WAIT)
                message = str(caught.value)
                assert "retries (1) are spent" in message, message
                named = [wid for wid in doomed_ids if f"on worker {wid} " in message]
                assert len(named) == 1, message

                for proc in doomed:
                    assert proc.wait(WAIT) == -signal.SIGKILL, workers.output(proc)
                assert cgroup.oom_kills in (2, None)
                assert spare.poll() is None, workers.output(spare)
                await wait_until(lambda: {w.id for w in cluster.workers} == {0, infos[2].id},
                                 "the killed workers leaving the cluster")

                await check_honest(digests, want)
                more, want = honest_work(rng, 4)
                await check_honest(more, want)
                assert await asyncio.wait_for(dagger.spawn(pid_of), WAIT) == spare.pid
        finally:
            workers.stop_all()
    assert not cgroup.path.exists()
    # A killed process cannot remove its spill directory: the next worker to start on
    # this machine does. Do what it does, and check that it finds exactly these.
    removed = spilldir.remove_stale(spill)
    assert {int(p.name.split("-")[2]) for p in removed} == {p.pid for p in doomed}
    assert not any(spill.iterdir())


async def test_a_worker_the_cluster_started_is_replaced_after_its_oom_kill(tmp_path, no_leaks, seed):
    """One of the cluster's own worker processes, moved into a 48 MiB cgroup, is killed by
    the kernel; its task fails naming it; the cluster starts another in its place."""
    rng = random.Random(seed)
    spill = tmp_path / "spill"
    with MemoryCgroup(LIMIT) as cgroup:
        async with dagger.Cluster(processes=2, threads=2, spill_dir=spill) as cluster:
            first = [w for w in cluster.workers if w.id != 0]
            victim, other = rng.sample(first, 2)
            cgroup.add(victim.pid)

            digests, want = honest_work(rng, 12)
            await wait_until(lambda: busy(cluster, {victim.id}), "work reaching the victim")
            hogging = dagger.options(scope=dagger.scope(worker=victim.id)).spawn(hog, HOG)
            with pytest.raises(dagger.WorkerLostError,
                               match=rf"on worker {victim.id} .*retries \(0\) are spent"):
                await asyncio.wait_for(hogging, WAIT)
            assert cgroup.oom_kills in (1, None)

            def replaced() -> bool:
                now = [w for w in cluster.workers if w.id != 0]
                return len(now) == 2 and victim.id not in {w.id for w in now}

            await wait_until(replaced, "the killed worker's replacement joining")
            now = {w.id: w for w in cluster.workers if w.id != 0}
            assert now[other.id].pid == other.pid
            (newcomer,) = [w for wid, w in now.items() if wid != other.id]
            assert newcomer.pid != victim.pid and not alive(victim.pid)
            assert cgroup.pids() == []  # the replacement starts outside it

            await check_honest(digests, want)
            on_new = dagger.options(scope=dagger.scope(worker=newcomer.id))
            assert await asyncio.wait_for(on_new.spawn(pid_of), WAIT) == newcomer.pid
            assert await asyncio.wait_for(dagger.spawn(os.getpid), WAIT) != os.getpid()
    assert not cgroup.path.exists()
    # The replacement removed the killed worker's spill directory when it started.
    assert not any(spill.iterdir())


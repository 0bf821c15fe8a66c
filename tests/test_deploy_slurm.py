"""aiodagger.deploy.SlurmCluster, against a real single-node Slurm (tests/slurm.py).

The first tests need no Slurm: the job script, how the token travels, bad arguments,
sbatch missing. The rest start munged, slurmctld and slurmd once for the module and
run graphs on workers that are Slurm jobs; each checks that nothing is left in the
queue. They skip, saying why, where Slurm is not installed (bash .ci/slurm-setup, or
``tox -e deploy``, installs it) or cannot run.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess

import numpy as np
import pytest

import aiodagger as dagger
from aiodagger.deploy import SlurmCluster
from aiodagger.errors import DeployError, JobStartTimeoutError
from tests.slurm import Slurm, single_node

# Small jobs: the node has 2 CPUs, so two of these run at once.
JOB = {"cores": 1, "memory": "512MiB", "walltime": "00:10:00", "listen_host": "127.0.0.1"}


def where(x: int = 0) -> tuple[int, str | None, int]:
    """The pid and the Slurm job of the process this task ran in."""
    return os.getpid(), os.environ.get("SLURM_JOB_ID"), x


def make_array(n: int, value: float) -> np.ndarray:
    return np.full(n, value)


def on(worker_id: int):
    return dagger.options(scope=dagger.scope(worker=worker_id))


async def eventually(condition, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


# -- without Slurm -------------------------------------------------------------------------


async def test_the_job_script_names_the_token_file_never_the_token(tmp_path):
    async with SlurmCluster(queue="debug", cores=2, processes=2, memory="2GiB", walltime="01:00:00",
                            job_extra=["--exclusive", "#SBATCH --qos=low"], listen_host="127.0.0.1",
                            job_script_prologue=["export OMP_NUM_THREADS=1"], token_dir=tmp_path,
                            log_directory=tmp_path / "logs") as c:
        script = c.job_script()
        [token_file] = tmp_path.glob("token-*")
        assert token_file.read_text() == c.token
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert c.token not in script
        assert f"--token-file {token_file}" in script
        for line in ("#SBATCH --partition=debug", "#SBATCH --cpus-per-task=2", "#SBATCH --mem=2048M",
                     "#SBATCH --time=01:00:00", "#SBATCH --exclusive", "#SBATCH --qos=low",
                     f"#SBATCH --output={tmp_path}/logs/aiodagger-worker-%j.out",
                     "export OMP_NUM_THREADS=1"):
            assert line in script.splitlines(), line
        # two workers of one thread and 1 GiB each, joining where the cluster listens
        assert "seq 1 2" in script and "--threads 1" in script and f"--memory-limit {1 << 30}" in script
        assert c.worker_address in script and c.worker_address.startswith("tcp://127.0.0.1:")
        check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=10)
        assert check.returncode == 0, check.stderr
        assert c.job_ids == [] and c.requested_workers == 0
    assert not token_file.exists()


async def test_sbatch_missing_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    async with SlurmCluster(token_dir=tmp_path, **JOB) as c:
        with pytest.raises(DeployError, match="sbatch was not found on PATH"):
            await c.scale(1)
        assert c.job_ids == []


def test_the_deploy_package_loads_each_cluster_on_first_use():
    import aiodagger.deploy

    assert "SlurmCluster" in aiodagger.deploy.__all__ and "SlurmCluster" in dir(aiodagger.deploy)
    assert aiodagger.deploy.SlurmCluster is SlurmCluster
    with pytest.raises(AttributeError, match="no attribute 'PBSCluster'"):
        aiodagger.deploy.PBSCluster  # noqa: B018


def test_bad_arguments_say_what_to_write():
    with pytest.raises(ValueError, match="more cores or fewer processes"):
        SlurmCluster(cores=1, processes=2)
    with pytest.raises(TypeError, match="pass memory="):
        SlurmCluster(memory_limit="1GiB")
    with pytest.raises(ValueError, match="one line"):
        SlurmCluster(job_extra=["--exclusive\nrm -rf ~"])
    with pytest.raises(ValueError, match="cores"):
        SlurmCluster(cores=0)
    with pytest.raises(ValueError, match="job_start_timeout"):
        SlurmCluster(job_start_timeout=0)
    with pytest.raises(TypeError, match="each job's memory"):
        SlurmCluster(memory=0.5)  # a fraction of this machine's memory means nothing to a job
    with pytest.raises(ValueError, match=r"SlurmCluster\(memory='lots'\)"):
        SlurmCluster(memory="lots")


async def test_adapt_and_scale_check_their_arguments(tmp_path):
    async with SlurmCluster(token_dir=tmp_path, **JOB) as c:
        with pytest.raises(ValueError, match="maximum is below the minimum"):
            c.adapt(minimum=2, maximum=1)
        with pytest.raises(ValueError, match="interval"):
            c.adapt(maximum=1, interval=0)
        with pytest.raises(ValueError, match="workers >= 0"):
            await c.scale(-1)
    with pytest.raises(RuntimeError, match="running cluster"):
        await c.scale(1)


# -- on a real Slurm -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with single_node(tmp_path_factory.mktemp("slurm")) as s:
        yield s


@pytest.fixture
def queue(slurm: Slurm):
    """The Slurm, checked to hold no job after the test (cancelled if it does)."""
    assert slurm.queue() == []
    yield slurm
    left = slurm.queue()
    if left:
        slurm.run("scancel", "--full", *left[::2], check=False)
    assert left == [], f"jobs left in the queue: {left}"


@pytest.fixture
def opts(tmp_path):
    return {**JOB, "token_dir": tmp_path, "log_directory": tmp_path}


@pytest.mark.deploy
@pytest.mark.timeout(120)
async def test_a_graph_runs_on_workers_that_are_slurm_jobs(queue, opts, tmp_path):
    async with SlurmCluster(n_workers=2, **opts) as c:
        assert len(c.job_ids) == 2 and queue.queue() == [j for i in c.job_ids for j in (i, "RUNNING")]
        remote = c.workers[1:]
        assert len(remote) == 2
        # one task pinned to each worker: each job runs them; then a graph over both
        pinned = await dagger.gather(*[on(w.id).spawn(where) for w in remote])
        assert [pid for pid, _, _ in pinned] == [w.pid for w in remote]
        assert sorted(job for _, job, _ in pinned) == sorted(c.job_ids)
        parts = [dagger.spawn(where, i) for i in range(8)]
        total = dagger.spawn(lambda *rs: sum(x for _, _, x in rs), *parts)
        assert await total == sum(range(8))
        for pid, job, _ in await dagger.gather(*parts):
            assert pid != os.getpid() and pid in {w.pid for w in remote}
            assert job in c.job_ids
        # the token is in neither the script Slurm keeps nor the workers' command lines
        for job in c.job_ids:
            kept = queue.run("scontrol", "write", "batch_script", job, "-")
            assert "--token-file" in kept and c.token not in kept
        for w in remote:
            with open(f"/proc/{w.pid}/cmdline", "rb") as f:
                assert c.token.encode() not in f.read()
    assert queue.queue() == []
    assert list(tmp_path.glob("token-*")) == []


@pytest.mark.deploy
@pytest.mark.timeout(120)
async def test_scale_up_and_down_keeps_results(queue, opts):
    async with SlurmCluster(**opts) as c:
        assert c.job_ids == [] and len(c.workers) == 1
        await c.scale(2)
        assert len(c.job_ids) == 2 and len(c.workers) == 3
        before = c.workers[1:]
        held = [on(w.id).spawn(make_array, 1 << 16, float(w.id)) for w in before]
        await dagger.wait(held)
        await c.scale(1)
        assert len(c.job_ids) == 1 and len(c.workers) == 2
        await eventually(lambda: queue.queue()[::2] == c.job_ids)
        # the retired worker handed what only it held over to the one left
        sums = await dagger.gather(*[dagger.spawn(np.sum, h) for h in held])
        assert sums == [float(w.id) * (1 << 16) for w in before]
        await c.scale(0)
        assert c.job_ids == [] and len(c.workers) == 1
        await eventually(lambda: queue.queue() == [])


@pytest.mark.deploy
@pytest.mark.timeout(120)
async def test_a_job_runs_several_workers(queue, opts):
    async with SlurmCluster(cores=2, processes=2, n_workers=2,
                            **{k: v for k, v in opts.items() if k != "cores"}) as c:
        [job] = c.job_ids
        remote = c.workers[1:]
        assert len(remote) == 2
        ran = await dagger.gather(*[on(w.id).spawn(where) for w in remote])
        assert sorted(pid for pid, _, _ in ran) == sorted(w.pid for w in remote)
        assert {j for _, j, _ in ran} == {job}


@pytest.mark.deploy
@pytest.mark.timeout(120)
async def test_adapt_submits_for_work_and_retires_idle_workers(queue, opts):
    async with SlurmCluster(**opts) as c:
        adaptive = c.adapt(minimum=0, maximum=1, interval=0.2, wait_count=2)
        assert adaptive.running
        # no worker yet: the task waits for the job adapt() submits, not for this process
        pid, job, _ = await asyncio.wait_for(dagger.spawn(where), 60)
        assert pid != os.getpid() and job is not None
        # idle now: the job's worker retires and the job ends
        await eventually(lambda: c.job_ids == [] and len(c.workers) == 1, 30)
        await eventually(lambda: queue.queue() == [], 30)
        adaptive.stop()
        await eventually(lambda: not adaptive.running, 10)


@pytest.mark.deploy
@pytest.mark.timeout(120)
async def test_adapt_scales_an_idle_cluster_down_to_its_minimum(queue, opts):
    async with SlurmCluster(n_workers=2, **opts) as c:
        assert len(c.job_ids) == 2
        c.adapt(minimum=1, maximum=2, interval=0.2, wait_count=2)
        await eventually(lambda: len(c.job_ids) == 1 and len(c.workers) == 2, 30)
        await eventually(lambda: len(queue.queue()) == 2, 30)  # one "ID STATE"
        assert (await dagger.spawn(where))[1] == c.job_ids[0]


@pytest.mark.deploy
@pytest.mark.timeout(60)
async def test_a_job_that_never_starts_times_out_naming_it_and_its_state(queue, opts):
    async with SlurmCluster(queue="closed", job_start_timeout=3, **opts) as c:
        with pytest.raises(JobStartTimeoutError) as info:
            await c.scale(1)
        [(job, state)] = info.value.jobs.items()
        assert state == "PENDING (PartitionDown)"
        assert f"job {job}: PENDING (PartitionDown)" in str(info.value)
        assert c.job_ids == []
        assert queue.queue() == []  # cancelled
    # the same from n_workers=: the cluster does not start, and leaves no job
    with pytest.raises(JobStartTimeoutError, match="PartitionDown"):
        async with SlurmCluster(queue="closed", job_start_timeout=2, n_workers=1, **opts):
            pass
    assert queue.queue() == []


@pytest.mark.deploy
async def test_sbatch_refusing_a_job_says_why(queue, opts):
    async with SlurmCluster(queue="nosuchpartition", **opts) as c:
        with pytest.raises(DeployError, match="invalid partition specified: nosuchpartition"):
            await c.scale(1)
        assert c.job_ids == []


@pytest.mark.deploy
@pytest.mark.timeout(60)
async def test_a_job_that_fails_says_so_with_its_output(queue, opts):
    async with SlurmCluster(python="/nonexistent/python3", **opts) as c:
        with pytest.raises(DeployError, match=r"ended before their workers joined") as info:
            await c.scale(1)
        assert "FAILED (NonZeroExitCode)" in str(info.value)
        assert "/nonexistent/python3: No such file" in str(info.value)  # its output, quoted
        assert c.job_ids == []


@pytest.mark.deploy
@pytest.mark.timeout(120)
def test_with_from_synchronous_code(queue, opts):
    # listening on every interface: the workers reach it at this machine's name
    del opts["listen_host"]
    with SlurmCluster(n_workers=1, **opts) as c:
        assert c.worker_address.startswith(f"tcp://{socket.gethostname()}:")
        pid, job, _ = dagger.spawn(where).fetch(timeout=30)
        assert job == c.job_ids[0] and pid == c.workers[1].pid
        asyncio.run(c.scale(2))  # from another loop: it runs on the cluster's
        assert len(c.job_ids) == 2 and len(c.workers) == 3
    assert queue.queue() == []

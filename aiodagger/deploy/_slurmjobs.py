"""Slurm's side of :class:`~aiodagger.deploy.SlurmCluster`: the job script, and the
commands that submit, watch and cancel jobs (``sbatch``, ``squeue``, ``scancel``).

Every command runs as a subprocess of the cluster's loop, with a timeout; one that is
missing or fails raises :class:`~aiodagger.errors.DeployError` carrying what it wrote
to stderr, which is where Slurm says why (an unknown partition, a walltime over the
limit, a controller that does not answer).
"""

from __future__ import annotations

import asyncio
import math
import re
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import DeployError

__all__ = ["JobSpec", "cancel", "ended", "job_of", "job_script", "job_states", "submit"]

# Seconds a Slurm command gets: sbatch itself gives up on an unreachable controller
# after MessageTimeout (10 s by default) and a few retries.
COMMAND_TIMEOUT = 60.0

# The states of a job that will never run (again); any other (PENDING, RUNNING,
# COMPLETING, SUSPENDED, REQUEUED...) is still the batch system's.
_ENDED = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "TIMEOUT",
})

# The workers of job 17 are named slurm-17-1, slurm-17-2...: how the cluster tells
# which job a worker that joined belongs to.
_WORKER_NAME = re.compile(r"slurm-(\d+)-\d+")


def job_of(worker_name: str) -> str | None:
    """The id of the job a worker of that name runs in, or None (not a job's worker)."""
    match = _WORKER_NAME.fullmatch(worker_name)
    return match.group(1) if match else None


def ended(state: str) -> bool:
    """Whether a state as :func:`job_states` gives it is one of a job that is over."""
    return state.split(" ", 1)[0].rstrip("+") in _ENDED or state.startswith("gone")


@dataclass(frozen=True)
class JobSpec:
    """What one batch job asks for and runs: ``processes`` workers sharing ``cores``
    and ``memory`` (bytes)."""

    python: str
    queue: str | None
    account: str | None
    cores: int
    memory: int
    walltime: str
    processes: int
    job_name: str
    log_directory: str | None
    job_extra: tuple[str, ...]
    prologue: tuple[str, ...]
    worker_args: tuple[str, ...]

    @property
    def threads(self) -> int:
        return self.cores // self.processes

    def output_of(self, job_id: str) -> str:
        """Where a job's output (its workers' logs and errors) goes."""
        if self.log_directory is None:  # sbatch's default
            return f"slurm-{job_id}.out, in the directory the cluster was started in"
        return f"{self.log_directory}/{self.job_name}-{job_id}.out"


def slurm_memory(n: int) -> str:
    """Bytes as sbatch's --mem takes them, rounded up to a whole MiB (its unit "M")."""
    return f"{max(1, math.ceil(n / 2**20))}M"


def job_script(spec: JobSpec, scheduler: str, token_file: str) -> str:
    """The batch script of one job: ``spec.processes`` workers that join ``scheduler``.

    It names the token's file, never the token: Slurm keeps job scripts (in its state
    directory, and in the accounting database where AccountingStoreFlags=job_script).
    """
    directives = [
        f"--job-name={spec.job_name}",
        "--nodes=1",
        "--ntasks=1",
        f"--cpus-per-task={spec.cores}",
        f"--mem={slurm_memory(spec.memory)}",
        f"--time={spec.walltime}",
    ]
    if spec.queue is not None:
        directives.append(f"--partition={spec.queue}")
    if spec.account is not None:
        directives.append(f"--account={spec.account}")
    if spec.log_directory is not None:
        directives.append(f"--output={spec.log_directory}/{spec.job_name}-%j.out")
    lines = ["#!/usr/bin/env bash", *(f"#SBATCH {d}" for d in directives)]
    lines += [extra if extra.startswith("#SBATCH") else f"#SBATCH {extra}" for extra in spec.job_extra]
    lines += ["", *spec.prologue] if spec.prologue else []
    command = [
        shlex.quote(spec.python), "-m", "aiodagger.worker", shlex.quote(scheduler),
        "--token-file", shlex.quote(token_file),
        '--name "slurm-${SLURM_JOB_ID}-$i"',
        "--threads", str(spec.threads),
        "--memory-limit", str(spec.memory // spec.processes),
        *(shlex.quote(arg) for arg in spec.worker_args),
    ]
    lines += [
        "",
        f"# {spec.processes} aiodagger worker(s) joining {scheduler}. The job ends when they",
        "# leave, failed (FAILED, in squeue and sacct) where one of them failed.",
        "pids=()",
        f"for i in $(seq 1 {spec.processes}); do",
        f"    {' '.join(command)} &",
        "    pids+=($!)",
        "done",
        "status=0",
        'for pid in "${pids[@]}"; do wait "$pid" || status=$?; done',
        "exit $status",
        "",
    ]
    return "\n".join(lines)


async def run(argv: Sequence[str], stdin: bytes | None = None, timeout: float = COMMAND_TIMEOUT) -> str:
    """Run a Slurm command; its stdout, or DeployError with its stderr."""
    shown = shlex.join(argv)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError as exc:
        raise DeployError(
            f"{argv[0]} was not found on PATH: a SlurmCluster runs Slurm's commands (sbatch, "
            "squeue, scancel), so run it on a machine that submits jobs (a login node), with "
            "SLURM_CONF set where slurm.conf is not in its default place") from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except BaseException as exc:  # timed out, or cancelled: the command must not outlive us
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if isinstance(exc, TimeoutError):
            raise DeployError(f"`{shown}` did not finish within {timeout:g} s: is slurmctld "
                              "reachable from here (scontrol ping)?") from None
        raise
    if proc.returncode != 0:
        said = err.decode(errors="replace").strip() or out.decode(errors="replace").strip()
        raise DeployError(f"`{shown}` failed (exit status {proc.returncode}): {said or 'no output'}")
    return out.decode(errors="replace")


async def submit(script: str) -> str:
    """Submit a batch script (on sbatch's stdin: no file to clean up); its job id."""
    out = await run(["sbatch", "--parsable"], stdin=script.encode())
    job_id = out.strip().split(";", 1)[0]  # "ID" or "ID;CLUSTER"
    if not job_id.isdigit():
        raise DeployError(f"sbatch printed no job id: {out.strip()!r}")
    return job_id


async def cancel(job_ids: Sequence[str]) -> None:
    """Cancel jobs: pending ones leave the queue, running ones get SIGTERM (their
    workers stop), then SIGKILL after Slurm's KillWait."""
    if job_ids:
        await run(["scancel", *job_ids])


async def job_states(job_ids: Sequence[str]) -> dict[str, str]:
    """Each job's state as Slurm gives it, with the reason it waits where it does:
    ``"PENDING (PartitionDown)"``, ``"RUNNING"``, ``"FAILED (NonZeroExitCode)"``;
    ``"gone (...)"`` for one that squeue no longer lists (ended long enough ago)."""
    if not job_ids:
        return {}
    states: dict[str, str] = {}
    try:
        out = await run(["squeue", "--noheader", "--states=all", f"--jobs={','.join(job_ids)}",
                         "--format=%i|%T|%r"])
    except DeployError as exc:
        if "Invalid job id" not in str(exc):  # what squeue says when it lists none of them
            raise
        out = ""
    for line in out.splitlines():
        job_id, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        if job_id in job_ids:
            states[job_id] = f"{state} ({reason})" if reason and reason != "None" else state
    missing = [j for j in job_ids if j not in states]
    if missing:
        states.update(await _accounted_states(missing))
    return states


async def _accounted_states(job_ids: Sequence[str]) -> dict[str, str]:
    """What accounting (sacct) says of jobs squeue no longer lists, where it is kept."""
    try:
        out = await run(["sacct", "--noheader", "--parsable2", "--allocations",
                         f"--jobs={','.join(job_ids)}", "--format=JobID,State"])
    except DeployError as exc:
        why = str(exc).rpartition(": ")[2]
        return {j: f"gone (not in squeue; sacct: {why})" for j in job_ids}
    found = dict(line.split("|", 1) for line in out.splitlines() if "|" in line)
    return {j: found.get(j, "gone (in neither squeue nor sacct)") for j in job_ids}

"""SlurmCluster: a cluster whose workers run as Slurm batch jobs.

The scheduler runs in this process (a :class:`~aiodagger.cluster.Cluster` listening for
workers); each job that ``scale()`` or ``adapt()`` submits runs ``processes`` workers
(``python -m aiodagger.worker``) that join it. The job script comes from
:func:`~aiodagger.deploy._slurmjobs.job_script`, as dask-jobqueue's SLURMCluster builds
its own: one node, one task, ``cores`` CPUs and ``memory`` per job.

How the token travels: in a file only this user can read (0600, in a 0700 directory,
``~/.aiodagger`` unless ``token_dir=`` says otherwise), named by ``--token-file`` in the
job script and removed when the cluster closes. Not on a command line, where ``ps``
shows it to every user of the node; not in the job script, which Slurm keeps (in its
state directory and, with ``AccountingStoreFlags=job_script``, in the accounting
database); not in the job's environment, which Slurm stores in its accounting database
too where ``AccountingStoreFlags=job_env`` is set, and which every task and every
process it starts would inherit. The price: the directory must be visible at the same
path on the compute nodes, as home directories on a batch cluster are.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import secrets
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._bridge import run_on_loop_awaitable
from .._context import ClusterState
from ..adapt import Adaptive
from ..cluster import Cluster
from ..comm.handshake import new_token
from ..errors import DeployError, JobStartTimeoutError
from ..memory import parse_memory_limit
from . import _slurmjobs as slurm

if TYPE_CHECKING:
    from ..scheduler.registry import RemoteWorker

__all__ = ["SlurmCluster"]

logger = logging.getLogger(__name__)

# Seconds between looks at the queue (squeue) while jobs start, and between the looks
# adapt() takes at jobs that may have ended: squeue asks slurmctld, which every user of
# the batch system shares.
STARTING_POLL = 1.0
REFRESH_INTERVAL = 5.0
# Seconds close() waits for its jobs to leave the queue after scancel: Slurm's KillWait
# (30 s by default) between SIGTERM and SIGKILL, and some.
GONE_TIMEOUT = 60.0
# Cluster options a SlurmCluster sets itself, or that mean something else here.
_OWN_OPTIONS = {
    "processes": "processes= is the workers per job here",
    "listen": "pass listen_host= (and port=)",
    "memory_limit": "pass memory= (each job's memory, shared by its workers)",
    "gpus": "the jobs' workers find their GPUs; ask Slurm for some with job_extra=['--gpus=1']",
}


@dataclasses.dataclass
class _Job:
    id: str
    submitted: float  # loop time
    joined: set[str] = dataclasses.field(default_factory=set)  # names of its workers that joined
    slow_start_logged: bool = False


class SlurmCluster(Cluster):
    """A cluster whose workers run as Slurm batch jobs, each job ``processes`` workers.

    ``queue`` is the partition (None: Slurm's default one); ``cores``, ``memory`` and
    ``walltime`` are what each job asks for (its workers share them: ``cores //
    processes`` threads and ``memory / processes`` memory limit each); ``job_extra``
    adds ``#SBATCH`` lines (``["--exclusive", "--qos=debug"]``); ``job_script_prologue``
    adds shell lines run before the workers (``["module load python"]``); ``python`` is
    the interpreter the jobs run, which must import this aiodagger.

    The cluster listens on ``listen_host:port`` (None: every interface, where workers
    reach this machine at its host name; any port) with ``token`` (a random one unless
    given). ``n_workers`` are started with the cluster; ``await cluster.scale(n)``
    submits or cancels jobs, and ``cluster.adapt(minimum=, maximum=)`` does so as the
    work in flight asks. A job whose workers do not join within ``job_start_timeout``
    seconds (None: no limit) fails ``scale()`` with
    :class:`~aiodagger.errors.JobStartTimeoutError`, naming it and its state.

    Tasks run on the jobs' workers; while the cluster has no job (and does not adapt),
    they run in this process, as in a ``Cluster()``. Closing retires the workers and
    cancels every job the cluster submitted, and waits until none is left in the queue.
    Other keyword arguments go to :class:`~aiodagger.cluster.Cluster` (``dashboard=``,
    ``shutdown_timeout=``, ``heartbeat_timeout=``, ``ssl=``...).
    """

    def __init__(
        self,
        queue: str | None = None,
        cores: int = 1,
        memory: str | int = "1GiB",
        walltime: str = "00:30:00",
        processes: int = 1,
        job_extra: Sequence[str] = (),
        python: str = sys.executable,
        listen_host: str | None = None,
        token: str | None = None,
        *,
        port: int = 0,
        n_workers: int = 0,
        account: str | None = None,
        job_name: str = "aiodagger-worker",
        log_directory: str | os.PathLike[str] | None = None,
        token_dir: str | os.PathLike[str] | None = None,
        job_script_prologue: Sequence[str] = (),
        worker_extra_args: Sequence[str] = (),
        job_start_timeout: float | None = 300.0,
        **cluster_options: Any,
    ) -> None:
        for option, instead in _OWN_OPTIONS.items():
            if option in cluster_options:
                raise TypeError(f"SlurmCluster({option}=...) is not a Cluster option here: {instead}")
        spec = _job_spec(python=python, queue=queue, account=account, cores=cores, memory=memory,
                         walltime=walltime, processes=processes, job_name=job_name,
                         log_directory=log_directory, job_extra=job_extra, prologue=job_script_prologue)
        if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 0:
            raise ValueError(f"SlurmCluster(n_workers=...) takes a number of workers >= 0, got {n_workers!r}")
        if job_start_timeout is not None and not job_start_timeout > 0:
            raise ValueError(f"SlurmCluster(job_start_timeout=...) takes seconds > 0 or None, got {job_start_timeout!r}")
        bind = listen_host or "0.0.0.0"
        host = f"[{bind}]" if ":" in bind else bind
        super().__init__(listen=f"tcp://{host}:{port}", token=token or new_token(), gpus=0,
                         **cluster_options)
        # Where the jobs' workers reach this process: where it listens, or, listening on
        # every interface, this machine's name as the compute nodes resolve it.
        self._contact = bind if bind not in ("0.0.0.0", "::") else socket.gethostname()
        # The cluster's timeouts are its workers' too, as for its subprocess workers.
        self._spec = dataclasses.replace(spec, worker_args=(
            "--heartbeat-timeout", str(self._heartbeat[1]), "--shutdown-timeout", str(self.shutdown_timeout),
            "--max-frame", str(self.max_frame), *worker_extra_args))
        self.n_workers = n_workers
        self.job_start_timeout = job_start_timeout
        self._token_dir = Path(token_dir) if token_dir is not None else Path.home() / ".aiodagger"
        self._token_file: Path | None = None
        self._jobs: dict[str, _Job] = {}
        self._adaptive: Adaptive | None = None
        self._lock: asyncio.Lock | None = None
        self._next_refresh = 0.0
        self._closing: asyncio.Future[None] | None = None

    # -- introspection -------------------------------------------------------------------
    @property
    def job_ids(self) -> list[str]:
        """The ids of the jobs this cluster has submitted and not yet seen end."""
        return list(self._jobs)

    @property
    def worker_address(self) -> str | None:
        """Where the jobs' workers connect, ``tcp://HOST:PORT`` (once started)."""
        address = self.address
        if address is None:
            return None
        host = f"[{self._contact}]" if ":" in self._contact else self._contact
        return f"tcp://{host}:{address.rpartition(':')[2]}"

    @property
    def requested_workers(self) -> int:
        """Workers of the jobs submitted and not ended, whether or not they have joined."""
        return len(self._jobs) * self._spec.processes

    @property
    def threads_per_worker(self) -> int:
        return self._spec.threads

    def job_script(self) -> str:
        """The batch script each job runs (once the cluster has started: it names its
        address and token file)."""
        if self.worker_address is None or self._token_file is None:
            raise RuntimeError("the job script names the cluster's address, known once it has "
                               "started: use `async with SlurmCluster(...)` or `with SlurmCluster(...)`")
        return slurm.job_script(self._spec, self.worker_address, str(self._token_file))

    def __repr__(self) -> str:
        workers = sum(map(len, self._workers_by_job().values()))
        return f"<SlurmCluster {self.state} jobs={len(self._jobs)} workers={workers} address={self.worker_address}>"

    # -- lifecycle -----------------------------------------------------------------------
    async def _start_workers(self) -> None:
        await super()._start_workers()
        self._lock = asyncio.Lock()
        token = self.token
        assert token is not None
        loop = asyncio.get_running_loop()
        self._token_file = await loop.run_in_executor(None, _write_token, self._token_dir, token)
        if self.n_workers:
            await self._scale(self.n_workers, wait=True, idle_only=False)

    async def _close(self, hurry: bool) -> None:
        # One close does the work; a second waits for it (shielded: the jobs are
        # cancelled even when the close that started it is itself cancelled).
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close_jobs_and_cluster(hurry))
        await asyncio.shield(self._closing)

    async def _close_jobs_and_cluster(self, hurry: bool) -> None:
        if self._state is ClusterState.RUNNING:
            if self._adaptive is not None:
                await self._adaptive.wait_stopped(0.5 if hurry else self.shutdown_timeout)
            # Queued jobs first: one starting now would join a cluster that is going
            # away. In a hurry every job: its workers stop on the signal.
            await self._cancel_quietly([j.id for j in self._jobs.values() if hurry or not j.joined])
        try:
            await super()._close(hurry)  # tells every worker to stop, then they leave
        finally:
            ids = list(self._jobs)
            self._jobs.clear()
            if ids:  # those whose workers stopped are over already: scancel is a no-op
                await self._cancel_quietly(ids)
                await self._wait_gone(ids)
            if self._token_file is not None:
                self._token_file.unlink(missing_ok=True)
                self._token_file = None

    async def _cancel_quietly(self, ids: list[str]) -> None:
        try:
            await slurm.cancel(ids)
        except DeployError as exc:
            logger.error("could not cancel job(s) %s: %s", ", ".join(ids), exc)

    async def _wait_gone(self, ids: list[str]) -> None:
        """Wait until squeue lists none of ``ids`` as queued, running or completing."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GONE_TIMEOUT
        while True:
            try:
                states = await slurm.job_states(ids)
            except DeployError as exc:
                logger.error("could not check that job(s) %s ended: %s", ", ".join(ids), exc)
                return
            left = {j: s for j, s in states.items() if not slurm.ended(s)}
            if not left:
                return
            if loop.time() > deadline:
                logger.error("job(s) still in Slurm's queue %.0f s after scancel: %s", GONE_TIMEOUT,
                             ", ".join(f"{j} ({s})" for j, s in left.items()))
                return
            await asyncio.sleep(0.25)

    # -- scaling ---------------------------------------------------------------------------
    async def scale(self, n: int, *, wait: bool = True) -> None:
        """Make the number of Slurm workers ``n``: submit jobs (``ceil(n / processes)``
        in all) or cancel them, retiring their workers first, idle ones first: a retiring
        worker hands the results only it holds to the others. Stops ``adapt()``.

        ``wait``: return once the new jobs' workers have joined, or raise
        :class:`~aiodagger.errors.JobStartTimeoutError` (naming each job and its state)
        after ``job_start_timeout``, and :class:`~aiodagger.errors.DeployError` at once
        for a job that ended first; those jobs are cancelled.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"scale() takes a number of workers >= 0, got {n!r}")
        if self._state is not ClusterState.RUNNING:
            raise RuntimeError(f"scale() needs a running cluster; this one is {self.state}")
        await run_on_loop_awaitable(self._scale_by_hand(n, wait), self.loop)

    async def _scale_by_hand(self, n: int, wait: bool) -> None:
        if self._adaptive is not None:
            logger.info("scale(%d): adaptive scaling stops", n)
            adaptive, self._adaptive = self._adaptive, None
            await adaptive.wait_stopped(self.shutdown_timeout)
        await self._scale(n, wait=wait, idle_only=False)

    def adapt(self, *, minimum: int = 0, maximum: int, interval: float = 1.0,
              wait_count: int = 3) -> Adaptive:
        """Submit and cancel jobs as the work in flight asks: a worker per
        ``threads_per_worker`` tasks spawned and not done, within ``[minimum, maximum]``
        (workers, rounded up to whole jobs). Checked every ``interval`` seconds; idle
        workers are retired after ``wait_count`` checks in a row asked for fewer.

        Tasks wait for a job's workers meanwhile (none runs in this process). Returns
        the :class:`Adaptive`, whose ``stop()`` ends this; ``scale()`` ends it too.
        Callable from any thread.
        """
        return super().adapt(minimum=minimum, maximum=maximum, interval=interval, wait_count=wait_count)

    def _adapting_changed(self) -> None:
        self._expect()

    async def refresh(self) -> None:
        """Forget the jobs that ended (walltime, a node failure, scancel by hand); for
        adapt(), which calls it every interval: squeue runs at most every few seconds,
        and only while a job has no worker in the cluster."""
        assert self._lock is not None
        if self._lock.locked():
            return  # a scale() is looking already
        async with self._lock:
            await self._refresh(force=False)

    async def adapt_to(self, n: int) -> None:
        """Submit jobs for ``n`` workers without waiting for them, or retire idle ones
        (for adapt())."""
        await self._scale(n, wait=False, idle_only=True)

    async def _scale(self, n: int, *, wait: bool, idle_only: bool) -> None:
        assert self._lock is not None
        async with self._lock:
            await self._refresh(force=True)
            wanted = math.ceil(n / self._spec.processes)
            try:
                if wanted > len(self._jobs):
                    for _ in range(wanted - len(self._jobs)):
                        await self._submit()
                elif wanted < len(self._jobs):
                    await self._remove(len(self._jobs) - wanted, idle_only)
            finally:
                self._expect()
            if wait:
                await self._wait_joined()

    async def _submit(self) -> None:
        job_id = await slurm.submit(self.job_script())
        self._jobs[job_id] = _Job(job_id, asyncio.get_running_loop().time())
        logger.info("submitted job %s (%d worker(s) of %s)", job_id, self._spec.processes, self.worker_address)

    async def _remove(self, count: int, idle_only: bool) -> None:
        """Retire the workers of ``count`` jobs and cancel those jobs: queued jobs first,
        newest first, then the least busy; with ``idle_only``, never a busy one."""
        workers = self._workers_by_job()

        def busy(job: _Job) -> int:
            return sum(len(w.running) for w in workers.get(job.id, ()))

        jobs = list(self._jobs.values())
        queued = [j for j in reversed(jobs) if j.id not in workers]
        running = sorted((j for j in jobs if j.id in workers), key=busy)
        if idle_only:
            running = [j for j in running if busy(j) == 0]
        chosen = (queued + running)[:count]
        assert self._launcher is not None
        registry = self._launcher.dist
        for job in chosen:
            for worker in workers.get(job.id, ()):
                await registry.retire(worker)
        ids = [j.id for j in chosen]
        await slurm.cancel(ids)  # the retired workers have left: their jobs end anyway
        for job_id in ids:
            self._jobs.pop(job_id, None)
        if ids:
            logger.info("cancelled job(s) %s", ", ".join(ids))

    def _expect(self) -> None:
        """Tasks wait for a job's workers while there are jobs, or adapt() may submit
        some; else they run in this process, as in a Cluster() without workers."""
        if self._launcher is not None:
            self._launcher.dist.expects_workers = bool(self._jobs) or (
                self._adaptive is not None and not self._adaptive.stopped)

    def _workers_by_job(self) -> dict[str, list[RemoteWorker]]:
        """The workers in the cluster now, by the id of the job they run in; notes each
        job's workers as joined."""
        if self._launcher is None:
            return {}
        found: dict[str, list[RemoteWorker]] = {}
        for worker in self._launcher.dist.workers.values():
            job_id = slurm.job_of(worker.name)
            if job_id is not None:
                found.setdefault(job_id, []).append(worker)
                job = self._jobs.get(job_id)
                if job is not None:
                    job.joined.add(worker.name)
        return found

    async def _refresh(self, force: bool) -> None:
        """Forget the jobs that have ended; log those that ended before their workers joined."""
        loop = asyncio.get_running_loop()
        if not force and loop.time() < self._next_refresh:
            return
        self._next_refresh = loop.time() + REFRESH_INTERVAL
        workers = self._workers_by_job()
        unseen = [j for j in self._jobs if j not in workers]
        if not unseen:
            return
        states = await slurm.job_states(unseen)
        timeout = self.job_start_timeout
        for job_id, state in states.items():
            job = self._jobs.get(job_id)
            if job is None:
                continue
            if slurm.ended(state):
                del self._jobs[job_id]
                if job.joined:
                    logger.info("job %s ended: %s", job_id, state)
                else:
                    logger.warning("job %s ended (%s) before its workers joined the cluster; its "
                                   "output says why: %s", job_id, state, self._spec.output_of(job_id))
            elif (not job.joined and not job.slow_start_logged and timeout is not None
                  and loop.time() - job.submitted > timeout):
                # adapt() waits on: a busy queue is no error, but it is why tasks wait.
                job.slow_start_logged = True
                logger.warning("job %s has not started its workers after %.0f s: %s", job_id,
                               loop.time() - job.submitted, state)
        self._expect()

    async def _wait_joined(self) -> None:
        """Wait until every worker of every job has joined; see scale()."""
        loop = asyncio.get_running_loop()
        timeout = self.job_start_timeout
        deadline = math.inf if timeout is None else loop.time() + timeout
        next_look = loop.time() + STARTING_POLL
        while True:
            self._workers_by_job()
            waiting = [j.id for j in self._jobs.values() if len(j.joined) < self._spec.processes]
            if not waiting:
                return
            now = loop.time()
            if now >= deadline:
                states = await slurm.job_states(waiting)
                await self._forget(waiting)
                raise JobStartTimeoutError(self._timeout_message(states, timeout), states)
            if now >= next_look:
                next_look = now + STARTING_POLL
                states = await slurm.job_states(waiting)
                over = {j: s for j, s in states.items() if slurm.ended(s)}
                if over:
                    await self._forget(waiting)
                    raise DeployError(await self._ended_message(over, waiting))
            await asyncio.sleep(0.1)

    async def _forget(self, ids: list[str]) -> None:
        """Cancel jobs whose start failed, and stop counting them."""
        for job_id in ids:
            self._jobs.pop(job_id, None)
        self._expect()
        await self._cancel_quietly(ids)

    def _timeout_message(self, states: dict[str, str], timeout: float | None) -> str:
        lines = []
        for job_id, state in states.items():
            if state.startswith("PENDING"):
                hint = "queued still: its reason says for what (`scontrol show job ID` tells more)"
            else:  # started, but its workers did not join
                hint = (f"its workers did not reach {self.worker_address} (listen_host= sets an "
                        f"address the compute nodes reach); their output: {self._spec.output_of(job_id)}")
            lines.append(f"  job {job_id}: {state}: {hint}")
        return (f"the workers of {len(states)} Slurm job(s) did not join within {timeout:g} s "
                "(SlurmCluster(job_start_timeout=...)); the jobs are cancelled:\n" + "\n".join(lines))

    async def _ended_message(self, over: dict[str, str], cancelled: list[str]) -> str:
        lines = []
        for job_id, state in over.items():
            path = self._spec.output_of(job_id)
            lines.append(f"  job {job_id}: {state}; its output: {path}")
            tail = await asyncio.get_running_loop().run_in_executor(None, _tail, path)
            lines += [f"    | {line}" for line in tail]
        others = sorted(set(cancelled) - set(over))
        also = f"; job(s) {', '.join(others)} of the same scale() are cancelled" if others else ""
        return ("Slurm job(s) ended before their workers joined the cluster" + also + ":\n"
                + "\n".join(lines))


def _job_spec(*, python: str, queue: str | None, account: str | None, cores: int, memory: str | int,
              walltime: str, processes: int, job_name: str, log_directory: str | os.PathLike[str] | None,
              job_extra: Sequence[str], prologue: Sequence[str]) -> slurm.JobSpec:
    """SlurmCluster's job arguments, checked: a wrong one fails the call, not each job."""
    for what, value in (("cores", cores), ("processes", processes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"SlurmCluster({what}=...) takes an int >= 1, got {value!r}")
    if cores < processes:
        raise ValueError(f"SlurmCluster(cores={cores}, processes={processes}): each of a job's "
                         "workers needs a core at least; ask for more cores or fewer processes")
    # A float would be a fraction of *this* machine's memory: not the jobs' business.
    if isinstance(memory, bool) or not isinstance(memory, int | str):
        raise TypeError(f"SlurmCluster(memory=...) takes each job's memory as '16GiB' or bytes, got {memory!r}")
    try:
        memory_bytes = parse_memory_limit(memory)
    except ValueError as exc:
        raise ValueError(f"SlurmCluster(memory={memory!r}): {exc}") from None
    assert memory_bytes is not None
    # Each line goes into the job script: a line break would start a command there.
    for what, text in [("queue", queue), ("account", account), ("walltime", walltime),
                       ("job_name", job_name), ("python", python),
                       *(("job_extra", line) for line in job_extra),
                       *(("job_script_prologue", line) for line in prologue)]:
        if text is not None and (not isinstance(text, str) or "\n" in text or "\r" in text):
            raise ValueError(f"SlurmCluster({what}=...) takes one line of text, got {text!r}")
    return slurm.JobSpec(
        python=python, queue=queue, account=account, cores=cores, memory=memory_bytes,
        walltime=walltime, processes=processes, job_name=job_name,
        log_directory=None if log_directory is None else os.path.abspath(os.fspath(log_directory)),
        job_extra=tuple(job_extra), prologue=tuple(prologue), worker_args=())


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _write_token(directory: Path, token: str) -> Path:
    """A new file holding ``token``, readable by this user only (in a directory others
    cannot list, made so where missing)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"token-{os.getpid()}-{secrets.token_hex(6)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token)
    return path


def _tail(path: str, lines: int = 12) -> list[str]:
    """The last lines of a job's output, where this machine sees the file."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()[-8192:].splitlines()[-lines:]
    except OSError:
        return []

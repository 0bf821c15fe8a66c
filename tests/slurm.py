"""A real single-node Slurm for the tests: munged, slurmctld and slurmd, started here.

``single_node(directory)`` writes a munge key and a minimal slurm.conf under
``directory`` (this machine as the one node, 2 CPUs, its memory; partition ``debug``,
the default, and ``closed``, which is down: a job there never starts), starts the three
daemons in the foreground as subprocesses, waits until ``sinfo`` shows the node idle,
and points ``SLURM_CONF`` at the file, so that sbatch, squeue and scancel (of the tests
and of the cluster under test) talk to it. Leaving the block ends the daemons by PID.

Debian's slurmctld, slurmd, slurm-client and munge provide them (.ci/slurm-setup
installs them; ``tox -e deploy`` runs it). The daemons run jobs as their user, which
takes root: without the programs, or root, or when a daemon does not start, the block
skips the test, saying which and why.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "scontrol")
NODE_CPUS = 2


@dataclass
class Slurm:
    conf: Path
    node: str
    logs: Path

    def run(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=30,
                              env={**os.environ, "SLURM_CONF": str(self.conf)})
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def queue(self) -> list[str]:
        """Jobs queued, running or completing, as "ID STATE"."""
        return self.run("squeue", "--noheader", "--format=%i %T").split()


def missing() -> str | None:
    """Why a Slurm cannot run here, or None."""
    absent = [p for p in PROGRAMS if shutil.which(p) is None]
    if absent:
        return (f"{', '.join(absent)} not installed: Debian's slurmctld, slurmd, slurm-client and "
                "munge (bash .ci/slurm-setup; tox -e deploy runs it)")
    if os.geteuid() != 0:
        return "not root: slurmd runs jobs as their submitting user, which it must be root to do"
    return None


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free now, below the kernel's range for ephemeral ports, so
    that no connection made meanwhile (the tests' clusters make many) takes one."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    held: list[socket.socket] = []
    try:
        while len(held) < n:
            s = socket.socket()
            try:
                s.bind(("0.0.0.0", random.randrange(max(1024, low - 12000), low)))
            except OSError:
                s.close()
                continue
            held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def _memory_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def write_conf(directory: Path, node: str, munge_socket: Path) -> Path:
    for sub in ("state", "spool"):
        (directory / sub).mkdir()
    conf = directory / "slurm.conf"
    ctld_port, slurmd_port = _free_ports(2)
    conf.write_text(f"""\
ClusterName=aiodagger-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={directory}/state
SlurmdSpoolDir={directory}/spool
SlurmctldPidFile={directory}/slurmctld.pid
SlurmdPidFile={directory}/slurmd.pid
SlurmctldLogFile={directory}/logs/slurmctld.log
SlurmdLogFile={directory}/logs/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# the node is what this file says, whatever the machine has
SlurmdParameters=config_overrides
NodeName={node} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} RealMemory={_memory_mib()} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
PartitionName=closed Nodes={node} MaxTime=INFINITE State=DOWN
""")
    return conf


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


@contextmanager
def single_node(directory: Path, timeout: float = 60.0) -> Iterator[Slurm]:
    why = missing()
    if why is not None:
        pytest.skip(f"no Slurm here: {why}")
    logs = directory / "logs"
    logs.mkdir()
    munge = directory / "munge"
    munge.mkdir(mode=0o700)
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    sock = munge / "munge.socket"
    node = socket.gethostname().split(".")[0]
    conf = write_conf(directory, node, sock)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str, *argv: str) -> None:
        with open(logs / f"{name}.out", "wb") as out:
            procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                           stdin=subprocess.DEVNULL)

    def gave_up(name: str, what: str) -> None:
        pytest.skip(f"{name} {what} here: {_tail(logs / f'{name}.out')}")

    try:
        # --force: munge wants every directory above its socket open to all, which a
        # test's temporary directory (0700) is not; only root uses it here.
        start("munged", "munged", "--foreground", "--force", f"--key-file={key}",
              f"--socket={sock}", f"--pid-file={munge}/munged.pid", f"--seed-file={munge}/seed",
              f"--log-file={logs}/munged.log")
        if not _wait_for(sock.exists, procs, 10.0):
            gave_up("munged", "did not start")
        start("slurmctld", "slurmctld", "-D", "-f", str(conf))
        start("slurmd", "slurmd", "-D", "-N", node, "-f", str(conf))
        slurm = Slurm(conf, node, logs)

        def idle() -> bool:
            proc = subprocess.run(["sinfo", "--noheader", "--partition=debug", "--format=%T"],
                                  capture_output=True, text=True, env=env, timeout=30)
            return proc.stdout.strip() == "idle"

        if not _wait_for(idle, procs, timeout):
            dead = [n for n, p in procs.items() if p.poll() is not None]
            if dead:
                gave_up(dead[0], f"exited (status {procs[dead[0]].returncode})")
            gave_up("slurmd", f"left the node not idle after {timeout:g} s")
        old = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(conf)
        try:
            yield slurm
        finally:
            if old is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = old
    finally:
        for name in ("slurmd", "slurmctld", "munged"):
            proc = procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _wait_for(ready, procs: dict[str, subprocess.Popen[bytes]], timeout: float) -> bool:
    """Whether ``ready()`` came true in time, with every daemon still running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs.values()):
            return False
        if ready():
            return True
        time.sleep(0.2)
    return False

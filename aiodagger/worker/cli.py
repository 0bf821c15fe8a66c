"""``aiodagger worker tcp://HOST:PORT``: run a worker process that joins a cluster.

Also the entry point of subprocess workers (``python -m aiodagger.worker``), which read
their token from a pipe the cluster hands them (``--token-fd``): never on the command
line, where ``ps`` shows it, nor in the environment, which every task could read and
every process a task starts would inherit.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import ssl
import sys
from typing import Any

from .._loopthread import new_event_loop
from ..comm.framing import DEFAULT_MAX_FRAME, check_max_frame, keep_warm_buffers
from ..comm.server import is_loopback, parse_address
from ..comm.tls import worker_contexts
from ..comm.tokens import MAKE_ONE, entropy_bits, weak_token_message
from ..errors import AuthenticationError
from ..gpu.discovery import check_spec, choose
from ..memory import process
from ..taskoptions import check_resources
from .process import WorkerProcess

__all__ = ["add_worker_arguments", "main", "run_worker"]

logger = logging.getLogger(__name__)

# Freed heap, and idle receive buffers, kept for reuse at most (each; a quarter of the
# memory limit where there is one): see memory.process.tune_heap, comm.framing.WarmBuffers.
RETAIN = 512 << 20
_TOKEN_READ_LIMIT = 1 << 16  # a token, not whatever file or pipe we were pointed at


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scheduler", help="the cluster's address, tcp://HOST:PORT")
    parser.add_argument("--token-file", help="file holding the cluster's token (else $AIODAGGER_TOKEN)")
    parser.add_argument("--token-fd", type=int, metavar="FD",
                        help="read the token from this inherited file descriptor (then closed)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads for sync tasks (default: the CPUs)")
    parser.add_argument("--name", default=None, help="worker name (default: HOST-PID)")
    parser.add_argument("--memory-limit", default=None, help='memory limit, e.g. "8GiB" (default: none)')
    parser.add_argument("--spill-dir", default=None, help="where to spill chunks (default: the temp dir)")
    parser.add_argument("--tls-cert", help="this worker's certificate (PEM), to serve and to present")
    parser.add_argument("--tls-key", help="the certificate's private key (PEM)")
    parser.add_argument("--tls-ca", help="CA certificates (PEM) to verify the cluster and peers")
    parser.add_argument("--heartbeat-timeout", type=float, default=10.0,
                        help="seconds without word from the scheduler before reconnecting")
    parser.add_argument("--shutdown-timeout", type=float, default=10.0,
                        help="seconds running tasks get to finish when the worker stops")
    parser.add_argument("--max-frame", type=int, default=DEFAULT_MAX_FRAME,
                        help=f"the largest frame, in bytes, a connection of this worker carries "
                             f"(default {DEFAULT_MAX_FRAME}); larger values fail their tasks")
    parser.add_argument("--subprocess", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gpus", default="auto",
                        help="GPU processors: 'auto' (every CUDA device this worker sees; none without "
                             "cupy), a count N (the first N), or device numbers as a list, '[0,2]'")
    parser.add_argument("--gpu-memory-limit", default=None,
                        help='device memory results may hold per GPU before the oldest move to host, '
                             'e.g. "16GiB" (default: no limit; they move when a task runs out of memory)')
    parser.add_argument("--resources", default=None,
                        help='amounts of named resources this worker has, e.g. "db=4,GPU=1": tasks '
                             'with options(resources={"db": 1}) run where there are enough, '
                             'holding them while they run')
    parser.add_argument("--data-host", help="the address this worker's data server listens on, "
                                            "where peers fetch inputs (default 0.0.0.0)")


def parse_resources(text: str | None) -> dict[str, float]:
    """``--resources "db=4,GPU=1"`` -> {"db": 4.0, "GPU": 1.0}; exits saying what is wrong."""
    if not text:
        return {}
    found: dict[str, float] = {}
    for item in text.split(","):
        name, sep, amount = item.strip().partition("=")
        try:
            if not sep:
                raise ValueError(f"{item.strip()!r} is not NAME=AMOUNT")
            found[name.strip()] = float(amount)
            check_resources(found, "--resources")
        except (TypeError, ValueError) as exc:
            raise SystemExit(f'aiodagger worker: --resources {text!r}: {exc} (write e.g. "db=4,GPU=1")') from None
    return found


def _read_token(args: argparse.Namespace) -> str:
    # Tasks run in this process and start others: the token leaves the environment
    # either way (/proc/PID/environ still shows what the process started with, so
    # --token-file or --token-fd are the ways that leave no trace there).
    from_env = os.environ.pop("AIODAGGER_TOKEN", "")
    if args.token_fd is not None:
        try:
            with open(args.token_fd, encoding="utf-8", closefd=True) as f:
                token = f.read(_TOKEN_READ_LIMIT).strip()
        except OSError as exc:
            raise SystemExit(f"aiodagger worker: cannot read the token from --token-fd: {exc}") from None
        if args.token_fd <= 2:
            # stdin (say) read and closed: the next socket would take its number, and
            # libuv aborts the process when it closes a socket numbered 0-2 (uvloop).
            null = os.open(os.devnull, os.O_RDWR)
            if null != args.token_fd:
                os.dup2(null, args.token_fd)
                os.close(null)
    elif args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read(_TOKEN_READ_LIMIT).strip()
        except OSError as exc:
            raise SystemExit(f"aiodagger worker: cannot read --token-file: {exc}") from None
    else:
        token = from_env
    if not token:
        raise SystemExit("aiodagger worker: no token; pass --token-file FILE (or set AIODAGGER_TOKEN)")
    return token


def _check_token(args: argparse.Namespace, token: str) -> None:
    """Refuse a weak token when the cluster is on the network.

    A cluster refuses such a token there itself, so this one is misconfigured (or not
    ours); and this worker's own data server, on all interfaces, would accept anyone who
    guesses it and run what they send. On loopback the cluster is local: only warn, for
    the data server.
    """
    if args.subprocess:
        return  # the cluster made the token
    weak = weak_token_message(token, f"the cluster at {args.scheduler}")
    if weak is None:
        return
    host, _ = parse_address(args.scheduler)
    if not is_loopback(host):
        raise SystemExit(f"aiodagger worker: {weak}")
    logger.warning("this worker serves its data on all interfaces with a token that is easy to "
                   "guess (about %.0f bits of entropy); a random one is made with: %s",
                   entropy_bits(token), MAKE_ONE)


def _tls(args: argparse.Namespace) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("aiodagger worker: --tls-cert and --tls-key go together")
    try:
        return worker_contexts(args.tls_cert, args.tls_key, args.tls_ca)
    except (OSError, ssl.SSLError) as exc:
        raise SystemExit(f"aiodagger worker: cannot use the TLS files: {exc}") from None


def _die_with_parent() -> None:
    """A subprocess worker must not outlive the cluster that started it (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        # By soname: ctypes.util.find_library would run `ldconfig -p` (~20 ms a start).
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _gpus(text: str) -> list[int]:
    """The devices this worker runs GPU processors on, found here, in its own process
    (CUDA started before the fork would break this process's context)."""
    text = text.strip()
    spec: Any = text
    try:
        if text.startswith("["):
            spec = [int(v) for v in text.strip("[]").split(",") if v.strip()]
        elif text != "auto":
            spec = int(text)
        return choose(check_spec(spec))
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"aiodagger worker: --gpus {text}: {exc}") from None


def run_worker(args: argparse.Namespace) -> int:
    from ..comm.serialize import trust_main

    trust_main()  # this process's __main__ is aiodagger's: results take the fast pickle path
    token = _read_token(args)
    _check_token(args, token)
    client_ssl, server_ssl = _tls(args)
    if args.threads < 1:
        raise SystemExit("aiodagger worker: --threads must be >= 1")
    try:
        max_frame = check_max_frame(args.max_frame, "--max-frame")
    except ValueError as exc:
        raise SystemExit(f"aiodagger worker: {exc}") from None
    memory_limit = None
    if args.memory_limit is not None:
        from ..memory.sizes import parse_memory_limit

        memory_limit = parse_memory_limit(args.memory_limit)
    if args.subprocess:
        _die_with_parent()
    # Before any thread starts: each thread would get an arena of its own.
    retain = RETAIN if memory_limit is None else min(RETAIN, memory_limit // 4)
    process.tune_heap(retain)
    keep_warm_buffers(retain)
    gpus = _gpus(args.gpus)
    gpu_memory_limit = None
    if args.gpu_memory_limit is not None:
        from ..memory.device import parse_device_limit

        try:
            gpu_memory_limit = parse_device_limit(args.gpu_memory_limit)
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"aiodagger worker: --gpu-memory-limit: {exc}") from None
    worker = WorkerProcess(
        args.scheduler, token, threads=args.threads,
        name=args.name or f"{os.uname().nodename}-{os.getpid()}",
        reconnect=not args.subprocess, ssl_client=client_ssl, ssl_server=server_ssl,
        # A subprocess worker reaches its cluster over loopback, where the cluster
        # listens in the clear; TLS is for its peers, which may be remote workers.
        ssl_scheduler=None if args.subprocess else client_ssl,
        heartbeat_timeout=args.heartbeat_timeout, memory_limit=memory_limit, spill_dir=args.spill_dir,
        shutdown_timeout=args.shutdown_timeout, max_frame=max_frame, data_host=args.data_host,
        gpus=gpus, gpu_memory_limit=gpu_memory_limit, resources=parse_resources(args.resources),
    )

    def on_signal(sig: signal.Signals) -> None:
        # A subprocess worker's signal comes from its cluster going away (the parent-death
        # signal, a Ctrl-C to the whole process group): nobody waits for its tasks. A
        # worker someone started stops as gracefully as its shutdown timeout allows,
        # unless told twice.
        now = args.subprocess or worker.stopping
        logger.info("worker %s stopping%s on %s", worker.name, " now" if now else "", sig.name)
        worker.stop(now=now)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        await worker.run()

    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(main())
            if worker.stuck:
                # The spill directory is gone already; closing the loop would wait forever
                # for coroutines that swallow their cancellation, and keep this process alive.
                logger.warning("worker %s: leaving coroutine tasks that ignore cancellation behind",
                               worker.name)
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
    except AuthenticationError as exc:
        # Another try would be refused the same way: say why, once, and stop.
        raise SystemExit(f"aiodagger worker: cannot join the cluster at {args.scheduler}: {exc}") from None
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aiodagger worker", description="join an aiodagger cluster")
    add_worker_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_worker(args)

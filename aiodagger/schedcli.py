"""``aiodagger scheduler``: a cluster that runs no code of its own, for workers to join.

    aiodagger scheduler --listen tcp://0.0.0.0:8786 --token-file token.txt \\
        [--processes 2] [--memory-limit 8GiB] [--dashboard 127.0.0.1:8787]

It listens where workers (``aiodagger worker tcp://HOST:8786 --token-file F``) join,
starts ``--processes`` local worker processes, serves the dashboard if asked, prints
where each is, and runs until SIGTERM or Ctrl-C, when it closes the cluster (its tasks
are cancelled, its local workers stop and clean up).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

__all__ = ["add_scheduler_arguments", "run_scheduler"]

logger = logging.getLogger(__name__)


def add_scheduler_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", required=True, help="where workers join, tcp://HOST:PORT (port 0: any free one)")
    parser.add_argument("--token-file", help="file holding the cluster's token (else $AIODAGGER_TOKEN); "
                                             "required off loopback")
    parser.add_argument("--processes", type=int, default=0, help="local worker processes to start (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="threads per local worker process")
    parser.add_argument("--memory-limit", default=None, help='memory limit of each local worker, e.g. "8GiB"')
    parser.add_argument("--spill-dir", default=None, help="where local workers spill (default: the temp dir)")
    parser.add_argument("--resources", default=None,
                        help='amounts of named resources each local worker has, e.g. "db=4,GPU=1"')
    parser.add_argument("--dashboard", default=None, help="serve the dashboard at HOST:PORT (port 0: any free one)")


def _token(args: argparse.Namespace) -> str:
    """The token workers must present: a cluster that made up its own could be joined by
    no one, so one is required (checked for strength by the cluster off loopback)."""
    import os

    token = os.environ.pop("AIODAGGER_TOKEN", "")
    if args.token_file is not None:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read(4096).strip()
        except OSError as exc:
            raise SystemExit(f"aiodagger scheduler: cannot read --token-file: {exc}") from None
    if not token:
        raise SystemExit("aiodagger scheduler: no token; pass --token-file FILE (or set AIODAGGER_TOKEN), "
                         "made with: python -c \"import secrets; print(secrets.token_urlsafe(32))\" > FILE")
    return token


def _resources(args: argparse.Namespace) -> dict[str, float] | None:
    if not args.resources:
        return None
    from .worker.cli import parse_resources

    try:
        return parse_resources(args.resources)
    except SystemExit as exc:
        raise SystemExit(str(exc).replace("aiodagger worker", "aiodagger scheduler")) from None


def run_scheduler(args: argparse.Namespace) -> int:
    from ._loopthread import new_event_loop
    from .cluster import Cluster

    if args.processes < 0:
        raise SystemExit("aiodagger scheduler: --processes must be >= 0")
    try:
        cluster = Cluster(processes=args.processes, threads=args.threads, memory_limit=args.memory_limit,
                          spill_dir=args.spill_dir, listen=args.listen, token=_token(args),
                          dashboard=args.dashboard, resources=_resources(args))
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"aiodagger scheduler: {exc}") from None

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with cluster:
            print(f"aiodagger scheduler: workers join at {cluster.address}", flush=True)
            if cluster.dashboard_url is not None:
                print(f"aiodagger scheduler: dashboard at {cluster.dashboard_url}", flush=True)
            await stop.wait()
            logger.info("aiodagger scheduler: stopping")

    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(main())
    except OSError as exc:  # the address is taken, say
        print(f"aiodagger scheduler: {exc}", file=sys.stderr)
        return 1
    return 0

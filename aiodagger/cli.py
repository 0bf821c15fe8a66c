"""The ``aiodagger`` command line: ``aiodagger demo``, ``aiodagger worker``, ``aiodagger scheduler``."""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aiodagger", description="asyncio-native parallel computing")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a realistic workload on a local cluster and print its checks and timings")
    demo.add_argument("--size", type=int, default=1024, help="matrix size of the blocked product (default 1024)")
    demo.add_argument("--block", type=int, default=256, help="block size (default 256)")
    demo.add_argument("--requests", type=int, default=200, help="simulated downloads (default 200)")
    demo.add_argument("--ooc-chunks", type=int, default=48, help="chunks of the out-of-core part (default 48)")
    demo.add_argument("--ooc-chunk-mib", type=int, default=16, help="MiB per chunk (default 16)")
    demo.add_argument("--ooc-limit", default="192MiB", help="memory limit of its worker (default 192MiB)")
    worker = sub.add_parser("worker", help="join a cluster: aiodagger worker tcp://HOST:PORT --token-file F")
    from .worker.cli import add_worker_arguments

    add_worker_arguments(worker)
    scheduler = sub.add_parser("scheduler", help="run a cluster for workers to join: aiodagger scheduler "
                                                 "--listen tcp://0.0.0.0:8786 --token-file F")
    from .schedcli import add_scheduler_arguments

    add_scheduler_arguments(scheduler)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "demo":
        import asyncio
        import os

        # The demo runs many BLAS calls at once on the thread pool; BLAS libraries that
        # also start a thread per core then oversubscribe the CPUs (measured here: a
        # blocked 1024^2 product took 1.1 s instead of 0.08 s). One BLAS thread per task,
        # as Dask does for its workers. Set before numpy is first imported.
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, "1")

        from .demo import run_demo

        if args.size % args.block:
            parser.error(f"--size {args.size} must be a multiple of --block {args.block}")
        return 0 if asyncio.run(run_demo(args.size, args.block, args.requests, args.ooc_chunks,
                                         args.ooc_chunk_mib, args.ooc_limit)) else 1
    if args.command == "worker":
        from .worker.cli import run_worker

        return run_worker(args)
    if args.command == "scheduler":
        from .schedcli import run_scheduler

        return run_scheduler(args)
    return 2  # pragma: no cover - argparse requires a command


if __name__ == "__main__":
    sys.exit(main())

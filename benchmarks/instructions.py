"""W3's overhead counted in machine instructions, which do not move with the machine's noise.

    python -m benchmarks.instructions                 # 10,000 tasks, 3 counted rounds
    python -m benchmarks.instructions --rounds 5 --tasks 20000

W3 (10,000 ``async def`` tasks that ``await asyncio.sleep(0)``, spawned, then gathered)
runs under ``valgrind --tool=cachegrind --cache-sim=no``, for aiodagger
(``dagger.spawn`` + ``dagger.gather`` in ``Cluster()``) and for asyncio itself
(``create_task`` + ``asyncio.gather``). Each runs twice: two warm-up rounds then one
round, and two warm-up rounds then 1 + ``--rounds`` rounds; the difference of the two
counts over ``--rounds`` x ``--tasks`` is the instructions a task, start-up and imports
left out. Their ratio is what aiodagger adds to a coroutine task, measured the same way
every time: on this project's 2-core machine identical timed runs of W3 differed by 7 %
or more, while these counts repeat within a few tenths of a percent.

Instructions are not time. The collector's passes over a task's objects, for one, cost
cache misses the count does not weigh: at one commit W3 ran 1.12x asyncio's
instructions and 1.25-1.33x its time. Use it to see what a change to the per-task path
does, and the timed runner for what a user gets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import re
import shutil
import subprocess
import sys
from typing import Any

from benchmarks.workloads import sleep0_identity

SYSTEMS = ("aiodagger", "asyncio")
WARM_UP = 2
_TOTAL = re.compile(r"I\s+refs:\s+([\d,]+)")


async def _rounds(system: str, tasks: int, rounds: int) -> None:
    """The child's work: W3 ``WARM_UP + rounds`` times on ``system``."""
    import aiodagger as dagger

    async with dagger.Cluster(threads=1) if system == "aiodagger" else contextlib.AsyncExitStack():
        for _ in range(WARM_UP + rounds):
            gc.collect()
            if system == "aiodagger":
                got = await dagger.gather(*[dagger.spawn(sleep0_identity, i) for i in range(tasks)])
            else:
                got = await asyncio.gather(*[asyncio.create_task(sleep0_identity(i)) for i in range(tasks)])
            if got != list(range(tasks)):
                raise SystemExit(f"{system}: W3 gave a wrong result")


def count(system: str, tasks: int, rounds: int, valgrind: str) -> int:
    """Instructions for ``WARM_UP + rounds`` rounds of W3 on ``system``, start-up included."""
    out = subprocess.run(
        [valgrind, "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
         sys.executable, "-m", "benchmarks.instructions", "--child", system,
         "--tasks", str(tasks), "--rounds", str(rounds)],
        capture_output=True, text=True, timeout=1800, check=False)
    found = _TOTAL.search(out.stderr)
    if out.returncode != 0 or found is None:
        raise RuntimeError(f"valgrind on {system} exited {out.returncode}: {out.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def per_task(system: str, tasks: int, rounds: int, valgrind: str) -> float:
    """Instructions a task of W3 on ``system``, start-up and warm-up left out."""
    return (count(system, tasks, 1 + rounds, valgrind) - count(system, tasks, 1, valgrind)) / (rounds * tasks)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=10_000, help="tasks a round (default 10,000, as W3)")
    p.add_argument("--rounds", type=int, default=3, help="rounds counted (default 3)")
    p.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tasks < 1 or args.rounds < 1:
        p.error("--tasks and --rounds must be at least 1")
    if args.child:
        asyncio.run(_rounds(args.child, args.tasks, args.rounds))
        return 0
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("valgrind is not installed: it counts the instructions (apt install valgrind)", file=sys.stderr)
        return 2
    figures: dict[str, Any] = {s: per_task(s, args.tasks, args.rounds, valgrind) for s in SYSTEMS}
    for system in SYSTEMS:
        print(f"W3 {system:<10} {figures[system]:>10,.0f} instructions/task")
    print(f"aiodagger / asyncio: {figures['aiodagger'] / figures['asyncio']:.3f}x "
          f"({args.rounds} rounds of {args.tasks:,} tasks, Python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

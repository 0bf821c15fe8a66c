"""Connections that never authenticate, from a process of their own (so that the
listener's process is measured alone): ``python -m tests.slowloris PORT [PORT ...]``.

Each of ``--connections`` connects from one of ``--sources`` (loopback has 16 million
addresses on Linux, so one machine can look like many hosts) and then, by ``--mode``:

* ``idle``: sends nothing, connects once (and "open" waits for all to be connected);
* ``slow``: each picks at random to send nothing, one byte, or a hello frame cut short,
  a byte at a time every ``--drip`` seconds; when the server hangs up, it connects again
  after ``--reconnect`` seconds.

It prints "open" once every connection has been started, and stops (closing them all)
when its stdin reaches end of file or gets a line. :class:`Flood` runs it for a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import socket
import struct
import sys

import msgpack

PREFIX = struct.Struct("!2sHI")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Flood:
    """This script in a process of its own, for a test; ended by its pid, always."""

    def __init__(self, ports: list[int], *options: str) -> None:
        self.ports = ports
        self.options = options
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Flood:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.slowloris", *map(str, self.ports), *self.options,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            cwd=ROOT)
        # The attacker's CPU is not the cluster's: on a real network it is another
        # machine's. On this test's shared cores it runs at the lowest priority, so that
        # what the honest tasks measure is the cluster's defences, not the flood's own
        # Python and loopback work competing with them for two cores.
        os.setpriority(os.PRIO_PROCESS, self.proc.pid, 19)
        await self._expect(b"ready" if "--wait" in self.options else b"open")
        return self

    def go(self) -> None:
        """Start connecting (with ``--wait``); :meth:`opened` waits until all are."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(b"\n")

    async def opened(self) -> None:
        await self._expect(b"open")

    async def _expect(self, word: bytes) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        if line.strip() != word:
            raise RuntimeError(f"the flood did not start: {line!r} {await self.stop()}")

    async def stop(self) -> str:
        """Close every connection and end the process; what it reports (or why it ended)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return ""
        try:
            out, err = await asyncio.wait_for(proc.communicate(b"\n"), 30)
        except TimeoutError:
            os.kill(proc.pid, 9)
            await proc.wait()
            return "the flood did not stop within 30 s: killed"
        if proc.returncode:
            return f"the flood failed ({proc.returncode}): {err.decode()[-2000:]}"
        return out.decode()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def partial_hello(rng: random.Random) -> bytes:
    head = msgpack.packb({"op": "hello", "version": 3, "nonce": rng.randbytes(32), "info": {}})
    frame = PREFIX.pack(b"AG", 0, len(head)) + head
    return frame[:rng.randrange(1, len(frame))]


async def connect(loop: asyncio.AbstractEventLoop, host: str, port: int, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.bind((source, 0))
        await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def closed_within(loop: asyncio.AbstractEventLoop, sock: socket.socket, seconds: float) -> bool:
    # asyncio.timeout, not wait_for: wait_for (3.11) can swallow a cancellation that
    # arrives as the read completes, and the flood would then never stop.
    try:
        async with asyncio.timeout(seconds):
            return await loop.sock_recv(sock, 4096) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


async def slow(loop: asyncio.AbstractEventLoop, port: int, source: str, rng: random.Random,
               args: argparse.Namespace, counts: dict[str, int]) -> None:
    while True:
        try:
            sock = await connect(loop, args.host, port, source)
        except OSError:
            counts["failed"] += 1
            await asyncio.sleep(args.reconnect)
            continue
        counts["connected"] += 1
        payload = rng.choice([b"", b"A", partial_hello(rng)])
        try:
            for i in range(len(payload)):
                if await closed_within(loop, sock, rng.uniform(0.5, 1.5) * args.drip):
                    break
                await loop.sock_sendall(sock, payload[i:i + 1])
            else:
                while not await closed_within(loop, sock, 3600):
                    pass
        except OSError:
            pass
        finally:
            sock.close()
        await asyncio.sleep(rng.uniform(0.5, 1.5) * args.reconnect)


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    rng = random.Random(args.seed)
    sources = args.source or [f"127.0.{i // 250}.{2 + i % 250}" for i in range(args.sources)]
    counts = {"connected": 0, "failed": 0}
    if args.wait:
        print("ready", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
    held: list[socket.socket] = []
    tasks = []
    # A few connects at a time: a burst past the listen backlog would have its SYNs
    # dropped and retried seconds later, and the flood would arrive in dribs.
    in_flight = asyncio.Semaphore(64)

    async def hold(port: int, source: str) -> None:
        async with in_flight:
            try:
                held.append(await connect(loop, args.host, port, source))
            except OSError:
                counts["failed"] += 1

    for i in range(args.connections):
        port = args.ports[i % len(args.ports)]
        source = sources[i % len(sources)]
        if args.mode == "idle":
            tasks.append(loop.create_task(hold(port, source)))
        else:
            task_rng = random.Random(rng.random())
            tasks.append(loop.create_task(slow(loop, port, source, task_rng, args, counts)))
    if args.mode == "idle":
        await asyncio.gather(*tasks)
        counts["connected"] = len(held)
    print("open", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for sock in held:
        sock.close()
    print(f"connected {counts['connected']} failed {counts['failed']}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("ports", type=int, nargs="+")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--host", default="127.0.0.1", help="where the ports listen")
    parser.add_argument("--sources", type=int, default=200, help="loopback addresses to connect from")
    parser.add_argument("--source", action="append", help="an address to connect from (instead)")
    parser.add_argument("--wait", action="store_true", help='print "ready", connect after a line')
    parser.add_argument("--mode", choices=["idle", "slow"], default="idle")
    parser.add_argument("--drip", type=float, default=1.0)
    parser.add_argument("--reconnect", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # The flood stands for machines elsewhere: on this one, it runs only on CPU time the
    # cluster it attacks leaves idle, so that the tests measure what the flood costs the
    # cluster itself.
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)
    asyncio.run(main(parser.parse_args()))

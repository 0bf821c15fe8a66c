"""What a result was measured on: printed with the table and written to the markdown."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path

# Versions that explain a figure; aiodagger comes first and is found by import,
# since a source checkout on PYTHONPATH has no installed metadata.
PACKAGES = ("dask", "distributed", "ray", "numpy", "uvloop")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cores() -> str:
    logical = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return str(logical)
    return str(logical) if usable == logical else f"{usable} usable of {logical}"


def ram() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                kib = int(line.split()[1])
                return f"{kib / 2**20:.1f} GiB"
    except (OSError, ValueError):
        pass
    return "unknown"


def aiodagger_version() -> str:
    from benchmarks.peers.aiodagger_ import load
    from benchmarks.peers.base import Unavailable

    try:
        aiodagger = load()
    except Unavailable:
        return "not importable"
    version = getattr(aiodagger, "__version__", None)
    if version:
        return str(version)
    try:
        return metadata.version("aiodagger")
    except metadata.PackageNotFoundError:
        return "unknown"


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe(loop: str) -> dict[str, str]:
    """An ordered mapping of label -> value."""
    info = {
        "CPU": cpu_model(),
        "Cores": cores(),
        "RAM": ram(),
        "OS": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "Event loop": loop,
        "aiodagger": aiodagger_version(),
    }
    info.update({name: package_version(name) for name in PACKAGES})
    return info


def command_line() -> str:
    """The command as it can be typed again (``python -m benchmarks.run ...``)."""
    import shlex

    return shlex.join(["python", "-m", "benchmarks.run", *sys.argv[1:]])

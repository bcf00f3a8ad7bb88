"""What a benchmark page says about where it ran: the CPU, its cores, the commit."""

from __future__ import annotations

import os
import platform
import subprocess


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown"


def describe() -> str:
    """"<CPU>, <n> cores"."""
    return f"{cpu_name()}, {os.cpu_count()} cores"


def commit() -> str:
    """The repository's HEAD commit, or "unknown"."""
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"

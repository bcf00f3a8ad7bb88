"""What a benchmark page says about where it ran: the CPU, its cores, the commit."""

from __future__ import annotations

import os
import platform
import subprocess


def cpu_name() -> str:
    """The CPU's model name, family/model and widest vector unit (from /proc/cpuinfo where there is
    one): machines with the same model name ("AMD EPYC") differ in generation, and PyTorch's and XLA's
    convolutions gain differently from AVX-512."""
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        fields = {}
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    if "model name" not in fields:
        return platform.processor() or platform.machine() or "unknown"
    flags = fields.get("flags", "").split()
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{fields['model name']} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')}, {vector})"


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

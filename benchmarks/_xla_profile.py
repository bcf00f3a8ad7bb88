"""XLA's view of a jitted step: its cost analysis and the time per op kind in a profiler trace."""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import tempfile
from collections.abc import Callable
from typing import Any

import jax


def cost_analysis(jitted: Any, *args: Any) -> dict[str, float]:
    """XLA's cost analysis ("flops", "bytes accessed", ...) of `jitted` compiled for `args`."""
    analysis = jitted.lower(*args).compile().cost_analysis()
    return (analysis[0] if isinstance(analysis, list) else analysis) or {}


def op_times(run: Callable[[], Any], steps: int = 3) -> list[tuple[str, float, int]]:
    """(op kind, total ms, calls) over `steps` calls of `run` (which waits for its results), slowest
    first; ops of one kind are summed with their numbering stripped (convolution.12 -> convolution)."""
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps):
                run()
        (path,) = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    totals: dict[str, float] = {}
    calls: dict[str, int] = {}
    for e in events:
        op = (e.get("args") or {}).get("hlo_op")
        if e.get("ph") == "X" and op:
            kind = re.sub(r"\.\d+$", "", op)
            totals[kind] = totals.get(kind, 0.0) + e.get("dur", 0.0)
            calls[kind] = calls.get(kind, 0) + 1
    return [(kind, us / 1e3, calls[kind]) for kind, us in sorted(totals.items(), key=lambda kv: -kv[1])]

"""Statistics over seeds: mean, std and the Student-t interval of the mean, and their table cells."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import special  # a dependency of scikit-learn


def _t_quantile(dof: int) -> float:
    """The 0.975 quantile of Student's t with `dof` degrees of freedom (`scipy.stats.t.ppf`'s value;
    scipy.special alone, since importing scipy.stats costs every process about a second)."""
    return float(special.stdtrit(dof, 0.975))


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample std (ddof 1) and the 95% t confidence interval of the mean of `values`.

    NaN values are dropped (`n` counts the rest). With one value the std is 0 and the interval NaN.
    """
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    n = len(v)
    if n == 0:
        return {"n": 0, "mean": float("nan"), "std": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    mean = float(v.mean())
    std = float(v.std(ddof=1)) if n > 1 else 0.0
    half = _t_quantile(n - 1) * std / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def format_cell(stats: Mapping[str, float]) -> str:
    """`mean ± std [lo, hi]` with 3 decimals; `–` when there is no value."""
    if not stats["n"]:
        return "–"
    text = f"{stats['mean']:.3f} ± {stats['std']:.3f}"
    if math.isfinite(stats["ci_low"]):
        text += f" [{stats['ci_low']:.3f}, {stats['ci_high']:.3f}]"
    return text


def parse_cell(cell: str) -> dict[str, float]:
    """Inverse of `format_cell` (to 3 decimals)."""
    if cell == "–":
        return {"n": 0}
    mean_std, _, ci = cell.partition(" [")
    mean, std = (float(x) for x in mean_std.split(" ± "))
    out = {"mean": mean, "std": std}
    if ci:
        lo, hi = (float(x) for x in ci.rstrip("]").split(", "))
        out.update(ci_low=lo, ci_high=hi)
    return out

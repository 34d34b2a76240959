"""Helpers the benchmark scripts share for their markdown tables (imported as a sibling module:
the scripts run as `python benchmarks/NAME.py`, which puts this folder on sys.path)."""

from __future__ import annotations

import statistics


def mean_sd(xs: list[float | None]) -> str:
    """'0.944 ± 0.004' over the values given (None skipped); one value as is; '-' for none."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"

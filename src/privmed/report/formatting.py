"""Metrics and p-values as the report prints them."""

from __future__ import annotations

from typing import Any

from privmed.report.words import NA
from privmed.report.words import as_int as _int
from privmed.report.words import num as _num


COUNTS = ("n", "events", "volumes")  # metrics that are counts: integers, summed (not averaged) over sites


def fmt_metric(name: str, value: Any) -> str:
    """AUC, C-index, ECE and loss to 3 decimals, accuracies as a percentage, counts as integers;
    "n/a" for a missing or non-finite value."""
    x = _num(value)
    if x is None:
        return NA
    if name in ("accuracy", "balanced_accuracy"):
        return f"{100 * x:.1f}%"
    if name in COUNTS:
        return _int(x)
    if name.startswith(("hd95", "psnr")):
        return f"{x:.2f}"
    if name.startswith("nmse"):
        return f"{x:.4f}"
    return f"{x:.3f}"


def fmt_p(value: Any) -> str:
    """A p-value as "p = 0.031" (2 significant digits), "p < 0.0001", or "p n/a" when undefined."""
    x = _num(value)
    if x is None:
        return f"p {NA}"
    if x < 1e-4:
        return "p < 0.0001"
    return f"p = {x:.2g}"

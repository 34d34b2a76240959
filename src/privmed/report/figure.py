"""One figure slot of the report (FigureOut), as every figure module returns it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FigureOut:
    """One figure slot of the report: PNG bytes, or a note saying why it is missing."""

    name: str
    title: str
    caption: str
    png: bytes | None = None
    note: str | None = None

"""The run report: one self-contained report.html (figures embedded) written into a run directory."""

from privmed.report.html import write_report

__all__ = ["write_report"]

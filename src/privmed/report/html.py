"""Turn a finished (or stopped) run directory into one self-contained report.html.

The report is made in steps, one module each:

    run_files      read_run: the run directory's files as one RunFiles (the only step that reads)
    task_view      task_view: what the run's task means for the report (metric, items, rows)
    figures        make_figures: which figures, with their captions (figures_predictions: ROC,
                   calibration, dense examples; figures_survival: Kaplan-Meier; figures_audit)
    survival       the Kaplan-Meier and log-rank statistics
    context        the template's context (context_audit: the Audit section)
    render         render: the template filled in (formatting: metrics and p-values as printed)

`write_report` (here) is the only function that writes (plots/<name>.png and report.html,
atomically). The names older callers import from this module stay importable from it.

The report follows the run's task: "classification" (images), "tabular-classification" (a feature
table: the same scores, nothing about images) and "survival" (concordance index, Kaplan-Meier curves
of the predicted risk groups instead of ROC and calibration).

Two reports (privmed.report.private): RUN_DIR/report.html may be shared: of an audit it says when
it ran, which attacks and what each attacker assumes, never a result. With `private=True` the
report also shows the audit's results and figures (computed from patients outside the DP mechanism,
training images among them) and goes to RUN_DIR/private/report.html, its figures to private/plots/.
"""

from __future__ import annotations

from pathlib import Path

from privmed.io import write_bytes, write_text
from privmed.report import words
from privmed.report.context import context
from privmed.report.figure import FigureOut
from privmed.report.figures import make_figures
from privmed.report.formatting import COUNTS, fmt_metric, fmt_p
from privmed.report.render import render
from privmed.report.run_files import REQUIRED_FILES, RunFiles, read_run
from privmed.report.task_view import (
    CLASSIFICATION_ROWS,
    DENSE_ROWS,
    PERSONALISED,
    SURVIVAL_ROWS,
    TaskView,
    task_view,
)
from privmed.report.words import fmt_epsilon

__all__ = [
    "CLASSIFICATION_ROWS", "COUNTS", "DENSE_ROWS", "PERSONALISED", "REQUIRED_FILES", "SURVIVAL_ROWS",
    "FigureOut", "RunFiles", "TaskView", "context", "fmt_budget", "fmt_epsilon", "fmt_metric", "fmt_p",
    "make_figures", "read_run", "render", "task_view", "write_report",
]

# the report's privacy wording lives in privmed.report.words (shared with the privacy statement);
# these are the names older callers import from here
UNITS, UNIT_COUNTS, PRIVATE_MODES, fmt_budget = words.UNITS, words.UNIT_COUNTS, words.PRIVATE_MODES, words.fmt_budget
INVERSION_IMAGES = "audit_inversion.npz"  # under private/: privmed.report.private.INVERSION_FILE


def write_report(run_dir: Path, private: bool = False) -> Path:
    """Write `run_dir/report.html` (and each figure as `run_dir/plots/<name>.png`), which may be
    shared; with `private`, the report with the audit's results to `run_dir/private/report.html`
    (figures under private/plots/). Returns its path.

    Raises RunDirError when `run_dir` is not a privmed run directory or one of its files is corrupt.
    """
    run = read_run(Path(run_dir), private=private)
    figures = make_figures(run)
    if private:
        from privmed.report.private import private_dir

        home = private_dir(run.path)
    else:
        home = run.path
    for fig in figures:
        if fig.png is not None:
            write_bytes(home / "plots" / f"{fig.name}.png", fig.png)
    out = home / "report.html"
    write_text(out, render(run, figures))
    return out

"""Choosing the report's figures (make_figures) and drawing the run's own: the learning curves
and the privacy spent per site. The test set's figures are in figures_predictions and
figures_survival, the audit's in figures_audit. Pure: every figure comes back as PNG bytes or a
note saying why it is missing."""

from __future__ import annotations

import math

from privmed.catalog import PrivacyMode
from privmed.report import plots, words
from privmed.report.figure import FigureOut
from privmed.report.figures_audit import audit_figure, inversion_figure
from privmed.report.figures_predictions import dense_figures, prediction_figures
from privmed.report.figures_survival import survival_figures
from privmed.report.run_files import RunFiles, site_names
from privmed.report.task_view import TaskView, task_view
from privmed.report.words import ACCOUNTANTS, fmt_number
from privmed.report.words import as_dict as _dict
from privmed.report.words import get as _get
from privmed.report.words import num as _num
from privmed.report.words import privacy_status as _privacy_status


def make_figures(run: RunFiles) -> list[FigureOut]:
    """The report's figures, in the order it shows them: learning curves; privacy spent (a run
    with differential privacy); the test set's (dense examples, Kaplan-Meier, or ROC and
    calibration); in a private report only, the audit's."""
    view = task_view(run)
    privacy = _privacy_figure(run)
    if view.dense:
        predictions = dense_figures(run, view)
    else:
        predictions = survival_figures(run) if view.survival else prediction_figures(run, view)
    audits = []
    if run.private:  # drawn from the audit's results: never in a shareable report
        audits = [f for f in (audit_figure(run, view), inversion_figure(run)) if f is not None]
    return [_learning_curves(run, view), *([privacy] if privacy else []), *predictions, *audits]


def _learning_curves(run: RunFiles, view: TaskView | None = None) -> FigureOut:
    view = view or task_view(run)
    metric, label = view.metric, view.metric_label
    rows = run.metrics
    title = f"Learning curves: {label} over rounds" if view.survival else "Learning curves"
    has_val = any(_dict(row.get("val")) for row in rows) or not rows
    own = "own test" if not view.personalised else "own test (each site's own model)"
    if not has_val:  # data.val_fraction 0: no validation scores; show the sites' test scores instead
        part, ylabel = "test", f"test {label}"
        val_label, test_label = "pooled validation", "pooled test"
        caption = (
            f"Top: test {label} per round of the model on each site's own test data, on all sites' "
            "test data pooled and, where the sites have test data of their own, their unweighted "
            "mean. The run had no validation data, so the result is the last round's model and "
            "these scores played no part in choosing it. The dotted red line marks the selected round."
        )
    else:
        part, ylabel = "val", f"validation {label}"
        if view.personalised:
            scored = "each site's own model on that site's validation data"
            val_label, test_label = "mean of site models, validation", "mean of site models, test"
            choice = f"the mean over the site models' validation {label} (used to choose the round)"
        else:
            scored = "the shared model on each site's validation data"
            val_label, test_label = "pooled validation", "pooled test"
            choice = "all sites' validation data pooled (used to choose the round)"
        caption = (
            f"Top: validation {label} per round of {scored}; of {choice}; and of the test data, for "
            "information only (it plays no part in the choice). The dotted red line marks the "
            "selected round."
        )
    caption += " Bottom: mean training loss of each site's local training in that round."
    if run.facts.privacy_mode == PrivacyMode.DP_SGD:
        units = words.unit_nouns(run.facts.privacy_unit, tabular=view.tabular)
        caption += (" Under DP-SGD the sites do not report their training loss (it is computed from "
                    f"training {units} outside the privacy mechanism), so that panel is empty.")
    if not rows:
        return FigureOut("learning_curves", title, caption, note="No completed rounds: nothing to plot.")
    sites = site_names(run)
    mean_test = [_get(row, "test_mean_over_sites", metric) for row in rows]
    has_mean = any(_num(x) is not None for x in mean_test)
    if has_mean and has_val:
        caption += (f" The dash-dotted line is the unweighted mean over sites of each site's {own} "
                    f"{label}, also for information only.")
    png = plots.learning_curves(
        rounds=[row["round"] for row in rows],
        val_auc_by_site={s: [_get(row, "sites", s, part, metric) for row in rows] for s in sites},
        train_loss_by_site={s: [_get(row, "train_loss", s) for row in rows] for s in sites},
        pooled_val_auc=[_get(row, "val", metric) for row in rows],
        pooled_test_auc=[_get(row, "test", metric) for row in rows],
        best_round=run.facts.best_round,
        val_label=val_label,
        test_label=test_label,
        metric_label=ylabel,
        mean_test_auc=mean_test if has_mean else None,
        mean_test_label=f"{own}, mean over sites",
        title=title,
    )
    return FigureOut("learning_curves", title, caption, png=png)


def _privacy_figure(run: RunFiles) -> FigureOut | None:
    """Epsilon spent per site over the rounds; None for a run without differential privacy."""
    f = run.facts
    rows = [row for row in run.metrics if isinstance(row.get("epsilon"), dict)]
    if not rows and _privacy_status(_dict(f.privacy)) != "private":
        return None
    title = "Privacy spent"
    accountant, budget = f.accountant, f.budget_epsilon
    how = f"delta = {fmt_number(f.delta)}"
    if accountant:
        how = f"accountant: {ACCOUNTANTS.get(accountant, accountant)}; {how}"
    caption = (
        f"Epsilon each site has spent after each round, as the privacy ledger accounts it ({how}). "
        "It only grows, and it never passes the budget line (dashed): the run refuses a round that "
        "would take a site past its budget."
    )
    if budget is None:
        caption += " The run recorded no budget, so no budget line is drawn."
    if f.privacy_mode == PrivacyMode.CENTRAL:
        caption += " Under central DP every site takes part in every round, so the lines coincide."
    if not rows:
        return FigureOut("privacy_spent", title, caption,
                         note="No completed rounds recorded a privacy spend: nothing to plot.")
    rounds, series = _epsilon_series(run, rows)
    png = plots.privacy_spent(rounds, series, budget=budget, delta=f.delta)
    return FigureOut("privacy_spent", title, caption, png=png)


def _epsilon_series(run: RunFiles, rows: list[dict]) -> tuple[list[int], dict[str, list[float]]]:
    """Rounds and each site's epsilon after them, from the rows' ledger figures. A site a row does not
    name made no release that round: its epsilon stays where it was (0 before its first). The series
    start at round 0 with nothing spent when the rows start at round 1."""
    named = [s for row in rows for s in row["epsilon"]]
    sites = [s for s in site_names(run) if s in named]
    sites += [s for s in dict.fromkeys(named) if s not in sites]
    rounds = [row["round"] for row in rows]
    series: dict[str, list[float]] = {s: [] for s in sites}
    for site in sites:
        last = 0.0
        for row in rows:
            if site in row["epsilon"]:
                x = _num(row["epsilon"][site])
                last = math.nan if x is None else x
            series[site].append(last)
    if rounds[0] == 1:
        rounds = [0, *rounds]
        series = {s: [0.0, *v] for s, v in series.items()}
    return rounds, series

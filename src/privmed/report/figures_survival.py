"""A survival run's figure: Kaplan-Meier curves of the pooled test patients split at the median
predicted risk, with the log-rank test (the statistics: privmed.report.survival)."""

from __future__ import annotations

import numpy as np

from privmed.report import plots
from privmed.report.figure import FigureOut
from privmed.report.formatting import fmt_p
from privmed.report.run_files import RunFiles
from privmed.report.survival import kaplan_meier, logrank_p, risk_groups, step_at


KM_TITLE = "Kaplan-Meier curves by predicted risk group"
KM_CAPTION = (
    "The pooled test patients split at the median risk the selected model predicts: the half "
    "with the lower predicted risk and the half with the higher. Each line is that group's "
    "Kaplan-Meier estimate of the share of patients still free of the event over time; a tick "
    "marks a patient censored then (event-free when last seen). The further apart the two "
    "curves, the better the model ranks patients by risk. The legend gives each group's "
    "patients (n) and events."
)


def survival_figures(run: RunFiles) -> list[FigureOut]:
    """Kaplan-Meier curves of the pooled test patients split at the median predicted risk of the
    selected model (one panel per site's model for a personalised strategy), with a log-rank test."""
    why = _why_not_drawn(run)
    if why is not None:
        return [FigureOut("kaplan_meier", KM_TITLE, KM_CAPTION, note=why)]
    models = ["global"] if "global" in run.risk else list(run.risk)
    time, event = run.time, run.labels.astype(bool)
    finite = [m for m in models if np.isfinite(run.risk[m]).all()]
    dropped = [m for m in models if m not in finite]
    if not finite:
        why = "Not drawn: no model has finite predicted risks (training diverged?)."
    elif len(time) < 2:
        why = "Not drawn: the test set holds a single patient, too few for two risk groups."
    if why is not None:
        return [FigureOut("kaplan_meier", KM_TITLE, KM_CAPTION, note=why)]
    panels, tests, single = {}, [], []
    for model in finite:
        groups = risk_groups(run.risk[model])
        curves = _group_curves(time, event, groups)
        if len(curves) < 2:
            single.append(model)
        p = logrank_p(time, event, groups)
        tests.append((model, p))
        panel = f"{model}: log-rank {fmt_p(p)}" if len(finite) > 1 else f"Test set, log-rank {fmt_p(p)}"
        panels[panel] = curves
    caption = KM_CAPTION + _logrank_words(tests, single, dropped)
    png = plots.kaplan_meier(panels, time_label=_time_label(run))
    return [FigureOut("kaplan_meier", KM_TITLE, caption, png=png)]


def _why_not_drawn(run: RunFiles) -> str | None:
    """Why the run's test set gives no Kaplan-Meier curves at all (None: it may give some)."""
    if (run.labels is None or run.time is None or not run.risk) and any(
            "concordant" in c for c in run.counts.values()):
        return ("Not drawn: the sites keep their patients' predicted risks and reported only "
                "evaluation counts (test_counts.npz); splitting the pooled test patients at "
                "the median risk would need a second round of counts (the pooled median "
                "first, then each site's patients above and below it), which this run did "
                "not do.")
    if run.labels is None or run.time is None or not run.risk:
        return ("Not drawn: the run directory has no predictions.npz (or it holds no survival "
                "times and predicted risks).")
    if len(run.labels) == 0:
        return "Not drawn: the test set is empty."
    if not np.isfinite(run.time).all():
        return "Not drawn: some test survival times are not finite."
    return None


def _group_curves(time: np.ndarray, event: np.ndarray, groups: np.ndarray) -> list[dict]:
    """The Kaplan-Meier curve of each risk group that has patients (0: lower, 1: higher risk), as
    plots.kaplan_meier draws them: label, step times and survival, censored times and survival."""
    curves = []
    for g, name in ((0, "lower risk"), (1, "higher risk")):
        mask = groups == g
        if not mask.any():
            continue
        t, e = time[mask], event[mask]
        steps_t, steps_s = kaplan_meier(t, e)
        censored = np.sort(t[~e])
        curves.append({
            "label": f"{name} (n = {int(mask.sum())}, {int(e.sum())} events)",
            "times": steps_t, "survival": steps_s,
            "censored_times": censored, "censored_survival": step_at(steps_t, steps_s, censored),
        })
    return curves


def _logrank_words(tests: list[tuple[str, float | None]], single: list[str], dropped: list[str]) -> str:
    """The caption's end: each panel's log-rank p-value, the models whose patients form one group,
    and those left out for risks that are not finite."""
    if len(tests) == 1:
        text = (" Log-rank test of the difference between the two groups' survival: "
                f"{fmt_p(tests[0][1])} (small values: the groups' survival differs by more than "
                "chance would make it).")
    else:
        text = (" One panel per site's own model, all on the same pooled test patients; the "
                "log-rank test of the difference between each panel's two groups: "
                + "; ".join(f"{m}: {fmt_p(p)}" for m, p in tests) + ".")
    if single:
        text += (f" {', '.join(single)}: every patient got the same predicted risk, so they form "
                 "a single group and the log-rank test is undefined.")
    if dropped:
        text += f" Left out, their predicted risks are not finite: {', '.join(dropped)}."
    return text


def _time_label(run: RunFiles) -> str:
    unit = run.facts.data.time_unit
    return f"time ({unit})" if unit else "time"

"""Kaplan-Meier and log-rank statistics for the report: pure functions of arrays of times (N,),
event indicators (N,) and predicted risks (N,)."""

from __future__ import annotations

import numpy as np

from privmed.report.words import num as _num


def _survival_helpers():
    """(kaplan_meier, risk_groups) from privmed.tasks.survival when it has them, else None."""
    try:
        from privmed.tasks import survival
    except ImportError:
        return None
    km, groups = getattr(survival, "kaplan_meier", None), getattr(survival, "risk_groups", None)
    return (km, groups) if callable(km) and callable(groups) else None


def kaplan_meier(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Kaplan-Meier estimate as a right-continuous step function: (times, survival after each)."""
    helpers = _survival_helpers()
    if helpers is not None:
        times, surv = helpers[0](time, event)
    else:
        from lifelines import KaplanMeierFitter

        sf = KaplanMeierFitter().fit(time, event_observed=event).survival_function_
        times, surv = sf.index.to_numpy(), sf.iloc[:, 0].to_numpy()
    times, surv = np.asarray(times, dtype=np.float64), np.asarray(surv, dtype=np.float64)
    if not len(times) or times[0] > 0:  # start every curve at time 0 with everyone event-free
        times, surv = np.concatenate([[0.0], times]), np.concatenate([[1.0], surv])
    return times, surv


def risk_groups(risk: np.ndarray) -> np.ndarray:
    """Group of each patient: 1 (higher risk) above the median predicted risk, else 0."""
    helpers = _survival_helpers()
    if helpers is not None:
        return np.asarray(helpers[1](risk, n_groups=2), dtype=np.int64)
    return (risk > np.median(risk)).astype(np.int64)


def step_at(times: np.ndarray, surv: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The step function (times, surv) evaluated at `at` (1 before its first step)."""
    i = np.searchsorted(times, at, side="right") - 1
    return np.where(i >= 0, surv[np.clip(i, 0, None)], 1.0)


def logrank_p(time: np.ndarray, event: np.ndarray, groups: np.ndarray) -> float | None:
    """The log-rank test's p-value for groups 0 and 1; None when it is undefined (no events)."""
    from lifelines.statistics import logrank_test

    a, b = groups == 0, groups == 1
    if not a.any() or not b.any() or not event.any():
        return None
    result = logrank_test(time[a], time[b], event_observed_A=event[a], event_observed_B=event[b])
    return _num(result.p_value)

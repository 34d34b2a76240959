"""Survival analysis: the Cox loss, the concordance index, Kaplan-Meier curves and risk groups.

    cox_loss(risk, time, event)              negative Cox partial log-likelihood (Breslow ties) / B
    CoxLoss()(out, target)                   the same as an nn.Module; target (B, 2) = [time, event]
                                             (reduction "mean" or "sum"; no "none": see CoxLoss)
    concordance_index(time, risk, event)     Harrell's C, higher risk = earlier event
    survival_metrics(risk, time, event)      {"c_index", "loss", "n", "events"}
    kaplan_meier(time, event)                (times, survival) step function
    risk_groups(risk, n_groups=2)            group ids by quantiles of risk (0 = lowest risk)

A model's output is a risk score per patient (the log hazard ratio of the Cox model): higher means
an earlier event. `event` is 1 for an observed event and 0 for a censored time. Pure functions; the
concordance index and Kaplan-Meier estimate come from lifelines.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood with Breslow's handling of tied times, divided by the
    batch size B (a mean over patients, as Opacus and the optimizers expect):

        sum_{i: event_i = 1} [ log sum_{j: time_j >= time_i} exp(risk_j) - risk_i ] / B

    risk, time, event: (B,). Vectorised, O(B log B): the log-sums over risk sets are one
    logcumsumexp over the patients sorted by time, descending; a patient's risk set is read at the
    end of its tie group (so it holds every patient with the same time). A batch with no events (or
    no patients) gives 0, with a zero gradient. Differentiable in `risk`.
    """
    risk = risk.reshape(-1)
    time = time.reshape(-1).to(risk.device).contiguous()
    event = event.reshape(-1).to(device=risk.device, dtype=risk.dtype)
    b = risk.shape[0]
    if time.shape[0] != b or event.shape[0] != b:
        raise ValueError(f"cox_loss: risk, time and event need one entry per patient, got "
                         f"{b}, {time.shape[0]}, {event.shape[0]}")
    if b == 0:
        return risk.sum() * 0.0
    order = torch.argsort(time, descending=True, stable=True)
    log_cum = torch.logcumsumexp(risk[order], dim=0)  # log sum of exp(risk) over the k+1 latest
    # |{j: time_j >= time_i}| - 1 is the last position of i's tie group in the descending order.
    at_risk = b - torch.searchsorted(torch.sort(time).values, time, right=False)
    log_risk_set = log_cum[at_risk - 1]
    return (event * (log_risk_set - risk)).sum() / b


class CoxLoss(nn.Module):
    """cox_loss on a model's output (B, 1) or (B,) and target (B, 2) float = [time, event]: a scalar,
    divided by B under `reduction` "mean" (the default), not divided under "sum". There is no
    "none": the partial likelihood has no per-patient terms (each event's term holds every patient
    at risk), so asking for them raises ValueError rather than returning a scalar in their place."""

    per_sample = False  # one patient's data enters other patients' terms: DP-SGD cannot clip it

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction
        self._check_reduction()

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check_reduction()  # Opacus' ghost clipping sets the attribute directly
        risk = out[:, 0] if out.dim() == 2 else out
        loss = cox_loss(risk, target[:, 0], target[:, 1])
        return loss * risk.shape[0] if self.reduction == "sum" else loss

    def _check_reduction(self) -> None:
        if self.reduction == "none":
            raise ValueError(
                "reduction: 'none' is not available for the Cox loss: the partial likelihood "
                "couples the patients at risk, so it has no per-patient losses (allowed: 'mean', 'sum')"
            )
        if self.reduction not in ("mean", "sum"):
            raise ValueError(
                f"reduction: '{self.reduction}' is not a loss reduction (allowed: 'mean', 'sum')"
            )


def concordance_index(time, risk, event) -> float:
    """Harrell's concordance index: among comparable pairs (the earlier time is an observed event),
    the share in which the earlier one has the higher risk, ties in risk counting 1/2. Via
    `lifelines.utils.concordance_index(time, -risk, event)` (lifelines scores survival times, so
    the risk is negated). NaN, not an exception, when there is no comparable pair or a risk is not
    finite (a diverged model)."""
    from lifelines.utils import concordance_index as _lifelines_c

    time = np.asarray(time, dtype=np.float64).reshape(-1)
    risk = np.asarray(risk, dtype=np.float64).reshape(-1)
    event = np.asarray(event).reshape(-1)
    if len(time) < 2 or not np.all(np.isfinite(risk)):
        return math.nan
    try:
        return float(_lifelines_c(time, -risk, event))
    except ZeroDivisionError:  # lifelines: "No admissable pairs in the dataset."
        return math.nan


def survival_metrics(risk: np.ndarray, time, event) -> dict:
    """Scores of risk predictions (N,) on a whole set: "c_index" (concordance_index), "loss" (the
    mean negative partial log-likelihood per event, Breslow ties: cox_loss summed over the events
    and divided by their number; NaN without events), "n" and "events". Python floats and ints."""
    risk = np.asarray(risk, dtype=np.float64).reshape(-1)
    time = np.asarray(time, dtype=np.float64).reshape(-1)
    event = np.asarray(event).reshape(-1).astype(np.float64)
    n, events = len(risk), int(event.sum())
    if events > 0:
        with torch.no_grad():
            total = cox_loss(*(torch.from_numpy(a) for a in (risk, time, event)))
        loss = float(total) * n / events
    else:
        loss = math.nan
    return {
        "c_index": concordance_index(time, risk, event),
        "loss": loss,
        "n": int(n),
        "events": events,
    }


def kaplan_meier(time, event) -> tuple[np.ndarray, np.ndarray]:
    """The Kaplan-Meier estimate of the survival function, as lifelines' KaplanMeierFitter gives it:
    `times` (0 and every distinct observed time, ascending, censored ones included) and `survival`
    (the estimate from each time until the next; 1 at 0)."""
    from lifelines import KaplanMeierFitter

    kmf = KaplanMeierFitter().fit(
        np.asarray(time, dtype=np.float64).reshape(-1), np.asarray(event).reshape(-1).astype(bool)
    )
    sf = kmf.survival_function_
    return sf.index.to_numpy(dtype=np.float64), sf.iloc[:, 0].to_numpy(dtype=np.float64)


def risk_groups(risk, n_groups: int = 2) -> np.ndarray:
    """Group ids (N,) int64 by quantiles of risk: 0 holds the lowest risks, n_groups - 1 the
    highest. A risk equal to a cut point goes to the lower group (2 groups: above the median is
    high risk)."""
    if n_groups < 1:
        raise ValueError(f"risk_groups: n_groups must be >= 1, got {n_groups}")
    risk = np.asarray(risk, dtype=np.float64).reshape(-1)
    if len(risk) == 0:
        return np.zeros(0, dtype=np.int64)
    cuts = np.quantile(risk, np.arange(1, n_groups) / n_groups)
    return np.searchsorted(cuts, risk, side="left").astype(np.int64)

"""A survival split's counts (SURVIVAL_KEYS) and the c-index and Cox loss computed from pooled
counts."""

from __future__ import annotations

import math

import numpy as np

from privmed.tasks.counts.schema import Counts, check_counts


def survival_counts(risk: np.ndarray, time, event) -> Counts:
    """Counts of one set's risk predictions `risk` (N,) (higher = earlier event) with `time` (N,)
    and `event` (N,) 1/0:

    n, events (int64); loss_sum (float64: the negative Cox partial log-likelihood, Breslow ties,
    summed over the events, risk sets within this set); concordant (float64: comparable pairs the
    risk orders correctly, plus 1/2 for each with tied risks) and comparable (int64: pairs whose
    earlier time is an observed event; a censored time equal to an event's time counts as later), as
    lifelines' concordance_index counts them; nonfinite (int64: non-finite risks; then concordant
    and comparable are 0 and the c-index is NaN, as survival_metrics gives it)."""
    import torch

    from privmed.tasks.survival import cox_loss

    risk = np.asarray(risk, dtype=np.float64).reshape(-1)
    time = np.asarray(time, dtype=np.float64).reshape(-1)
    event = np.asarray(event).reshape(-1).astype(np.float64)
    n, events = len(risk), int(event.sum())
    if len(time) != n or len(event) != n:
        raise ValueError(f"survival_counts: risk, time and event need one entry per patient, got "
                         f"{n}, {len(time)}, {len(event)}")
    with torch.no_grad():
        total = float(cox_loss(*(torch.from_numpy(a) for a in (risk, time, event))))
    nonfinite = int(np.sum(~np.isfinite(risk)))
    correct = tied = pairs = 0
    if nonfinite == 0 and n >= 2:
        correct, tied, pairs = _concordance_pairs(time, risk, event)
    return {
        "n": np.asarray(n, dtype=np.int64),
        "events": np.asarray(events, dtype=np.int64),
        # cox_loss is the sum over the events divided by n; the product is what survival_metrics
        # divides by the events, so one set's loss comes out bit for bit the same.
        "loss_sum": np.asarray(total * n, dtype=np.float64),
        "concordant": np.asarray(correct + 0.5 * tied, dtype=np.float64),
        "comparable": np.asarray(pairs, dtype=np.int64),
        "nonfinite": np.asarray(nonfinite, dtype=np.int64),
    }


def _concordance_pairs(time: np.ndarray, risk: np.ndarray, event: np.ndarray) -> tuple[int, int, int]:
    """(correctly ordered, tied in risk, comparable) pairs, from lifelines' O(n log n) count, the one
    its concordance_index divides (the risk negated: lifelines scores survival times). A private
    lifelines function: tests/test_counts.py checks it against the public concordance_index."""
    from lifelines.utils.concordance import _concordance_summary_statistics

    correct, tied, pairs = _concordance_summary_statistics(time, -risk, event)
    return int(correct), int(tied), int(pairs)


def survival_metrics_from_counts(c: Counts) -> dict:
    """The keys and types of `survival_metrics` (c_index, loss: floats; n, events: ints) from counts.
    One set's counts give exactly its survival_metrics. Counts merged over sites give the c-index over
    pairs of patients of the same site (sum concordant / sum comparable) and the Cox loss per event
    with risk sets stratified by site; both differ from the figures on the pooled patients. c_index
    NaN without comparable pairs or with a non-finite risk; loss NaN without events.

    Noisy counts (`noisy_counts`): the c-index clipped to [0, 1], NaN unless the noisy comparable
    pairs are above 0; n and events rounded and at least 0; loss NaN (not released)."""
    check_counts(c)
    comparable, events = float(c["comparable"]), float(c["events"])
    ok = comparable > 0 and float(c["nonfinite"]) == 0
    return {
        "c_index": min(max(float(c["concordant"]) / comparable, 0.0), 1.0) if ok else math.nan,
        "loss": float(c["loss_sum"]) / events if events > 0 else math.nan,
        "n": max(int(round(float(c["n"]))), 0),
        "events": max(int(round(events)), 0),
    }

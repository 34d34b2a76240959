"""How well membership scores separate members from non-members: ROC AUC, TPR at low FPR and
bootstrap intervals (privmed.audit.mia's evaluation; numpy in, JSON-ready numbers out)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import roc_curve

from privmed.audit.mia_arrays import BoolArray, FloatArray, bool_array, finite_float

DEFAULT_FPRS = (0.001, 0.01)  # the low false-positive rates Carlini et al. ask attacks to be judged at
ROC_MAX_POINTS = 500  # at most about this many ROC points are returned for plotting
CONFIDENCE = 0.95  # level of the bootstrap intervals


def membership_metrics(
    scores: ArrayLike,
    members: ArrayLike,
    seed: int,
    n_boot: int = 200,
    fprs: Sequence[float] = DEFAULT_FPRS,
    max_roc_points: int = ROC_MAX_POINTS,
) -> dict[str, Any]:
    """How well `scores` (N,), higher = member, separate `members` (N,) bool. JSON-ready dict:

    - `roc_auc`: area under the ROC curve (ties count half); `roc_auc_ci`: [lo, hi];
    - `tpr_at_fpr`: {f"{fpr:g}": TPR} for each of `fprs`: the largest TPR over thresholds
      (score >= t is called a member) whose FPR is <= the target, exact (no interpolation), from
      sklearn's roc_curve. None where the target is below `min_resolvable_fpr` = 1 / n_nonmembers:
      the sample has no threshold with a false-positive rate that low other than flagging no one, so
      any number there would be an artefact; `tpr_at_fpr_ci`: likewise {key: [lo, hi] or None};
    - `balanced_accuracy`: max over thresholds of (TPR + 1 - FPR) / 2 (>= 0.5; optimistic: the
      threshold is chosen on the same data);
    - `n_members`, `n_nonmembers`, `min_resolvable_fpr`;
    - `roc_fpr`, `roc_tpr`: the ROC curve for a (log-axis) plot, at most about `max_roc_points`
      points: the lowest-FPR half of its corners exactly, the rest at log-spaced FPRs;
    - `ci_level`, `n_boot`, `seed`: how the intervals were made.

    Intervals: percentile bootstrap at level 0.95 over `n_boot` resamples that draw members and
    non-members separately, with replacement (so each resample keeps both counts), from
    numpy's default_rng(seed). None when `n_boot` == 0.
    """
    s, m = _scores_and_members(scores, members)
    n_pos, n_neg = int(m.sum()), int((~m).sum())
    if n_boot < 0:
        raise ValueError(f"n_boot: {n_boot}; must be >= 0")
    if any(not 0.0 < f < 1.0 for f in fprs):
        raise ValueError(f"fprs: {list(fprs)}; each must be in (0, 1)")
    keys = [f"{f:g}" for f in fprs]
    fpr, tpr = _roc(s, m)
    point = _summaries(fpr, tpr, n_neg, fprs)
    boot = _bootstrap(s, m, seed, n_boot, fprs)
    plot_fpr, plot_tpr = roc_points(s, m, max_roc_points)
    return {
        "roc_auc": point[0],
        "roc_auc_ci": _interval(boot[:, 0]) if n_boot else None,
        "tpr_at_fpr": dict(zip(keys, point[1:])),
        "tpr_at_fpr_ci": {
            k: (_interval(boot[:, 1 + i]) if n_boot and point[1 + i] is not None else None)
            for i, k in enumerate(keys)
        },
        "balanced_accuracy": float(np.max((tpr + 1.0 - fpr) / 2.0)),
        "n_members": n_pos,
        "n_nonmembers": n_neg,
        "min_resolvable_fpr": 1.0 / n_neg,
        "roc_fpr": plot_fpr.tolist(),
        "roc_tpr": plot_tpr.tolist(),
        "ci_level": CONFIDENCE,
        "n_boot": n_boot,
        "seed": seed,
    }


def tpr_at_fpr(scores: ArrayLike, members: ArrayLike, target_fpr: float) -> float | None:
    """The largest TPR among thresholds whose FPR is <= `target_fpr` (exact, from the ROC's corners);
    None when `target_fpr` < 1 / n_nonmembers (not resolvable with this many non-members)."""
    s, m = _scores_and_members(scores, members)
    fpr, tpr = _roc(s, m)
    return _tpr_at(fpr, tpr, int((~m).sum()), target_fpr)


def roc_points(
    scores: ArrayLike, members: ArrayLike, max_points: int = ROC_MAX_POINTS
) -> tuple[FloatArray, FloatArray]:
    """(fpr, tpr) of the ROC curve, thinned for plotting to at most `max_points` points.

    The curve's corners (sklearn's roc_curve without collinear points: the same piecewise-linear
    curve) are kept exactly up to the first `max_points // 2` of them (the low-FPR end, where the
    attacks that matter differ); beyond, the last corner at or below each of log-spaced FPRs up to 1.
    Every point returned is a point of the exact curve; (0, 0) and (1, 1) are always included.
    """
    s, m = _scores_and_members(scores, members)
    if max_points < 4:
        raise ValueError(f"max_points: {max_points}; need at least 4")
    fpr, tpr, _ = roc_curve(m, s, drop_intermediate=True)
    if len(fpr) <= max_points:
        return fpr, tpr
    exact = max_points // 2
    start = max(fpr[exact - 1], 1.0 / int((~m).sum()))
    grid = np.geomspace(start, 1.0, max_points - exact)
    picked = np.searchsorted(fpr, grid, side="right") - 1
    keep = np.unique(np.concatenate([np.arange(exact), picked, [len(fpr) - 1]]))
    return fpr[keep], tpr[keep]


def _roc(scores: FloatArray, members: BoolArray) -> tuple[FloatArray, FloatArray]:
    """Every corner of the ROC curve (thresholds at each distinct score, plus +inf)."""
    fpr, tpr, _ = roc_curve(members, scores, drop_intermediate=False)
    return fpr, tpr


def _tpr_at(fpr: FloatArray, tpr: FloatArray, n_neg: int, target: float) -> float | None:
    allowed = int(np.floor(target * n_neg + 1e-9))  # false positives allowed at FPR <= target
    if allowed < 1:
        return None
    false_pos = np.rint(fpr * n_neg)
    return float(np.max(tpr[false_pos <= allowed]))


def _summaries(fpr: FloatArray, tpr: FloatArray, n_neg: int, fprs: Sequence[float]) -> list[float | None]:
    """[AUC, TPR at each of `fprs`] of one ROC curve."""
    return [float(np.trapezoid(tpr, fpr))] + [_tpr_at(fpr, tpr, n_neg, f) for f in fprs]


def _bootstrap(scores: FloatArray, members: BoolArray, seed: int, n_boot: int, fprs: Sequence[float]) -> FloatArray:
    """(n_boot, 1 + len(fprs)) [AUC, TPRs] of resamples drawing members and non-members separately.
    A TPR that is not resolvable is NaN (the same in every resample: the non-member count is kept)."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(members), np.flatnonzero(~members)
    labels = np.concatenate([np.ones(len(pos), bool), np.zeros(len(neg), bool)])
    out = np.empty((n_boot, 1 + len(fprs)))
    for b in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        fpr, tpr = _roc(scores[idx], labels)
        out[b] = [np.nan if v is None else v for v in _summaries(fpr, tpr, len(neg), fprs)]
    return out


def _interval(values: FloatArray) -> list[float]:
    tail = (1.0 - CONFIDENCE) / 2.0 * 100.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return [float(lo), float(hi)]


def _scores_and_members(scores: ArrayLike, members: ArrayLike) -> tuple[FloatArray, BoolArray]:
    s = finite_float(scores, "scores", ndim=1)
    m = bool_array(members, "members")
    if m.shape != s.shape:
        raise ValueError(f"shapes: scores {s.shape}, members {m.shape}; need the same (N,)")
    n_pos, n_neg = int(m.sum()), int((~m).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"members: {n_pos} members and {n_neg} non-members; need at least one of each")
    return s, m

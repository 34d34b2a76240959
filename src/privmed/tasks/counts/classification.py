"""A classification split's counts (CLASSIFICATION_KEYS) and the metrics, ROC curve and
reliability diagram computed from pooled counts."""

from __future__ import annotations

import math

import numpy as np

from privmed.tasks.counts.grid import SCORE_BINS, grid_bins, score_bins
from privmed.tasks.counts.schema import RELIABILITY_BINS, Counts, check_counts


def classification_counts(probs: np.ndarray, labels: np.ndarray, n_bins: int = SCORE_BINS, *,
                          edges: np.ndarray | None = None, weights: np.ndarray | None = None,
                          loss_max: float | None = None) -> Counts:
    """Counts of one set's predictions `probs` (N, K) (rows of class probabilities) with `labels`
    (N,) ints in 0..K-1, on the grid of `score_bins` with `n_bins` bins, or with `edges` on that
    of `grid_bins` (len(edges) + 1 bins):

    n (int64), loss_sum (float64: sum of -log clip(p_true, 1e-12), nats),
    confusion (K, K) int64 [true class, predicted class (argmax)],
    score_hist (K, 2, n_bins) int64: [k, 1, b] = patients of class k whose p_k is in bin b of the
        grid (`score_bins`), [k, 0, b] = patients of any other class whose p_k is there (what
        one-vs-rest AUCs and ROC curves need, and K times smaller than per class pair),
    nonfinite (int64: patients with a non-finite probability; they are left out of score_hist),
    rel_count (15,) int64, rel_conf_sum (15,) and rel_correct_sum (15,) float64: patients, summed
        top-label confidence and correct predictions per confidence bin of `reliability_bins`.

    With `weights` (N,) (each item's weight, e.g. 1/k for a patient with k items: `patient_weights`)
    every count is the weighted sum instead, all float64; with `loss_max`, each item's loss is
    clipped to it first. What the private release (`noisy_counts`) starts from.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if probs.ndim != 2 or probs.shape[0] != len(labels) or probs.shape[1] < 2:
        raise ValueError(f"classification_counts: probs must be (N, K) with K >= 2 and N = "
                         f"{len(labels)} labels, got {probs.shape}")
    n, k = probs.shape
    if n and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"classification_counts: labels must lie in 0..{k - 1}")
    w = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w is not None and len(w) != n:
        raise ValueError(f"classification_counts: {len(w)} weights for {n} predictions")
    ones = np.ones(n) if w is None else w
    kind = np.int64 if w is None else np.float64
    pred = probs.argmax(axis=1)
    loss = -np.log(np.clip(probs[np.arange(n), labels], 1e-12, 1.0))
    if loss_max is not None:
        loss = np.minimum(loss, loss_max)
    finite = np.isfinite(probs).all(axis=1)
    if edges is not None:
        n_bins = len(edges) + 1
    hist = np.zeros((k, 2, n_bins), dtype=kind)
    # (N_finite, K)
    bins = score_bins(probs[finite], n_bins) if edges is None else grid_bins(probs[finite], edges)
    for cls in range(k):
        np.add.at(hist, (cls, (labels[finite] == cls).astype(np.int64), bins[:, cls]),
                  1 if w is None else w[finite])
    rel_count, rel_conf, rel_correct = _reliability_sums(probs, labels, ones)
    confusion = np.bincount(labels * k + pred, weights=ones, minlength=k * k).reshape(k, k)
    return {
        "n": np.asarray(n if w is None else w.sum(), dtype=kind),
        "loss_sum": np.asarray(np.sum(ones * loss), dtype=np.float64),
        "confusion": confusion.astype(kind),
        "score_hist": hist,
        "nonfinite": np.asarray(np.sum(ones[~finite]), dtype=kind),
        "rel_count": rel_count.astype(kind),
        "rel_conf_sum": rel_conf,
        "rel_correct_sum": rel_correct,
    }


def _reliability_sums(probs: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, ...]:
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    # The binning of classification.reliability_bins: bin i holds confidences in (i/n, (i+1)/n].
    # A NaN confidence (a diverged model) goes to bin 0, as it does there.
    ceil = np.where(np.isnan(conf), 0.0, np.ceil(conf * RELIABILITY_BINS))
    idx = np.clip(ceil.astype(int) - 1, 0, RELIABILITY_BINS - 1)
    return (np.bincount(idx, weights=weights, minlength=RELIABILITY_BINS),
            np.bincount(idx, weights=weights * conf, minlength=RELIABILITY_BINS).astype(np.float64),
            np.bincount(idx, weights=weights * correct, minlength=RELIABILITY_BINS).astype(np.float64))


def classification_metrics_from_counts(c: Counts) -> dict:
    """The keys and types of `classification_metrics` (auc, accuracy, balanced_accuracy, ece, loss:
    floats; n: int) from counts, merged or not. All but the AUC equal `classification_metrics` on the
    pooled predictions; the AUC is that of the scores rounded to the grid (`score_bins`), within
    `auc_rounding_bound(c)` of the exact one. NaN AUC with one class present or any non-finite
    probability; every metric NaN when n is 0.

    Noisy counts (`noisy_counts`: floats, some negative) give post-processed figures: counts
    clipped at 0 (the AUC excepted: `_auc_one`), accuracy over the clipped confusion matrix, loss
    at least 0, n rounded; every metric NaN when the noisy n is not above 0. On exact counts the
    clipping changes nothing."""
    check_counts(c)
    n = float(c["n"])
    if not n > 0:
        nan = math.nan
        return {"auc": nan, "accuracy": nan, "balanced_accuracy": nan, "ece": nan, "loss": nan, "n": 0}
    confusion = np.maximum(c["confusion"], 0)
    true_n = confusion.sum(axis=1)
    present = true_n > 0
    recall = np.diag(confusion)[present] / true_n[present]
    conf, acc, count = reliability_from_counts(c)
    seen = count > 0
    return {
        "auc": _auc(c),
        # confusion.sum() is n on exact counts
        "accuracy": float(np.trace(confusion) / confusion.sum()) if present.any() else math.nan,
        "balanced_accuracy": float(np.mean(recall)) if present.any() else math.nan,
        "ece": float(np.sum(count[seen] / count.sum() * np.abs(acc[seen] - conf[seen]))),
        "loss": max(float(c["loss_sum"] / n), 0.0),
        "n": int(round(n)),
    }


def _auc(c: Counts) -> float:
    """Binary: the AUC of p_1; K > 2: the mean one-vs-rest AUC over the classes present (as
    classification.roc_auc)."""
    present = _present(c)
    if len(present) < 2 or float(c["nonfinite"]) > 0:
        return math.nan
    k = c["confusion"].shape[0]
    classes = [1] if k == 2 else present
    # noisy counts: a class whose noisy histogram has no patient on one side gives no AUC and is
    # left out of the mean (on exact counts every present class gives one)
    aucs = [a for a in (_auc_one(*_pos_neg(c, cls)) for cls in classes) if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else math.nan


def _present(c: Counts) -> np.ndarray:
    """The classes with patients: a positive row of the confusion matrix (noisy counts: a row
    summing above 0 after clipping)."""
    return np.flatnonzero(np.maximum(c["confusion"], 0).sum(axis=1) > 0)


def one_vs_rest_auc(c: Counts, k: int) -> float:
    """The AUC of p_k for class `k` against the rest, on the scores rounded to the grid; NaN when
    class k or the rest has no patient."""
    check_counts(c)
    return _auc_one(*_pos_neg(c, k))


def _pos_neg(c: Counts, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per grid bin of p_k: patients of class k, and of every other class."""
    hist = c["score_hist"][k]
    return hist[1], hist[0]


def _auc_one(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC = sum_b pos[b] (neg below b + neg[b] / 2) / (P N): each positive-negative pair counts 1
    when the positive's bin is higher, 1/2 when they share a bin. NaN unless P > 0 and N > 0.

    On noisy counts the same formula on the counts as released, not clipped at 0, then clipped to
    [0, 1]: numerator and denominator are then sums of unbiased terms, where clipping every bin at 0
    adds the positive part of the noise of every empty bin (benchmarks/noisy_scoring.py measures
    both on PneumoniaMNIST)."""
    pos, neg = pos.astype(np.float64), neg.astype(np.float64)
    p, n = pos.sum(), neg.sum()
    if not (p > 0 and n > 0):
        return math.nan
    below = np.cumsum(neg) - neg
    return float(min(max(np.sum(pos * (below + 0.5 * neg)) / (p * n), 0.0), 1.0))


def auc_rounding_bound(c: Counts, k: int | None = None) -> float:
    """The most rounding to the grid can have moved the AUC from that of the unrounded scores: only
    a positive and a negative in the same bin can be ordered differently, and each such pair counts
    1/2 instead of 0, 1/2 or 1, so |AUC - exact AUC| <= sum_b pos[b] neg[b] / (2 P N). For the AUC
    of the metrics (k None; K > 2: the mean of the bound over the classes averaged), or for class
    `k` against the rest (`one_vs_rest_auc`). NaN where that AUC is NaN."""
    check_counts(c)
    if k is None:
        present = _present(c)
        if len(present) < 2 or float(c["nonfinite"]) > 0:
            return math.nan
        classes = [1] if c["confusion"].shape[0] == 2 else present
    else:
        classes = [k]
    bounds = []
    for cls in classes:
        pos, neg = (np.maximum(a, 0).astype(np.float64) for a in _pos_neg(c, cls))
        if pos.sum() == 0 or neg.sum() == 0:
            return math.nan
        bounds.append(np.sum(pos * neg) / (2 * pos.sum() * neg.sum()))
    return float(np.mean(bounds))


def roc_from_counts(c: Counts, k: int = 1, drop_intermediate: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of class `k` against the rest, from the histogram of p_k: what sklearn's
    `roc_curve(labels == k, p_k, drop_intermediate=...)` gives on the scores rounded to the grid (one
    point per occupied bin, highest first, after (0, 0); ends at (1, 1)). ValueError when class k or
    the rest has no patient."""
    check_counts(c)
    pos, neg = (np.maximum(a, 0) for a in _pos_neg(c, k))  # noisy counts: clipped at 0
    occupied = np.flatnonzero(pos + neg > 0)[::-1]  # thresholds from the highest bin down
    tps = np.cumsum(pos[occupied]).astype(np.float64)
    fps = np.cumsum(neg[occupied]).astype(np.float64)
    if tps.size == 0 or tps[-1] == 0 or fps[-1] == 0:
        raise ValueError(f"roc_from_counts: ROC of class {k} needs patients of class {k} and of others")
    if drop_intermediate and len(fps) > 2:  # sklearn's rule: keep the corners
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        fps, tps = fps[keep], tps[keep]
    return np.r_[0.0, fps] / fps[-1], np.r_[0.0, tps] / tps[-1]


def reliability_from_counts(c: Counts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean confidence, accuracy, count), each (15,) float64, as `reliability_bins` gives them on
    the pooled predictions: empty bins have count 0 and NaN means. Noisy counts: each count clipped
    at 0 and each sum to [0, count], so that the means lie in [0, 1]."""
    check_counts(c)
    count = np.maximum(c["rel_count"].astype(np.float64), 0.0)
    conf_sum = np.clip(c["rel_conf_sum"], 0.0, count)
    correct_sum = np.clip(c["rel_correct_sum"], 0.0, count)
    with np.errstate(invalid="ignore", divide="ignore"):
        return conf_sum / count, correct_sum / count, count

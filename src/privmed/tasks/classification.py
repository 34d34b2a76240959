"""Image classification: cross-entropy loss and the metrics privmed reports.

All metric functions take `probs` (N, K) class probabilities (rows sum to 1) and `labels` (N,) ints.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import accuracy_score, recall_score, roc_auc_score


def roc_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Binary: AUC of the positive-class probability. K > 2: one-vs-rest macro AUC over the classes
    present in `labels`. NaN when `labels` holds a single class (AUC is undefined there)."""
    present = np.unique(labels)
    if len(present) < 2:
        return math.nan
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    # One-vs-rest per present class, then the unweighted mean: sklearn's 'ovr' needs every class.
    return float(np.mean([roc_auc_score(labels == k, probs[:, k]) for k in present]))


def reliability_bins(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-label calibration in `n_bins` equal-width confidence bins on [0, 1].

    Returns (confidence, accuracy, count), each (n_bins,); empty bins have count 0 and NaN means.
    """
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    # Bin i holds confidences in (i/n, (i+1)/n]; confidence 0 cannot occur for a top label.
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        mean_acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return mean_conf, mean_acc, count


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): sum over bins of |accuracy - confidence| weighted by bin share."""
    conf, acc, count = reliability_bins(probs, labels, n_bins)
    seen = count > 0
    return float(np.sum(count[seen] / count.sum() * np.abs(acc[seen] - conf[seen])))


def balanced_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Mean recall over the classes present in `labels` (sklearn's balanced_accuracy_score, without
    its warning for a site whose validation data holds one class)."""
    present = np.unique(labels)
    return float(recall_score(labels, pred, labels=present, average="macro", zero_division=0))


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """auc, accuracy, balanced_accuracy, ece, loss (mean cross-entropy, nats) and n."""
    pred = probs.argmax(axis=1)
    p_true = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    return {
        "auc": roc_auc(probs, labels),
        "accuracy": float(accuracy_score(labels, pred)),
        "balanced_accuracy": balanced_accuracy(pred, labels),
        "ece": expected_calibration_error(probs, labels),
        "loss": float(-np.mean(np.log(p_true))),
        "n": int(len(labels)),
    }

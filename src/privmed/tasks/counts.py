"""Evaluation counts: what a site sends the coordinator instead of its patients' predictions.

A site scores a model on its own data and reports sums over its patients, never one patient's
prediction; the coordinator adds the sites' counts and computes from the sum the metrics it would
compute from the pooled predictions.

    c = classification_counts(probs, labels)      # at each site: {"n", "loss_sum", "confusion", ...}
    pooled = merge_counts([c_a, c_b, c_c])         # at the coordinator: key-wise sums
    classification_metrics_from_counts(pooled)     # {"auc", "accuracy", ..., "n"}

    survival_counts(risk, time, event)             # {"n", "events", "loss_sum", "concordant", ...}
    survival_metrics_from_counts(pooled)           # {"c_index", "loss", "n", "events"}

Counts are `dict[str, np.ndarray]`: every value a numpy array (0-d for a number), so that they can
be summed, sent as arrays and saved in an .npz (`save_counts`, `load_counts`).

What a site releases to the coordinator goes through the private release instead (the end of this
module): the same keys, per patient bounded and noised by the Gaussian mechanism
(privmed.privacy.noisy_counts), float64 and possibly negative:

    metrics, c = noisy_metrics_and_counts(task, pred, data, noise_multiplier, rng)   # at the site
    task.metrics_from_counts(merge_counts([c_a, c_b, c_c]))                            # coordinator

Every function here that reads counts takes noisy ones and post-processes them (clipping at 0,
into a figure's range); on exact counts that post-processing changes nothing.

What is exact and what is not:
- classification: n, loss, accuracy, balanced accuracy, ECE and the reliability diagram equal
  `classification_metrics` / `reliability_bins` on the pooled predictions (up to float summation
  order). The AUC and ROC curve are those of the scores rounded to a fixed grid of `SCORE_BINS` bins
  on the logit scale (see `score_bins`): exact for the rounded scores, and never further from the
  AUC of the unrounded scores than `auc_rounding_bound` says.
- survival: for one set, c_index and loss equal `survival_metrics`. For counts merged over sites the
  c-index counts only pairs of patients of the same site, and the Cox loss uses risk sets stratified
  by site (a patient's risk set holds the patients of its own site): both need no patient's risk to
  leave its site, and both differ from the figures on the pooled patients.
"""

from __future__ import annotations

import io
import math
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from privmed.privacy.noisy_counts import Block, gaussian_release, patient_weights

Counts = dict[str, np.ndarray]

LOGIT_MAX = 32.0
"""The score grid spans logit(p) in [-LOGIT_MAX, LOGIT_MAX] (p from 1.3e-14 to 1 - 1.3e-14); logits
beyond go to the end bins and tie there. Chosen for over-confident models, whose scores crowd the
ends: measured on 2,000 binary predictions with logits of s.d. 8-30 (float32 softmax, as the
models give them), clipping at 16 moved the AUC by up to 0.013 (float64 probabilities: 0.02), at 32
by up to 0.0009 (0.005). float32 probabilities tie above logit 16.6 anyway (1 - p below 6e-8), but
resolve p down to 1e-38 (logit -87) at the low end."""
SCORE_BINS = 8192
"""Bins of the score grid: each 2 * LOGIT_MAX / SCORE_BINS = 1/128 wide in logit, i.e. at most
p(1 - p) / 128 wide in probability (0.002 at p = 0.5, 7.8e-6 at p = 0.001). Scores in one bin count
as tied (1/2 a correctly ordered pair) in the AUC and ROC. On float32 softmax predictions with
logits of s.d. 1-8 (K = 2, 3, 5) the AUC moved by at most 4e-5 with 2,000 patients, 9e-6 with 20,000
and 4e-4 with 200 (where one pair of 100 x 100 is 1e-4)."""
RELIABILITY_BINS = 15  # as classification.reliability_bins and the ECE

CLASSIFICATION_KEYS = ("n", "loss_sum", "confusion", "score_hist", "nonfinite",
                       "rel_count", "rel_conf_sum", "rel_correct_sum")
SURVIVAL_KEYS = ("n", "events", "loss_sum", "concordant", "comparable", "nonfinite")


# ----------------------------------------------------------------------------------- classification


def score_bins(p: np.ndarray, n_bins: int = SCORE_BINS, logit_max: float = LOGIT_MAX) -> np.ndarray:
    """The grid bin (int64, same shape as `p`) of each probability: logit(p) clipped to
    [-logit_max, logit_max], in `n_bins` equal-width bins, bin b holding logits in
    [-logit_max + b w, -logit_max + (b + 1) w) with w = 2 logit_max / n_bins (the top bin also holds
    logit_max). Non-decreasing in p; p = 0 is bin 0 and p = 1 the top bin. `p` must be finite."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore"):  # p = 0 or 1: an infinite logit, clipped below
        z = np.log(p) - np.log1p(-p)
    z = np.clip(z, -logit_max, logit_max)
    width = 2 * logit_max / n_bins
    return np.clip(np.floor((z + logit_max) / width), 0, n_bins - 1).astype(np.int64)


def grid_bins(p: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The bin (int64, same shape as `p`) of each probability on the grid whose inner edges, on the
    logit scale, are `edges` (B - 1,) increasing: bin b holds logits in [edges[b-1], edges[b]) (bin
    0 everything below edges[0], bin B - 1 everything from edges[-1] up, p = 0 and 1 included).
    Non-decreasing in p. `p` must be finite."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore"):  # p = 0 or 1: an infinite logit, in an end bin
        z = np.log(p) - np.log1p(-p)
    return np.searchsorted(np.asarray(edges, dtype=np.float64), z, side="right").astype(np.int64)


def uniform_edges(n_bins: int, logit_max: float) -> np.ndarray:
    """Inner edges (n_bins - 1,) of `n_bins` equal-width bins on logits in [-logit_max, logit_max]
    (the grid of `score_bins`; beyond it, the end bins)."""
    return np.linspace(-logit_max, logit_max, n_bins + 1)[1:-1]


def asinh_edges(n_bins: int, logit_max: float, scale: float = 1.0) -> np.ndarray:
    """Inner edges (n_bins - 1,) of `n_bins` (even) bins, symmetric about logit 0 (an edge) and
    equal-width in asinh(logit / scale) over +-logit_max (the end bins reach past it): about
    `scale` x 2 asinh(logit_max / scale) / n_bins wide near 0, growing geometrically beyond
    |logit| = scale. One grid resolves
    both a young model's logits (all within +-1) and an over-confident one's (+-10)."""
    if n_bins < 2 or n_bins % 2:
        raise ValueError(f"n_bins: {n_bins} must be even and >= 2 (the grid has an edge at p = 0.5)")
    u = np.linspace(0.0, math.asinh(logit_max / scale), n_bins // 2 + 1)[1:-1]
    half = scale * np.sinh(u)
    return np.concatenate([-half[::-1], [0.0], half])


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


# ----------------------------------------------------------------------------------------- survival


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


# ---------------------------------------------------------------------------------------- merging


def merge_counts(parts: list[Counts]) -> Counts:
    """Key-wise sums of `parts` (new arrays; the parts are left alone). Empty parts ({}: a site with
    no data) are skipped; {} when none is left. ValueError naming the key when the parts' keys or
    shapes differ."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    first = parts[0]
    for i, part in enumerate(parts[1:], start=1):
        if set(part) != set(first):
            diff = sorted(set(part) ^ set(first))
            raise ValueError(f"merge_counts: part {i} differs from part 0 in key(s) {', '.join(diff)}")
        for key in first:
            if np.shape(part[key]) != np.shape(first[key]):
                raise ValueError(f"merge_counts: '{key}' has shape {np.shape(part[key])} in part {i}, "
                                 f"{np.shape(first[key])} in part 0")
    # np.asarray: a sum of 0-d arrays is a numpy scalar, and counts are arrays.
    return {key: np.asarray(np.sum([np.asarray(p[key]) for p in parts], axis=0)) for key in first}


# The dense tasks' counts (privmed.tasks.segmentation, privmed.tasks.reconstruction): sums over
# volumes or slices, and how many; each *_sum has the shape of its *_n.
SEGMENTATION_KEYS = ("dice_sum", "dice_n", "fg_dice_sum", "fg_dice_n", "hd95_sum", "hd95_n", "loss_sum", "n", "volumes")
RECONSTRUCTION_KEYS = ("psnr_sum", "ssim_sum", "nmse_sum", "psnr_zf_sum", "ssim_zf_sum", "nmse_zf_sum",
                       "loss_sum", "n", "volumes")
_DENSE = {"dice_sum": SEGMENTATION_KEYS, "psnr_sum": RECONSTRUCTION_KEYS}


def _check_dense(c: Counts, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in c]
    if missing:
        raise ValueError(f"counts lack {', '.join(missing)} (have: {', '.join(sorted(c)) or 'none'})")
    for key in keys:
        n_key = key[: -len("_sum")] + "_n"
        if n_key in c:  # a per-class sum: the shape of its count
            want = np.shape(c[n_key])
        elif key.endswith("_n") and key[:-2] + "_sum" in c:
            continue
        else:
            want = ()
        if np.shape(c[key]) != want:
            raise ValueError(f"counts: '{key}' has shape {np.shape(c[key])}, expected {want}")


def check_counts(c: Counts) -> None:
    """ValueError saying what is wrong when `c` is not one task's counts with consistent shapes."""
    dense = next((keys for key, keys in _DENSE.items() if key in c), None)
    if dense is not None:
        return _check_dense(c, dense)
    keys = CLASSIFICATION_KEYS if "score_hist" in c else SURVIVAL_KEYS
    missing = [k for k in keys if k not in c]
    if missing:
        raise ValueError(f"counts lack {', '.join(missing)} (have: {', '.join(sorted(c)) or 'none'})")
    scalars = ("n", "loss_sum", "nonfinite") + (("events", "concordant", "comparable")
                                                if keys is SURVIVAL_KEYS else ())
    for key in scalars:
        if np.shape(c[key]) != ():
            raise ValueError(f"counts: '{key}' has shape {np.shape(c[key])}, expected a number")
    if keys is SURVIVAL_KEYS:
        return
    k = np.shape(c["confusion"])[0] if np.ndim(c["confusion"]) == 2 else -1
    if k < 2 or np.shape(c["confusion"]) != (k, k):
        raise ValueError(f"counts: 'confusion' has shape {np.shape(c['confusion'])}, expected (K, K)")
    hist = np.shape(c["score_hist"])
    if len(hist) != 3 or hist[:2] != (k, 2) or hist[2] < 1:
        raise ValueError(f"counts: 'score_hist' has shape {hist}, expected ({k}, 2, bins)")
    for key in ("rel_count", "rel_conf_sum", "rel_correct_sum"):
        if np.shape(c[key]) != (RELIABILITY_BINS,):
            raise ValueError(f"counts: '{key}' has shape {np.shape(c[key])}, "
                             f"expected ({RELIABILITY_BINS},)")


# ------------------------------------------------------------------------------------------ files


def save_counts(path: Path, counts_by_key: dict[str, Counts]) -> None:
    """Write the counts of each model (key: "global", a site name, ...) to one .npz, atomically; the
    arrays are stored as "MODELKEY/NAME". A model with empty counts ({}) is not stored."""
    from privmed.io import write_bytes

    arrays = {}
    for model, counts in counts_by_key.items():
        for name, value in counts.items():
            value = np.asarray(value)
            if "/" in name or value.dtype == object:
                raise ValueError(f"save_counts: {model}/{name}: a count is a numeric array with a "
                                 "name without '/'")
            arrays[f"{model}/{name}"] = value
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # the histograms are mostly zeros
    write_bytes(Path(path), buf.getvalue())


def load_counts(path: Path) -> dict[str, Counts]:
    """The counts save_counts wrote, by model key. RunDirError naming `path` when it cannot be read
    or a model's counts are inconsistent (`check_counts`)."""
    from privmed.errors import RunDirError

    out: dict[str, Counts] = {}
    try:
        with np.load(Path(path), allow_pickle=False) as z:
            for key in z.files:
                model, sep, name = key.rpartition("/")
                if not sep or not model:
                    raise ValueError(f"array '{key}' is not named MODEL/COUNT")
                out.setdefault(model, {})[name] = z[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise RunDirError(f"{path}: cannot read evaluation counts ({e})") from None
    for model, counts in out.items():
        try:
            check_counts(counts)
        except ValueError as e:
            raise RunDirError(f"{path}: {model}: {e}") from None
    return out


# ------------------------------------------------------------------------------- the private release
#
# What a site releases when the coordinator asks it to score a model: the counts above, made so
# that one patient of the scored split moves each released block by at most a known L2 norm, then
# noised by privmed.privacy.noisy_counts (the Gaussian mechanism; unit: one patient of the split,
# add/remove neighbouring). A patient with k items (slices, views) weighs 1/k on each; every
# per-patient quantity without a natural bound is clipped to a public one; a non-finite prediction
# is replaced by a fixed one (uniform probabilities, risk 0, image 0), so that no reply depends on
# whether a patient's prediction overflowed. Everything the coordinator (or the site's own metrics)
# computes from the release is post-processing of it.

PRIVATE_BINS = 32
PRIVATE_LOGIT_MAX = 12.0
PRIVATE_EDGES = asinh_edges(PRIVATE_BINS, PRIVATE_LOGIT_MAX, 1.0)
"""The score grid of the private release (the exact counts use SCORE_BINS = 8,192 bins): 32 bins
equal in asinh(logit) over +-12, inner edges at 0, +-0.20, +-0.41, +-0.63, ..., +-1.5, ..., +-6.6,
+-8.0, +-9.8 (the end bins hold the rest). Chosen by measurement on PneumoniaMNIST under DP-SGD
(benchmarks/noisy_scoring.py): the AUC's error from the noise grows with the bins where the scores
are, its error from rounding falls. On the final model (logits up to +-11) equal-width grids of
12-16 bins over +-12 did about as well; on the early rounds' models (every logit within 1-3) they
moved the AUC by up to 0.13-0.25, this grid by at most 0.07."""
LOSS_MAX = 8.0
"""nats: each item's cross-entropy is clipped here before it is summed (p of the true class below
3.4e-4 counts as 3.4e-4) in the private release, so that one patient moves loss_sum by <= 8."""
CLASSIFICATION_SHARES = {"score_hist": 0.9, "rel": 0.05, "loss_sum": 0.05}
"""Binary: of the squared sensitivity, 0.9 to the score histogram (the AUC, the ROC, and the
confusion matrix and n, both read from it: the grid has a bin edge at p = 0.5), 0.05 to the
reliability sums and 0.05 to the loss."""
MULTICLASS_SHARES = {"score_hist": 0.75, "confusion": 0.1, "rel": 0.1, "loss_sum": 0.05}
SURVIVAL_SHARES = {"pairs": 0.8, "n": 0.1, "events": 0.1}
"""Survival: 0.8 to the concordant and comparable pairs (the c-index), 0.1 each to n and events.
The Cox loss is not released (one patient enters every risk set it is in: its sensitivity grows
with the split's size times the risk's range, and the noise would drown it): loss_sum is NaN."""


def safe_probabilities(probs: np.ndarray) -> np.ndarray:
    """(N, K) float64 `probs` with every row that holds a non-finite value replaced by 1/K, and
    every value clipped to [0, 1]: what the private release scores, so that an overflow is not a
    reply."""
    probs = np.asarray(probs, dtype=np.float64)
    bad = ~np.isfinite(probs).all(axis=1)
    out = np.clip(np.where(bad[:, None], 1.0 / probs.shape[1], probs), 0.0, 1.0)
    return out


def private_classification_counts(probs: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                                  edges: np.ndarray = PRIVATE_EDGES) -> tuple[Counts, list[Block]]:
    """The blocks a site releases for `probs` (N, K) with `labels` (N,) and item `weights` (N,)
    (`patient_weights`) on the score grid `edges` (`grid_bins`; K = 2: symmetric about logit 0,
    with 0 an edge), exact, and how far one patient can move each (the Block's bound):

    score_hist: K = 2: (2, B), the histogram of p_1 (counts' score_hist[1]); one patient adds
        weights summing to 1 to its cells: L2 <= 1. K > 2: (K, 2, B); one patient adds 1 to
        one cell of each class's slice: L2 <= sqrt(K).
    confusion (K > 2): (K, K); L2 <= 1.
    rel: (3, 15), rel_count, rel_conf_sum, rel_correct_sum; a patient adds (1, conf, correct) to one
        bin (weights summing to 1 over its items): L2 <= sqrt(3).
    loss_sum: the cross-entropy clipped at LOSS_MAX per item: <= LOSS_MAX.
    Shares: CLASSIFICATION_SHARES (K = 2), MULTICLASS_SHARES."""
    probs = safe_probabilities(probs)
    k = probs.shape[1]
    edges = np.asarray(edges, dtype=np.float64)
    if k == 2 and not (len(edges) % 2 and np.array_equal(edges, -edges[::-1])):
        raise ValueError("edges: a binary release's score grid must be symmetric about logit 0, "
                         "with 0 an edge (the class-0 histogram and the confusion matrix are read "
                         "from it)")
    c = classification_counts(probs, labels, edges=edges, weights=weights, loss_max=LOSS_MAX)
    rel = np.stack([c["rel_count"], c["rel_conf_sum"], c["rel_correct_sum"]])
    if k == 2:
        released = {"score_hist": c["score_hist"][1], "rel": rel, "loss_sum": c["loss_sum"]}
        bounds, shares = {"score_hist": 1.0}, CLASSIFICATION_SHARES
    else:
        released = {"score_hist": c["score_hist"], "confusion": c["confusion"], "rel": rel,
                    "loss_sum": c["loss_sum"]}
        bounds, shares = {"score_hist": math.sqrt(k), "confusion": 1.0}, MULTICLASS_SHARES
    bounds |= {"rel": math.sqrt(3.0), "loss_sum": LOSS_MAX}
    return released, [Block(key, bounds[key], shares[key]) for key in released]


def classification_from_release(r: Counts) -> Counts:
    """The counts (CLASSIFICATION_KEYS, float64) of a released `private_classification_counts`.
    K = 2: score_hist[0] is score_hist[1] mirrored (p_0 = 1 - p_1 falls in the mirror bin, and the
    classes swap), the confusion matrix is read from score_hist[1] on each side of p = 0.5, n is its
    total. K > 2: n is the confusion matrix's total. nonfinite is 0: non-finite predictions were
    scored as uniform (`safe_probabilities`)."""
    hist = r["score_hist"]
    if hist.ndim == 2:
        half = hist.shape[1] // 2
        hist = np.stack([hist[::-1, ::-1], hist])
        confusion = np.array([[hist[1, 0, :half].sum(), hist[1, 0, half:].sum()],
                              [hist[1, 1, :half].sum(), hist[1, 1, half:].sum()]])
    else:
        confusion = r["confusion"]
    return {
        "n": np.asarray(confusion.sum(), dtype=np.float64),
        "loss_sum": np.asarray(r["loss_sum"], dtype=np.float64),
        "confusion": confusion,
        "score_hist": hist,
        "nonfinite": np.asarray(0.0),
        "rel_count": r["rel"][0],
        "rel_conf_sum": r["rel"][1],
        "rel_correct_sum": r["rel"][2],
    }


def private_survival_counts(risk: np.ndarray, time, event, patient: np.ndarray | None,
                            max_patients: int | None = None) -> tuple[Counts, list[Block]]:
    """The blocks a site releases for risks `risk` (N,) with `time` and `event` (N,), exact, and
    their bounds. A patient with several items is one: its mean risk (non-finite risks count as 0),
    the time and event of its first item. `max_patients` is a public upper bound on the split's
    patients (default: how many it has, which a site's facts publish); adding or removing one
    patient changes at most max_patients - 1 comparable pairs and as many concordant ones:

    pairs: (2,) [concordant, comparable]: L2 <= sqrt(2) (max_patients - 1);
    n, events: L2 <= 1 each.
    Shares: SURVIVAL_SHARES."""
    risk = np.asarray(risk, dtype=np.float64).reshape(-1)
    risk = np.where(np.isfinite(risk), risk, 0.0)
    time = np.asarray(time, dtype=np.float64).reshape(-1)
    event = np.asarray(event).reshape(-1).astype(np.float64)
    if patient is not None:
        _, first, inverse = np.unique(np.asarray(patient), return_index=True, return_inverse=True)
        risk = np.bincount(inverse.reshape(-1), weights=risk) / np.bincount(inverse.reshape(-1))
        time, event = time[first], event[first]
    m = len(risk) if max_patients is None else int(max_patients)
    if len(risk) > m:
        raise ValueError(f"max_patients: {m} is below the split's {len(risk)} patients")
    c = survival_counts(risk, time, event)
    released = {"pairs": np.array([float(c["concordant"]), float(c["comparable"])]),
                "n": np.asarray(float(c["n"])), "events": np.asarray(float(c["events"]))}
    bounds = {"pairs": math.sqrt(2.0) * max(m - 1, 1), "n": 1.0, "events": 1.0}
    return released, [Block(key, bounds[key], SURVIVAL_SHARES[key]) for key in released]


def survival_from_release(r: Counts) -> Counts:
    """The counts (SURVIVAL_KEYS, float64) of a released `private_survival_counts`; loss_sum NaN."""
    return {"n": r["n"], "events": r["events"], "loss_sum": np.asarray(math.nan),
            "concordant": np.asarray(r["pairs"][0]), "comparable": np.asarray(r["pairs"][1]),
            "nonfinite": np.asarray(0.0)}


def noisy_counts(task, pred: np.ndarray, data, noise_multiplier: float, rng: np.random.Generator, *,
                 edges: np.ndarray = PRIVATE_EDGES, max_patients: int | None = None) -> Counts:
    """The counts a site releases for the task's predictions `pred` on `data` (an ImageSet): the
    task's counts keys, float64, made per patient bounded (`private_*_counts`) and noised by the
    Gaussian mechanism at `noise_multiplier` times its sensitivity (privmed.privacy.noisy_counts;
    one release = Release(noise_multiplier, 1.0, 1) on this split), noise drawn from `rng` only.
    {} for empty data (nothing is released). `edges`: the classification score grid (any grid
    fixed before the data is seen, e.g. one the request carries; `grid_bins`); `max_patients`:
    survival's public bound on the split's patients. noise_multiplier 0 gives the bounded counts
    without noise (for tests; a site refuses it)."""
    if len(data) == 0:
        return {}
    released, blocks, assemble = private_release(task, pred, data, edges, max_patients)
    return assemble(gaussian_release(released, blocks, noise_multiplier, rng))


def noisy_metrics_and_counts(task, pred: np.ndarray, data, noise_multiplier: float,
                             rng: np.random.Generator, **options) -> tuple[dict, Counts]:
    """(metrics, counts) as tasks.base.metrics_and_counts gives them, but both from the release:
    the counts are `noisy_counts`, the metrics the task's metrics_from_counts of them. What a site
    returns for a scoring request."""
    counts = noisy_counts(task, pred, data, noise_multiplier, rng, **options)
    return task.metrics_from_counts(counts), counts


def release_blocks(task, pred: np.ndarray, data, *, edges: np.ndarray = PRIVATE_EDGES,
                   max_patients: int | None = None) -> list[Block]:
    """The blocks (keys, bounds, shares) `noisy_counts` releases for `task` on `data`."""
    return private_release(task, pred, data, edges, max_patients)[1]


def private_release(task, pred: np.ndarray, data, edges: np.ndarray = PRIVATE_EDGES,
                    max_patients: int | None = None) -> tuple[Counts, list[Block], Callable[[Counts], Counts]]:
    """(the exact blocks `noisy_counts` releases, their Blocks, the function from the noisy blocks
    to the task's Counts): noisy_counts is assemble(gaussian_release(blocks..., rng)). For
    benchmarks that draw many releases of one prediction."""
    name = task.name
    if name in ("classification", "tabular-classification"):
        weights = patient_weights(data.patient, len(data))
        return (*private_classification_counts(pred, data.labels, weights, edges),
                classification_from_release)
    if name == "survival":
        if data.time is None:
            raise ValueError("task: 'survival' needs survival times, and this data has none")
        return (*private_survival_counts(pred, data.time, data.labels, data.patient, max_patients),
                survival_from_release)
    if name == "segmentation":
        from privmed.tasks.segmentation import private_segmentation_counts, segmentation_from_release

        return (*private_segmentation_counts(pred, task.target(data), data.patient_ids()),
                segmentation_from_release)
    if name == "reconstruction":
        from privmed.tasks.reconstruction import private_reconstruction_counts, reconstruction_from_release

        return (*private_reconstruction_counts(pred, task.target(data), data.images, data.patient_ids()),
                reconstruction_from_release)
    raise ValueError(f"noisy_counts: no private release for task '{name}'")

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

import numpy as np

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


def classification_counts(probs: np.ndarray, labels: np.ndarray, n_bins: int = SCORE_BINS) -> Counts:
    """Counts of one set's predictions `probs` (N, K) (rows of class probabilities) with `labels`
    (N,) ints in 0..K-1:

    n (int64), loss_sum (float64: sum of -log clip(p_true, 1e-12), nats),
    confusion (K, K) int64 [true class, predicted class (argmax)],
    score_hist (K, 2, n_bins) int64: [k, 1, b] = patients of class k whose p_k is in bin b of the
        grid (`score_bins`), [k, 0, b] = patients of any other class whose p_k is there (what
        one-vs-rest AUCs and ROC curves need, and K times smaller than per class pair),
    nonfinite (int64: patients with a non-finite probability; they are left out of score_hist),
    rel_count (15,) int64, rel_conf_sum (15,) and rel_correct_sum (15,) float64: patients, summed
        top-label confidence and correct predictions per confidence bin of `reliability_bins`.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if probs.ndim != 2 or probs.shape[0] != len(labels) or probs.shape[1] < 2:
        raise ValueError(f"classification_counts: probs must be (N, K) with K >= 2 and N = "
                         f"{len(labels)} labels, got {probs.shape}")
    n, k = probs.shape
    if n and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"classification_counts: labels must lie in 0..{k - 1}")
    pred = probs.argmax(axis=1)
    p_true = np.clip(probs[np.arange(n), labels], 1e-12, 1.0)
    finite = np.isfinite(probs).all(axis=1)
    hist = np.zeros((k, 2, n_bins), dtype=np.int64)
    bins = score_bins(probs[finite], n_bins)  # (N_finite, K)
    for cls in range(k):
        np.add.at(hist, (cls, (labels[finite] == cls).astype(np.int64), bins[:, cls]), 1)
    rel_count, rel_conf, rel_correct = _reliability_sums(probs, labels)
    return {
        "n": np.asarray(n, dtype=np.int64),
        "loss_sum": np.asarray(-np.sum(np.log(p_true)), dtype=np.float64),
        "confusion": np.bincount(labels * k + pred, minlength=k * k).reshape(k, k).astype(np.int64),
        "score_hist": hist,
        "nonfinite": np.asarray(n - int(finite.sum()), dtype=np.int64),
        "rel_count": rel_count,
        "rel_conf_sum": rel_conf,
        "rel_correct_sum": rel_correct,
    }


def _reliability_sums(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, ...]:
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    # The binning of classification.reliability_bins: bin i holds confidences in (i/n, (i+1)/n].
    # A NaN confidence (a diverged model) goes to bin 0, as it does there.
    ceil = np.where(np.isnan(conf), 0.0, np.ceil(conf * RELIABILITY_BINS))
    idx = np.clip(ceil.astype(int) - 1, 0, RELIABILITY_BINS - 1)
    return (np.bincount(idx, minlength=RELIABILITY_BINS).astype(np.int64),
            np.bincount(idx, weights=conf, minlength=RELIABILITY_BINS).astype(np.float64),
            np.bincount(idx, weights=correct, minlength=RELIABILITY_BINS).astype(np.float64))


def classification_metrics_from_counts(c: Counts) -> dict:
    """The keys and types of `classification_metrics` (auc, accuracy, balanced_accuracy, ece, loss:
    floats; n: int) from counts, merged or not. All but the AUC equal `classification_metrics` on the
    pooled predictions; the AUC is that of the scores rounded to the grid (`score_bins`), within
    `auc_rounding_bound(c)` of the exact one. NaN AUC with one class present or any non-finite
    probability; every metric NaN when n is 0."""
    check_counts(c)
    n = int(c["n"])
    if n == 0:
        nan = math.nan
        return {"auc": nan, "accuracy": nan, "balanced_accuracy": nan, "ece": nan, "loss": nan, "n": 0}
    confusion = c["confusion"]
    true_n = confusion.sum(axis=1)
    present = true_n > 0
    recall = np.diag(confusion)[present] / true_n[present]
    conf, acc, count = reliability_from_counts(c)
    seen = count > 0
    return {
        "auc": _auc(c),
        "accuracy": float(np.trace(confusion) / n),
        "balanced_accuracy": float(np.mean(recall)),
        "ece": float(np.sum(count[seen] / count.sum() * np.abs(acc[seen] - conf[seen]))),
        "loss": float(c["loss_sum"] / n),
        "n": n,
    }


def _auc(c: Counts) -> float:
    """Binary: the AUC of p_1; K > 2: the mean one-vs-rest AUC over the classes present (as
    classification.roc_auc)."""
    present = np.flatnonzero(c["confusion"].sum(axis=1) > 0)
    if len(present) < 2 or int(c["nonfinite"]) > 0:
        return math.nan
    k = c["confusion"].shape[0]
    classes = [1] if k == 2 else present
    return float(np.mean([_auc_one(*_pos_neg(c, cls)) for cls in classes]))


def one_vs_rest_auc(c: Counts, k: int) -> float:
    """The AUC of p_k for class `k` against the rest, on the scores rounded to the grid; NaN when
    class k or the rest has no patient."""
    check_counts(c)
    pos, neg = _pos_neg(c, k)
    return _auc_one(pos, neg) if pos.sum() > 0 and neg.sum() > 0 else math.nan


def _pos_neg(c: Counts, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per grid bin of p_k: patients of class k, and of every other class."""
    hist = c["score_hist"][k]
    return hist[1], hist[0]


def _auc_one(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC = sum_b pos[b] (neg below b + neg[b] / 2) / (P N): each positive-negative pair counts 1
    when the positive's bin is higher, 1/2 when they share a bin."""
    pos, neg = pos.astype(np.float64), neg.astype(np.float64)
    below = np.cumsum(neg) - neg
    return float(np.sum(pos * (below + 0.5 * neg)) / (pos.sum() * neg.sum()))


def auc_rounding_bound(c: Counts, k: int | None = None) -> float:
    """The most rounding to the grid can have moved the AUC from that of the unrounded scores: only
    a positive and a negative in the same bin can be ordered differently, and each such pair counts
    1/2 instead of 0, 1/2 or 1, so |AUC - exact AUC| <= sum_b pos[b] neg[b] / (2 P N). For the AUC
    of the metrics (k None; K > 2: the mean of the bound over the classes averaged), or for class
    `k` against the rest (`one_vs_rest_auc`). NaN where that AUC is NaN."""
    check_counts(c)
    if k is None:
        present = np.flatnonzero(c["confusion"].sum(axis=1) > 0)
        if len(present) < 2 or int(c["nonfinite"]) > 0:
            return math.nan
        classes = [1] if c["confusion"].shape[0] == 2 else present
    else:
        classes = [k]
    bounds = []
    for cls in classes:
        pos, neg = (a.astype(np.float64) for a in _pos_neg(c, cls))
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
    pos, neg = _pos_neg(c, k)
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
    the pooled predictions: empty bins have count 0 and NaN means."""
    check_counts(c)
    count = c["rel_count"].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return c["rel_conf_sum"] / count, c["rel_correct_sum"] / count, count


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
    NaN without comparable pairs or with a non-finite risk; loss NaN without events."""
    check_counts(c)
    comparable, events = int(c["comparable"]), int(c["events"])
    ok = comparable > 0 and int(c["nonfinite"]) == 0
    return {
        "c_index": float(c["concordant"] / comparable) if ok else math.nan,
        "loss": float(c["loss_sum"]) / events if events > 0 else math.nan,
        "n": int(c["n"]),
        "events": events,
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

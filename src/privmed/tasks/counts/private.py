"""The private release: what a site releases when the coordinator asks it to score a model."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from privmed.privacy.noisy_counts import Block, gaussian_release, patient_weights
from privmed.tasks.counts.classification import classification_counts
from privmed.tasks.counts.grid import asinh_edges
from privmed.tasks.counts.schema import Counts
from privmed.tasks.counts.survival import survival_counts

# What a site releases when the coordinator asks it to score a model: the exact counts, made so
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

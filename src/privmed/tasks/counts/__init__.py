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

What a site releases to the coordinator goes through the private release instead (`private`): the same keys, per patient bounded and noised by the Gaussian mechanism
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

One module per job, all re-exported here: `schema` (the keys, `check_counts`), `grid` (the score
grids), `classification` and `survival` (counts and the metrics from them), `merge`, `files` (the
.npz) and `private` (the private release).
"""

from __future__ import annotations

from privmed.tasks.counts.schema import (
    CLASSIFICATION_KEYS,
    RECONSTRUCTION_KEYS,
    RELIABILITY_BINS,
    SEGMENTATION_KEYS,
    SURVIVAL_KEYS,
    Counts,
    check_counts,
)
from privmed.tasks.counts.grid import LOGIT_MAX, SCORE_BINS, asinh_edges, grid_bins, score_bins, uniform_edges
from privmed.tasks.counts.classification import (
    auc_rounding_bound,
    classification_counts,
    classification_metrics_from_counts,
    one_vs_rest_auc,
    reliability_from_counts,
    roc_from_counts,
)
from privmed.tasks.counts.survival import survival_counts, survival_metrics_from_counts
from privmed.tasks.counts.merge import merge_counts
from privmed.tasks.counts.files import load_counts, save_counts
from privmed.tasks.counts.private import (
    CLASSIFICATION_SHARES,
    LOSS_MAX,
    MULTICLASS_SHARES,
    PRIVATE_BINS,
    PRIVATE_EDGES,
    PRIVATE_LOGIT_MAX,
    SURVIVAL_SHARES,
    classification_from_release,
    noisy_counts,
    noisy_metrics_and_counts,
    private_classification_counts,
    private_release,
    private_survival_counts,
    release_blocks,
    safe_probabilities,
    survival_from_release,
)

__all__ = [
    "CLASSIFICATION_KEYS", "CLASSIFICATION_SHARES", "LOGIT_MAX", "LOSS_MAX", "MULTICLASS_SHARES",
    "PRIVATE_BINS", "PRIVATE_EDGES", "PRIVATE_LOGIT_MAX", "RECONSTRUCTION_KEYS", "RELIABILITY_BINS",
    "SCORE_BINS", "SEGMENTATION_KEYS", "SURVIVAL_KEYS", "SURVIVAL_SHARES", "Counts", "asinh_edges",
    "auc_rounding_bound", "check_counts", "classification_counts", "classification_from_release",
    "classification_metrics_from_counts", "grid_bins", "load_counts", "merge_counts", "noisy_counts",
    "noisy_metrics_and_counts", "one_vs_rest_auc", "private_classification_counts", "private_release",
    "private_survival_counts", "release_blocks", "reliability_from_counts", "roc_from_counts",
    "safe_probabilities", "save_counts", "score_bins", "survival_counts", "survival_from_release",
    "survival_metrics_from_counts", "uniform_edges",
]

"""What a task is to the rest of privmed: how its targets are read, its loss, what the model's output
means (predictions), and how predictions are scored.

    task = get_task(cfg.task)
    y = task.targets(images)                      # tensor the loss compares the output with
    loss = task.criterion()(model(x), y[idx])      # a mean over the batch's patients
    pred = task.predict(model(x))                  # probabilities (N, K) or risks (N,)
    task.metrics(pred.numpy(), images)             # {"auc", ...} or {"c_index", ...}
    c = task.counts(pred.numpy(), images)          # sums a site can report (tasks/counts.py)
    task.metrics_from_counts(merge_counts([c, ...]))  # the same keys, from the sites' counts

Tasks: "classification" (images, K classes), "tabular-classification" (feature tables; a binary
label is one logit, logistic regression as FLamby does), "survival" (one risk score per patient,
Cox partial likelihood, concordance index).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from privmed.data.base import ImageSet, SourceData
from privmed.errors import ConfigError, unknown_name
from privmed.tasks.classification import classification_metrics
from privmed.tasks.counts import (
    classification_counts,
    classification_metrics_from_counts,
    survival_counts,
    survival_metrics_from_counts,
)


REDUCTIONS = ("mean", "sum", "none")


class ClassificationLoss(nn.Module):
    """Cross-entropy (nats) on (B, K) logits and (B,) int64 labels; with one logit (B, 1), binary
    cross-entropy of the positive class (labels 0/1). `reduction` as torch's losses: "mean" (a
    scalar, the default, as the optimizers and Opacus' per-sample scaling assume), "sum" (a scalar)
    or "none" (the (B,) per-patient losses). It is a plain attribute: Opacus' ghost clipping sets it
    to "none" to read the per-patient losses."""

    per_sample = True  # each patient's loss depends on that patient alone: DP-SGD can clip it

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"reduction: '{reduction}' is not a loss reduction (allowed: 'mean', 'sum', 'none')"
            )
        self.reduction = reduction

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if out.shape[1] == 1:
            return F.binary_cross_entropy_with_logits(
                out[:, 0], y.to(out.dtype), reduction=self.reduction
            )
        return F.cross_entropy(out, y, reduction=self.reduction)


def class_probabilities(out: torch.Tensor) -> torch.Tensor:
    """(B, K) probabilities from (B, K) logits, or from one logit (B, 1) as [1 - p, p]."""
    if out.shape[1] == 1:
        p = torch.sigmoid(out[:, 0])
        return torch.stack([1 - p, p], dim=1)
    return F.softmax(out, dim=1)


class Classification:
    name = "classification"
    headline = "auc"  # the metric progress bars and tables lead with
    prediction = "probs"  # predictions.npz key prefix
    per_sample = True  # the loss is a mean of per-patient terms: DP-SGD applies

    def n_outputs(self, source: SourceData) -> int:
        return source.n_classes

    def targets(self, data: ImageSet) -> torch.Tensor:
        return torch.from_numpy(data.labels.astype(np.int64))

    def criterion(self) -> nn.Module:
        return ClassificationLoss()

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        return class_probabilities(out)

    def metrics(self, pred: np.ndarray, data: ImageSet) -> dict:
        if len(data) == 0:
            return {}
        return classification_metrics(pred.astype(np.float64), data.labels)

    def counts(self, pred: np.ndarray, data: ImageSet) -> dict:
        """Evaluation counts of probabilities `pred` (N, K) on `data` (tasks.counts); {} when empty."""
        if len(data) == 0:
            return {}
        return classification_counts(pred.astype(np.float64), data.labels)

    def metrics_from_counts(self, c: dict) -> dict:
        """The keys of `metrics` from (merged) counts; {} from {}. AUC: scores rounded to the grid."""
        return classification_metrics_from_counts(c) if c else {}

    def selection_score(self, metrics: dict) -> float:
        """Higher is better; NaN when there is nothing to choose on."""
        if not metrics:
            return math.nan
        return metrics["auc"] if not math.isnan(metrics["auc"]) else -metrics["loss"]


class TabularClassification(Classification):
    name = "tabular-classification"

    def n_outputs(self, source: SourceData) -> int:
        return 1 if source.n_classes == 2 else source.n_classes


class Survival:
    name = "survival"
    headline = "c_index"
    prediction = "risk"
    per_sample = False  # the Cox partial likelihood couples the patients at risk

    def n_outputs(self, source: SourceData) -> int:
        return 1

    def targets(self, data: ImageSet) -> torch.Tensor:
        if data.time is None:
            raise ConfigError("task: 'survival' needs survival times, and this data has none")
        return torch.from_numpy(np.stack([data.time, data.labels], axis=1).astype(np.float32))

    def criterion(self) -> nn.Module:
        from privmed.tasks.survival import CoxLoss

        return CoxLoss()

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        return out[:, 0]

    def metrics(self, pred: np.ndarray, data: ImageSet) -> dict:
        from privmed.tasks.survival import survival_metrics

        if len(data) == 0:
            return {}
        return survival_metrics(pred.astype(np.float64), data.time, data.labels)

    def counts(self, pred: np.ndarray, data: ImageSet) -> dict:
        """Evaluation counts of risks `pred` (N,) on `data` (tasks.counts); {} when empty."""
        if len(data) == 0:
            return {}
        if data.time is None:
            raise ConfigError("task: 'survival' needs survival times, and this data has none")
        return survival_counts(pred.astype(np.float64), data.time, data.labels)

    def metrics_from_counts(self, c: dict) -> dict:
        """The keys of `metrics` from counts; {} from {}. Merged over sites: the c-index over
        within-site pairs and the Cox loss with risk sets stratified by site."""
        return survival_metrics_from_counts(c) if c else {}

    def selection_score(self, metrics: dict) -> float:
        if not metrics:
            return math.nan
        c = metrics["c_index"]
        return c if not math.isnan(c) else -metrics["loss"]


Task = Classification | Survival
_TASKS = {t.name: t for t in (Classification(), TabularClassification(), Survival())}


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise ConfigError(unknown_name("task", "task", name, _TASKS))
    return _TASKS[name]

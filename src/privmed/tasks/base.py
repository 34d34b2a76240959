"""What a task is to the rest of privmed: how its targets are read, its loss, what the model's output
means (predictions), and how predictions are scored.

    task = get_task(cfg.task)
    y = task.targets(images)                      # tensor the loss compares the output with
    loss = task.criterion()(model(x), y[idx])      # a mean over the batch's patients
    pred = task.predict(model(x))                  # probabilities (N, K) or risks (N,)
    task.metrics(pred.numpy(), images)             # {"auc", ...} or {"c_index", ...}
    c = task.counts(pred.numpy(), images)          # sums a site can report (tasks/counts/)
    task.metrics_from_counts(merge_counts([c, ...]))  # the same keys, from the sites' counts

Tasks: "classification" (images, K classes), "tabular-classification" (feature tables; a binary
label is one logit, logistic regression as FLamby does), "survival" (one risk score per patient,
Cox partial likelihood, concordance index), "segmentation" (a class per pixel, Dice plus
cross-entropy; tasks/segmentation.py) and "reconstruction" (an image from undersampled k-space;
tasks/reconstruction.py). The last two are dense: their targets are `ImageSet.target`, not labels.

A task's attributes the rest of privmed reads: `headline` (the metric bars and tables lead with),
`prediction` (predictions.npz key prefix), `per_sample` (DP-SGD applies), `dense` (targets are
images; no class per item, so no label shares, logit adjustment or label-based partition), and
`augment` (whether the random-shift augmentation may move the input alone).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from privmed.data.base import ImageSet, SourceData
from privmed import catalog
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
    dense = False
    augment = True

    def stored(self, pred: np.ndarray, target: bool = False) -> np.ndarray:
        """What predictions.npz keeps of predictions `pred`."""
        return pred.astype(np.float32)

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
    dense = False
    augment = False

    def stored(self, pred: np.ndarray, target: bool = False) -> np.ndarray:
        return pred.astype(np.float32)

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


class DenseTask:
    """A prediction per pixel, scored per patient (volume): what segmentation and reconstruction
    share. A subclass gives `_counts` and `_metrics`; the sums leave a site, never a slice."""

    name = ""
    headline = ""
    per_sample = True
    dense = True
    augment = False  # a shift would move the image and not its target (or, for k-space, no shift at all)

    def target(self, data: ImageSet) -> np.ndarray:
        if data.target is None:
            raise ConfigError(f"task: '{self.name}' needs a target image per item, and this data has none "
                              "(sources with them: ixi, nifti, phantom with data.volumes)")
        return data.target

    def counts(self, pred: np.ndarray, data: ImageSet) -> dict:
        return self._counts(pred, data) if len(data) else {}

    def metrics_from_counts(self, c: dict) -> dict:
        return self._metrics(c) if c else {}

    def metrics(self, pred: np.ndarray, data: ImageSet) -> dict:
        return self.metrics_from_counts(self.counts(pred, data))

    def selection_score(self, metrics: dict) -> float:
        if not metrics:
            return math.nan
        return metrics[self.headline] if not math.isnan(metrics[self.headline]) else -metrics["loss"]

    def _counts(self, pred: np.ndarray, data: ImageSet) -> dict:
        raise NotImplementedError

    def _metrics(self, c: dict) -> dict:
        raise NotImplementedError


class Segmentation(DenseTask):
    """A class per pixel: (B, K, H, W) logits against (B, H, W) class maps, or per voxel of 3D
    patches, (B, K, D, H, W) against (B, D, H, W) (tasks/segmentation.py)."""

    name = "segmentation"
    headline = "dice"
    prediction = "mask"

    def __init__(self) -> None:
        self.class_names: tuple[str, ...] = ()
        self.spacing_mm: float | None = None

    def n_outputs(self, source: SourceData) -> int:
        return source.n_classes

    def targets(self, data: ImageSet) -> torch.Tensor:
        return torch.from_numpy(self.target(data).astype(np.int64))

    def criterion(self) -> nn.Module:
        from privmed.tasks.segmentation import DiceCELoss

        return DiceCELoss()

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        return F.softmax(out, dim=1)

    def stored(self, pred: np.ndarray, target: bool = False) -> np.ndarray:
        """The predicted class map (N, H, W) uint8, not the (N, K, H, W) probabilities (3D patches:
        (N, D, H, W)); a target (`target` True, already a class map) as uint8."""
        return (pred if target else pred.argmax(axis=1)).astype(np.uint8)

    def examples(self, data: ImageSet, k: int = 4) -> np.ndarray:
        """Up to `k` item indices to show: of each of the first `k` patients, the slice (3D: the
        patch) where the last class (the smallest structure: ventricles) covers most. The report
        draws a patch by its slice where that class covers most (report.plots.dense_examples)."""
        target = self.target(data)
        patients = data.patient_ids()
        cover = (target == target.max(initial=0)).reshape(len(target), -1).sum(axis=1)
        out = []
        for p in list(dict.fromkeys(patients.tolist()))[:k]:
            rows = np.flatnonzero(patients == p)
            out.append(rows[np.argmax(cover[rows])])
        return np.asarray(out, dtype=np.int64)

    def shown_input(self, images: np.ndarray) -> np.ndarray:
        """What the report draws of input `images`: the images themselves."""
        return images.astype(np.float32)

    def _counts(self, pred: np.ndarray, data: ImageSet) -> dict:
        from privmed.tasks.segmentation import segmentation_counts

        return segmentation_counts(pred, self.target(data), data.patient_ids())

    def _metrics(self, c: dict) -> dict:
        from privmed.tasks.segmentation import segmentation_metrics_from_counts

        names = self.class_names or ("background", *(f"class{i}" for i in range(1, len(c["dice_sum"]) + 1)))
        return segmentation_metrics_from_counts(c, names, self.spacing_mm)

    def for_data(self, data: object) -> "Segmentation":
        """A copy that names `data`'s classes in its metrics and gives HD95 in mm where `data`
        (DataFacts or SourceData) knows the pixel side."""
        task = type(self)()
        task.class_names = tuple(getattr(data, "class_names", ()) or ())
        task.spacing_mm = getattr(data, "spacing_mm", None)
        return task


class Reconstruction(DenseTask):
    """An image from undersampled k-space: packed k-space (B, 3, H, W) in, (B, 1, H, W) magnitude
    out, L1 loss per item (tasks/reconstruction.py, tasks/recon_metrics.py)."""

    name = "reconstruction"
    headline = "psnr"
    prediction = "image"

    def n_outputs(self, source: SourceData) -> int:
        return 1

    def targets(self, data: ImageSet) -> torch.Tensor:
        return torch.from_numpy(self.target(data).astype(np.float32))

    def criterion(self) -> nn.Module:
        from privmed.tasks.recon_metrics import ReconLoss

        return ReconLoss("l1")

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def stored(self, pred: np.ndarray, target: bool = False) -> np.ndarray:
        """Images as float16 (their [0, 1] range needs no more)."""
        return pred.astype(np.float16)

    def _counts(self, pred: np.ndarray, data: ImageSet) -> dict:
        from privmed.tasks.reconstruction import reconstruction_counts

        return reconstruction_counts(pred, self.target(data), data.images, data.patient_ids())

    def _metrics(self, c: dict) -> dict:
        from privmed.tasks.reconstruction import reconstruction_metrics_from_counts

        return reconstruction_metrics_from_counts(c)

    def examples(self, data: ImageSet, k: int = 4) -> np.ndarray:
        """The middle slice of each of the first `k` patients."""
        patients = data.patient_ids()
        out = []
        for p in list(dict.fromkeys(patients.tolist()))[:k]:
            rows = np.flatnonzero(patients == p)
            out.append(rows[len(rows) // 2])
        return np.asarray(out, dtype=np.int64)

    def shown_input(self, images: np.ndarray) -> np.ndarray:
        """The zero-filled reconstruction of the packed k-space: what the measurement alone gives."""
        from privmed.tasks.reconstruction import zero_filled_images

        return zero_filled_images(images)


Task = Classification | Survival | Segmentation | Reconstruction
# Every task the catalog lists (privmed.catalog.TASKS), by name: each names a class of this module.
_TASKS = {t.name: catalog.load(t.impl)() for t in catalog.TASKS}


def metrics_and_counts(task: Task, pred: np.ndarray, data: ImageSet) -> tuple[dict, dict]:
    """(metrics, counts) of predictions `pred` on `data`. A dense task's metrics are its counts'
    (per-volume sums), so they are computed once: SSIM and HD95 are most of a round's scoring.
    The others' exact metrics (AUC from the scores themselves) differ from their counts'."""
    counts = task.counts(pred, data)
    return (task.metrics_from_counts(counts) if task.dense else task.metrics(pred, data)), counts


def get_task(name: str, data: object | None = None) -> Task:
    """The task `name`; given the data's facts (DataFacts or SourceData), one whose metrics name
    its classes (segmentation)."""
    if name not in _TASKS:
        raise ConfigError(unknown_name("task", "task", name, _TASKS))
    task = _TASKS[name]
    for_data = getattr(task, "for_data", None)
    return for_data(data) if for_data is not None and data is not None else task

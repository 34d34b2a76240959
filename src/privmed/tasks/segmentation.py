"""Segmentation: a class per pixel. Dice plus cross-entropy loss (MONAI's DiceLoss, per patient),
Dice and the 95% Hausdorff distance per class (MONAI's metrics), and the sums a site reports.

Shapes: logits (B, K, H, W); targets and predicted masks (B, H, W) int64 class maps, 0 the
background. Items are 2D slices; a volume's slices share its patient id. Items may also be 3D
patches (nifti's data.patch): logits (B, K, D, H, W), class maps (B, D, H, W); a volume's patches
share its patient id, and every figure below holds with "patch" for "slice", except HD95 (below).

How the figures are made, so that they mean the same at every site and pooled:
- Dice of a class, per volume: 2 |P ∩ T| / (|P| + |T|) over all the volume's slices (the volume is
  the unit, as in FLamby's Fed-IXI and the Decathlon); a class absent from both the prediction and
  the target of a volume gives no figure for it. The headline `dice` is the mean over foreground
  classes of each class's mean over volumes.
- The 95% Hausdorff distance, per slice where the class is in both the prediction and the target
  (MONAI's HausdorffDistanceMetric's definition, percentile 95, 2D; computed for all slices at once,
  see hd95_per_slice), averaged over those slices: in pixels, or in
  mm where the source gives the pixel side. A slice-wise figure, because a site's slices need not
  come in the volume's order. On 3D patches it is the same figure over every 2D slice (along D) of
  every patch, not the 3D HD95 of the reassembled volume: items carry no position in their volume,
  so the volume cannot be put back together at a site, and a 3D HD95 per patch would count the
  patch's cut faces as the structure's surface. It is comparable with a 2D run's, and says nothing
  of the distances across slices.
- `dice_foreground`: the Dice of every foreground class together (IXI: the whole brain), per volume.
- What a site reports (`segmentation_counts`): per class, the sum of its volumes' Dice and how many
  volumes gave one, the sum of its slices' HD95 and how many; and the loss summed over slices. Sums
  merge across sites by addition; no single slice's mask leaves a site.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

REDUCTIONS = ("mean", "sum", "none")


class DiceCELoss(nn.Module):
    """Soft Dice (MONAI's DiceLoss: softmax, one-hot targets, background included, per item) plus
    pixel cross-entropy (nats, mean over the item's pixels), each item's loss its own: (B, K, H, W)
    logits and (B, H, W) int64 targets, or 3D patches (B, K, D, H, W) and (B, D, H, W). `reduction` as torch's losses ("mean", "sum", or "none": the
    (B,) per-patient losses Opacus' ghost clipping reads)."""

    per_sample = True  # an item's loss depends on that item alone: DP-SGD can clip it

    def __init__(self, reduction: str = "mean", dice_weight: float = 1.0, ce_weight: float = 1.0):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: '{reduction}' is not a loss reduction (allowed: 'mean', 'sum', 'none')")
        self.reduction = reduction
        self.dice_weight, self.ce_weight = dice_weight, ce_weight
        # batch=False: one Dice per item and class, never pooled over the batch's patients
        self.dice = DiceLoss(softmax=True, to_onehot_y=True, include_background=True, reduction="none", batch=False)

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dice = self.dice(out, y.unsqueeze(1)).reshape(len(out), -1).mean(dim=1)  # (B,)
        ce = F.cross_entropy(out, y, reduction="none").reshape(len(out), -1).mean(dim=1)  # (B,)
        loss = self.dice_weight * dice + self.ce_weight * ce
        if self.reduction == "none":
            return loss
        return loss.sum() if self.reduction == "sum" else loss.mean()


def _one_hot(mask: np.ndarray, k: int) -> torch.Tensor:
    """(B, H, W) int class map -> (B, K, H, W) float one-hot."""
    return F.one_hot(torch.from_numpy(mask.astype(np.int64)), k).permute(0, 3, 1, 2).float()


def hd95_per_slice(pred: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    """(N, K-1) 95% Hausdorff distance (pixels) of each foreground class per slice, NaN where the
    class is missing from the prediction or the target.

    MONAI's HausdorffDistanceMetric (percentile 95, Euclidean) computes the same figure one slice
    and class at a time, which costs seconds per evaluation; this does every slice at once with
    scipy: edges are a mask less its erosion (4-connected, as scipy's default and MONAI's), each
    edge pixel's distance to the other mask's nearest edge pixel comes from one Euclidean distance
    transform, and the figure is the larger of the two directions' 95th percentiles. The tests hold
    it to MONAI's."""
    from scipy import ndimage

    out = np.full((len(pred), k - 1), np.nan)
    cross = np.zeros((3, 3, 3), dtype=bool)
    cross[1] = ndimage.generate_binary_structure(2, 1)  # in-plane neighbours only
    far = 1e6  # a sampling step across slices that no in-plane distance reaches
    for c in range(1, k):
        p, t = pred == c, target == c
        both = p.reshape(len(p), -1).any(1) & t.reshape(len(t), -1).any(1)
        if not both.any():
            continue
        p, t = p[both], t[both]
        edge_p = p ^ ndimage.binary_erosion(p, cross)
        edge_t = t ^ ndimage.binary_erosion(t, cross)
        to_t = ndimage.distance_transform_edt(~edge_t, sampling=(far, 1, 1))
        to_p = ndimage.distance_transform_edt(~edge_p, sampling=(far, 1, 1))
        rows = np.flatnonzero(both)
        for i in range(len(rows)):
            a = np.percentile(to_t[i][edge_p[i]], 95)
            b = np.percentile(to_p[i][edge_t[i]], 95)
            out[rows[i], c - 1] = max(a, b)
    return out


def hd95_monai(pred: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    """hd95_per_slice as MONAI's HausdorffDistanceMetric computes it, slice by slice (the reference
    the tests hold the fast one to)."""
    from monai.metrics import HausdorffDistanceMetric

    p, t = _one_hot(pred, k), _one_hot(target, k)
    both = (p.flatten(2).amax(2) > 0) & (t.flatten(2).amax(2) > 0)  # (N, K)
    out = np.full((len(pred), k - 1), np.nan)
    rows = torch.nonzero(both[:, 1:].any(dim=1)).flatten()
    if len(rows):
        metric = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
        with warnings.catch_warnings():
            # a class missing from a slice gives MONAI's warning and a NaN/inf, which is dropped below
            warnings.filterwarnings("ignore", message=".* is all 0, this may result in nan/inf distance")
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
            d = metric(p[rows], t[rows]).numpy()  # (n, K-1)
        d[~both[rows][:, 1:].numpy()] = np.nan
        out[rows.numpy()] = d
    return out


def volume_overlaps(pred: np.ndarray, target: np.ndarray, patient: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per volume (patient) and foreground class: (intersection, predicted, true) pixel counts,
    each (V, K-1), summed over the volume's slices."""
    _, vol = np.unique(patient, return_inverse=True)
    n_vol = int(vol.max()) + 1 if len(vol) else 0
    inter = np.zeros((n_vol, k - 1))
    npred = np.zeros((n_vol, k - 1))
    ntrue = np.zeros((n_vol, k - 1))
    for c in range(1, k):
        p, t = pred == c, target == c
        np.add.at(inter[:, c - 1], vol, (p & t).reshape(len(p), -1).sum(1))
        np.add.at(npred[:, c - 1], vol, p.reshape(len(p), -1).sum(1))
        np.add.at(ntrue[:, c - 1], vol, t.reshape(len(t), -1).sum(1))
    return inter, npred, ntrue


def volume_dice(pred: np.ndarray, target: np.ndarray, patient: np.ndarray, k: int) -> np.ndarray:
    """(V, K-1) Dice of each foreground class per volume; NaN where the class is in neither."""
    inter, npred, ntrue = volume_overlaps(pred, target, patient, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(npred + ntrue > 0, 2 * inter / (npred + ntrue), np.nan)


def segmentation_counts(probs: np.ndarray, target: np.ndarray, patient: np.ndarray) -> dict[str, np.ndarray]:
    """The sums a site reports for class probabilities `probs` (N, K, H, W) against `target`
    (N, H, W), or for 3D patches (N, K, D, H, W) against (N, D, H, W) (module doc); the loss is the
    pixel cross-entropy (nats) of the probabilities, a mean per item."""
    k = probs.shape[1]
    pred = probs.argmax(axis=1)
    p_true = np.take_along_axis(probs, target[:, None].astype(np.int64), axis=1)[:, 0]
    loss_sum = float(-np.log(np.clip(p_true, 1e-12, 1.0)).reshape(len(probs), -1).mean(axis=1).sum())
    dice = volume_dice(pred, target, patient, k)
    fg = volume_dice((pred > 0).astype(np.int64), (target > 0).astype(np.int64), patient, 2)[:, 0]
    hd = hd95_per_slice(pred.reshape(-1, *pred.shape[-2:]), target.reshape(-1, *target.shape[-2:]), k)
    finite = np.isfinite(hd)
    return {
        "dice_sum": np.nansum(dice, axis=0), "dice_n": np.sum(~np.isnan(dice), axis=0).astype(np.float64),
        "fg_dice_sum": np.asarray(np.nansum(fg)), "fg_dice_n": np.asarray(float(np.sum(~np.isnan(fg)))),
        "hd95_sum": np.where(finite, hd, 0).sum(axis=0), "hd95_n": finite.sum(axis=0).astype(np.float64),
        "loss_sum": np.asarray(float(loss_sum)), "n": np.asarray(float(len(pred))),
        "volumes": np.asarray(float(len(np.unique(patient)))),
    }


def segmentation_metrics_from_counts(c: dict, class_names: list[str] | tuple[str, ...], spacing_mm: float | None = None) -> dict:
    """dice (mean over foreground classes), dice_<class>, hd95 and hd95_<class> (pixels, or mm
    with `spacing_mm`), loss (per slice or patch), n (slices or patches), volumes; from (merged)
    counts."""
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(c["dice_n"] > 0, c["dice_sum"] / c["dice_n"], np.nan)
        hd = np.where(c["hd95_n"] > 0, c["hd95_sum"] / c["hd95_n"], np.nan)
    # noisy counts (the private release): post-processed into each figure's range; no-ops on exact ones
    dice, hd = np.clip(dice, 0.0, 1.0), np.maximum(hd, 0.0)
    scale = spacing_mm or 1.0
    fg_n = float(c["fg_dice_n"])
    fg = min(max(float(c["fg_dice_sum"]) / fg_n, 0.0), 1.0) if fg_n > 0 else math.nan
    out = {"dice": _nanmean(dice), "dice_foreground": fg, "hd95": _nanmean(hd) * scale}
    for i, name in enumerate(class_names[1:]):
        out[f"dice_{name}"] = float(dice[i])
        out[f"hd95_{name}"] = float(hd[i]) * scale
    n = float(c["n"])
    out["loss"] = max(float(c["loss_sum"]) / n, 0.0) if n > 0 else math.nan
    out["n"] = max(int(round(n)), 0)
    out["volumes"] = max(int(round(float(c["volumes"]))), 0)
    return out


def _nanmean(v: np.ndarray) -> float:
    v = v[~np.isnan(v)]
    return float(v.mean()) if len(v) else math.nan


# ------------------------------------------------------------------------------- the private release

HD95_MAX = 32.0
"""pixels: each slice's HD95 is clipped here in the private release (a structure missed by more
counts as 32 px), so that one patient moves hd95_sum by <= 32 per class. IXI at 2 mm: a trained
model's HD95 is about 3 px, a DP-SGD one that learnt nothing about 32 (benchmarks/results/ixi_segmentation.md)."""
SEGMENTATION_SHARES = {"dice": 0.5, "hd95_sum": 0.15, "hd95_n": 0.1, "loss_sum": 0.1, "volumes": 0.15}
"""Of the squared sensitivity: half to the Dice sums and counts (the headline), the rest to HD95,
loss and the number of patients that every figure divides by."""


def private_segmentation_counts(probs: np.ndarray, target: np.ndarray, patient: np.ndarray,
                                hd95_max: float = HD95_MAX, loss_max: float = 8.0) -> tuple[dict, list]:
    """The blocks a site releases for class probabilities `probs` (N, K, H, W) (or 3D patches) against
    `target`, exact, and how far one patient (volume: `patient` (N,) ids) can move each:

    dice: (2K,) [dice_sum (K-1), dice_n (K-1), fg_dice_sum, fg_dice_n]: one Dice in [0, 1] and one
        count per class and volume: L2 <= sqrt(2K);
    hd95_sum, hd95_n: (K-1,): each 2D slice's HD95 clipped at `hd95_max`, weighted 1/(slices of its
        patient): L2 <= hd95_max sqrt(K-1) and sqrt(K-1);
    loss_sum: each item's cross-entropy clipped at `loss_max`, weighted 1/(items of its patient):
        <= loss_max;
    volumes: 1.
    Non-finite probabilities count as 1/K. Shares: SEGMENTATION_SHARES."""
    from privmed.privacy.noisy_counts import Block, patient_weights

    k = probs.shape[1]
    probs = np.where(np.isfinite(probs), probs, 1.0 / k)
    w = patient_weights(patient, len(probs))
    pred = probs.argmax(axis=1)
    p_true = np.take_along_axis(probs, target[:, None].astype(np.int64), axis=1)[:, 0]
    loss = np.minimum(-np.log(np.clip(p_true, 1e-12, 1.0)).reshape(len(probs), -1).mean(axis=1), loss_max)
    dice = volume_dice(pred, target, patient, k)
    fg = volume_dice((pred > 0).astype(np.int64), (target > 0).astype(np.int64), patient, 2)[:, 0]
    slices = pred.reshape(-1, *pred.shape[-2:])
    hd = hd95_per_slice(slices, target.reshape(-1, *target.shape[-2:]), k)
    w_slice = np.repeat(w / (len(slices) // len(pred)), len(slices) // len(pred))[:, None]
    finite = np.isfinite(hd)
    released = {
        "dice": np.concatenate([np.nansum(dice, axis=0), np.sum(~np.isnan(dice), axis=0),
                                [np.nansum(fg), np.sum(~np.isnan(fg))]]).astype(np.float64),
        "hd95_sum": np.sum(np.where(finite, np.minimum(hd, hd95_max), 0.0) * w_slice, axis=0),
        "hd95_n": np.sum(finite * w_slice, axis=0),
        "loss_sum": np.asarray(float(np.sum(w * loss))),
        "volumes": np.asarray(float(len(np.unique(patient)))),
    }
    bounds = {"dice": math.sqrt(2 * k), "hd95_sum": hd95_max * math.sqrt(k - 1),
              "hd95_n": math.sqrt(k - 1), "loss_sum": loss_max, "volumes": 1.0}
    return released, [Block(key, bounds[key], SEGMENTATION_SHARES[key]) for key in released]


def segmentation_from_release(r: dict) -> dict:
    """The counts (counts.SEGMENTATION_KEYS) of a released `private_segmentation_counts`: n, which
    counts slices in the exact counts, is the number of patients here (each weighs 1)."""
    dice = r["dice"]
    k1 = (len(dice) - 2) // 2
    return {"dice_sum": dice[:k1], "dice_n": dice[k1:2 * k1], "fg_dice_sum": np.asarray(dice[-2]),
            "fg_dice_n": np.asarray(dice[-1]), "hd95_sum": r["hd95_sum"], "hd95_n": r["hd95_n"],
            "loss_sum": r["loss_sum"], "n": r["volumes"], "volumes": r["volumes"]}

"""Image-quality metrics and losses of the reconstruction task, per item.

    psnr(pred, target)   -> (N,) dB        10 log10(data_range^2 / MSE)
    ssim(pred, target)   -> (N,)           MONAI's SSIM, 7x7 uniform window (fastMRI's choice)
    nmse(pred, target)   -> (N,)           ||pred - target||^2 / ||target||^2
    ReconLoss("l1" | "ssim" | "ssim_l1", reduction="mean" | "sum" | "none")

pred and target are (N, 1, H, W) magnitude images (torch tensors or numpy arrays) in the units of
the targets, which privmed's reconstruction data scales to [0, 1] per volume (its 99.5th percentile
maps to 1, brighter voxels are clipped).

Data range: a FIXED 1.0 for PSNR and SSIM. fastMRI uses the target volume's maximum; after the
per-volume scaling above every volume's maximum is 1, so the two agree per volume, and a fixed
range keeps each slice's score independent of the other slices (a per-slice maximum would reward
dark slices).

SSIM: MONAI's SSIMMetric with a 7x7 uniform window, k1 = 0.01, k2 = 0.03, averaged over the valid
(unpadded) windows, as skimage's `structural_similarity` that fastMRI calls; MONAI's local
variances are the biased ones (divide by 49) where skimage divides by 48, a difference in the
third decimal at most.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import SSIMLoss
from monai.metrics import PSNRMetric, SSIMMetric
from torch import nn

DATA_RANGE = 1.0
SSIM_WINDOW = 7
LOSS_KINDS = ("l1", "ssim", "ssim_l1")
REDUCTIONS = ("mean", "sum", "none")


def psnr(pred, target, data_range: float = DATA_RANGE) -> np.ndarray:
    """(N,) float64 peak signal-to-noise ratio in dB, 10 log10(data_range^2 / MSE) per item."""
    p, t = _as_tensors(pred, target)
    return _per_item(PSNRMetric(max_val=data_range, reduction="none")(p, t))


def ssim(pred, target, data_range: float = DATA_RANGE) -> np.ndarray:
    """(N,) float64 structural similarity per item (1 = identical); images of at least 7x7."""
    p, t = _as_tensors(pred, target)
    metric = SSIMMetric(
        spatial_dims=2, data_range=data_range, kernel_type="uniform", win_size=SSIM_WINDOW, reduction="none"
    )
    return _per_item(metric(p, t))


def nmse(pred, target) -> np.ndarray:
    """(N,) float64 normalised squared error ||pred - target||^2 / ||target||^2 per item."""
    p, t = _as_tensors(pred, target)
    p, t = p.double().flatten(1), t.double().flatten(1)
    return ((p - t).pow(2).sum(1) / t.pow(2).sum(1)).numpy()


class ReconLoss(nn.Module):
    """Per-item image loss on (B, 1, H, W) predictions and targets.

    kind "l1": mean absolute error per item. "ssim": 1 - SSIM per item (MONAI's SSIMLoss, the same
    7x7 uniform window and data range as `ssim`). "ssim_l1": alpha (1 - SSIM) + (1 - alpha) L1,
    alpha = 0.84 (Zhao et al., IEEE TCI 2017). `reduction` as torch's losses: "mean" (the default),
    "sum" (scalars) or "none" (the (B,) per-item losses); a plain attribute that Opacus' ghost
    clipping sets to "none"."""

    per_sample = True  # each item's loss depends on that item alone: DP-SGD can clip it

    def __init__(
        self, kind: str = "l1", reduction: str = "mean", alpha: float = 0.84, data_range: float = DATA_RANGE
    ):
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ValueError(f"kind: '{kind}' is not a reconstruction loss (allowed: {', '.join(LOSS_KINDS)})")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: '{reduction}' is not a loss reduction (allowed: {', '.join(REDUCTIONS)})")
        self.kind, self.reduction, self.alpha = kind, reduction, alpha
        self.ssim_loss = SSIMLoss(
            spatial_dims=2, data_range=data_range, kernel_type="uniform", win_size=SSIM_WINDOW, reduction="none"
        )

    def per_item(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B,) losses."""
        if self.kind == "ssim":
            return self.ssim_loss(pred, target).reshape(-1)
        l1 = F.l1_loss(pred, target, reduction="none").flatten(1).mean(1)
        if self.kind == "l1":
            return l1
        return self.alpha * self.ssim_loss(pred, target).reshape(-1) + (1 - self.alpha) * l1

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses = self.per_item(pred, target)
        if self.reduction == "mean":
            return losses.mean()
        if self.reduction == "sum":
            return losses.sum()
        return losses


def _as_tensors(pred, target) -> tuple[torch.Tensor, torch.Tensor]:
    p, t = torch.as_tensor(pred).detach().float(), torch.as_tensor(target).detach().float()
    if p.shape != t.shape or p.dim() != 4:
        raise ValueError(f"pred {tuple(p.shape)} and target {tuple(t.shape)}: expected the same (N, C, H, W)")
    return p, t


def _per_item(values: torch.Tensor) -> np.ndarray:
    return values.reshape(-1).double().numpy()

"""Reconstruction: an image from undersampled k-space. The metrics per volume and the sums a site
reports (metrics and loss per item: privmed.tasks.recon_metrics; k-space: privmed.tasks.kspace).

Inputs are packed k-space (N, 3, H, W) [k_re, k_im, mask]; predictions and targets magnitude images
(N, 1, H, W) in [0, 1]. PSNR, SSIM and NMSE are computed per slice, averaged over each volume's
slices (fastMRI scores volumes), then averaged over volumes; the same figures for the zero-filled
reconstruction of the same measurements are the baseline a model must beat. A site reports the
sums over its volumes of each volume's mean, the number of volumes and slices, and the summed L1
loss: sums merge across sites by addition; no slice leaves a site.
"""

from __future__ import annotations

import numpy as np
import torch

from privmed.tasks.kspace import unpack_input, zero_filled
from privmed.tasks.recon_metrics import nmse, psnr, ssim

FIGURES = ("psnr", "ssim", "nmse")


def zero_filled_images(inputs: np.ndarray) -> np.ndarray:
    """(N, 1, H, W) zero-filled magnitude images of packed k-space `inputs` (N, 3, H, W)."""
    k, _ = unpack_input(torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32)))
    return zero_filled(k).numpy()


def _per_volume(values: np.ndarray, patient: np.ndarray) -> np.ndarray:
    """(V,) mean of `values` (N,) over each patient's items."""
    _, vol = np.unique(patient, return_inverse=True)
    return np.bincount(vol, weights=values) / np.bincount(vol)


def reconstruction_counts(pred: np.ndarray, target: np.ndarray, inputs: np.ndarray, patient: np.ndarray) -> dict:
    """The sums a site reports for reconstructions `pred` of `target` from `inputs` (module doc)."""
    zf = zero_filled_images(inputs)
    out = {}
    for name, fn in zip(FIGURES, (psnr, ssim, nmse)):
        out[f"{name}_sum"] = np.asarray(_per_volume(fn(pred, target), patient).sum())
        out[f"{name}_zf_sum"] = np.asarray(_per_volume(fn(zf, target), patient).sum())
    out["loss_sum"] = np.asarray(float(np.abs(pred - target).reshape(len(pred), -1).mean(axis=1).sum()))
    out["n"] = np.asarray(float(len(pred)))
    out["volumes"] = np.asarray(float(len(np.unique(patient))))
    return out


def reconstruction_metrics_from_counts(c: dict) -> dict:
    """psnr (dB), ssim, nmse and their *_zero_filled baselines (means over volumes), loss (L1 per
    slice), n (slices), volumes."""
    v, n = float(c["volumes"]), float(c["n"])
    out = {}
    for name in FIGURES:
        out[name] = float(c[f"{name}_sum"]) / v if v else float("nan")
        out[f"{name}_zero_filled"] = float(c[f"{name}_zf_sum"]) / v if v else float("nan")
    out["loss"] = float(c["loss_sum"]) / n if n else float("nan")
    out["n"], out["volumes"] = int(n), int(v)
    return out

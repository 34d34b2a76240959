"""Reconstruction: an image from undersampled k-space. The metrics per volume and the sums a site
reports (metrics and loss per item: privmed.tasks.recon_metrics; k-space: privmed.kspace).

Inputs are packed k-space (N, 3, H, W) [k_re, k_im, mask]; predictions and targets magnitude images
(N, 1, H, W) in [0, 1]. PSNR, SSIM and NMSE are computed per slice, averaged over each volume's
slices (fastMRI scores volumes), then averaged over volumes; the same figures for the zero-filled
reconstruction of the same measurements are the baseline a model must beat. A site reports the
sums over its volumes of each volume's mean, the number of volumes and slices, and the summed L1
loss: sums merge across sites by addition; no slice leaves a site.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from privmed.kspace import unpack_input, zero_filled
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
        out[name] = float(c[f"{name}_sum"]) / v if v > 0 else float("nan")
        out[f"{name}_zero_filled"] = float(c[f"{name}_zf_sum"]) / v if v > 0 else float("nan")
    out["loss"] = max(float(c["loss_sum"]) / n, 0.0) if n > 0 else float("nan")
    out["n"], out["volumes"] = max(int(round(n)), 0), max(int(round(v)), 0)
    return out


# ------------------------------------------------------------------------------- the private release

FIGURE_RANGES = {"psnr": (0.0, 50.0), "ssim": (-1.0, 1.0), "nmse": (0.0, 1.0)}
"""Each slice's figure is clipped to its range before the volume's mean in the private release
(PSNR in dB: an exact reconstruction, infinite PSNR, counts as 50; NMSE above 1, worse than
predicting zero, counts as 1), so that one patient moves each sum by at most the range's largest
magnitude. IXI at 2 mm: zero-filled about 22 dB and 0.05, trained models about 24 dB."""
L1_MAX = 1.0  # each slice's mean absolute error is clipped here (images are in [0, 1])
RECONSTRUCTION_SHARES = {"psnr": 0.4, "ssim": 0.2, "nmse": 0.1, "loss_sum": 0.1, "volumes": 0.2}
"""Of the squared sensitivity: most to PSNR (the headline) and to the number of patients every
figure divides by."""


def private_reconstruction_counts(pred: np.ndarray, target: np.ndarray, inputs: np.ndarray,
                                  patient: np.ndarray) -> tuple[dict, list]:
    """The blocks a site releases for reconstructions `pred` of `target` from `inputs`, exact, and
    how far one patient (volume) can move each:

    psnr, ssim, nmse: (2,) [model, zero-filled] sums over volumes of the volume's mean of the
        slices' clipped figure (FIGURE_RANGES): L2 <= sqrt(2) max|range|;
    loss_sum: each slice's L1 clipped at L1_MAX, weighted 1/(slices of its patient): <= L1_MAX;
    volumes: 1.
    Non-finite predictions count as 0. Shares: RECONSTRUCTION_SHARES."""
    from privmed.privacy.noisy_counts import Block, patient_weights

    pred = np.where(np.isfinite(pred), pred, 0.0).astype(np.float32)
    zf = zero_filled_images(inputs)
    released, bounds = {}, {}
    for name, fn in zip(FIGURES, (psnr, ssim, nmse)):
        lo, hi = FIGURE_RANGES[name]
        figures = [np.clip(np.nan_to_num(fn(x, target), nan=hi, posinf=hi, neginf=lo), lo, hi)
                   for x in (pred, zf)]
        released[name] = np.array([_per_volume(f, patient).sum() for f in figures])
        bounds[name] = math.sqrt(2.0) * max(abs(lo), abs(hi))
    l1 = np.minimum(np.abs(pred - target).reshape(len(pred), -1).mean(axis=1), L1_MAX)
    released["loss_sum"] = np.asarray(float(np.sum(patient_weights(patient, len(pred)) * l1)))
    released["volumes"] = np.asarray(float(len(np.unique(patient))))
    bounds |= {"loss_sum": L1_MAX, "volumes": 1.0}
    return released, [Block(key, bounds[key], RECONSTRUCTION_SHARES[key]) for key in released]


def reconstruction_from_release(r: dict) -> dict:
    """The counts (counts.RECONSTRUCTION_KEYS) of a released `private_reconstruction_counts`: n,
    which counts slices in the exact counts, is the number of patients here (each weighs 1)."""
    out = {}
    for name in FIGURES:
        out[f"{name}_sum"], out[f"{name}_zf_sum"] = np.asarray(r[name][0]), np.asarray(r[name][1])
    return out | {"loss_sum": r["loss_sum"], "n": r["volumes"], "volumes": r["volumes"]}

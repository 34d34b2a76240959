"""SYNTHETIC head volumes with masks, for the dense tasks' demos and tests: not patient data, and
labelled so everywhere.

Each volume is a skull shell around a brain ellipsoid with two ventricles (dark, as on T1) and a
smooth texture; its slices (axial, through the brain) are one patient's items, in order. The mask
holds 0 background (and skull), 1 brain tissue, 2 ventricles. Each site is a scanner as in the
classification phantom (privmed.data.phantom.site_scanner): intensity scale and offset, contrast,
noise and blur differ per site.

    images, masks, clean = make_volumes(n_volumes, slices, size, scanner, rng)
    # images (V*S, 1, size, size) float32 in [0, 1]: the scanner's rendering, noise included
    # masks  (V*S, size, size) int64;  clean: the same rendering without noise (what a
    # reconstruction is scored against)
"""

from __future__ import annotations

import numpy as np

from privmed.config import DataConfig, SitesConfig
from privmed.data._images import set_channels
from privmed.data.base import ImageSet, SourceData
from privmed.data.phantom import Scanner, _blur, site_scanner

CLASS_NAMES = ["background", "tissue", "ventricles"]
DEFAULT_SIZE = 32
SLICES = 12  # per volume
_VOLUME_STREAM = 0x7015


def make_volumes(
    n_volumes: int, slices: int, size: int, scanner: Scanner, rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images (V*S, 1, H, W) float32 in [0, 1], masks (V*S, H, W) int64, clean (V*S, 1, H, W))."""
    imgs, masks = [], []
    for _ in range(n_volumes):
        img, mask = _volume(slices, size, rng)
        imgs.append(img)
        masks.append(mask)
    clean = np.concatenate(imgs)  # (V*S, H, W) anatomy
    blurred = _blur(clean, scanner.blur * size / DEFAULT_SIZE)
    rendered = scanner.offset + scanner.scale * np.clip(blurred, 0.0, 1.0) ** scanner.gamma
    rendered = np.clip(rendered, 0.0, 1.0).astype(np.float32)
    noisy = rendered + rng.normal(0.0, scanner.noise, rendered.shape).astype(np.float32)
    return np.clip(noisy, 0.0, 1.0).astype(np.float32)[:, None], np.concatenate(masks), rendered[:, None]


def _volume(slices: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One head: (S, H, W) intensities in [0, 1] and (S, H, W) int64 mask."""
    c = ((np.arange(size) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
    z = np.linspace(-0.75, 0.75, slices, dtype=np.float32)[:, None, None]
    y, x = c[None, :, None], c[None, None, :]
    cx, cy = rng.uniform(-0.05, 0.05, 2)
    a, b, cz = rng.uniform(0.62, 0.78), rng.uniform(0.70, 0.86), rng.uniform(0.85, 1.0)
    r2 = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 + (z / cz) ** 2
    brain = r2 <= 1.0
    skull = (r2 > 1.0) & (r2 <= 1.25)
    # two ventricles, mirrored about the midline, through the middle slices
    ventricles = np.zeros_like(brain)
    va, vb, vc = rng.uniform(0.08, 0.14), rng.uniform(0.22, 0.32), rng.uniform(0.35, 0.5)
    off = rng.uniform(0.10, 0.16)
    for side in (-1, 1):
        v = ((x - cx - side * off) / va) ** 2 + ((y - cy) / vb) ** 2 + (z / vc) ** 2
        ventricles |= v <= 1.0
    ventricles &= brain
    tissue = rng.uniform(0.50, 0.62)
    fx, fy, fz = rng.uniform(2.0, 4.0, 3)
    texture = 0.05 * np.cos(np.pi * (fx * x + fy * y + fz * z) + rng.uniform(0, 2 * np.pi))
    img = np.where(brain, tissue + texture, 0.0)
    img = np.where(ventricles, rng.uniform(0.12, 0.22), img)
    img = np.where(skull, rng.uniform(0.80, 0.95), img)
    mask = np.where(ventricles, 2, np.where(brain, 1, 0)).astype(np.int64)
    return img.astype(np.float32), mask


def load_phantom_volumes(data: DataConfig, sites: SitesConfig, seed: int, noise: bool = True) -> SourceData:
    """Segmentation phantom: per site, data.volumes_per_site volumes of SLICES slices (its scanner,
    privmed.data.phantom.site_scanner), and a quarter as many (at least 1) test volumes from each
    scanner that go to a public test set (no site holds them: the report can show them).
    `noise` False: the scanners' renderings without their image noise (reconstruction adds its
    noise in k-space)."""
    size = data.size or DEFAULT_SIZE
    n_train = data.volumes_per_site
    n_test = max(1, round(0.25 * n_train))
    trains, tests = [], []
    for i, name in enumerate(sites.site_names()):
        rng = np.random.default_rng([seed, _VOLUME_STREAM, i])
        images, masks, clean = make_volumes(n_train + n_test, SLICES, size, site_scanner(i, seed), rng)
        images = set_channels(images if noise else clean, data.channels)
        n = len(images)
        patient = np.repeat([f"{name}-{k:04d}" for k in range(n_train + n_test)], SLICES)
        full = ImageSet(images=images, labels=np.zeros(n, np.int64), site=np.full(n, name),
                        patient=patient, target=masks)
        trains.append(full.subset(np.arange(n_train * SLICES)))
        tests.append(full.subset(np.arange(n_train * SLICES, n)))
    test = ImageSet.concat(tests)
    return SourceData(
        train=ImageSet.concat(trains),
        test=ImageSet(images=test.images, labels=test.labels, patient=test.patient, target=test.target),
        class_names=list(CLASS_NAMES),
        synthetic=True,
        description=(f"SYNTHETIC phantom head volumes (generated, not patient data): {SLICES} slices of "
                     f"{size}x{size} per volume, masks of brain tissue and ventricles, {len(trains)} "
                     "simulated scanners"),
        citation="synthetic (privmed phantom generator)",
        spacing_mm=None,
    )

"""SYNTHETIC phantom images for demos and tests: not patient data, and labelled so everywhere.

Each image is a body ellipse with a few organ ellipses and faint texture; label 1 ("lesion") adds a
small soft-edged disc of modest contrast inside the body. Every site is its own "scanner": intensity
scale and offset, contrast (gamma), noise, blur (resolution) and lesion prevalence differ per site,
spread over their ranges by the site's index and the seed, so sites are non-IID like real hospitals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from privmed.config import DataConfig, SitesConfig
from privmed.data._images import set_channels
from privmed.data.base import ImageSet, SourceData

CLASS_NAMES = ["no lesion", "lesion"]
DEFAULT_SIZE = 32
_SCANNER_STREAM, _ITEM_STREAM = 0x5CA7, 0x17E5

# Per-parameter irrational steps: site i sits at frac(offset + i * step) of each range, so any two
# sites are well apart in every parameter (a low-discrepancy sequence) whatever the seed.
_STEPS = np.array([0.6180339887, 0.4142135624, 0.7320508076, 0.2360679775, 0.6457513111, 0.1622776602])


@dataclass(frozen=True)
class Scanner:
    """How one site's scanner renders the same anatomy."""

    scale: float  # multiplies intensities
    offset: float  # added to intensities
    gamma: float  # contrast: x ** gamma
    noise: float  # std of additive Gaussian noise
    blur: float  # std of the Gaussian blur, in pixels at 32 px: lower resolution
    prevalence: float  # share of images with a lesion


def site_scanner(site_index: int, seed: int) -> Scanner:
    """The scanner of site `site_index` (0-based) under `seed`."""
    offsets = np.random.default_rng([seed, _SCANNER_STREAM]).random(len(_STEPS))
    t = (offsets + site_index * _STEPS) % 1.0
    lo = np.array([0.70, 0.00, 0.70, 0.015, 0.30, 0.35])
    hi = np.array([1.00, 0.12, 1.40, 0.06, 1.10, 0.65])
    v = lo + t * (hi - lo)
    return Scanner(*(float(x) for x in v))


def make_site_images(
    n: int, size: int, scanner: Scanner, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 1, size, size) float32 in [0, 1], labels (n,) int64) for one scanner."""
    labels = (rng.random(n) < scanner.prevalence).astype(np.int64)
    clean = _anatomy(n, size, labels, rng)
    blurred = _blur(clean, scanner.blur * size / DEFAULT_SIZE)  # same resolution at any size
    img = scanner.offset + scanner.scale * np.clip(blurred, 0.0, 1.0) ** scanner.gamma
    img = img + rng.normal(0.0, scanner.noise, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)[:, None], labels


def load_phantom(data: DataConfig, sites: SitesConfig, seed: int) -> SourceData:
    """Per site: data.samples_per_site training images and max(20, 25%) test images of its own."""
    size = data.size or DEFAULT_SIZE
    n_train = data.samples_per_site
    n_test = max(20, round(0.25 * n_train))
    trains, tests = [], []
    for i, name in enumerate(sites.site_names()):
        rng = np.random.default_rng([seed, _ITEM_STREAM, i])
        images, labels = make_site_images(n_train + n_test, size, site_scanner(i, seed), rng)
        images = set_channels(images, data.channels)
        site = np.full(len(labels), name)
        patient = np.array([f"{name}-{k:06d}" for k in range(len(labels))])
        full = ImageSet(images=images, labels=labels, site=site, patient=patient)
        trains.append(full.subset(np.arange(n_train)))
        tests.append(full.subset(np.arange(n_train, n_train + n_test)))
    return SourceData(
        train=ImageSet.concat(trains),
        test=ImageSet.concat(tests),
        class_names=list(CLASS_NAMES),
        synthetic=True,
        description=(
            f"SYNTHETIC phantom images (generated, not patient data): {size}x{size} grey"
            f"{' (as 3 channels)' if data.channels == 3 else ''}, lesion present or not, "
            f"{len(trains)} simulated scanners"
        ),
        citation="synthetic (privmed phantom generator)",
    )


def _anatomy(n: int, size: int, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, size, size) noiseless images: body, organs, texture and (label 1) a lesion."""
    c = ((np.arange(size) + 0.5) / size * 2.0 - 1.0).astype(np.float32)  # pixel centres in [-1, 1]
    y, x = c[None, :, None], c[None, None, :]

    def col(v: np.ndarray) -> np.ndarray:  # (n,) -> (n, 1, 1) float32, to broadcast over pixels
        return v.astype(np.float32)[:, None, None]

    # Body.
    bx, by = rng.uniform(-0.06, 0.06, n), rng.uniform(-0.06, 0.06, n)
    ba, bb = rng.uniform(0.72, 0.90, n), rng.uniform(0.55, 0.75, n)
    body = _ellipse(x, y, bx, by, ba, bb, rng.uniform(-0.3, 0.3, n))
    img = body * col(rng.uniform(0.40, 0.55, n))

    # Organs: larger ellipses of either sign, inside the body.
    for _ in range(2):
        ox, oy = _inside(bx, by, ba, bb, 0.5, rng)
        organ = _ellipse(x, y, ox, oy, rng.uniform(0.25, 0.45, n), rng.uniform(0.18, 0.35, n),
                         rng.uniform(0, np.pi, n))
        img = img + organ * body * col(rng.uniform(-0.18, 0.12, n))

    # Faint smooth texture, so the background is not flat.
    for _ in range(2):
        fx, fy = rng.uniform(1.5, 4.0, n), rng.uniform(1.5, 4.0, n)
        wave = np.cos(np.pi * (col(fx) * x + col(fy) * y) + col(rng.uniform(0, 2 * np.pi, n)))
        img = img + body * wave * col(rng.uniform(0.01, 0.04, n))

    # Lesion: a small soft-edged disc (radius size/14..size/8 px) of modest contrast.
    lx, ly = _inside(bx, by, ba, bb, 0.6, rng)
    radius = rng.uniform(1 / 14, 1 / 8, n) * 2.0  # in [-1, 1] units (the image is 2 wide)
    dist = np.sqrt((x - col(lx)) ** 2 + (y - col(ly)) ** 2)
    edge = 0.5 * 2.0 / size  # half a pixel
    blob = 1.0 / (1.0 + np.exp((dist - col(radius)) / edge))
    amp = rng.uniform(0.20, 0.35, n) * labels
    return img + blob * body * col(amp)


def _ellipse(x, y, cx, cy, a, b, theta) -> np.ndarray:
    """(n, H, W) mask, 1 inside the rotated ellipse and 0 outside."""
    def col(v: np.ndarray) -> np.ndarray:
        return v.astype(np.float32)[:, None, None]

    cos, sin = col(np.cos(theta)), col(np.sin(theta))
    dx, dy = x - col(cx), y - col(cy)
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    return ((u / col(a)) ** 2 + (v / col(b)) ** 2 <= 1.0).astype(np.float32)


def _inside(bx, by, ba, bb, reach: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random points within `reach` of the (unrotated) body's half-axes: inside the body."""
    n = len(bx)
    r = reach * np.sqrt(rng.random(n))
    phi = rng.uniform(0, 2 * np.pi, n)
    return bx + r * ba * np.cos(phi), by + r * bb * np.sin(phi)


def _blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (n, H, W) images, renormalised at the borders."""
    size = images.shape[-1]
    d = np.arange(size)[:, None] - np.arange(size)[None, :]
    g = np.exp(-(d**2) / (2 * sigma**2))
    g = (g / g.sum(axis=1, keepdims=True)).astype(np.float32)
    return g @ images @ g.T

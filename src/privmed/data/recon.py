"""Reconstruction data: each site's scanner acquires the slices of a volume source (IXI, the
phantom volumes) as undersampled single-coil k-space (privmed.kspace).

    recon = as_reconstruction(source, sites, seed, data)
    recon.train.images   # (N, 3, H, W) [k_re, k_im, mask]: what the site's scanner measured
    recon.train.target   # (N, 1, H, W) in [0, 1]: the fully sampled magnitude slice

Sites differ as scanners do (`scanner_profile`): the undersampling pattern alternates between
random lines (with a fully sampled centre) and equispaced lines, and the thermal noise grows from
site to site; every site samples at `data.acceleration` unless `data.accelerations` gives one per
site. The public test set is acquired by a reference scanner: random lines at `data.acceleration`,
noise `TEST_NOISE`. Every slice gets its own mask (a random-mask scanner's acquisitions differ),
drawn with the noise from a generator seeded by (seed, site), so the data is the same on every run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from privmed.config import DataConfig, SitesConfig
from privmed.data.base import ImageSet, SourceData
from privmed.errors import DataError
from privmed.kspace import MASK_KINDS, default_center_fraction, undersample

# (mask kind, noise std per k-space entry in units of the [0, 1] image) of site i, cycled
SCANNERS = (("random", 0.0), ("equispaced", 0.01), ("random", 0.02))
TEST_NOISE = 0.01
_STREAM = 0x4EC0


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanner acquires: the undersampling mask, its acceleration, and thermal noise
    (std per k-space entry, in units of the [0, 1] image: see `kspace.simulate_kspace`)."""

    mask_kind: str = "random"  # "random" or "equispaced"
    acceleration: float = 4.0  # 4: a quarter of the phase-encode lines
    noise_std: float = 0.0
    center_fraction: float | None = None  # None: fastMRI's 0.32 / acceleration

    def __post_init__(self) -> None:
        if self.mask_kind not in MASK_KINDS:
            raise ValueError(f"mask_kind: '{self.mask_kind}' is not a mask kind (allowed: {', '.join(MASK_KINDS)})")
        if not self.acceleration > 1:
            raise ValueError(f"acceleration: {self.acceleration} must be > 1")
        if self.noise_std < 0:
            raise ValueError(f"noise_std: {self.noise_std} must be >= 0")
        if self.center_fraction is not None and not 0 < self.center_fraction < 1 / self.acceleration:
            raise ValueError(
                f"center_fraction: {self.center_fraction} must lie in (0, 1/acceleration = {1 / self.acceleration:.3f})"
            )

    @property
    def centre(self) -> float:
        """The fully sampled centre fraction used."""
        if self.center_fraction is None:
            return default_center_fraction(self.acceleration)
        return self.center_fraction


def acquire(targets: np.ndarray, profile: ScannerProfile, generator: torch.Generator) -> np.ndarray:
    """What `profile`'s scanner measures of the magnitude slices `targets` (N, 1, H, W) in [0, 1]:
    (N, 3, H, W) float32 [k_re, k_im, mask] (kspace.pack_input), a fresh mask per slice, then
    noise, all drawn from `generator`. Phase-encode lines run along W."""
    return undersample(
        torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32)),
        kind=profile.mask_kind,
        acceleration=profile.acceleration,
        center_fraction=profile.center_fraction,
        noise_std=profile.noise_std,
        generator=generator,
    ).numpy()


def scanner_profile(index: int, data: DataConfig) -> ScannerProfile:
    """The scanner of site `index` (0-based)."""
    kind, noise = SCANNERS[index % len(SCANNERS)]
    accelerations = data.accelerations or [data.acceleration]
    return ScannerProfile(mask_kind=kind, acceleration=float(accelerations[index % len(accelerations)]),
                          noise_std=noise)


def test_profile(data: DataConfig) -> ScannerProfile:
    return ScannerProfile(mask_kind="random", acceleration=float(data.acceleration), noise_std=TEST_NOISE)


def as_reconstruction(source: SourceData, sites: SitesConfig, seed: int, data: DataConfig) -> SourceData:
    """`source`'s slices (images (N, 1, H, W) in [0, 1], each with its site) as each site's scanner
    acquires them; the fully sampled slices become the targets."""
    if source.train.site is None:
        raise DataError("task: 'reconstruction' needs the site of every training slice (its scanner); "
                        "this source gives none (give data.csv a 'site' column)")
    names = list(dict.fromkeys(source.train.site.tolist()))
    parts = []
    for i, name in enumerate(names):
        rows = np.flatnonzero(source.train.site == name)
        parts.append(_acquire(source.train.subset(rows), scanner_profile(i, data), [seed, _STREAM, i]))
    test = _acquire(source.test, test_profile(data), [seed, _STREAM, 0xE57])
    profiles = ", ".join(f"{n}: {_words(scanner_profile(i, data))}" for i, n in enumerate(names))
    return replace(
        source, train=ImageSet.concat(parts), test=test, class_names=["image"],
        description=f"{source.description}; as single-coil k-space, {profiles}; test: {_words(test_profile(data))}",
    )


def _acquire(items: ImageSet, profile: ScannerProfile, seed: list[int]) -> ImageSet:
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
    magnitude = items.images[:, :1].astype(np.float32)
    return ImageSet(images=acquire(magnitude, profile, gen), labels=np.zeros(len(items), np.int64),
                    site=items.site, patient=items.patient, target=magnitude)


def _words(p: ScannerProfile) -> str:
    return f"{p.mask_kind} lines at {p.acceleration:g}x, noise {p.noise_std:g}"

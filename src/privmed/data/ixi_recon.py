"""IXI T1 volumes as a reconstruction task: 2D axial slices as targets, their simulated
undersampled k-space as inputs, one scanner profile per site.

    vols = load_subjects(root / "images")                   # {subject id: (X, Y, Z) float32 [0, 1]}
    targets, patients = slice_subjects(vols)                # (N, 1, H, W) [0, 1], (N,) subject ids
    arrays = site_arrays(targets, patients, ScannerProfile(acceleration=4), generator=g)
    arrays.inputs (N, 3, H, W) [k_re, k_im, mask], arrays.targets (N, 1, H, W), arrays.patient (N,)

The files are read here; the k-space maths is `privmed.tasks.kspace`. The shared IXI volumes
(../shared/data/ixi-t1, CC BY-SA 3.0) are 120 x 120 x 90 at 2 mm, axes (P, S, R): an axial slice
(perpendicular to the S axis, found from the affine) is 120 (A-P, H) x 90 (L-R, W), and the
phase-encode lines run along W (left-right).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from privmed.tasks.kspace import MASK_KINDS, default_center_fraction, undersample

# A voxel is head (not background) above 10% of the volume's 99.5th percentile; IXI's background
# sits near 2%. A slice is kept when at least 30% of it is head: this drops the top of the skull
# and the empty slices below the neck, keeping about 80-100 of the 120 axial slices per subject.
FOREGROUND_LEVEL = 0.1
MIN_FOREGROUND = 0.3
NORM_PERCENTILE = 99.5


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


@dataclass(frozen=True)
class ReconArrays:
    inputs: np.ndarray  # (N, 3, H, W) float32 [k_re, k_im, mask] (kspace.pack_input); not in [0, 1]
    targets: np.ndarray  # (N, 1, H, W) float32 in [0, 1]: the fully sampled magnitude slice
    patient: np.ndarray  # (N,) str: the subject each slice comes from (the privacy unit)

    def __len__(self) -> int:
        return len(self.targets)


def subject_id(path: Path) -> str:
    """'IXI012-HH-1211' from '.../IXI012-HH-1211-T1_ds.nii.gz' (the id in demographics.csv)."""
    return path.name.split("-T1")[0]


def load_volume(path: Path) -> np.ndarray:
    """A NIfTI volume reoriented so that axis 1 is superior-inferior (axial slices are [:, k, :]),
    the other two axes in their stored order: (X, S, Z) float32, raw intensities."""
    img = nib.load(str(path))
    codes = nib.aff2axcodes(img.affine)
    s_axis = next(i for i, c in enumerate(codes) if c in ("S", "I"))
    return np.moveaxis(np.asarray(img.get_fdata(dtype=np.float32)), s_axis, 1)


def normalise_volume(volume: np.ndarray, percentile: float = NORM_PERCENTILE) -> np.ndarray:
    """Scale a volume to [0, 1]: divide by its `percentile`-th percentile, clip at 1 (so a few
    bright voxels, vessels or fat, do not set the scale). float32, same shape."""
    scale = float(np.percentile(volume, percentile))
    if not scale > 0:
        raise ValueError(f"volume's {percentile}th percentile is {scale}: an empty volume?")
    return np.clip(volume / scale, 0.0, 1.0).astype(np.float32)


def head_slices(
    volume: np.ndarray, level: float = FOREGROUND_LEVEL, min_foreground: float = MIN_FOREGROUND
) -> np.ndarray:
    """Indices of the axial slices (axis 1 of a normalised `load_volume` volume) in which at least
    `min_foreground` of the pixels exceed `level`: (S,) int64, ascending."""
    fraction = (volume > level).mean(axis=(0, 2))
    return np.nonzero(fraction >= min_foreground)[0]


def load_subjects(folder: Path) -> dict[str, np.ndarray]:
    """{subject id: normalised (X, S, Z) volume} for every *.nii.gz in `folder`, sorted by id."""
    paths = sorted(Path(folder).glob("*.nii.gz"))
    if not paths:
        raise FileNotFoundError(f"no *.nii.gz volumes in {folder}")
    return {subject_id(p): normalise_volume(load_volume(p)) for p in paths}


def slice_subjects(
    volumes: dict[str, np.ndarray], step: int = 1, min_foreground: float = MIN_FOREGROUND
) -> tuple[np.ndarray, np.ndarray]:
    """Every `step`-th kept axial slice of each subject: targets (N, 1, X, Z) float32 in [0, 1] and
    patient ids (N,) str, subjects in the dict's order."""
    targets, patients = [], []
    for sid, vol in volumes.items():
        keep = head_slices(vol, min_foreground=min_foreground)[::step]
        targets.append(np.moveaxis(vol[:, keep, :], 1, 0)[:, None])
        patients.append(np.full(len(keep), sid))
    return np.concatenate(targets).astype(np.float32), np.concatenate(patients)


def site_arrays(
    targets: np.ndarray, patients: np.ndarray, profile: ScannerProfile, generator: torch.Generator
) -> ReconArrays:
    """One site's data: the slices `targets` (N, 1, H, W) in [0, 1] acquired by `profile`'s scanner
    (a fresh mask per slice, then noise, all from `generator`)."""
    inputs = undersample(
        torch.from_numpy(np.ascontiguousarray(targets)),
        kind=profile.mask_kind,
        acceleration=profile.acceleration,
        center_fraction=profile.center_fraction,
        noise_std=profile.noise_std,
        generator=generator,
    )
    return ReconArrays(inputs=inputs.numpy(), targets=targets, patient=np.asarray(patients))

"""From NIfTI volumes to the 2D slices or 3D patches the dense tasks train on (the file reading:
nibabel).

    vol, side = read_volume(path)              # (X, Y, Z) float32 in the file's voxel order; pixel mm
    vol, side = read_volume(path, spacing=(1, 1, 2))  # resampled to 1 x 1 x 2 mm voxels (MONAI)
    img = normalise(vol)                       # [0, 1]: / the 99.5th percentile of nonzero voxels
    slab = axial(vol, axis, shape)             # (S, H, W): slices along `axis`, centre-padded/cropped
    keep = slices_with(mask_slab > 0, 0.02)    # slices (or patches) whose foreground covers >= 2%
    cube = patches(vol, axis, (D, H, W))       # (P, D, H, W): the volume cut into whole patches

A volume is one patient: all its slices (patches) carry the patient id, and privmed's splits and
DP-SGD's sampling treat them as one unit (privacy.dpsgd.patient_batches draws a patient, then one
of its slices).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from privmed.errors import DataError


def read_volume(path: Path, slice_axis: int = 2, spacing: tuple[float, float, float] | None = None,
                mask: bool = False) -> tuple[np.ndarray, float]:
    """(voxels (X, Y, Z) float32, a pixel's side in mm within the slices along `slice_axis`: the
    smaller of the two in-plane voxel sides) of a NIfTI file; DataError naming the file when it
    cannot be read or is not 3D. The slice thickness does not count: a CT of 0.8 mm pixels in 5 mm
    slices has 0.8 mm pixels.

    With `spacing` (mm along the file's three voxel axes) the volume is resampled to it by MONAI's
    Spacing transform, which follows the file's affine and keeps its axis order: trilinear for an
    image, nearest neighbour for a `mask` (its classes stay whole numbers)."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
        zooms = img.header.get_zooms()
        affine = img.affine
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable NIfTI volume ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    data = np.squeeze(data)
    if data.ndim != 3:
        raise DataError(f"{path}: a volume of shape {data.shape}; a 3D volume (X, Y, Z) is needed")
    if spacing is not None:
        data = resample(data, affine, spacing, mask)
        zooms = spacing
    return data, float(min(z for i, z in enumerate(zooms[:3]) if i != slice_axis))


def resample(vol: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float], mask: bool = False) -> np.ndarray:
    """`vol` (X, Y, Z) with voxel-to-world `affine` (4, 4) resampled to voxels of `spacing` mm
    (MONAI's Spacing: trilinear, or nearest neighbour for a `mask`; borders repeat the edge)."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    t = MetaTensor(torch.from_numpy(np.ascontiguousarray(vol))[None], affine=torch.as_tensor(affine, dtype=torch.float64))
    out = Spacing(pixdim=tuple(float(s) for s in spacing), mode="nearest" if mask else "bilinear",
                  dtype=np.float32)(t)
    return np.asarray(out.array[0], dtype=np.float32)


def normalise(vol: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """`vol` scaled to [0, 1]: divided by the `percentile` of its nonzero voxels, then clipped
    (so a few bright voxels do not squash the tissue contrast); all zeros stays all zeros."""
    nz = vol[vol > 0]
    top = float(np.percentile(nz, percentile)) if len(nz) else 0.0
    if top <= 0:
        return np.zeros_like(vol, dtype=np.float32)
    return np.clip(vol / top, 0.0, 1.0).astype(np.float32)


def axial(vol: np.ndarray, axis: int, shape: tuple[int, int]) -> np.ndarray:
    """(S, H, W) slices of `vol` along `axis`, each centre-padded with zeros or centre-cropped to
    `shape` (H, W)."""
    slab = np.moveaxis(vol, axis, 0)
    out = np.zeros((slab.shape[0], *shape), dtype=slab.dtype)
    src, dst = [], []
    for n, want in zip(slab.shape[1:], shape):
        if n >= want:  # crop
            a = (n - want) // 2
            src.append(slice(a, a + want))
            dst.append(slice(0, want))
        else:  # pad
            a = (want - n) // 2
            src.append(slice(0, n))
            dst.append(slice(a, a + n))
    out[:, dst[0], dst[1]] = slab[:, src[0], src[1]]
    return out


def patches(vol: np.ndarray, axis: int, shape: tuple[int, int, int]) -> np.ndarray:
    """(P, D, H, W) patches of `vol`, depth D along `axis` (then the other axes in order): the
    volume is centre-padded with zeros to a whole number of patches along each side, then cut into
    that grid, depth-major. Every voxel lies in exactly one patch; nothing is resampled or cropped."""
    block = np.moveaxis(vol, axis, 0)
    grid = [-(-n // p) for n, p in zip(block.shape, shape)]  # ceil: patches along each side
    padded = np.zeros([g * p for g, p in zip(grid, shape)], dtype=block.dtype)
    at = tuple(slice((g * p - n) // 2, (g * p - n) // 2 + n) for g, p, n in zip(grid, shape, block.shape))
    padded[at] = block
    (gd, gh, gw), (d, h, w) = grid, shape
    return padded.reshape(gd, d, gh, h, gw, w).transpose(0, 2, 4, 1, 3, 5).reshape(-1, d, h, w)


def slices_with(foreground: np.ndarray, min_fraction: float) -> np.ndarray:
    """Indices of the slices of `foreground` (S, H, W) bool (or patches, (P, D, H, W)) whose
    foreground covers at least `min_fraction` of the slice (patch)."""
    share = foreground.reshape(len(foreground), -1).mean(axis=1)
    return np.flatnonzero(share >= min_fraction)


def remap(labels: np.ndarray, classes: dict[int, tuple[int, ...]]) -> np.ndarray:
    """A class map (int64) from a label map: voxels whose label is in `classes[k]` get class k,
    the rest 0. Classes are applied in order, so a later class wins over an earlier one."""
    out = np.zeros(labels.shape, dtype=np.int64)
    for k, values in classes.items():
        out[np.isin(labels, values)] = k
    return out

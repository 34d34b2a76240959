"""NIfTI volumes with masks, listed in a CSV: the segmentation source for a hospital's own scans.

    data.csv (paths relative to data.root, or to the CSV's folder without data.root):
        file,mask,site,patient,split
        ct/001.nii.gz,ct/001_mask.nii.gz,hospital-a,001,train
        ct/002.nii.gz,ct/002_mask.nii.gz,hospital-a,002,test

- `file` and `mask` are required: an image volume and its integer mask (0 background, 1..K-1 the
  classes; `data.class_names` names them, background first). `site`, `patient` (default: the
  file's name) and `split` ("train", "val" or "test", any case, never empty; any other value is
  refused) are optional. A row marked "test" is the test set of the site it names, scored at that
  site (its patients' images never leave it); with `data.public_test: true`, or without a `site`
  column, the rows marked "test" are one public test set that the coordinator holds and scores.
  When no row says "test", the last `data.test_subjects` patients in the file are the public test
  set. Rows marked "val" are their site's validation set, in place of a `data.val_fraction` draw
  from its training rows (a site with none is refused, naming the fix, unless data.val_fraction is
  0: it then has no validation data). A patient belongs to one split: one row of theirs marked
  "test" (else "val") puts all their rows there.
- Items are slices along the volume's last axis (axial for RAS/LPS files), centre-padded or cropped
  to `data.size` square (default: the largest slice side, rounded up to a multiple of 16). Slices
  with no mask at all are kept only when `data.min_foreground` is 0.
- With `data.patch: [D, H, W]` items are 3D patches instead, (N, 1, D, H, W) images and (N, D, H, W)
  class maps, D along the last axis: each volume (voxels as stored, or resampled by `data.spacing`)
  is centre-padded with zeros to a whole number of patches along each side and cut into that grid
  (privmed.data.volumes.patches). `data.min_foreground` applies to a patch's share of mask voxels.
  The privacy unit stays the volume: all its patches carry its patient id and site. Segmentation
  then trains the 3D U-Net, "unet3d", by default.
- `data.spacing: [x, y, z]` (mm) resamples every volume first (MONAI's Spacing: trilinear for the
  image, nearest neighbour for the mask). HD95 is in mm when every volume has the same pixel side
  (after resampling, always), in pixels otherwise.
- Intensities: CT (HU) with `data.window: [low, high]` is clipped to the window and scaled to
  [0, 1]; anything else is divided by its 99.5th percentile (privmed.data.volumes.normalise).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from privmed.config import DataConfig, SitesConfig
from privmed.data._csv import check_splits, read_index
from privmed.data.base import ImageSet, SourceData
from privmed.data.volumes import axial, normalise, patches, read_volume, slices_with
from privmed.errors import DataError


def load_nifti(data: DataConfig, sites: SitesConfig, seed: int) -> SourceData:
    csv = Path(data.csv)
    rows = read_index(csv, ("file", "mask"), ("site", "patient", "split"))
    check_splits(rows, csv, ("train", "val", "test"))
    root = Path(data.root) if data.root is not None else csv.parent
    spacing = tuple(data.spacing) if data.spacing else None
    vols = [_read_pair(root, r, spacing) for r in rows]
    side = data.size or int(np.ceil(max(max(v.shape[:2]) for v, _, _ in vols) / 16) * 16)
    patch = tuple(data.patch) if data.patch else None
    k = max(int(m.max()) for _, m, _ in vols) + 1
    names = list(data.class_names) if data.class_names else ["background", *(f"class {i}" for i in range(1, k))]
    if len(names) < k:
        raise DataError(f"data.class_names: {len(names)} names, but the masks hold classes up to {k - 1} "
                        "(name the background first)")
    patients = [r.get("patient") or Path(r["file"]).name.split(".")[0] for r in rows]
    test = {p for r, p in zip(rows, patients) if r.get("split", "").lower() == "test"}
    val = {p for r, p in zip(rows, patients) if r.get("split", "").lower() == "val"} - test
    # a test row stays its site's own, unless the config (or a file without sites) makes it public
    public = data.public_test or "site" not in rows[0]
    if not test:
        public = True
        ordered = list(dict.fromkeys(patients))
        if data.test_subjects >= len(ordered):
            raise DataError(f"data.test_subjects: {data.test_subjects} leaves no patient to train on "
                            f"({len(ordered)} patients in {csv})")
        test = set(ordered[-data.test_subjects:])
    train, validation, held = [], [], []
    for r, p, (vol, mask, _) in zip(rows, patients, vols):
        img, m = _items(_intensities(vol, data.window), mask, patch or (side, side))
        keep = slices_with(m > 0, data.min_foreground) if data.min_foreground > 0 else np.arange(len(m))
        n = len(keep)
        part = ImageSet(images=img[keep], labels=np.zeros(n, np.int64), patient=np.full(n, p),
                        site=None if p in test and public else np.full(n, r.get("site", "site-1")),
                        target=m[keep])
        (held if p in test else validation if p in val else train).append(part)
    if not train or not held:
        raise DataError(f"{csv}: the split leaves no {'training' if not train else 'test'} volume")
    # HD95 in mm needs one pixel side for every volume; otherwise it is given in pixels, and the
    # description says why
    sides = [s for _, _, s in vols]
    same = max(sides) <= min(sides) * 1.01
    voxels = (f"resampled to {' x '.join(f'{s:g}' for s in spacing)} mm" if spacing else
              "voxels as stored" + ("" if same else f", pixel sides {min(sides):.2f} to {max(sides):.2f} mm "
                                    "(HD95 in pixels; data.spacing resamples them to one)"))
    return SourceData(
        train=ImageSet.concat(train), test=ImageSet.concat(held), class_names=names,
        val=ImageSet.concat(validation) if validation else None,
        description=f"NIfTI volumes from {csv.name}: {len(rows)} volumes, {voxels}, "
                    + (f"patches {'x'.join(map(str, patch))}" if patch else f"slices {side}x{side}"),
        files=[str(root / r[c]) for r in rows for c in ("file", "mask")],
        spacing_mm=max(sides) if same else None,
    )


def _items(img: np.ndarray, mask: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 1, *shape), class maps (N, *shape)) of one volume: slices along its last axis
    for a 2D `shape` (H, W), patches for a 3D one (D, H, W)."""
    cut = patches if len(shape) == 3 else axial
    return cut(img, 2, shape)[:, None], cut(mask, 2, shape)


def _read_pair(root: Path, row: dict, spacing: tuple[float, ...] | None) -> tuple[np.ndarray, np.ndarray, float]:
    path, mpath = root / row["file"], root / row["mask"]
    for p in (path, mpath):
        if not p.is_file():
            raise DataError(f"data.csv: {p} not found")
    vol, side = read_volume(path, spacing=spacing)
    mask, _ = read_volume(mpath, spacing=spacing, mask=True)
    if mask.shape != vol.shape:
        raise DataError(f"{mpath}: shape {mask.shape} differs from its image's {vol.shape}")
    m = np.rint(mask)
    if m.min() < 0 or not np.allclose(m, mask):
        raise DataError(f"{mpath}: a mask holds whole class numbers 0, 1, ...; found {float(mask.min()):g} "
                        f"to {float(mask.max()):g}")
    return vol, m.astype(np.int64), side


def _intensities(vol: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    if window is None:
        return normalise(vol)
    lo, hi = window
    return ((np.clip(vol, lo, hi) - lo) / (hi - lo)).astype(np.float32)

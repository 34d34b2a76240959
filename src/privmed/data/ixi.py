"""IXI T1 brain MRI (../shared/data/ixi-t1): 10 volumes from the IXI study's Hammersmith scanner,
resampled to 2 mm (120 x 120 x 90, P-S-R voxel order), each with a DLMUSE label map of 149 regions.

    data.root/images/IXI012-HH-1211-T1_ds.nii.gz   the T1 volume
    data.root/labels/IXI012-HH-1211-T1_ds_DLMUSE.nii.gz   its label map (MUSE numbering)

Segmentation classes, merged from the label map (`CLASSES`):
- 2 "ventricles": MUSE labels 4 (3rd ventricle), 11 (4th ventricle), 49 and 50 (right and left
  inferior lateral ventricles), 51 and 52 (right and left lateral ventricles);
- 1 "tissue": every other nonzero label (the rest of the brain);
- 0 background. "Whole brain" is classes 1 and 2 together: the metrics' `dice_foreground`.

Items are axial slices (along the S axis) that cross the brain (brain covers >= 2% of the slice),
each 112 x 80 px (the 120 x 90 slice centre-cropped; the brain lies within it), intensities / the volume's 99.5th percentile.
`data.slice_step` n keeps every n-th of those slices. A subject is a patient; `data.test_subjects` subjects (drawn by the seed) are the public test set,
the rest are dealt to the sites in turn (the `site` column; `sites.partition: natural` keeps it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from privmed.config import DataConfig, SitesConfig
from privmed.data.base import ImageSet, SourceData
from privmed.data.volumes import axial, normalise, read_volume, remap, slices_with
from privmed.errors import DataError

CLASS_NAMES = ["background", "tissue", "ventricles"]
VENTRICLES = (4, 11, 49, 50, 51, 52)
SLICE_AXIS = 1  # S: axial slices
SLICE_SHAPE = (112, 80)  # the 120 x 90 slice centre-cropped: the brain lies within it
MIN_BRAIN = 0.02
CITATION = "IXI dataset (brain-development.org/ixi-dataset), CC BY-SA 3.0; labels: DLMUSE"


def subjects_in(root: Path) -> list[tuple[str, Path, Path]]:
    """(subject id, image file, label file) of each subject under `root`, sorted by id; DataError
    naming the folder or the file that is missing."""
    images = root / "images"
    if not images.is_dir():
        raise DataError(f"data.root: {root} has no images/ folder (the IXI layout: images/*.nii.gz, labels/*.nii.gz)")
    out = []
    for img in sorted(images.glob("*.nii.gz")):
        stem = img.name[: -len(".nii.gz")]
        label = root / "labels" / f"{stem}_DLMUSE.nii.gz"
        if not label.is_file():
            raise DataError(f"{img}: its label map {label} is missing")
        out.append((stem.split("-T1")[0], img, label))
    if not out:
        raise DataError(f"data.root: {images} holds no .nii.gz volumes")
    return out


def load_subject(image: Path, label: Path, step: int = 1) -> tuple[np.ndarray, np.ndarray, float]:
    """(slices (S, 1, H, W) float32 in [0, 1], class maps (S, H, W) int64, pixel side in mm) of
    every `step`-th of one subject's slices that cross the brain."""
    vol, spacing = read_volume(image, SLICE_AXIS)
    lab, _ = read_volume(label)
    if lab.shape != vol.shape:
        raise DataError(f"{label}: shape {lab.shape} differs from its image's {vol.shape}")
    classes = remap(np.rint(lab).astype(np.int64), {1: tuple(np.unique(lab[lab > 0]).astype(int)), 2: VENTRICLES})
    img = axial(normalise(vol), SLICE_AXIS, SLICE_SHAPE)
    mask = axial(classes, SLICE_AXIS, SLICE_SHAPE)
    keep = slices_with(mask > 0, MIN_BRAIN)[::step]
    return img[keep][:, None], mask[keep], spacing


def load_ixi(data: DataConfig, sites: SitesConfig, seed: int) -> SourceData:
    root = Path(data.root)
    found = subjects_in(root)
    if data.subjects is not None:
        known = {s for s, _, _ in found}
        unknown = [s for s in data.subjects if s not in known]
        if unknown:
            raise DataError(f"data.subjects: '{unknown[0]}' is not in {root} (has: {', '.join(sorted(known))})")
        found = [f for f in found if f[0] in data.subjects]
    if data.test_subjects >= len(found):
        raise DataError(f"data.test_subjects: {data.test_subjects} leaves no subject to train on ({len(found)} subjects)")
    order = np.random.default_rng([seed, 0x1C1]).permutation(len(found))
    test_ids = {found[i][0] for i in order[: data.test_subjects]}
    train_ids = [found[i][0] for i in order[data.test_subjects:]]
    names = sites.site_names()
    site_of = {s: names[i % len(names)] for i, s in enumerate(train_ids)}
    train, test, spacing = [], [], None
    for subject, image, label in found:
        img, mask, spacing = load_subject(image, label, data.slice_step)
        n = len(img)
        part = ImageSet(images=img, labels=np.zeros(n, np.int64),
                        site=np.full(n, site_of.get(subject, "test")), patient=np.full(n, subject), target=mask)
        (test if subject in test_ids else train).append(part)
    return SourceData(
        train=ImageSet.concat(train),
        test=_no_site(ImageSet.concat(test)),
        class_names=list(CLASS_NAMES),
        description=(f"IXI T1 brain MRI, {len(found)} subjects ({len(test_ids)} held out for test), "
                     f"axial slices {SLICE_SHAPE[0]}x{SLICE_SHAPE[1]} at 2 mm; classes: brain tissue, ventricles"),
        citation=CITATION,
        files=[str(p) for _, a, b in found for p in (a, b)],
        spacing_mm=spacing,
    )


def _no_site(s: ImageSet) -> ImageSet:
    """The test subjects belong to no site: the coordinator holds them (a public test set)."""
    return ImageSet(images=s.images, labels=s.labels, patient=s.patient, target=s.target)

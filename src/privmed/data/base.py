"""The in-memory form every data source produces.

Images are float32 arrays (N, C, H, W) scaled to [0, 1], volumes (N, C, D, H, W) likewise; tabular
sources give float32 features (N, D) in the same field. Labels are int64 (N,): the class, or for survival data the event indicator
(1: the event was observed at `time`, 0: censored at `time`). A source may also say, per item, which
site (hospital) it came from and which patient it belongs to: the privacy unit is the patient, so
splits never separate one patient's items.

Dense tasks (segmentation, reconstruction) also carry a `target` per item: a class map (N, H, W)
int64 for segmentation, the image to reconstruct (N, 1, H, W) float32 for reconstruction. Their
`labels` are then all 0 (no class per item), and a volume's slices are one patient's items, in the
order of the volume.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # (N, C, H, W) or (N, C, D, H, W) float32 in [0, 1], or (N, D) features
    labels: np.ndarray  # (N,) int64 in [0, n_classes); survival: the event indicator 0/1
    site: np.ndarray | None = None  # (N,) str: the site each item comes from, if known
    patient: np.ndarray | None = None  # (N,) str: patient ids, if known
    time: np.ndarray | None = None  # (N,) float64 survival: time to the event or to censoring
    target: np.ndarray | None = None  # (N, ...) dense targets: class maps or images to reconstruct

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.images.ndim not in (2, 4, 5) or len(self.images) != n:
            raise ValueError(
                f"images {self.images.shape} do not match {n} labels as (N, C, H, W), "
                "(N, C, D, H, W) or (N, D)"
            )
        for name in ("site", "patient", "time", "target"):
            col = getattr(self, name)
            if col is not None and len(col) != n:
                raise ValueError(f"{name} has {len(col)} entries for {n} items")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "ImageSet":
        idx = np.asarray(idx, dtype=np.int64)
        return ImageSet(
            images=self.images[idx],
            labels=self.labels[idx],
            site=None if self.site is None else self.site[idx],
            patient=None if self.patient is None else self.patient[idx],
            time=None if self.time is None else self.time[idx],
            target=None if self.target is None else self.target[idx],
        )

    def patient_ids(self) -> np.ndarray:
        """(N,) patient id per item; each item is its own patient when the source has none."""
        if self.patient is not None:
            return self.patient
        return np.arange(len(self)).astype(str)

    @staticmethod
    def concat(parts: list["ImageSet"]) -> "ImageSet":
        def cat(name: str):
            cols = [getattr(p, name) for p in parts]
            return None if any(c is None for c in cols) else np.concatenate(cols)

        return ImageSet(
            images=np.concatenate([p.images for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            site=cat("site"),
            patient=cat("patient"),
            time=cat("time"),
            target=cat("target"),
        )


@dataclass(frozen=True)
class SourceData:
    """What a data source returns: pooled splits plus facts about the data."""

    train: ImageSet  # everything sites may train on (partitioned into sites later)
    test: ImageSet  # the pooled test set; never trained on
    class_names: list[str]
    val: ImageSet | None = None  # an official validation split, if the source has one
    synthetic: bool = False  # True for generated (phantom) data: say so everywhere
    description: str = ""  # one line: what the data is
    citation: str = ""  # license / source to cite in the report
    files: list[str] = field(default_factory=list)  # files read, for the record
    feature_names: list[str] = field(default_factory=list)  # tabular: one name per column of D
    spacing_mm: float | None = None  # dense tasks: the pixel side in mm, when known (HD95 in mm)

    @property
    def tabular(self) -> bool:
        """True for (N, D) feature tables, False for (N, C, H, W) images."""
        return self.train.images.ndim == 2

    @property
    def n_features(self) -> int:
        """Tabular: D, the number of feature columns."""
        return int(self.train.images.shape[1])

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        """Image side in pixels, a volume's in voxels (0 for tabular data)."""
        return 0 if self.tabular else int(self.train.images.shape[2])

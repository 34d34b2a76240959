"""The public facts a plan is made from: the data's shape and classes, and each site's counts.
No patient's record is in them; in a deployment each hospital reports its own (`describe`), and
the coordinator plans from them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from privmed.data.base import SourceData
from privmed.data.sites import SiteData
from privmed.errors import PrivmedError
from privmed.federation.site import n_patients

# what every site's data must agree on for one model to serve them all
# (spatial_dims: images and volumes of one side do not mix; image sides other than the first may
# differ, as before, since the image models pool adaptively)
SHAPE_FIELDS = ("in_channels", "image_size", "n_classes", "tabular", "class_names", "feature_names",
                "spatial_dims")


@dataclass(frozen=True)
class DataFacts:
    """What a plan, the summary and the report need to know of the data, and nothing of any
    patient: its shape and classes and what it is (public; in a deployment every site reports
    them, and they must agree)."""

    in_channels: int
    image_size: int
    n_classes: int
    tabular: bool
    source: str  # data.source, for messages
    class_names: tuple[str, ...] = ()
    feature_names: tuple[str, ...] = ()
    image_shape: tuple[int, ...] = ()  # one item's shape: (C, H, W), (C, D, H, W) or (D,) (tabular)
    synthetic: bool = False
    description: str = ""
    citation: str = ""
    spacing_mm: float | None = None  # dense tasks: the pixel side, when the source knows it

    @property
    def spatial_dims(self) -> int:
        """0 for a feature table, 2 for images, 3 for volumes (2 where the shape is not known)."""
        if self.tabular:
            return 0
        return len(self.image_shape) - 1 if self.image_shape else 2

    @classmethod
    def of(cls, source: SourceData, name: str) -> DataFacts:
        return cls(
            source.in_channels, source.image_size, source.n_classes, source.tabular, name,
            tuple(source.class_names), tuple(source.feature_names),
            tuple(int(s) for s in source.train.images.shape[1:]),
            source.synthetic, source.description, source.citation, source.spacing_mm,
        )

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> DataFacts:
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})

    @classmethod
    def agreed(cls, reported: dict[str, DataFacts]) -> DataFacts:
        """The facts every site reported alike (PrivmedError naming the first that differs); the
        description names every site's data."""
        if not reported:
            raise PrivmedError("no site reported its data")
        names = list(reported)
        first = reported[names[0]]
        for name in names[1:]:
            for key in SHAPE_FIELDS:
                a, b = getattr(first, key), getattr(reported[name], key)
                if a != b:
                    raise PrivmedError(
                        f"site '{name}' holds data with {key} {b!r}, but site '{names[0]}' has {a!r}: "
                        "one model cannot serve both (the hospitals must agree on classes and image size)"
                    )
        return replace(
            first,
            synthetic=all(f.synthetic for f in reported.values()),
            description=_one_or_each({n: f.description for n, f in reported.items() if f.description}),
            citation="; ".join(dict.fromkeys(f.citation for f in reported.values() if f.citation)),
        )


@dataclass(frozen=True)
class SiteProfile:
    """A site's public counts: what it tells the coordinator about itself."""

    name: str
    n_train: int  # training items (images, records)
    n_patients: int  # distinct training patients (items, where the data names no patients)
    patient_ids: bool  # whether its training data names each item's patient
    n_val: int
    n_test: int
    # how many validation items of each class (classification; () for survival data): every round's
    # evaluation counts release them anyway; the run's reference label shares come from them
    val_label_counts: tuple[int, ...] = ()

    @classmethod
    def of(cls, sd: SiteData) -> SiteProfile:
        dense = sd.val.target is not None or sd.train.target is not None
        counts = () if sd.val.time is not None or dense else tuple(int(c) for c in np.bincount(sd.val.labels))
        return cls(sd.name, len(sd.train), n_patients(sd.train), sd.train.patient is not None,
                   len(sd.val), 0 if sd.test is None else len(sd.test), counts)

    def to_dict(self) -> dict:
        return {**asdict(self), "val_label_counts": list(self.val_label_counts)}

    @classmethod
    def from_dict(cls, d: dict) -> SiteProfile:
        try:
            return cls(str(d["name"]), int(d["n_train"]), int(d["n_patients"]), bool(d["patient_ids"]),
                       int(d["n_val"]), int(d["n_test"]), tuple(int(c) for c in d.get("val_label_counts", ())))
        except (KeyError, TypeError, ValueError) as e:
            raise PrivmedError(f"a site's description lacks or garbles {e}: {d}") from None


def reference_label_shares(sites: list[SiteProfile], n_classes: int) -> tuple[float, ...] | None:
    """The federation's label shares as the sites' validation items give them (Laplace-smoothed):
    the reference that logit adjustment calibrates the shared model to. None without validation
    items, or for data without classes."""
    counts = np.zeros(n_classes, dtype=np.float64)
    for p in sites:
        c = np.asarray(p.val_label_counts[:n_classes], dtype=np.float64)
        counts[: len(c)] += c
    if n_classes < 2 or counts.sum() == 0:
        return None
    return tuple(float(x) for x in (counts + 1) / (counts.sum() + n_classes))


def _one_or_each(texts: dict[str, str]) -> str:
    """The text every site gave, once; else each site's, named."""
    if len(set(texts.values())) <= 1:
        return next(iter(texts.values()), "")
    return "; ".join(f"{n}: {t}" for n, t in texts.items())

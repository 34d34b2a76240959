"""The public facts a plan is made from: the data's shape and classes, and each site's counts.
No patient's record is in them; in a deployment each hospital reports its own (`describe`), and
the coordinator plans from them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from privmed.data.base import SourceData
from privmed.data.sites import SiteData
from privmed.federation.site import n_patients


@dataclass(frozen=True)
class DataFacts:
    """What a plan needs to know of the data, and nothing of any patient: its shape and classes
    (public; in a deployment every site reports them)."""

    in_channels: int
    image_size: int
    n_classes: int
    tabular: bool
    source: str  # data.source, for messages

    @classmethod
    def of(cls, source: SourceData, name: str) -> DataFacts:
        return cls(source.in_channels, source.image_size, source.n_classes, source.tabular, name)


@dataclass(frozen=True)
class SiteProfile:
    """A site's public counts: what it tells the coordinator about itself."""

    name: str
    n_train: int  # training items (images, records)
    n_patients: int  # distinct training patients (items, where the data names no patients)
    patient_ids: bool  # whether its training data names each item's patient
    n_val: int
    n_test: int

    @classmethod
    def of(cls, sd: SiteData) -> SiteProfile:
        return cls(sd.name, len(sd.train), n_patients(sd.train), sd.train.patient is not None,
                   len(sd.val), 0 if sd.test is None else len(sd.test))

    def to_dict(self) -> dict:
        return asdict(self)

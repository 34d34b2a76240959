"""From a source's pooled data to one SiteData per hospital: training and validation data of its
own, and its own test data when the source says which site each test item comes from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from privmed.config import SitesConfig
from privmed.data import partition as P
from privmed.data._split import holdout_by_patient
from privmed.data.base import ImageSet, SourceData
from privmed.errors import ConfigError, DataError

_MAX_DRAWS = 100  # redraws of a random partition that left a site too small


@dataclass(frozen=True)
class SiteData:
    name: str
    train: ImageSet
    val: ImageSet
    test: ImageSet | None = None  # the site's own test data, if any


def split_into_sites(
    source: SourceData, sites: SitesConfig, *, val_fraction: float, seed: int
) -> list[SiteData]:
    """Partition `source.train` (and `source.val`, when the source has one) into sites.

    Deterministic in `seed`. Raises DataError when a site ends up with too little data.
    """
    rng = np.random.default_rng([seed, 0x5175])  # a stream of its own: partitioning only
    if sites.partition == "natural":
        parts = _natural(source, sites, val_fraction, rng)
    else:
        parts = _random(source, sites, val_fraction, rng)
    for sd in parts:
        if len(sd.val) == 0 and val_fraction > 0:
            fix = ("the source's validation split (rows marked 'val') holds none of its items: mark "
                   "some of its patients 'val', or set data.val_fraction: 0 (a site without 'val' rows then "
                   "has no validation data)"
                   if source.val is not None and sites.partition == "natural" else
                   "raise data.val_fraction or sites.alpha")
            raise DataError(
                f"sites: site '{sd.name}' has no validation data ({len(sd.train)} training items); {fix}"
            )
    return parts


def _natural(
    source: SourceData, sites: SitesConfig, val_fraction: float, rng: np.random.Generator
) -> list[SiteData]:
    train = source.train
    if train.site is None:
        raise ConfigError(
            "sites.partition: 'natural' needs a site for every item, and this data source has none "
            "(give data.csv a 'site' column, or use iid, dirichlet or quantity)"
        )
    found = list(dict.fromkeys(train.site.tolist()))  # order of first appearance
    if sites.names is not None:
        missing = sorted(set(sites.names) - set(found))
        extra = sorted(set(found) - set(sites.names))
        if missing or extra:
            raise ConfigError(
                f"sites.names: {sites.names} do not match the data's sites {sorted(found)}"
            )
        found = list(sites.names)
    if len(found) != sites.count:
        raise ConfigError(
            f"sites.count: {sites.count}, but the data holds {len(found)} sites ({', '.join(found)})"
        )
    out = []
    for name in found:
        tr = train.subset(np.flatnonzero(train.site == name))
        _check_size(name, len(tr), sites)
        if source.val is not None and source.val.site is not None:
            va = source.val.subset(np.flatnonzero(source.val.site == name))
        else:
            tr, va = _holdout(tr, val_fraction, rng, name)
        te = None
        if source.test.site is not None:
            idx = np.flatnonzero(source.test.site == name)
            te = source.test.subset(idx) if len(idx) else None
        out.append(SiteData(name, tr, va, te))
    return out


def _random(
    source: SourceData, sites: SitesConfig, val_fraction: float, rng: np.random.Generator
) -> list[SiteData]:
    names = sites.site_names()
    n, train = sites.count, source.train
    unit_of_item, unit_label, _ = P.patient_units(train.patient_ids(), train.labels)
    n_units = len(unit_label)
    if n_units < n:
        raise DataError(f"sites.count: {n} sites but the data has only {n_units} patients")

    for _ in range(_MAX_DRAWS):
        if sites.partition == "iid":
            shares = None
            unit_sets = P.split_iid(n_units, n, rng)
        elif sites.partition == "dirichlet":
            shares = P.dirichlet_label_proportions(source.n_classes, n, sites.alpha, rng)
            unit_sets = P.split_by_label_proportions(unit_label, shares, rng)
        else:  # quantity
            shares = P.quantity_proportions(n, sites.alpha, rng)
            unit_sets = P.split_by_quantity(n_units, shares, rng)
        item_sets = P.units_to_items(unit_of_item, unit_sets)
        if min(len(s) for s in item_sets) >= sites.min_samples:
            break
    else:
        small = min(range(n), key=lambda s: len(item_sets[s]))
        raise DataError(
            f"sites: partition '{sites.partition}' (alpha={sites.alpha}) left site '{names[small]}' "
            f"with {len(item_sets[small])} training items (< sites.min_samples={sites.min_samples}) "
            f"in {_MAX_DRAWS} draws; raise sites.alpha or lower sites.count"
        )

    val_sets = _split_val(source.val, sites.partition, shares, n, rng) if source.val else None
    out = []
    for s, name in enumerate(names):
        tr = train.subset(item_sets[s])
        if val_sets is not None:
            va = val_sets[s]
        else:
            tr, va = _holdout(tr, val_fraction, rng, name)
        out.append(SiteData(name, tr, va, None))
    return out


def _split_val(
    val: ImageSet, scheme: str, shares: np.ndarray | None, n: int, rng: np.random.Generator
) -> list[ImageSet]:
    """The source's own validation split, partitioned the same way as its training data."""
    unit_of_item, unit_label, _ = P.patient_units(val.patient_ids(), val.labels)
    if scheme == "iid":
        unit_sets = P.split_iid(len(unit_label), n, rng)
    elif scheme == "dirichlet":
        unit_sets = P.split_by_label_proportions(unit_label, shares, rng)
    else:
        unit_sets = P.split_by_quantity(len(unit_label), shares, rng)
    return [val.subset(idx) for idx in P.units_to_items(unit_of_item, unit_sets)]


def _holdout(
    data: ImageSet, fraction: float, rng: np.random.Generator, site: str
) -> tuple[ImageSet, ImageSet]:
    """A site's validation split, stratified by label, patients kept whole (none for fraction 0)."""
    if fraction == 0:
        return data, data.subset(np.zeros(0, dtype=np.int64))
    keep_idx, held_idx = holdout_by_patient(
        data.labels, data.patient_ids(), fraction, rng, field=f"data.val_fraction (site '{site}')"
    )
    return data.subset(keep_idx), data.subset(held_idx)


def _check_size(name: str, n_train: int, sites: SitesConfig) -> None:
    if n_train < sites.min_samples:
        raise DataError(
            f"sites: site '{name}' has {n_train} training items (< sites.min_samples={sites.min_samples})"
        )


def pooled_site(parts: list[SiteData], name: str = "pooled") -> SiteData:
    """All sites' training and validation data in one place: the centralised reference."""
    return SiteData(
        name,
        ImageSet.concat([p.train for p in parts]),
        ImageSet.concat([p.val for p in parts]),
        None,
    )


def own_site(name: str, source: SourceData, *, val_fraction: float, seed: int) -> SiteData:
    """A hospital's SiteData from its own data alone (`source`: its folder or table): training data,
    a validation hold-out of `val_fraction` by patient (or the source's own validation split) and
    its own test data. Seeded by the hospital's seed and name only, so the same folder gives the
    same split wherever it is loaded (at the hospital, or in a simulation of it)."""
    rng = np.random.default_rng([seed, 0x5175, *name.encode()])
    train = source.train
    _check_size(name, len(train), SitesConfig(count=1))  # the default minimum
    if source.val is not None:
        tr, va = train, source.val
    else:
        tr, va = _holdout(train, val_fraction, rng, name)
    return SiteData(name, tr, va, source.test)

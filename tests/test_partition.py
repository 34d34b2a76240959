"""Partitioning into sites: invariants (disjoint, complete, patients kept whole, seeded)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privmed.config import SitesConfig
from privmed.data import partition as P
from privmed.data.base import ImageSet, SourceData
from privmed.data.sites import split_into_sites
from privmed.errors import ConfigError, DataError


def _source(n=600, n_classes=2, patients=None, site=None, with_val=False, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    imgs = rng.random((n, 1, 4, 4), dtype=np.float32)
    train = ImageSet(imgs, labels, site=site, patient=patients)
    val = None
    if with_val:
        vl = rng.integers(0, n_classes, n // 5)
        val = ImageSet(rng.random((n // 5, 1, 4, 4), dtype=np.float32), vl)
    test = ImageSet(imgs[:50], labels[:50])
    return SourceData(train=train, test=test, val=val, class_names=[str(k) for k in range(n_classes)])


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_partition_is_disjoint_complete_and_seeded(scheme):
    src = _source(with_val=True)
    cfg = SitesConfig(count=4, partition=scheme, alpha=1.0)
    a = split_into_sites(src, cfg, val_fraction=0.2, seed=1)
    b = split_into_sites(src, cfg, val_fraction=0.2, seed=1)
    c = split_into_sites(src, cfg, val_fraction=0.2, seed=2)
    total = sum(len(s.train) for s in a)
    assert total == len(src.train)  # official val exists: training data is not split further
    assert sum(len(s.val) for s in a) == len(src.val)
    seen = np.concatenate([s.train.images.reshape(len(s.train), -1)[:, 0] for s in a])
    assert len(np.unique(seen)) == len(seen)  # no item in two sites
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.train.labels, y.train.labels)
        np.testing.assert_array_equal(x.train.images, y.train.images)
    assert any(len(x.train) != len(z.train) or not np.array_equal(x.train.images, z.train.images)
               for x, z in zip(a, c))


def test_dirichlet_small_alpha_skews_labels_more_than_iid():
    src = _source(n=3000)
    def skew(parts):
        return np.mean([abs(p.train.labels.mean() - 0.5) for p in parts])
    iid = split_into_sites(src, SitesConfig(count=5, partition="iid"), val_fraction=0.1, seed=0)
    dir_ = split_into_sites(src, SitesConfig(count=5, partition="dirichlet", alpha=0.1),
                            val_fraction=0.1, seed=0)
    assert skew(dir_) > 3 * skew(iid)


def test_quantity_small_alpha_skews_sizes():
    src = _source(n=3000)
    parts = split_into_sites(src, SitesConfig(count=5, partition="quantity", alpha=0.3),
                             val_fraction=0.1, seed=0)
    sizes = [len(p.train) for p in parts]
    assert max(sizes) > 2 * min(sizes)


@given(st.integers(0, 1000), st.integers(2, 6))
@settings(max_examples=25, deadline=None)
def test_patients_never_split(seed, n_sites):
    rng = np.random.default_rng(seed)
    patients = rng.integers(0, 150, 600).astype(str)
    src = _source(patients=patients, seed=seed)
    parts = split_into_sites(src, SitesConfig(count=n_sites, partition="iid", min_samples=1),
                             val_fraction=0.2, seed=seed)
    owner = {}
    for p in parts:
        for split in (p.train, p.val):
            for pid in np.unique(split.patient):
                assert owner.setdefault(pid, (p.name, id(split))) == (p.name, id(split))


def test_natural_uses_site_column_and_checks_count():
    site = np.array(["x", "y", "z"] * 200)
    src = _source(site=site)
    parts = split_into_sites(src, SitesConfig(count=3, partition="natural"), val_fraction=0.2, seed=0)
    assert [p.name for p in parts] == ["x", "y", "z"]
    assert all(set(p.train.site) == {p.name} for p in parts)
    with pytest.raises(ConfigError, match="holds 3 sites"):
        split_into_sites(src, SitesConfig(count=2, partition="natural"), val_fraction=0.2, seed=0)
    with pytest.raises(ConfigError, match="no site|none"):
        split_into_sites(_source(), SitesConfig(count=3, partition="natural"), val_fraction=0.2, seed=0)


def test_site_left_without_data_is_an_error():
    src = _source(n=40)
    with pytest.raises(DataError, match="site"):
        split_into_sites(src, SitesConfig(count=30, partition="dirichlet", alpha=0.01),
                         val_fraction=0.2, seed=0)


def test_patient_units_groups_by_first_appearance():
    unit, label, size = P.patient_units(np.array(["b", "a", "b", "c"]), np.array([1, 0, 1, 0]))
    assert unit.tolist() == [0, 1, 0, 2]
    assert label.tolist() == [1, 0, 0]
    assert size.tolist() == [2, 1, 1]

"""The tabular sources: UCI Heart Disease and TCGA-BRCA, preprocessed as FLamby's Fed-Heart-Disease
and Fed-TCGA-BRCA (sizes, features, split, standardisation, errors)."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import train_test_split

from privmed.config import DataConfig, SitesConfig
from privmed.data import load_source
from privmed.data.heart_disease import load_heart_disease
from privmed.data.tcga_brca import load_tcga_brca
from privmed.errors import DataError

HEART_SITES = ["cleveland", "hungarian", "switzerland", "va"]
HEART_ROWS = [303, 261, 46, 130]  # after dropping columns 10-12 and incomplete rows
HEART_TRAIN = [199, 172, 30, 85]  # FLamby's README (Fed-Heart-Disease)
HEART_TEST = [104, 89, 16, 45]
HEART_FEATURES = ["age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak",
                  "cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2"]
TCGA_SITES = ["Northeast", "South", "West", "Midwest", "Europe", "Canada"]
TCGA_TRAIN = [248, 156, 164, 129, 129, 40]  # FLamby's README (Fed-TCGA-BRCA)
TCGA_TEST = [63, 40, 42, 33, 33, 11]

_cache: dict = {}


def _heart(shared, standardize="auto"):
    key = ("heart", standardize)
    if key not in _cache:
        _cache[key] = load_heart_disease(DataConfig(
            source="heart-disease", root=shared / "uci-heart-disease", standardize=standardize))
    return _cache[key]


def _tcga(shared, standardize="auto"):
    key = ("tcga", standardize)
    if key not in _cache:
        _cache[key] = load_tcga_brca(DataConfig(
            source="tcga-brca", root=shared / "tcga-brca", standardize=standardize))
    return _cache[key]


def _sizes(part, sites):
    return [int((part.site == s).sum()) for s in sites]


def _check_per_site(sd, raw):
    """Each site's training rows have mean 0 and std 1 (or are constant); test rows are scaled by
    the training statistics of their own site."""
    for s in dict.fromkeys(sd.train.site.tolist()):
        tr, te = sd.train.site == s, sd.test.site == s
        x = sd.train.images[tr].astype(np.float64)
        np.testing.assert_allclose(x.mean(0), 0, atol=1e-5)
        raw_x = raw.train.images[tr].astype(np.float64)
        std = raw_x.std(0, ddof=1)
        varying = std > 0
        np.testing.assert_allclose(x.std(0, ddof=1)[varying], 1, atol=1e-5)
        np.testing.assert_allclose(x[:, ~varying], 0, atol=1e-6)
        # the site's test rows, by hand from the raw features
        mean, scale = raw_x.mean(0), np.where(varying, std, 1.0)
        expected = (raw.test.images[te].astype(np.float64) - mean) / scale
        np.testing.assert_allclose(sd.test.images[te], expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- heart disease


def test_heart_sizes_features_and_labels(shared_data):
    sd = _heart(shared_data)
    assert sd.tabular and sd.val is None and sd.n_features == 13
    assert sd.feature_names == HEART_FEATURES
    assert sd.class_names == ["no disease", "disease"]
    assert list(dict.fromkeys(sd.train.site.tolist())) == HEART_SITES
    assert list(dict.fromkeys(sd.test.site.tolist())) == HEART_SITES
    assert _sizes(sd.train, HEART_SITES) == HEART_TRAIN
    assert _sizes(sd.test, HEART_SITES) == HEART_TEST
    assert [a + b for a, b in zip(HEART_TRAIN, HEART_TEST)] == HEART_ROWS
    for part in (sd.train, sd.test):
        assert part.images.dtype == np.float32 and part.images.shape[1] == 13
        assert part.labels.dtype == np.int64 and set(np.unique(part.labels)) <= {0, 1}
        assert part.time is None
    patients = np.concatenate([sd.train.patient, sd.test.patient])
    assert len(set(patients)) == sum(HEART_ROWS)
    assert sd.train.patient[0] == "cleveland-1"
    assert len(sd.files) == 4 and all(f.endswith(".data") for f in sd.files)
    assert "CC BY 4.0" in sd.citation and "Janosi" in sd.citation


def test_heart_raw_features_follow_the_file(shared_data):
    raw = _heart(shared_data, "none")
    # cleveland line 1: 63,1,1,145,233,1,2,150,0,2.3,3,0,6,0 -> cp 1 and restecg 2
    row = raw.train.images[raw.train.patient == "cleveland-1"]
    if len(row) == 0:
        row = raw.test.images[raw.test.patient == "cleveland-1"]
    np.testing.assert_allclose(row[0], [63, 1, 145, 233, 1, 150, 0, 2.3, 0, 0, 0, 0, 1], rtol=1e-6)
    allx = np.concatenate([raw.train.images, raw.test.images])
    assert set(np.unique(allx[:, 8:])) == {0.0, 1.0}  # dummies
    assert (allx[:, 8:11].sum(1) <= 1).all() and (allx[:, 11:].sum(1) <= 1).all()


def test_heart_split_matches_an_independent_recomputation(shared_data):
    sd = _heart(shared_data)
    path = shared_data / "uci-heart-disease" / "processed.hungarian.data"
    df = pd.read_csv(path, header=None, na_values="?")
    df = df.drop(columns=[10, 11, 12]).dropna()
    y = (df[13] > 0).astype(int).to_numpy()
    tr, te = train_test_split(np.arange(len(df)), train_size=0.66, test_size=0.34,
                              random_state=43, shuffle=True, stratify=y)
    lines = df.index.to_numpy() + 1
    for part, idx in ((sd.train, tr), (sd.test, te)):
        got = sorted(part.patient[part.site == "hungarian"])
        assert got == sorted(f"hungarian-{n}" for n in lines[idx])
    assert sd.train.labels[sd.train.site == "hungarian"].sum() == y[tr].sum()


def test_heart_standardisation_per_site(shared_data):
    sd, raw = _heart(shared_data), _heart(shared_data, "none")
    _check_per_site(sd, raw)
    per_site = _heart(shared_data, "per-site")
    np.testing.assert_array_equal(per_site.train.images, sd.train.images)  # auto = per-site
    # Switzerland's chol is 0 in every row: centred, not blown up
    chol = HEART_FEATURES.index("chol")
    assert (sd.test.images[sd.test.site == "switzerland", chol] == 0).all()
    assert np.abs(sd.test.images).max() < 50


def test_heart_is_deterministic_and_loads_through_load_source(shared_data):
    a = _heart(shared_data)
    b = load_source(DataConfig(source="heart-disease", root=shared_data / "uci-heart-disease"),
                    SitesConfig(), seed=7)
    for pa, pb in ((a.train, b.train), (a.test, b.test)):
        np.testing.assert_array_equal(pa.images, pb.images)
        np.testing.assert_array_equal(pa.labels, pb.labels)
        np.testing.assert_array_equal(pa.patient, pb.patient)
        np.testing.assert_array_equal(pa.site, pb.site)


def test_heart_missing_folder_and_file(tmp_path, shared_data):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere.*not found.*processed.cleveland.data.*uci.edu"):
        load_heart_disease(DataConfig(source="heart-disease", root=missing))
    root = tmp_path / "heart"
    root.mkdir()
    for site in ("cleveland", "hungarian", "va"):
        shutil.copy(shared_data / "uci-heart-disease" / f"processed.{site}.data", root)
    with pytest.raises(DataError) as e:
        load_heart_disease(DataConfig(source="heart-disease", root=root))
    assert str(root / "processed.switzerland.data") in str(e.value) and "not found" in str(e.value)


@pytest.mark.parametrize("bad, what", [
    ("63,1,1,145,233,1,2,150,0,2.3,3,0,6", "13 fields"),
    ("63,1,1,abc,233,1,2,150,0,2.3,3,0,6,0", "trestbps"),
    ("63,1,1,145,233,1,2,150,0,2.3,3,0,6,7", "num"),
])
def test_heart_malformed_line(tmp_path, shared_data, bad, what):
    root = tmp_path / "heart"
    shutil.copytree(shared_data / "uci-heart-disease", root)
    path = root / "processed.va.data"
    lines = path.read_text().splitlines()
    lines[4] = bad
    path.chmod(0o644)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_heart_disease(DataConfig(source="heart-disease", root=root))
    msg = str(e.value)
    assert str(path) in msg and "line 5" in msg and what in msg


# --------------------------------------------------------------------------- TCGA-BRCA


def test_tcga_sizes_features_and_labels(shared_data):
    sd = _tcga(shared_data)
    with open(shared_data / "tcga-brca" / "brca.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[0] == "pid" and header[-2:] == ["E", "T"]
    assert sd.tabular and sd.val is None and sd.n_features == 39
    assert sd.feature_names == header[1:40]
    assert sd.class_names == ["censored", "event"]
    assert list(dict.fromkeys(sd.train.site.tolist())) == TCGA_SITES
    assert list(dict.fromkeys(sd.test.site.tolist())) == TCGA_SITES
    assert _sizes(sd.train, TCGA_SITES) == TCGA_TRAIN
    assert _sizes(sd.test, TCGA_SITES) == TCGA_TEST
    assert len(sd.train) + len(sd.test) == 1088  # of 1,096 in brca.csv
    for part in (sd.train, sd.test):
        assert part.images.dtype == np.float32 and part.images.shape[1] == 39
        assert part.labels.dtype == np.int64 and set(np.unique(part.labels)) == {0, 1}
        assert part.time.dtype == np.float64 and (part.time >= 0).all()
        assert all(p.startswith("TCGA-") for p in part.patient)
    assert len(sd.files) == 3 and "GDC" in sd.citation and "MIT" in sd.citation


def test_tcga_rows_and_split_follow_the_files(shared_data):
    sd = _tcga(shared_data)
    brca = pd.read_csv(shared_data / "tcga-brca" / "brca.csv").set_index("pid")
    split = pd.read_csv(shared_data / "tcga-brca" / "train_test_split.csv").set_index("pid")
    for fold, part in (("train", sd.train), ("test", sd.test)):
        assert (split.loc[part.patient, "fold"] == fold).all()
        centers = split.loc[part.patient, "fold2"].str.split("_").str[1].astype(int).to_numpy()
        np.testing.assert_array_equal(np.array(TCGA_SITES)[centers], part.site)
        rows = brca.loc[part.patient]
        np.testing.assert_array_equal(part.images, rows.iloc[:, :39].to_numpy(np.float32))
        np.testing.assert_array_equal(part.labels, rows["E"].to_numpy().astype(np.int64))
        np.testing.assert_array_equal(part.time, rows["T"].to_numpy())
    left_out = set(brca.index) - set(split.index)
    assert len(left_out) == 8
    assert not left_out & set(np.concatenate([sd.train.patient, sd.test.patient]))


def test_tcga_standardisation(shared_data):
    raw = _tcga(shared_data, "none")
    auto = _tcga(shared_data)
    np.testing.assert_array_equal(auto.train.images, raw.train.images)  # FLamby: raw features
    np.testing.assert_array_equal(auto.test.images, raw.test.images)
    _check_per_site(_tcga(shared_data, "per-site"), raw)


def test_tcga_is_deterministic_and_loads_through_load_source(shared_data):
    a = _tcga(shared_data, "per-site")
    b = load_source(DataConfig(source="tcga-brca", root=shared_data / "tcga-brca",
                               standardize="per-site"), SitesConfig(), seed=3)
    for pa, pb in ((a.train, b.train), (a.test, b.test)):
        np.testing.assert_array_equal(pa.images, pb.images)
        np.testing.assert_array_equal(pa.time, pb.time)
        np.testing.assert_array_equal(pa.patient, pb.patient)


def _tcga_copy(tmp_path, shared_data):
    root = tmp_path / "tcga"
    shutil.copytree(shared_data / "tcga-brca", root)
    for p in root.iterdir():
        p.chmod(0o644)
    return root


def test_tcga_missing_folder_and_file(tmp_path, shared_data):
    with pytest.raises(DataError, match="nowhere.*not found.*brca.csv.*owkin/FLamby"):
        load_tcga_brca(DataConfig(source="tcga-brca", root=tmp_path / "nowhere"))
    root = _tcga_copy(tmp_path, shared_data)
    (root / "centers.csv").unlink()
    with pytest.raises(DataError) as e:
        load_tcga_brca(DataConfig(source="tcga-brca", root=root))
    assert str(root / "centers.csv") in str(e.value) and "not found" in str(e.value)


def test_tcga_malformed_line(tmp_path, shared_data):
    root = _tcga_copy(tmp_path, shared_data)
    path = root / "brca.csv"
    lines = path.read_text().splitlines()
    lines[9] = lines[9].replace(",", ",x", 1)  # line 10: a non-number in age_at_index
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_tcga_brca(DataConfig(source="tcga-brca", root=root))
    msg = str(e.value)
    assert str(path) in msg and "line 10" in msg and "age_at_index" in msg


def test_tcga_center_spanning_two_regions_is_an_error(tmp_path, shared_data):
    root = _tcga_copy(tmp_path, shared_data)
    path = root / "centers.csv"
    text = path.read_text()
    assert "BH,University of Pittsburgh,USA,PA,Northeast" in text  # a TSS of center 0
    path.write_text(text.replace("BH,University of Pittsburgh,USA,PA,Northeast",
                                 "BH,University of Pittsburgh,USA,PA,West"))
    with pytest.raises(DataError, match="center 0 holds patients of 2 regions"):
        load_tcga_brca(DataConfig(source="tcga-brca", root=root))

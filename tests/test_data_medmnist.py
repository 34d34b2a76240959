"""MedMNIST .npz loading (2D images and 3D volumes), the MD5 table, the (offline) download path and
every bad-input error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from privmed.config import DataConfig, SitesConfig, validate_config
from privmed.data import load_source
from privmed.data import medmnist
from privmed.data.medmnist import MD5, file_md5, file_name, load_medmnist
from privmed.data.sites import split_into_sites
from privmed.errors import ConfigError, DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OFFLINE = "http://127.0.0.1:9/{file}"  # the discard port: connection refused, at once


def _cfg(root: Path, name: str = "breastmnist", **kw) -> DataConfig:
    return DataConfig(source="medmnist", name=name, root=root, **kw)


def _arrays(n=(12, 4, 6), side=28, rgb=False, n_classes=2, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for split, k in zip(("train", "val", "test"), n):
        shape = (k, side, side, 3) if rgb else (k, side, side)
        out[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        out[f"{split}_labels"] = rng.integers(0, n_classes, (k, 1)).astype(np.int64)
    return out


def _volumes(n=(12, 4, 6), side=28, n_classes=2, seed=0, dtype=np.uint8) -> dict[str, np.ndarray]:
    """A 3D MedMNIST file's arrays: (N, side, side, side) volumes of random voxels."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, k in zip(("train", "val", "test"), n):
        shape = (k, side, side, side)
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        out[f"{split}_images"] = images if dtype == np.uint8 else (images / 255.0).astype(dtype)
        out[f"{split}_labels"] = rng.integers(0, n_classes, (k, 1)).astype(np.uint8)
    return out


def _write(path: Path, **arrays) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def _error(cfg: DataConfig, **kw) -> str:
    with pytest.raises(DataError) as e:
        load_medmnist(cfg, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- the real file


def test_real_pneumoniamnist():
    root = SHARED / "medmnist"
    if not (root / "pneumoniamnist.npz").is_file():
        pytest.skip(f"shared data not present at {root} (see /work/shared/DATA.md)")
    assert file_md5(root / "pneumoniamnist.npz") == MD5["pneumoniamnist"][28]
    src = load_source(_cfg(root, "pneumoniamnist", download=False), SitesConfig(), 0)
    assert (len(src.train), len(src.val), len(src.test)) == (4708, 524, 624)
    assert src.train.images.shape[1:] == (1, 28, 28) and src.train.images.dtype == np.float32
    assert src.train.images.min() >= 0 and src.train.images.max() <= 1
    for s in (src.train, src.val, src.test):
        assert s.labels.dtype == np.int64 and set(np.unique(s.labels)) == {0, 1}
        assert s.site is None and s.patient is None
    assert src.class_names == ["normal", "pneumonia"]
    assert "CC BY 4.0" in src.citation and "Kermany" in src.citation and "Yang" in src.citation
    assert src.files == [str((root / "pneumoniamnist.npz").absolute())]


# --------------------------------------------------------------------------- tables


def test_md5_table_covers_every_set_and_size():
    assert len(MD5) == 18 and medmnist.VOLUMES_3D <= set(MD5) and len(medmnist.VOLUMES_3D) == 6
    for name, sizes in MD5.items():
        want = [28, 64] if name in medmnist.VOLUMES_3D else [28, 64, 128, 224]
        assert sorted(sizes) == want, name
        assert all(len(h) == 32 and int(h, 16) >= 0 for h in sizes.values())
        assert len(medmnist.LABELS[name]) >= 2 and name in medmnist._ABOUT
    assert MD5["pneumoniamnist"][64] == "8f4eceb4ccffa70c672198ea285246c6"
    assert MD5["vesselmnist3d"][28] == "b41fd4f7e7e2feedddb201585ecafa1b"  # ../shared/DATA.md's
    assert len({h for s in MD5.values() for h in s.values()}) == 60  # no copy-paste duplicates
    assert [len(medmnist.LABELS[n]) for n in sorted(medmnist.VOLUMES_3D)] == [2, 3, 2, 11, 2, 2]
    assert medmnist.LABELS["vesselmnist3d"] == ["vessel", "aneurysm"]


def test_file_names():
    assert file_name("pathmnist", None) == "pathmnist.npz"
    assert file_name("pathmnist", 28) == "pathmnist.npz"
    assert file_name("pathmnist", 224) == "pathmnist_224.npz"
    assert file_name("vesselmnist3d", 64) == "vesselmnist3d_64.npz"


# --------------------------------------------------------------------------- loading


def test_grey_file_is_scaled_and_reshaped(tmp_path):
    arrays = _arrays()
    _write(tmp_path / "breastmnist.npz", **arrays)
    src = load_medmnist(_cfg(tmp_path))  # a file with another MD5 is fine
    np.testing.assert_array_equal(
        src.train.images[:, 0] * 255, arrays["train_images"].astype(np.float32)
    )
    np.testing.assert_array_equal(src.test.labels, arrays["test_labels"][:, 0])
    assert src.val.images.shape == (4, 1, 28, 28)
    assert src.class_names == ["malignant", "normal, benign"]


def test_rgb_file_and_64px(tmp_path):
    arrays = _arrays(side=64, rgb=True, n_classes=8)
    _write(tmp_path / "bloodmnist_64.npz", **arrays)
    src = load_medmnist(_cfg(tmp_path, "BloodMNIST", size=64))
    assert src.train.images.shape == (12, 3, 64, 64)
    np.testing.assert_allclose(
        src.train.images[3].transpose(1, 2, 0), arrays["train_images"][3] / 255.0, atol=1e-7
    )
    assert len(src.class_names) == 8 and "BloodMNIST" in src.description


def test_channels_option_converts(tmp_path):
    _write(tmp_path / "breastmnist.npz", **_arrays())
    src = load_medmnist(_cfg(tmp_path, channels=3))
    assert src.train.images.shape[1] == 3
    np.testing.assert_array_equal(src.train.images[:, 0], src.train.images[:, 2])


def test_wrong_side_for_size(tmp_path):
    _write(tmp_path / "breastmnist_64.npz", **_arrays(side=28))
    msg = _error(_cfg(tmp_path, size=64))
    assert "28x28" in msg and "64x64" in msg and "breastmnist_64.npz" in msg


# --------------------------------------------------------------------------- 3D volumes


def test_real_vesselmnist3d():
    root = SHARED / "medmnist"
    if not (root / "vesselmnist3d.npz").is_file():
        pytest.skip(f"shared data not present at {root} (see /work/shared/DATA.md)")
    src = load_source(_cfg(root, "vesselmnist3d", download=False), SitesConfig(), 0)
    assert (len(src.train), len(src.val), len(src.test)) == (1335, 191, 382)
    assert src.train.images.shape[1:] == (1, 28, 28, 28) and src.train.images.dtype == np.float32
    assert set(np.unique(src.test.images)) == {0.0, 1.0}  # voxelised meshes: 0 or 255 in the file
    assert [np.bincount(s.labels).tolist() for s in (src.train, src.val, src.test)] == [
        [1185, 150], [169, 22], [339, 43]]
    assert src.class_names == ["vessel", "aneurysm"] and (src.image_size, src.in_channels) == (28, 1)
    assert "VesselMNIST3D" in src.description and "28x28x28" in src.description
    assert "IntrA" in src.citation and "CC BY 4.0" in src.citation


def test_volume_file_is_scaled_and_reshaped(tmp_path):
    arrays = _volumes()
    _write(tmp_path / "vesselmnist3d.npz", **arrays)
    src = load_medmnist(_cfg(tmp_path, "VesselMNIST3D"))  # a file with another MD5 is fine
    assert src.train.images.shape == (12, 1, 28, 28, 28) and src.train.images.dtype == np.float32
    np.testing.assert_array_equal(src.train.images[:, 0] * 255, arrays["train_images"].astype(np.float32))
    np.testing.assert_array_equal(src.val.labels, arrays["val_labels"][:, 0])
    assert src.test.labels.dtype == np.int64 and src.train.patient is None
    assert (src.image_size, src.in_channels, src.tabular) == (28, 1, False)
    assert src.class_names == ["vessel", "aneurysm"] and "VesselMNIST3D" in src.description


def test_float_volumes_in_unit_range_and_64px(tmp_path):
    arrays = _volumes(n=(3, 2, 2), side=64, n_classes=3, dtype=np.float32)
    _write(tmp_path / "fracturemnist3d_64.npz", **arrays)
    src = load_medmnist(_cfg(tmp_path, "fracturemnist3d", size=64))
    assert src.val.images.shape == (2, 1, 64, 64, 64)
    np.testing.assert_array_equal(src.val.images[:, 0], arrays["val_images"])
    assert len(src.class_names) == 3 and "64x64x64" in src.description


def test_volumes_stay_apart_when_split_into_sites(tmp_path):
    # MedMNIST names no patients: each volume is its own privacy unit, so every training volume
    # goes to exactly one site (its training or its validation data) and no test volume to any
    _write(tmp_path / "vesselmnist3d.npz", **_volumes(n=(60, 6, 9)))
    src = load_medmnist(_cfg(tmp_path, "vesselmnist3d"))
    sites = split_into_sites(src, SitesConfig(count=3), val_fraction=0.2, seed=0)

    def keys(images):
        return [v.tobytes() for v in images]

    held = [k for sd in sites for part in (sd.train, sd.val) for k in keys(part.images)]
    assert sorted(held) == sorted(keys(src.train.images) + keys(src.val.images))
    assert len(set(held)) == len(held) and not set(held) & set(keys(src.test.images))
    # the sites validate on the official validation split, divided among them
    assert sorted(k for sd in sites for k in keys(sd.val.images)) == sorted(keys(src.val.images))
    assert all(sd.train.images.shape[1:] == (1, 28, 28, 28) and sd.test is None for sd in sites)


@pytest.mark.parametrize(
    "arrays, size, words",
    [
        (_arrays(), 28, ["train_images has shape (12, 28, 28)", "holds volumes (N, 28, 28, 28)"]),
        (_volumes(), 64, ["train_images are 28x28x28 voxels", "asks for 64x64x64"]),
        ({**_volumes(), "test_images": np.full((6, 28, 28, 28), 2.0)}, 28,
         ["test_images holds the value 2", "must lie in [0, 1]"]),
        ({**_volumes(), "val_images": np.zeros((4, 28, 28, 28), np.int16)}, 28,
         ["val_images has dtype int16", "uint8"]),
    ],
)
def test_bad_volume_files(tmp_path, arrays, size, words):
    path = _write(tmp_path / file_name("vesselmnist3d", size), **arrays)
    msg = _error(_cfg(tmp_path, "vesselmnist3d", size=size))
    assert str(path) in msg and all(w in msg for w in words), msg


def test_volume_sizes_and_channels_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"data.size: 128 is not a size of the 3D MedMNIST set "
                                          r"'vesselmnist3d'; allowed: 28, 64") as e:
        validate_config({"data": {"source": "medmnist", "name": "vesselmnist3d", "root": str(tmp_path),
                                  "size": 128}})
    assert "\n" not in str(e.value)
    _write(tmp_path / "vesselmnist3d.npz", **_volumes())
    assert "data.channels: 3 is not allowed for 'vesselmnist3d'" in _error(
        _cfg(tmp_path, "vesselmnist3d", channels=3))


# --------------------------------------------------------------------------- missing files, download


def test_missing_file_without_download(tmp_path):
    msg = _error(_cfg(tmp_path, "pneumoniamnist", download=False))
    target = tmp_path.absolute() / "pneumoniamnist.npz"
    assert f"{target} not found" in msg and "data.download is false" in msg
    assert "https://zenodo.org/records/10519652/files/pneumoniamnist.npz" in msg
    assert f"place it at {target}" in msg and MD5["pneumoniamnist"][28] in msg


def test_offline_download_fails_cleanly(tmp_path):
    root = tmp_path / "new" / "medmnist"
    msg = _error(_cfg(root, "pneumoniamnist", size=64), url_template=OFFLINE, timeout=5)
    assert "could not be downloaded" in msg and "pneumoniamnist_64.npz" in msg
    assert MD5["pneumoniamnist"][64] in msg
    assert not (tmp_path / "new").exists()  # no folder, no partial file left behind


def test_download_from_local_url(tmp_path, monkeypatch):
    served = _write(tmp_path / "served" / "breastmnist.npz", **_arrays(seed=4))
    monkeypatch.setitem(MD5["breastmnist"], 28, file_md5(served))
    root = tmp_path / "root"
    url = (tmp_path / "served").as_uri() + "/{file}"
    src = load_medmnist(_cfg(root), url_template=url)
    assert len(src.train) == 12
    assert file_md5(root / "breastmnist.npz") == file_md5(served)
    assert sorted(p.name for p in root.iterdir()) == ["breastmnist.npz"]


def test_download_with_wrong_md5_leaves_nothing(tmp_path):
    _write(tmp_path / "served" / "breastmnist.npz", **_arrays())
    root = tmp_path / "root"
    root.mkdir()
    url = (tmp_path / "served").as_uri() + "/{file}"
    msg = _error(_cfg(root), url_template=url)
    assert "MD5" in msg and "is not the official" in msg
    assert list(root.iterdir()) == []


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "name, words",
    [
        ("pneumonia", ["unknown MedMNIST dataset 'pneumonia'", "did you mean 'pneumoniamnist'"]),
        ("chestmnist", ["multi-label not supported yet"]),
        ("vesselmnist", ["unknown MedMNIST dataset", "did you mean 'vesselmnist3d'"]),
    ],
)
def test_bad_names(tmp_path, name, words):
    msg = _error(_cfg(tmp_path, name))
    assert all(w in msg for w in words), msg


def test_corrupt_npz(tmp_path):
    path = tmp_path / "breastmnist.npz"
    path.write_bytes(b"PK\x03\x04 this is not really a zip file" * 10)
    msg = _error(_cfg(tmp_path))
    assert str(path) in msg and "corrupt" in msg


def test_truncated_npz(tmp_path):
    path = _write(tmp_path / "breastmnist.npz", **_arrays())
    path.write_bytes(path.read_bytes()[:300])
    assert str(path) in _error(_cfg(tmp_path))


def test_missing_key(tmp_path):
    arrays = _arrays()
    del arrays["val_labels"]
    _write(tmp_path / "breastmnist.npz", **arrays)
    msg = _error(_cfg(tmp_path))
    assert "missing key 'val_labels'" in msg


@pytest.mark.parametrize("bad", [2, -1])
def test_label_out_of_range(tmp_path, bad):
    arrays = _arrays()
    arrays["test_labels"][2, 0] = bad
    _write(tmp_path / "breastmnist.npz", **arrays)
    msg = _error(_cfg(tmp_path))
    assert "test_labels" in msg and f"label {bad}" in msg and "0..1" in msg


def test_multi_label_file(tmp_path):
    arrays = _arrays()
    arrays["train_labels"] = np.zeros((12, 3), dtype=np.int64)
    _write(tmp_path / "breastmnist.npz", **arrays)
    assert "multi-label not supported yet" in _error(_cfg(tmp_path))


def test_volume_file_for_a_2d_set(tmp_path):
    arrays = _arrays()
    arrays["train_images"] = np.zeros((12, 28, 28, 28), dtype=np.uint8)
    _write(tmp_path / "breastmnist.npz", **arrays)
    msg = _error(_cfg(tmp_path))
    assert "breastmnist.npz" in msg and "(12, 28, 28, 28)" in msg and "'breastmnist' is a 2D set" in msg
    assert "vesselmnist3d" in msg  # the 3D sets are named


def test_float_images(tmp_path):
    arrays = _arrays()
    arrays["val_images"] = arrays["val_images"].astype(np.float32)
    _write(tmp_path / "breastmnist.npz", **arrays)
    assert "val_images has dtype float32" in _error(_cfg(tmp_path))


def test_label_count_mismatch(tmp_path):
    arrays = _arrays()
    arrays["train_labels"] = arrays["train_labels"][:5]
    _write(tmp_path / "breastmnist.npz", **arrays)
    assert "5 labels for 12 images" in _error(_cfg(tmp_path))

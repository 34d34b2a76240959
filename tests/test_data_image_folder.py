"""Class folders of PNG/JPEG images: layouts, CSV columns, patient-grouped hold-out, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from privmed.config import DataConfig, SitesConfig
from privmed.data import load_source
from privmed.data._split import holdout_by_patient
from privmed.errors import DataError


def _png(path: Path, value=100, size=(20, 20), mode="L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(value, np.ndarray):
        Image.fromarray(value).save(path)
    else:
        fill = value if mode == "L" else (value, 255 - value, 7)
        Image.new(mode, size, fill).save(path)
    return path


def _classes(root: Path, n=10, classes=("normal", "pneumonia"), prefix="") -> list[str]:
    files = []
    for c, name in enumerate(classes):
        for i in range(n):
            rel = f"{prefix}{name}/img{i:03d}.png"
            _png(root / rel, value=40 + 100 * c + i)
            files.append(rel)
    return files


def _csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def _load(root: Path, seed=0, **kw):
    return load_source(DataConfig(source="image-folder", root=root, **kw), SitesConfig(), seed)


def _error(root: Path, **kw) -> str:
    with pytest.raises(DataError) as e:
        _load(root, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_class_folders_with_holdout(tmp_path):
    _classes(tmp_path, n=10)
    src = _load(tmp_path, test_fraction=0.2)
    assert src.class_names == ["normal", "pneumonia"]
    assert len(src.train) == 16 and len(src.test) == 4
    assert np.bincount(src.test.labels).tolist() == [2, 2]  # stratified
    assert src.train.images.shape[1:] == (1, 20, 20) and src.train.images.dtype == np.float32
    assert src.train.labels.dtype == np.int64 and src.val is None
    # Pixel values: image i of class c is grey 40 + 100c + i.
    values = np.concatenate([src.train.images[:, 0, 0, 0], src.test.images[:, 0, 0, 0]])
    expected = np.array([40 + i for i in range(10)] + [140 + i for i in range(10)]) / 255
    np.testing.assert_allclose(np.sort(values), np.sort(expected), atol=1e-6)
    assert len(src.files) == 20


def test_same_seed_same_split_other_seed_other_split(tmp_path):
    _classes(tmp_path, n=15)
    a, b, c = _load(tmp_path, seed=1), _load(tmp_path, seed=1), _load(tmp_path, seed=2)
    np.testing.assert_array_equal(a.test.images, b.test.images)
    np.testing.assert_array_equal(a.train.labels, b.train.labels)
    assert not np.array_equal(a.test.images, c.test.images)


def test_csv_patients_are_never_split_and_sites_kept(tmp_path):
    files = _classes(tmp_path, n=12)
    rows = [f"{f},{'A' if i % 2 else 'B'},p{i // 3}" for i, f in enumerate(files)]  # 3 images/patient
    csv = _csv(tmp_path / "index.csv", "file,site,patient,extra", [r + ",x" for r in rows])
    for seed in range(5):
        src = _load(tmp_path, seed=seed, csv=csv, test_fraction=0.3)
        assert not set(src.train.patient) & set(src.test.patient)
        assert set(src.test.site) == {"A", "B"} and len(src.test) % 3 == 0
        assert len(src.test) > 0
    # Columns follow their images: image i (grey 40 + 100c + k) is site A when i is odd.
    for part in (src.train, src.test):
        grey = np.rint(part.images[:, 0, 0, 0] * 255).astype(int)
        i = (grey - 40) // 100 * 12 + (grey - 40) % 100
        np.testing.assert_array_equal(part.site, np.where(i % 2 == 1, "A", "B"))
        np.testing.assert_array_equal(part.patient, np.char.add("p", (i // 3).astype(str)))


def test_kermany_layout_with_val_merged(tmp_path):
    _classes(tmp_path, n=4, prefix="train/")
    _classes(tmp_path, n=2, prefix="val/")
    _classes(tmp_path, n=3, prefix="test/")
    src = _load(tmp_path)
    assert len(src.train) == 12 and len(src.test) == 6
    assert src.class_names == ["normal", "pneumonia"]
    assert np.bincount(src.test.labels).tolist() == [3, 3]


def test_kermany_patient_in_train_and_test_is_an_error(tmp_path):
    files = _classes(tmp_path, n=2, prefix="train/") + _classes(tmp_path, n=2, prefix="test/")
    rows = [f"{f},p{i % 4}" for i, f in enumerate(files)]
    csv = _csv(tmp_path / "index.csv", "file,patient", rows)
    msg = _error(tmp_path, csv=csv)
    assert "both train and test" in msg and "patient" in msg


def test_jpeg_uppercase_rgb_and_channels(tmp_path):
    _png(tmp_path / "a" / "x.PNG", value=51, mode="RGB")
    _png(tmp_path / "a" / "y.png", value=51, mode="RGB")
    _png(tmp_path / "b" / "z.JPG", value=200)
    _png(tmp_path / "b" / "w.jpeg", value=200)
    (tmp_path / "b" / "notes.txt").write_text("ignored")
    src = _load(tmp_path, channels=3, test_fraction=0.4)
    imgs = np.concatenate([src.train.images, src.test.images])
    assert imgs.shape == (4, 3, 20, 20)
    rgb = [im for im in imgs if abs(im[0, 0, 0] - 0.2) < 1e-6]
    assert len(rgb) == 2 and abs(rgb[0][1, 0, 0] - 204 / 255) < 1e-6
    grey = _load(tmp_path, test_fraction=0.4)
    assert grey.train.images.shape[1] == 1


def test_sixteen_bit_png_keeps_range(tmp_path):
    arr = np.full((10, 10), 65535, dtype=np.uint16)
    arr[:5] = 0
    for c in ("a", "b"):
        for i in range(3):
            _png(tmp_path / c / f"{i}.png", value=arr)
    src = _load(tmp_path)
    img = src.train.images[0, 0]
    assert img.max() == 1.0 and img.min() == 0.0


def test_resize_center_crops_then_resizes(tmp_path):
    wide = np.zeros((20, 40), dtype=np.uint8)
    wide[:, 10:30] = 255  # the central square is white, the sides black
    for c in ("a", "b"):
        for i in range(3):
            _png(tmp_path / c / f"{i}.png", value=wide)
    _png(tmp_path / "a" / "small.png", value=128, size=(12, 12))
    src = _load(tmp_path, size=16)
    imgs = np.concatenate([src.train.images, src.test.images])
    assert imgs.shape == (7, 1, 16, 16)
    white = [im for im in imgs if im.min() > 0.99]
    assert len(white) == 6


def test_mixed_sizes_are_an_error_without_size(tmp_path):
    _classes(tmp_path, n=3)
    odd = _png(tmp_path / "pneumonia" / "big.png", size=(30, 24))
    msg = _error(tmp_path)
    assert str(odd) in msg and "30x24" in msg and "20x20" in msg and "data.size" in msg


def test_corrupt_image(tmp_path):
    _classes(tmp_path, n=3)
    bad = tmp_path / "normal" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    msg = _error(tmp_path)
    assert str(bad) in msg and "not a readable" in msg


def test_truncated_jpeg(tmp_path):
    _classes(tmp_path, n=3)
    good = tmp_path / "normal" / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(good)
    good.write_bytes(good.read_bytes()[:200])
    assert str(good) in _error(tmp_path)


def test_folder_errors(tmp_path):
    assert "is not a folder" in _error(tmp_path / "nope")
    _classes(tmp_path, n=3, classes=("only",))
    assert "at least 2" in _error(tmp_path)
    (tmp_path / "empty").mkdir()
    msg = _error(tmp_path)
    assert str(tmp_path / "empty") in msg and "empty class folder" in msg


def test_test_class_not_in_train(tmp_path):
    _classes(tmp_path, n=2, prefix="train/")
    _classes(tmp_path, n=2, prefix="test/", classes=("normal", "covid"))
    assert "'covid' is not among the training classes" in _error(tmp_path)


def test_too_few_images_to_hold_out(tmp_path):
    _classes(tmp_path, n=1)
    assert "data.test_fraction" in _error(tmp_path)


def test_csv_errors(tmp_path):
    files = _classes(tmp_path, n=3)
    missing_col = _csv(tmp_path / "a.csv", "path,site", [f"{f},A" for f in files])
    msg = _error(tmp_path, csv=missing_col)
    assert str(missing_col) in msg and "missing column 'file'" in msg

    ghost = _csv(tmp_path / "b.csv", "file,site", [f"{f},A" for f in files] + ["normal/ghost.png,A"])
    msg = _error(tmp_path, csv=ghost)
    assert "normal/ghost.png" in msg and "does not exist" in msg

    partial = _csv(tmp_path / "c.csv", "file,site", [f"{f},A" for f in files[1:]])
    msg = _error(tmp_path, csv=partial)
    assert f"image '{files[0]}'" in msg and "not listed" in msg

    empty_site = _csv(tmp_path / "d.csv", "file,site", [f"{f}," for f in files])
    assert "empty 'site'" in _error(tmp_path, csv=empty_site)

    twice = _csv(tmp_path / "e.csv", "file", [*files, files[0]])
    assert "already listed" in _error(tmp_path, csv=twice)

    assert "not found" in _error(tmp_path, csv=tmp_path / "missing.csv")


def test_csv_with_windows_separators_and_bom(tmp_path):
    files = _classes(tmp_path, n=3)
    path = tmp_path / "index.csv"
    lines = [f"{f.replace('/', chr(92))},p{i}\r\n" for i, f in enumerate(files)]  # backslashes
    text = "file,patient\r\n" + "".join(lines)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    src = _load(tmp_path, csv=path)
    assert len(src.train) + len(src.test) == 6 and src.train.patient is not None


# --------------------------------------------------------------------------- the hold-out itself


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=4, max_size=40),
    n_classes=st.integers(2, 3),
    fraction=st.floats(0.05, 0.45),
    seed=st.integers(0, 2**31 - 1),
)
def test_holdout_partitions_by_patient(sizes, n_classes, fraction, seed):
    """Every item on exactly one side, no patient on both, each side non-empty (or a DataError)."""
    patients = np.repeat([f"p{i}" for i in range(len(sizes))], sizes)
    labels = np.repeat(np.arange(len(sizes)) % n_classes, sizes)
    try:
        tr, te = holdout_by_patient(labels, patients, fraction, np.random.default_rng(seed))
    except DataError as e:
        assert "data.test_fraction" in str(e)
        return
    assert len(tr) and len(te)
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, te])), np.arange(len(labels)))
    assert not set(patients[tr]) & set(patients[te])
    again = holdout_by_patient(labels, patients, fraction, np.random.default_rng(seed))
    np.testing.assert_array_equal(te, again[1])
    # Stratified: each class with 2+ patients keeps at least one patient on the train side.
    for c in range(n_classes):
        if len(set(patients[labels == c])) >= 2:
            assert (labels[tr] == c).any()


def test_holdout_share_is_close_to_the_fraction():
    patients = np.arange(1000).astype(str)
    labels = np.arange(1000) % 2
    tr, te = holdout_by_patient(labels, patients, 0.2, np.random.default_rng(0))
    assert len(te) == 200 and np.bincount(labels[te]).tolist() == [100, 100]


def test_named_classes_let_a_hospital_hold_only_some_of_them(tmp_path):
    """data.class_names: the federation's classes, in that order; this hospital holds 'pneumonia'
    only (no 'normal' folder, or an empty one), and its labels index the named classes."""
    _classes(tmp_path, n=10, classes=("pneumonia",))
    assert "data.class_names" in _error(tmp_path)  # without names: one class folder, and the way out
    src = _load(tmp_path, class_names=["normal", "pneumonia"], test_fraction=0.2)
    assert src.class_names == ["normal", "pneumonia"]
    assert set(src.train.labels.tolist()) == set(src.test.labels.tolist()) == {1}
    (tmp_path / "normal").mkdir()  # an empty folder for the class it lacks: the same
    again = _load(tmp_path, class_names=["normal", "pneumonia"], test_fraction=0.2)
    np.testing.assert_array_equal(again.train.labels, src.train.labels)
    # the names' order, not the folders', gives the labels
    both = tmp_path / "both"
    _classes(both, n=5)
    swapped = _load(both, class_names=["pneumonia", "normal"], test_fraction=0.2)
    assert swapped.class_names == ["pneumonia", "normal"]
    assert np.all((swapped.train.images[:, 0, 0, 0] * 255 > 120) == (swapped.train.labels == 0))
    # a folder that is not a named class is refused, naming it
    _classes(both, n=5, classes=("covid",))
    assert "class 'covid' is not among data.class_names ['normal', 'pneumonia']" in _error(
        both, class_names=["normal", "pneumonia"])

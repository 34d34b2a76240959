"""DICOM files listed in a CSV: modality LUT, windowing maths, MONOCHROME1, splits and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from privmed.config import DataConfig, SitesConfig
from privmed.data import load_source
from privmed.data.dicom import read_dicom
from privmed.errors import DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _dcm(path: Path, pixels: np.ndarray, photometric="MONOCHROME2", frames=None, **tags) -> Path:
    """A minimal single-frame (or `frames`-frame) CT file of int16/uint16 pixels."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    if frames:
        ds.NumberOfFrames = frames
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _ramp(lo=-500, hi=500, shape=(16, 16)) -> np.ndarray:
    return np.linspace(lo, hi, shape[0] * shape[1]).round().astype(np.int16).reshape(shape)


def _csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def _set(tmp_path: Path, n=10, labels=("benign", "malignant"), shape=(16, 16)) -> list[str]:
    files = []
    for i in range(n):
        rel = f"scans/{i:02d}.dcm"
        _dcm(tmp_path / rel, _ramp(-100 - i, 300 + 7 * i, shape))
        files.append((rel, labels[i % len(labels)]))
    return [f"{f},{lab}" for f, lab in files]


def _load(root: Path, csv: Path, seed=0, **kw):
    return load_source(DataConfig(source="dicom", root=root, csv=csv, **kw), SitesConfig(), seed)


def _error(root: Path, csv: Path, **kw) -> str:
    with pytest.raises(DataError) as e:
        _load(root, csv, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- pixel maths


def _window(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 linear window, scaled to [0, 1]: written out by hand."""
    out = ((x - (c - 0.5)) / (w - 1) + 0.5).astype(np.float64)
    out[x <= c - 0.5 - (w - 1) / 2] = 0.0
    out[x > c - 0.5 + (w - 1) / 2] = 1.0
    return out


def test_rescale_and_window_match_hand_computation(tmp_path):
    raw = _ramp(-300, 600)
    path = _dcm(tmp_path / "w.dcm", raw, RescaleSlope=2, RescaleIntercept=-1000,
                WindowCenter=-900, WindowWidth=400)
    hu = raw.astype(np.float64) * 2 - 1000  # -1600 .. 200: beyond both ends of the window
    expected = _window(hu, -900, 400)
    got = read_dicom(path)
    assert got.dtype == np.float32 and got.shape == (16, 16)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got.min() == 0.0 and got.max() == 1.0
    inside = (expected > 0) & (expected < 1)
    assert inside.sum() > 20  # the linear part is exercised, not just the clipping


def test_window_keeps_its_grey_levels_when_the_image_is_inside_it(tmp_path):
    raw = _ramp(0, 100)
    path = _dcm(tmp_path / "in.dcm", raw, WindowCenter=50, WindowWidth=1000)
    np.testing.assert_allclose(read_dicom(path), _window(raw.astype(float), 50, 1000), atol=1e-6)


def test_no_window_is_min_max(tmp_path):
    raw = _ramp(-20, 80)
    path = _dcm(tmp_path / "mm.dcm", raw, RescaleSlope=0.5, RescaleIntercept=7)
    np.testing.assert_allclose(read_dicom(path), (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)


def test_monochrome1_is_inverted_and_constant_is_zero(tmp_path):
    raw = _ramp(0, 50).astype(np.uint16)
    inv = read_dicom(_dcm(tmp_path / "m1.dcm", raw, photometric="MONOCHROME1"))
    np.testing.assert_allclose(inv, 1 - (raw - 0.0) / 50, atol=1e-6)
    flat = read_dicom(_dcm(tmp_path / "flat.dcm", np.full((8, 8), 300, np.int16)))
    assert flat.shape == (8, 8) and not flat.any()


def test_real_sample_files():
    ct, mr = SHARED / "dicom" / "CT_small.dcm", SHARED / "dicom" / "MR_small.dcm"
    if not (ct.is_file() and mr.is_file()):
        pytest.skip(f"shared DICOM samples not present at {SHARED / 'dicom'}")
    img = read_dicom(ct)  # rescale to HU, no window: min-max
    hu = pydicom.dcmread(ct).pixel_array.astype(np.float64) - 1024
    np.testing.assert_allclose(img, (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-6)
    img = read_dicom(mr)  # window 600 / 1600
    raw = pydicom.dcmread(mr).pixel_array.astype(np.float64)
    np.testing.assert_allclose(img, _window(raw, 600, 1600), atol=1e-6)
    assert img.shape == (64, 64)


def test_real_files_through_the_loader(tmp_path):
    root = SHARED / "dicom"
    if not (root / "CT_small.dcm").is_file():
        pytest.skip(f"shared DICOM samples not present at {root}")
    csv = _csv(tmp_path / "i.csv", "file,label,split", ["CT_small.dcm,ct,train", "MR_small.dcm,mr,test"])
    src = _load(root, csv, size=32, channels=3)
    assert src.class_names == ["ct", "mr"]
    assert src.train.images.shape == (1, 3, 32, 32) and src.test.images.shape == (1, 3, 32, 32)
    assert src.test.labels.tolist() == [1]


# --------------------------------------------------------------------------- the loader


def test_string_labels_holdout_and_columns(tmp_path):
    rows = _set(tmp_path, n=12)
    csv = _csv(tmp_path / "i.csv", "file,label,site,patient",
               [f"{r},{'north' if i < 6 else 'south'},p{i // 2}" for i, r in enumerate(rows)])
    src = _load(tmp_path, csv, test_fraction=0.3)
    assert src.class_names == ["benign", "malignant"]
    assert len(src.train) + len(src.test) == 12 and len(src.test) >= 2
    assert not set(src.train.patient) & set(src.test.patient)
    assert src.test.site is not None and src.train.images.shape[1:] == (1, 16, 16)
    again = _load(tmp_path, csv, test_fraction=0.3)
    np.testing.assert_array_equal(src.test.images, again.test.images)
    assert len(src.files) == 13


def test_integer_labels_and_given_split(tmp_path):
    rows = _set(tmp_path, n=6, labels=("0", "2"))
    csv = _csv(tmp_path / "i.csv", "file,label,split",
               [f"{r},{'Test' if i >= 4 else 'train'}" for i, r in enumerate(rows)])
    src = _load(tmp_path, csv)
    assert src.class_names == ["0", "1", "2"]
    assert len(src.train) == 4 and len(src.test) == 2
    assert sorted(set(src.train.labels.tolist())) == [0, 2]


def test_resize_mixed_sizes(tmp_path):
    _dcm(tmp_path / "a.dcm", _ramp(shape=(16, 16)))
    _dcm(tmp_path / "b.dcm", _ramp(shape=(24, 20)))
    csv = _csv(tmp_path / "i.csv", "file,label,split", ["a.dcm,0,train", "b.dcm,1,test"])
    msg = _error(tmp_path, csv)
    assert str(tmp_path / "b.dcm") in msg and "20x24" in msg and "data.size" in msg
    src = _load(tmp_path, csv, size=12)
    assert src.train.images.shape == (1, 1, 12, 12) and src.test.images.shape == (1, 1, 12, 12)
    assert src.test.images.min() >= 0 and src.test.images.max() <= 1


# --------------------------------------------------------------------------- errors


@pytest.mark.filterwarnings("ignore:End of file reached:UserWarning")  # pydicom, on junk.dcm
def test_unsupported_and_corrupt_files(tmp_path):
    multi = _dcm(tmp_path / "multi.dcm", np.stack([_ramp(), _ramp()]), frames=2)
    with pytest.raises(DataError, match="multi-frame"):
        read_dicom(multi)
    rgb = _dcm(tmp_path / "rgb.dcm", _ramp(), photometric="RGB", SamplesPerPixel=3,
               PlanarConfiguration=0)
    with pytest.raises(DataError, match="colour DICOM is not supported"):
        read_dicom(rgb)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)
    with pytest.raises(DataError, match="junk.dcm"):
        read_dicom(junk)
    text = tmp_path / "text.dcm"
    text.write_text("not a dicom file")
    with pytest.raises(DataError, match="not a readable DICOM image"):
        read_dicom(text)
    cut = _dcm(tmp_path / "cut.dcm", _ramp(shape=(64, 64)))
    cut.write_bytes(cut.read_bytes()[:-3000])
    with pytest.raises(DataError, match="cut.dcm"):
        read_dicom(cut)


def test_corrupt_file_through_loader_names_it(tmp_path):
    rows = _set(tmp_path, n=4)
    (tmp_path / "scans" / "01.dcm").write_bytes(b"garbage")
    csv = _csv(tmp_path / "i.csv", "file,label", rows)
    assert str(tmp_path / "scans" / "01.dcm") in _error(tmp_path, csv)


def test_csv_errors(tmp_path):
    rows = _set(tmp_path, n=4)
    no_label = _csv(tmp_path / "a.csv", "file,site", [r.split(",")[0] + ",A" for r in rows])
    assert "missing column 'label'" in _error(tmp_path, no_label)

    ghost = _csv(tmp_path / "b.csv", "file,label", [*rows, "scans/99.dcm,benign"])
    msg = _error(tmp_path, ghost)
    assert "scans/99.dcm" in msg and "does not exist" in msg

    files = [r.split(",")[0] for r in rows]
    negative = _csv(tmp_path / "c.csv", "file,label", [f"{f},{i - 1}" for i, f in enumerate(files)])
    assert "label -1 is negative" in _error(tmp_path, negative)

    one_class = _csv(tmp_path / "d.csv", "file,label", [r.split(",")[0] + ",x" for r in rows])
    assert "at least 2" in _error(tmp_path, one_class)

    bad_split = _csv(tmp_path / "e.csv", "file,label,split", [f"{r},valid" for r in rows])
    assert "split 'valid'" in _error(tmp_path, bad_split)

    no_test = _csv(tmp_path / "f.csv", "file,label,split", [f"{r},train" for r in rows])
    assert "no 'test' rows" in _error(tmp_path, no_test)

    leak = _csv(tmp_path / "g.csv", "file,label,split,patient",
                [f"{r},{'train' if i < 2 else 'test'},p{i % 2}" for i, r in enumerate(rows)])
    assert "both train and test" in _error(tmp_path, leak)

    assert "not found" in _error(tmp_path, tmp_path / "none.csv")
    assert "is not a folder" in _error(tmp_path / "nowhere", no_test)


def test_named_classes_take_names_or_indices_and_refuse_others(tmp_path):
    rows = _set(tmp_path, n=6, labels=("malignant",))  # a hospital holding one of the federation's classes
    csv = _csv(tmp_path / "i.csv", "file,label", rows)
    assert "needs at least 2" in _error(tmp_path, csv)
    src = _load(tmp_path, csv, class_names=["benign", "malignant"], test_fraction=0.3)
    assert src.class_names == ["benign", "malignant"] and set(src.train.labels.tolist()) == {1}
    indices = _csv(tmp_path / "j.csv", "file,label", [r.replace("malignant", "1") for r in rows])
    np.testing.assert_array_equal(_load(tmp_path, indices, class_names=["benign", "malignant"],
                                        test_fraction=0.3).train.labels, src.train.labels)
    bad = _csv(tmp_path / "k.csv", "file,label", [r.replace("malignant", "2") for r in rows])
    assert "label '2' is not one of data.class_names ['benign', 'malignant'] (nor a class index 0 to 1)" in _error(
        tmp_path, bad, class_names=["benign", "malignant"])

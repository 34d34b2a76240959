"""Single-frame greyscale DICOM images listed in a CSV: `file`, `label`[, `site`, `patient`, `split`].

Each image goes through the modality LUT (rescale slope/intercept, e.g. to Hounsfield units), then
the file's VOI LUT or window when it has one, and is scaled to [0, 1]: a windowed image by its
window's output range (so a window means the same grey levels in every image), any other image by
its own min and max. MONOCHROME1 (bright = low) is inverted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from privmed.config import DataConfig
from privmed.data._csv import check_splits, read_index
from privmed.data._images import center_crop_resize, stack_images
from privmed.data._split import train_test
from privmed.data.base import ImageSet, SourceData
from privmed.errors import DataError



def load_dicom(data: DataConfig, seed: int) -> SourceData:
    """SourceData from the DICOM files a CSV lists (paths relative to data.root)."""
    root, csv_path = Path(data.root), Path(data.csv)
    if not root.is_dir():
        raise DataError(f"data.root: {root} is not a folder (expected the folder of .dcm files)")
    rows = read_index(csv_path, ("file", "label"), ("site", "patient", "split"))
    labels, class_names = parse_labels([r["label"] for r in rows], csv_path, data.class_names)

    paths = [root / r["file"] for r in rows]
    for p, r in zip(paths, rows):
        if not p.is_file():
            raise DataError(f"{csv_path}: lists '{r['file']}', which does not exist under {root}")
    channels = data.channels or 1
    arrays = []
    for p in paths:
        img = read_dicom(p)[:, :, None]
        if data.size is not None:
            img = center_crop_resize(img, data.size)
        arrays.append(np.repeat(img, 3, axis=2) if channels == 3 else img)
    images = stack_images(arrays, [str(p) for p in paths])

    cols = rows[0].keys()
    column = lambda name: np.array([r[name] for r in rows]) if name in cols else None  # noqa: E731
    full = ImageSet(images=images, labels=labels, site=column("site"), patient=column("patient"))
    is_test = _given_split(rows, csv_path) if "split" in cols else None
    train, test = train_test(full, is_test, data.test_fraction, seed, str(csv_path))

    return SourceData(
        train=train,
        test=test,
        class_names=class_names,
        description=(
            f"DICOM images listed in {csv_path}: {len(full)} images, {len(class_names)} classes "
            f"({', '.join(class_names)}), {images.shape[2]}x{images.shape[3]} px"
        ),
        citation=f"user-supplied DICOM images from {root}: cite their source and license",
        files=[str(p) for p in paths] + [str(csv_path)],
    )


def parse_labels(values: list[str], where: Path, named: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """int64 labels and class names: integer indices (names '0'..'max'), or names in sorted order;
    with `named` (data.class_names, the federation's agreed classes), names among them or indices
    below their number, and those names, whichever classes this CSV holds."""
    if named:
        return _named_labels(values, where, list(named)), list(named)
    try:
        ints = [int(v) for v in values]
    except ValueError:
        names = sorted(set(values))
        index = {n: i for i, n in enumerate(names)}
        labels = np.array([index[v] for v in values], dtype=np.int64)
    else:
        neg = [v for v in ints if v < 0]
        if neg:
            raise DataError(f"{where}: label {neg[0]} is negative; allowed: class indices 0, 1, ...")
        labels = np.array(ints, dtype=np.int64)
        names = [str(i) for i in range(int(labels.max()) + 1)]
    if len(names) < 2:
        raise DataError(
            f"{where}: column 'label' has {len(names)} class(es) {names}; "
            "classification needs at least 2"
        )
    return labels, names


def _given_split(rows: list[dict[str, str]], csv_path: Path) -> np.ndarray:
    """(N,) bool: which rows the CSV's `split` column puts in the test set."""
    check_splits(rows, csv_path)
    split = np.array([r["split"].lower() for r in rows])
    if not (split == "test").any() or not (split == "train").any():
        missing = "test" if not (split == "test").any() else "train"
        raise DataError(
            f"{csv_path}: column 'split' names no '{missing}' rows; need both train and test"
        )
    return split == "test"


def _named_labels(values: list[str], where: Path, named: list[str]) -> np.ndarray:
    index = {n: i for i, n in enumerate(named)}
    labels = []
    for v in values:
        if v in index:
            labels.append(index[v])
        elif v.isdigit() and int(v) < len(named):
            labels.append(int(v))
        else:
            raise DataError(f"{where}: label '{v}' is not one of data.class_names {named} "
                            f"(nor a class index 0 to {len(named) - 1})")
    return np.array(labels, dtype=np.int64)


def read_dicom(path: Path) -> np.ndarray:
    """(H, W) float32 in [0, 1] from a single-frame greyscale DICOM file (see the module docstring)."""
    try:
        ds = pydicom.dcmread(path)
        photometric = _check_header(ds, path)
        raw = ds.pixel_array
        if raw.ndim != 2:
            raise DataError(
                f"{path}: pixel data has shape {raw.shape}; only single 2D images are supported"
            )
        arr = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
        out = _voi_to_unit(arr, ds)
    except DataError:
        raise
    except Exception as e:  # pydicom raises many types for a damaged file; all mean "unreadable"
        raise DataError(f"{path}: not a readable DICOM image ({_short(e)})") from None
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)


def _check_header(ds: pydicom.Dataset, path: Path) -> str:
    """The photometric interpretation, after refusing what is not one greyscale 2D image."""
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM file has no pixel data (no image to read)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(
            f"{path}: multi-frame DICOM ({frames} frames) is not supported; use single-frame files"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(
            f"{path}: PhotometricInterpretation '{photometric}' with {samples} sample(s) per pixel is "
            "not supported (colour DICOM is not supported); allowed: MONOCHROME1, MONOCHROME2"
        )
    return photometric


def _voi_to_unit(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """[0, 1] image: by the window's output range when the file has a window, else min-max."""
    has_lut = "VOILUTSequence" in ds
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    if has_window and not has_lut:
        out = apply_voi_lut(arr, ds)
        with np.errstate(all="ignore"):  # a SIGMOID window overflows harmlessly at the extremes
            lo, hi = apply_voi_lut(np.array([-1e300, 1e300]), ds)
        if hi > lo:
            return np.clip((out - lo) / (hi - lo), 0.0, 1.0)
        arr = out
    elif has_lut:
        arr = np.asarray(apply_voi_lut(arr, ds), dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def _short(e: BaseException) -> str:
    line = (str(e).strip().splitlines() or [""])[0].split(" Use force=True")[0]
    return line[:160] or type(e).__name__

"""UCI Heart Disease from its four `processed.*.data` files, preprocessed as FLamby's
Fed-Heart-Disease.

Each file (no header, 14 comma-separated columns, '?' for a missing value) is one hospital:
Cleveland, Budapest (hungarian), Zurich/Basel (switzerland), Long Beach VA (va). As FLamby does:
columns 10-12 (slope, ca, thal: mostly missing outside Cleveland) are dropped, then every row with a
missing value; the label is column 13 (num, 0-4) > 0. Each hospital's rows are split 66 / 34 into train / test with
sklearn's train_test_split (seed 43, stratified by the label where both classes have more than 2
rows). Columns 2 (cp) and 6 (restecg) are one-hot encoded over the pooled table, dropping the first
level: 8 numeric columns, then cp_2..cp_4, then restecg_1, restecg_2 (13 features). Standardisation
('auto' and 'per-site'): each hospital's features are centred and scaled by the mean and standard
deviation (ddof=1) of that hospital's own training rows, applied to its training and test rows.
Result: 303 / 261 / 46 / 130 rows; train 199 / 172 / 30 / 85, test 104 / 89 / 16 / 45.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from privmed.config import DataConfig
from privmed.data.base import ImageSet, SourceData
from privmed.errors import DataError

SITES = ("cleveland", "hungarian", "switzerland", "va")  # center ids 0..3, as in FLamby
UCI_PAGE = "https://archive.ics.uci.edu/dataset/45/heart+disease"
# The 14 columns of the processed files (heart-disease.names, "Attribute Information").
COLUMNS = ("age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak",
           "slope", "ca", "thal", "num")
DROPPED = (10, 11, 12)  # slope, ca, thal
CATEGORICAL = (2, 6)  # cp, restecg: one-hot, first level dropped
LABEL = 13
TRAIN_FRACTION = 0.66
SPLIT_SEED = 43


def file_path(root: Path, site: str) -> Path:
    return root / f"processed.{site}.data"


def load_heart_disease(data: DataConfig) -> SourceData:
    """SourceData with FLamby's per-hospital train / test split of the four UCI files in data.root.

    Deterministic (the split is seeded as FLamby's). Raises DataError for a missing folder or file
    and for a malformed row (naming the file and line).
    """
    root = Path(data.root).absolute()
    names = ", ".join(file_path(root, s).name for s in SITES)
    if not root.is_dir():
        raise DataError(
            f"data.root: {root} not found; put the UCI Heart Disease files {names} there "
            f"(from {UCI_PAGE})"
        )

    raw, label, rows, train_mask = _read_sites(root, names)
    features, feature_names = _encode(np.concatenate(raw))
    sizes = np.cumsum([0] + [len(r) for r in raw])
    per_site = [features[a:b] for a, b in zip(sizes[:-1], sizes[1:])]
    standardize = data.standardize in ("auto", "per-site")  # FLamby standardises per hospital
    parts = _splits(per_site, label, rows, train_mask, standardize)

    return SourceData(
        train=ImageSet.concat(parts["train"]),
        test=ImageSet.concat(parts["test"]),
        class_names=["no disease", "disease"],
        description=(
            f"UCI Heart Disease as FLamby's Fed-Heart-Disease: {int(sizes[-1])} patients at 4 "
            "hospitals (Cleveland, Budapest, Zurich/Basel, Long Beach VA), 13 clinical features, "
            "heart disease (num > 0) vs none"
        ),
        citation=(
            "UCI Heart Disease (Janosi, Steinbrunn, Pfisterer, Detrano; UCI Machine Learning "
            f"Repository, {UCI_PAGE}), CC BY 4.0; preprocessing and split as FLamby "
            "Fed-Heart-Disease (owkin/FLamby, MIT; du Terrail et al., NeurIPS 2022)"
        ),
        files=[str(file_path(root, s)) for s in SITES],
        feature_names=feature_names,
    )


def _read_sites(
    root: Path, names: str
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Per site in SITES: the file's rows (`read_processed`), the binary labels (num > 0), the
    rows' line numbers and FLamby's train mask; DataError for a missing file."""
    raw, label, rows, train_mask = [], [], [], []
    for site in SITES:
        path = file_path(root, site)
        if not path.is_file():
            raise DataError(
                f"data.root: {path} not found; put the UCI Heart Disease files {names} in {root} "
                f"(from {UCI_PAGE})"
            )
        values, line_numbers = read_processed(path)
        y = (values[:, LABEL] > 0).astype(np.int64)
        raw.append(values)
        label.append(y)
        rows.append(line_numbers)
        train_mask.append(split_center(y))
    return raw, label, rows, train_mask


def _splits(
    per_site: list[np.ndarray], label: list[np.ndarray], rows: list[np.ndarray],
    train_mask: list[np.ndarray], standardize: bool,
) -> dict[str, list[ImageSet]]:
    """{"train": [...], "test": [...]}: each site's encoded features (standardised by its own
    training rows' statistics when `standardize`), float32, with patients named SITE-LINE."""
    parts: dict[str, list[ImageSet]] = {"train": [], "test": []}
    for site, x, y, lines, is_train in zip(SITES, per_site, label, rows, train_mask):
        if standardize:
            mean, std = train_stats(x[is_train])
            x = (x - mean) / std
        patient = np.array([f"{site}-{n}" for n in lines])
        for split, mask in (("train", is_train), ("test", ~is_train)):
            parts[split].append(ImageSet(
                images=x[mask].astype(np.float32),
                labels=y[mask],
                site=np.array([site] * int(mask.sum())),
                patient=patient[mask],
            ))
    return parts


def read_processed(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The complete rows of one processed file: float64 (N, 14) with columns 10-12 set to NaN (they
    are dropped), and each row's 1-based line number in the file.

    A row with a missing value ('?') outside columns 10-12 is skipped, as FLamby does; a row without
    14 fields, with a non-number, or with a label outside 0-4 is a DataError naming file and line.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(
            f"{path}: not a text file; expected the UCI Heart Disease processed data"
        ) from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e})") from None
    values, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != len(COLUMNS):
            raise DataError(
                f"{path}: line {number}: {len(fields)} fields; expected {len(COLUMNS)} "
                f"({', '.join(COLUMNS)}), '?' for a missing value"
            )
        row = np.full(len(COLUMNS), np.nan)
        complete = True
        for i, field in enumerate(fields):
            if i in DROPPED:
                continue
            if field == "?":
                complete = False
                continue
            try:
                value = float(field)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise DataError(
                    f"{path}: line {number}: column {i + 1} ({COLUMNS[i]}) is '{field}'; expected "
                    "a number or '?' for a missing value"
                )
            row[i] = value
        if not complete:
            continue
        if row[LABEL] not in (0, 1, 2, 3, 4):
            raise DataError(
                f"{path}: line {number}: column 14 (num) is '{fields[LABEL]}'; expected 0 (no "
                "disease) to 4"
            )
        values.append(row)
        lines.append(number)
    if not values:
        raise DataError(f"{path}: no complete rows; expected the UCI Heart Disease processed data")
    return np.array(values), np.array(lines, dtype=np.int64)


def split_center(y: np.ndarray) -> np.ndarray:
    """Boolean mask of one hospital's training rows, FLamby's split: 66 / 34, seed 43, stratified
    by the binary label when both classes have more than 2 rows."""
    counts = np.unique(y, return_counts=True)[1]
    stratify = y if len(counts) > 1 and bool(np.all(counts > 2)) else None
    train_idx, _ = train_test_split(
        np.arange(len(y)), train_size=TRAIN_FRACTION, test_size=1.0 - TRAIN_FRACTION,
        random_state=SPLIT_SEED, shuffle=True, stratify=stratify,
    )
    mask = np.zeros(len(y), dtype=bool)
    mask[train_idx] = True
    return mask


def _encode(raw: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The pooled rows as 13 features (pandas get_dummies(columns=[2, 6], drop_first=True) with the
    levels of all hospitals together), and their names."""
    numeric = [i for i in range(len(COLUMNS)) if i not in DROPPED + CATEGORICAL + (LABEL,)]
    blocks = [raw[:, numeric]]
    names = [COLUMNS[i] for i in numeric]
    for col in CATEGORICAL:
        levels = np.unique(raw[:, col])[1:]  # sorted; the first level is dropped
        blocks.append((raw[:, col, None] == levels[None, :]).astype(np.float64))
        names += [f"{COLUMNS[col]}_{_level_name(v)}" for v in levels]
    return np.concatenate(blocks, axis=1), names


def _level_name(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def train_stats(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation (ddof=1, as torch.std) of one site's training rows.

    Where the deviation is 0 (a constant column, e.g. chol: always 0 in the Switzerland file) or
    undefined (one row), it is replaced by 1 so the column is only centred. FLamby divides by
    std + 1e-9 instead, which maps a test value that differs from the constant training value to
    about 1e9 times the difference: we do not reproduce that.
    """
    if len(x_train) == 0:
        raise DataError("per-site standardisation: a site has no training rows")
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0, ddof=1) if len(x_train) > 1 else np.zeros(x_train.shape[1])
    std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
    return mean, std


def standardize_per_site(x: np.ndarray, site: np.ndarray, is_train: np.ndarray) -> np.ndarray:
    """float64 copy of x with each site's rows scaled by the statistics of its training rows."""
    out = np.array(x, dtype=np.float64)
    for s in dict.fromkeys(site.tolist()):
        rows = site == s
        train = rows & is_train
        if not train.any():
            raise DataError(f"per-site standardisation: site '{s}' has no training rows")
        mean, std = train_stats(out[train])
        out[rows] = (out[rows] - mean) / std
    return out

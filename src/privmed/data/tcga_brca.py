"""TCGA-BRCA clinical survival data as prepared for FLamby's Fed-TCGA-BRCA.

Three files in data.root, all from owkin/FLamby (flamby/datasets/fed_tcga_brca):
- `brca.csv`: `pid`, 39 clinical features (age and one-hot categories), then `E` (event: 1 death
  observed, 0 censored) and `T` (days to the event or to censoring); 1,096 patients.
- `train_test_split.csv`: `pid`, `fold` (train / test) and `fold2` (train_K / test_K, K the center
  0..5); 1,088 patients, the others (8, from TSS in the 'Other' region) are left out, as in FLamby.
- `centers.csv`: `TSS Code` -> `Region`: the tissue source site is the second part of the pid
  (TCGA-E2-A9RU -> E2), and each center K is one region; the region names the site.
Features are used raw (FLamby does not scale them) unless data.standardize is 'per-site'.
Result: train 248 / 156 / 164 / 129 / 129 / 40, test 63 / 40 / 42 / 33 / 33 / 11 (FLamby's README).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from privmed.config import DataConfig
from privmed.data._csv import read_rows
from privmed.data.base import ImageSet, SourceData
from privmed.data.heart_disease import standardize_per_site
from privmed.errors import DataError

DATA_FILE, SPLIT_FILE, CENTERS_FILE = "brca.csv", "train_test_split.csv", "centers.csv"
FLAMBY_DIR = "github.com/owkin/FLamby, flamby/datasets/fed_tcga_brca"
GDC_TERMS = "https://gdc.cancer.gov/access-data/data-access-processes-and-tools"
N_CENTERS = 6
N_FEATURES = 39


def load_tcga_brca(data: DataConfig) -> SourceData:
    """SourceData with FLamby's train / test split of TCGA-BRCA, sites = the 6 regions.

    labels is the event indicator E, time the survival time T. Deterministic. Raises DataError for
    a missing folder or file, a malformed row (naming file and line) or inconsistent files.
    """
    root = Path(data.root).absolute()
    files = [root / DATA_FILE, root / SPLIT_FILE, root / CENTERS_FILE]
    what = (f"put FLamby's {DATA_FILE}, {CENTERS_FILE} and {SPLIT_FILE} in {root} (from "
            f"{FLAMBY_DIR}; the split is in its dataset_creation_scripts/)")
    if not root.is_dir():
        raise DataError(f"data.root: {root} not found; {what}")
    for path in files:
        if not path.is_file():
            raise DataError(f"data.root: {path} not found; {what}")

    feature_names, patients = _read_data(files[0])
    split = _read_split(files[1], patients)
    regions = _read_centers(files[2])
    site_names = _site_names(files, split, regions)

    # by center 0..5, each in brca.csv's order (FLamby's order within a center)
    order = [p for k in range(N_CENTERS) for p in patients if p in split and split[p][1] == k]
    x = np.array([patients[p][0] for p in order], dtype=np.float64)
    event = np.array([patients[p][1] for p in order], dtype=np.int64)
    time = np.array([patients[p][2] for p in order], dtype=np.float64)
    is_train = np.array([split[p][0] == "train" for p in order])
    site = np.array([site_names[split[p][1]] for p in order])
    pid = np.array(order)
    if data.standardize == "per-site":  # 'auto' and 'none': raw features, as FLamby
        x = standardize_per_site(x, site, is_train)

    def part(mask: np.ndarray) -> ImageSet:
        return ImageSet(images=x[mask].astype(np.float32), labels=event[mask], site=site[mask],
                        patient=pid[mask], time=time[mask])

    return SourceData(
        train=part(is_train),
        test=part(~is_train),
        class_names=["censored", "event"],
        description=(
            f"TCGA-BRCA clinical data as FLamby's Fed-TCGA-BRCA: {len(order)} breast cancer "
            f"patients in {N_CENTERS} regions, {N_FEATURES} clinical features, overall survival "
            "(time, event)"
        ),
        citation=(
            "TCGA-BRCA open-access clinical data (The Cancer Genome Atlas; NCI Genomic Data "
            f"Commons (GDC) terms: {GDC_TERMS}; Liu et al., Cell 2018); preparation and split "
            "from FLamby Fed-TCGA-BRCA (owkin/FLamby, MIT; du Terrail et al., NeurIPS 2022)"
        ),
        files=[str(p) for p in files],
        feature_names=feature_names,
    )


def _rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, fields) of the non-blank rows of one of FLamby's CSV files."""
    return read_rows(path, expected=f"FLamby's {path.name} with a header row",
                     fix=f"expected FLamby's {path.name}")


def _columns(path: Path, header: list[str], wanted: tuple[str, ...]) -> list[int]:
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError(
            f"{path}: missing column '{missing[0]}'; found {header}, required {list(wanted)}"
        )
    return [header.index(c) for c in wanted]


def _read_data(path: Path) -> tuple[list[str], dict[str, tuple[list[float], int, float]]]:
    """Feature names and {pid: (features, event, time)} in file order."""
    header, body = _rows(path)
    n = N_FEATURES + 3
    if len(header) != n or header[0] != "pid" or header[-2:] != ["E", "T"]:
        raise DataError(
            f"{path}: header has {len(header)} columns ({', '.join(header[:2])}, ..., "
            f"{', '.join(header[-2:])}); expected {n}: pid, {N_FEATURES} features, E, T"
        )
    patients: dict[str, tuple[list[float], int, float]] = {}
    lines: dict[str, int] = {}
    for line, row in body:
        if len(row) != n:
            raise DataError(f"{path}: line {line}: {len(row)} fields; expected {n} (pid, "
                            f"{N_FEATURES} features, E, T)")
        pid = row[0].strip()
        if not pid:
            raise DataError(f"{path}: line {line}: empty pid")
        if pid in patients:
            raise DataError(f"{path}: line {line}: pid {pid} is already on line {lines[pid]}")
        values = []
        for name, field in zip(header[1:], row[1:]):
            try:
                v = float(field)
            except ValueError:
                v = math.nan
            if not math.isfinite(v):
                raise DataError(f"{path}: line {line}: column '{name}' is '{field.strip()}'; "
                                "expected a number")
            values.append(v)
        event, time = values[-2:]
        if event not in (0.0, 1.0):
            raise DataError(f"{path}: line {line}: E is '{row[-2].strip()}'; expected 0 (censored) "
                            "or 1 (event)")
        if time < 0:
            raise DataError(f"{path}: line {line}: T is '{row[-1].strip()}'; expected a time >= 0")
        patients[pid] = (values[:-2], int(event), time)
        lines[pid] = line
    if not patients:
        raise DataError(f"{path}: no rows below the header")
    return header[1:-2], patients


def _read_split(path: Path, patients: dict) -> dict[str, tuple[str, int]]:
    """{pid: (fold, center)} from train_test_split.csv."""
    header, body = _rows(path)
    i_pid, i_fold, i_fold2 = _columns(path, header, ("pid", "fold", "fold2"))
    allowed = f"train_0..train_{N_CENTERS - 1} or test_0..test_{N_CENTERS - 1}"
    split: dict[str, tuple[str, int]] = {}
    for line, row in body:
        if len(row) != len(header):
            raise DataError(f"{path}: line {line}: {len(row)} fields; expected {len(header)} "
                            f"({', '.join(header)})")
        pid, fold, fold2 = row[i_pid].strip(), row[i_fold].strip(), row[i_fold2].strip()
        m = re.fullmatch(r"(train|test)_(\d+)", fold2)
        if fold not in ("train", "test"):
            raise DataError(f"{path}: line {line}: fold is '{fold}'; expected train or test")
        if not m or int(m.group(2)) >= N_CENTERS:
            raise DataError(f"{path}: line {line}: fold2 is '{fold2}'; expected {allowed}")
        if m.group(1) != fold:
            raise DataError(f"{path}: line {line}: fold '{fold}' and fold2 '{fold2}' disagree")
        if pid in split:
            raise DataError(f"{path}: line {line}: pid {pid} is listed twice")
        if pid not in patients:
            raise DataError(f"{path}: line {line}: pid {pid} is not in {DATA_FILE}")
        split[pid] = (fold, int(m.group(2)))
    return split


def _read_centers(path: Path) -> dict[str, str]:
    """{TSS code: region} from centers.csv."""
    header, body = _rows(path)
    i_code, i_region = _columns(path, header, ("TSS Code", "Region"))
    regions: dict[str, str] = {}
    for line, row in body:
        if len(row) != len(header):
            raise DataError(f"{path}: line {line}: {len(row)} fields; expected {len(header)} "
                            f"({', '.join(header)})")
        code, region = row[i_code].strip(), row[i_region].strip()
        if not code or not region:
            raise DataError(f"{path}: line {line}: empty TSS Code or Region")
        if regions.get(code, region) != region:
            raise DataError(f"{path}: line {line}: TSS code {code} is in regions "
                            f"{regions[code]} and {region}")
        regions[code] = region
    return regions


def _site_names(
    files: list[Path], split: dict[str, tuple[str, int]], regions: dict[str, str]
) -> list[str]:
    """The region of each center 0..5: all its patients' TSS must lie in that one region, and no
    two centers may share one."""
    found: dict[int, set[str]] = {k: set() for k in range(N_CENTERS)}
    for pid, (_, k) in split.items():
        parts = pid.split("-")
        if len(parts) < 3 or parts[1] not in regions:
            raise DataError(
                f"{files[1]}: pid {pid}: its tissue source site "
                f"'{parts[1] if len(parts) > 1 else ''}' is not in {files[2]}"
            )
        found[k].add(regions[parts[1]])
    names = []
    for k, rs in found.items():
        if len(rs) != 1:
            raise DataError(
                f"{files[1]}: center {k} holds patients of {len(rs)} regions "
                f"({', '.join(sorted(rs)) or 'none'}) by {files[2]}; expected exactly one per "
                "center"
            )
        names.append(_sanitise(rs.pop()))
    if len(set(names)) != len(names):
        raise DataError(f"{files[1]}: centers 0..{N_CENTERS - 1} map to regions {names}; expected "
                        "a different region for each center")
    return names


def _sanitise(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "region"

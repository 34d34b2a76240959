"""PNG/JPEG images in one folder per class, optionally split into train/[val/]test folders.

Layouts under data.root:
    <class>/<image>                 -> a seeded test hold-out of data.test_fraction, by patient
    train/<class>/..., test/<class>/... [, val/<class>/... merged into train]   (the Kermany layout)
An optional data.csv (columns `file`, and any of `site`, `patient`) gives each image's site and
patient; it must list every image.

The classes are the class folders' names, sorted; or `data.class_names`, in that order: the
federation's agreed classes, so that a hospital holding only some of them (label skew) can join.
Then a class may have no folder, or an empty one, and a folder that is not a named class is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from privmed.config import DataConfig
from privmed.data._csv import read_index
from privmed.data._images import IMAGE_SUFFIXES, read_image, stack_images
from privmed.data._split import train_test
from privmed.data.base import ImageSet, SourceData
from privmed.errors import DataError

SPLIT_FOLDERS = ("train", "val", "test")


@dataclass(frozen=True)
class _Item:
    rel: str  # POSIX path relative to root, as found on disk
    split: str  # "train" or "test" ("" when the layout has no split folders)
    label: int


def load_image_folder(data: DataConfig, seed: int) -> SourceData:
    """SourceData from class folders of PNG/JPEG images; see the module docstring for layouts."""
    root = Path(data.root)
    if not root.is_dir():
        raise DataError(
            f"data.root: {root} is not a folder (expected one subfolder per class of .png/.jpg images, "
            "or train/ and test/ folders of class subfolders)"
        )
    channels = data.channels or 1
    items, class_names = scan_folders(root, data.class_names)
    files = [it.rel for it in items]

    site = patient = None
    if data.csv is not None:
        site, patient = _csv_columns(Path(data.csv), root, files)

    arrays = [read_image(root / it.rel, channels, data.size) for it in items]
    images = stack_images(arrays, [str(root / f) for f in files])
    labels = np.array([it.label for it in items], dtype=np.int64)
    full = ImageSet(images=images, labels=labels, site=site, patient=patient)

    split = np.array([it.split for it in items])
    is_test = (split == "test") if (split == "test").any() else None
    train, test = train_test(full, is_test, data.test_fraction, seed, str(data.csv))

    return SourceData(
        train=train,
        test=test,
        class_names=class_names,
        description=(
            f"image folder {root}: {len(full)} images, {len(class_names)} classes "
            f"({', '.join(class_names)}), {images.shape[2]}x{images.shape[3]} px"
        ),
        citation=f"user-supplied images from {root}: cite their source and license",
        files=[str(root / f) for f in files] + ([str(data.csv)] if data.csv is not None else []),
    )


def scan_folders(root: Path, named: list[str] | None = None) -> tuple[list[_Item], list[str]]:
    """Every image under root's class folders (sorted), and the class names: the folders' sorted,
    or `named` (data.class_names), which may include classes with no images here."""
    subdirs = _subdirs(root)
    names = {d.name for d in subdirs}
    if "train" in names and names <= set(SPLIT_FOLDERS):
        layout = {s: root / s for s in SPLIT_FOLDERS if s in names}
    else:
        layout = {"": root}

    classes = _subdirs(layout["train"] if "train" in layout else root)
    class_names = list(named) if named else [d.name for d in classes]
    if len(class_names) < 2:
        where = layout.get("train", root)
        raise DataError(
            f"data.root: {where} has {len(class_names)} class folder(s) {class_names}; "
            "classification needs at least 2 (one subfolder of images per class; a hospital that "
            "holds only some of the federation's classes names them all in data.class_names)"
        )
    index = {n: i for i, n in enumerate(class_names)}
    what = "data.class_names" if named else "the training classes"
    items: list[_Item] = []
    for split, folder in layout.items():
        for d in _subdirs(folder):
            if d.name not in index:
                raise DataError(f"{d}: class '{d.name}' is not among {what} {class_names}")
            found = _images_in(d)
            if not found and not named:
                raise DataError(f"{d}: empty class folder (no {'/'.join(IMAGE_SUFFIXES)} images)")
            tag = "test" if split == "test" else ("train" if split else "")
            items += [_Item(p.relative_to(root).as_posix(), tag, index[d.name]) for p in found]
    if not items:
        raise DataError(f"data.root: {root} holds no {'/'.join(IMAGE_SUFFIXES)} images in its class folders")
    return items, class_names


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _csv_columns(
    csv_path: Path, root: Path, files: list[str]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(site, patient) columns in the order of `files`, from the index CSV (None when absent)."""
    rows = read_index(csv_path, ("file",), ("site", "patient"))
    by_file = {r["file"]: r for r in rows}
    on_disk = set(files)
    for r in rows:
        if r["file"] not in on_disk:
            if not (root / r["file"]).is_file():
                raise DataError(f"{csv_path}: lists '{r['file']}', which does not exist under {root}")
            raise DataError(
                f"{csv_path}: lists '{r['file']}', which is not a .png/.jpg/.jpeg image in a class "
                f"folder under {root}"
            )
    for f in files:
        if f not in by_file:
            raise DataError(
                f"{csv_path}: image '{f}' under {root} is not listed; the CSV must list every image "
                f"({len(files) - len(by_file.keys() & on_disk)} missing)"
            )
    cols = rows[0].keys()
    site = np.array([by_file[f]["site"] for f in files]) if "site" in cols else None
    patient = np.array([by_file[f]["patient"] for f in files]) if "patient" in cols else None
    return site, patient

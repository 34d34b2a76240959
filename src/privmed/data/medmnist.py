"""MedMNIST v2 / MedMNIST+ datasets, 2D and 3D, from their official .npz files (optionally
downloaded).

A 2D file holds `{train,val,test}_images` uint8 (N, H, W) or (N, H, W, 3); it becomes float32
(N, C, H, W) / 255. A 3D file (`*mnist3d.npz`, `*mnist3d_64.npz`) holds volumes (N, D, H, W), uint8
(or floats in [0, 1]); they become float32 (N, 1, D, H, W) in [0, 1]. `{train,val,test}_labels`
(N, 1) become int64 (N,). The MD5 and URL tables are those of the official MedMNIST package
(MedMNIST/MedMNIST, medmnist/info.py, v3.0.2: Zenodo record 10519652).
"""

from __future__ import annotations

import difflib
import hashlib
import os
import tempfile
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np

from privmed.config import MEDMNIST_VOLUMES, DataConfig
from privmed.data._images import set_channels
from privmed.data.base import ImageSet, SourceData
from privmed.errors import DataError

URL_TEMPLATE = "https://zenodo.org/records/10519652/files/{file}?download=1"
PAGE_TEMPLATE = "https://zenodo.org/records/10519652/files/{file}"
DOWNLOAD_TIMEOUT_S = 20.0
SPLITS = ("train", "val", "test")

# Official MD5 per dataset and image side (MedMNIST/MedMNIST medmnist/info.py, v3.0.2); the 3D sets
# come in 28 and 64 voxels a side.
MD5: dict[str, dict[int, str]] = {
    "pathmnist": {28: "a8b06965200029087d5bd730944a56c1", 64: "55aa9c1e0525abe5a6b9d8343a507616",
                  128: "ac42d08fb904d92c244187169d1fd1d9", 224: "2c51a510bcdc9cf8ddb2af93af1eadec"},
    "chestmnist": {28: "02c8a6516a18b556561a56cbdd36c4a8", 64: "9de6cd0b934ebb5b7426cfba5efbae16",
                   128: "db107e5590b27930b62dbaf558aebee3", 224: "45bd33e6f06c3e8cdb481c74a89152aa"},
    "dermamnist": {28: "0744692d530f8e62ec473284d019b0c7", 64: "b70a2f5635c6199aeaa28c31d7202e1f",
                   128: "2defd784463fa5243564e855ed717de1", 224: "8974907d8e169bef5f5b96bc506ae45d"},
    "octmnist": {28: "c68d92d5b585d8d81f7112f81e2d0842", 64: "e229e9440236b774d9f0dfef9d07bdaf",
                 128: "0a97e76651ace45c5d943ee3f65b63ae", 224: "abc493b6d529d5de7569faaef2773ba3"},
    "pneumoniamnist": {28: "28209eda62fecd6e6a2d98b1501bb15f", 64: "8f4eceb4ccffa70c672198ea285246c6",
                       128: "05b46931834c231683c68f40c47b2971", 224: "d6a3c71de1b945ea11211b03746c1fe1"},
    "retinamnist": {28: "bd4c0672f1bba3e3a89f0e4e876791e4", 64: "afda852cc34dcda56f86ad2b2457dbcc",
                    128: "e48e916a24454daf90583d4e6efb1a18", 224: "eae7e3b6f3fcbda4ae613ebdcbe35348"},
    "breastmnist": {28: "750601b1f35ba3300ea97c75c52ff8f6", 64: "742edef2a1fd1524b2efff4bd7ba9364",
                    128: "363e4b3f8d712e9b5de15470a2aaadf1", 224: "b56378a6eefa9fed602bb16d192d4c8b"},
    "bloodmnist": {28: "7053d0359d879ad8a5505303e11de1dc", 64: "2b94928a2ae4916078ca51e05b6b800b",
                   128: "adace1e0ed228fccda1f39692059dd4c", 224: "b718ff6835fcbdb22ba9eacccd7b2601"},
    "tissuemnist": {28: "ebe78ee8b05294063de985d821c1c34b", 64: "123ece2eba09d0aa5d698fda57103344",
                    128: "61b955355d7425a89687b06cca3ce0c2", 224: "b077128c4a949f0a4eb01517f9037b9c"},
    "organamnist": {28: "68e3f8846a6bd62f0c9bf841c0d9eacc", 64: "2dcccc29b88e6da5a01161ef20cda288",
                    128: "eeae80d0a227a8d099027e1b3cfd3b60", 224: "50747347e05c87dd3aaf92c49f9f3170"},
    "organcmnist": {28: "b9ceb9546e10131b32923c5bbeaea2b1", 64: "3ce34a8724ea6f548e6db4744d03b6a9",
                    128: "773c1f009daa3fe5d9a2a201b2a7ed94", 224: "050f5e875dc056f6768abf94ec9995d1"},
    "organsmnist": {28: "9ab87b696fb54e2a387ebe992d6ed5f1", 64: "53a6d115339d874c25e309a994ff46d3",
                    128: "ded0c5fa01a95dc4978b956f613e9b8e", 224: "b354719e553fbbb2513d5533f52a4cb1"},
    "organmnist3d": {28: "a0c5a1ff56af4f155c46d46fbb45a2fe", 64: "58a2205adf14a9d0a189cb06dc78bf10"},
    "nodulemnist3d": {28: "8755a7e9e05a4d9ce80a24c3e7a256f3", 64: "c47c5b7d457bf6332200d2ea6d64ecd8"},
    "adrenalmnist3d": {28: "bbd3c5a5576322bc4cdfea780653b1ce", 64: "17721accfe9fb005146a47d33bc54b2f"},
    "fracturemnist3d": {28: "6aa7b0143a6b42da40027a9dda61302f", 64: "f01d7e6316aedf4210da0da5b7437b42"},
    "vesselmnist3d": {28: "b41fd4f7e7e2feedddb201585ecafa1b", 64: "6bb274a8846e1097066dcd64e2c4520f"},
    "synapsemnist3d": {28: "1235b78a3cd6280881dd7850a78eadb6", 64: "43bd14ebf3af9d3dd072446fedc14d5e"},
}

_ORGANS = ["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
           "lung-left", "lung-right", "pancreas", "spleen"]

# Label names by class index (medmnist/info.py "label").
LABELS: dict[str, list[str]] = {
    "pathmnist": ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                  "normal colon mucosa", "cancer-associated stroma",
                  "colorectal adenocarcinoma epithelium"],
    "chestmnist": ["atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
                   "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis",
                   "pleural", "hernia"],
    "dermamnist": ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                   "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                   "vascular lesions"],
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "retinamnist": ["0", "1", "2", "3", "4"],
    "breastmnist": ["malignant", "normal, benign"],
    "bloodmnist": ["basophil", "eosinophil", "erythroblast",
                   "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
                   "lymphocyte", "monocyte", "neutrophil", "platelet"],
    "tissuemnist": ["Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
                    "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
                    "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb"],
    "organamnist": _ORGANS,
    "organcmnist": _ORGANS,
    "organsmnist": _ORGANS,
    # OrganMNIST3D numbers the same organs in another order
    "organmnist3d": ["liver", "kidney-right", "kidney-left", "femur-right", "femur-left", "bladder",
                     "heart", "lung-right", "lung-left", "spleen", "pancreas"],
    "nodulemnist3d": ["benign", "malignant"],
    "adrenalmnist3d": ["normal", "hyperplasia"],
    "fracturemnist3d": ["buckle rib fracture", "nondisplaced rib fracture", "displaced rib fracture"],
    "vesselmnist3d": ["vessel", "aneurysm"],
    "synapsemnist3d": ["inhibitory synapse", "excitatory synapse"],
}

# (what it shows, the source it is derived from, its license).
_ABOUT: dict[str, tuple[str, str, str]] = {
    "pathmnist": ("colorectal cancer histology patches, 9 tissue types",
                  "NCT-CRC-HE-100K / CRC-VAL-HE-7K, Kather et al., PLOS Medicine 2019", "CC BY 4.0"),
    "chestmnist": ("frontal chest X-rays, 14 findings (multi-label)",
                   "NIH ChestX-ray14, Wang et al., CVPR 2017", "CC BY 4.0"),
    "dermamnist": ("dermatoscopic images of pigmented skin lesions, 7 diagnoses",
                   "HAM10000, Tschandl et al., Scientific Data 2018", "CC BY-NC 4.0"),
    "octmnist": ("retinal OCT scans, 4 diagnoses",
                 "Kermany et al., Cell 2018", "CC BY 4.0"),
    "pneumoniamnist": ("paediatric chest X-rays, normal vs pneumonia",
                       "Kermany et al., Cell 2018", "CC BY 4.0"),
    "retinamnist": ("retina fundus images, diabetic retinopathy grade 0-4",
                    "DeepDRiD, Liu et al., Patterns 2022", "CC BY 4.0"),
    "breastmnist": ("breast ultrasound, malignant vs normal/benign",
                    "BUSI, Al-Dhabyani et al., Data in Brief 2020", "CC BY 4.0"),
    "bloodmnist": ("blood cell microscopy, 8 cell types",
                   "Acevedo et al., Data in Brief 2020", "CC BY 4.0"),
    "tissuemnist": ("kidney cortex cell microscopy, 8 cell types",
                    "BBBC051, Ljosa et al., Nature Methods 2012", "CC BY 4.0"),
    "organamnist": ("abdominal CT, axial organ crops, 11 organs",
                    "LiTS, Bilic et al., Medical Image Analysis 2023", "CC BY 4.0"),
    "organcmnist": ("abdominal CT, coronal organ crops, 11 organs",
                    "LiTS, Bilic et al., Medical Image Analysis 2023", "CC BY 4.0"),
    "organsmnist": ("abdominal CT, sagittal organ crops, 11 organs",
                    "LiTS, Bilic et al., Medical Image Analysis 2023", "CC BY 4.0"),
    "organmnist3d": ("abdominal CT, 3D organ crops, 11 organs",
                     "LiTS, Bilic et al., Medical Image Analysis 2023", "CC BY 4.0"),
    "nodulemnist3d": ("chest CT, lung nodules, benign vs malignant",
                      "LIDC-IDRI, Armato et al., Medical Physics 2011", "CC BY 4.0"),
    "adrenalmnist3d": ("adrenal gland shapes from abdominal CT, normal vs hyperplasia",
                       "Zhongshan Hospital, Fudan University (new in MedMNIST v2)", "CC BY 4.0"),
    "fracturemnist3d": ("chest CT, rib fractures, 3 types",
                        "RibFrac, Jin et al., EBioMedicine 2020", "CC BY 4.0"),
    "vesselmnist3d": ("brain vessel segments from MRA, healthy vessel vs aneurysm",
                      "IntrA, Yang et al., CVPR 2020", "CC BY 4.0"),
    "synapsemnist3d": ("electron microscopy of rat cortex, inhibitory vs excitatory synapses",
                       "MitoEM volume, Wei et al., MICCAI 2020 (new in MedMNIST v2)", "CC BY 4.0"),
}

MULTI_LABEL = frozenset({"chestmnist"})
VOLUMES_3D = frozenset(MEDMNIST_VOLUMES)


def dataset_names() -> list[str]:
    """The MedMNIST datasets this loader knows, 2D and 3D (chestmnist included, though
    multi-label)."""
    return sorted(MD5)


def file_name(name: str, size: int | None) -> str:
    """The official file name: `{name}.npz` for 28 px (or None), else `{name}_{size}.npz`."""
    return f"{name}.npz" if size in (None, 28) else f"{name}_{size}.npz"


def file_md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def load_medmnist(
    data: DataConfig, *, url_template: str = URL_TEMPLATE, timeout: float = DOWNLOAD_TIMEOUT_S
) -> SourceData:
    """SourceData with the official train / val / test splits of one MedMNIST file: images
    (N, C, H, W) from a 2D set, volumes (N, 1, D, H, W) from a 3D set.

    The file is `data.root / file_name(data.name, data.size)`; when missing and `data.download` is
    true it is fetched from `url_template` (a `{file}` placeholder), MD5-checked and moved into
    place atomically. No site or patient columns: MedMNIST does not publish them.
    """
    name = _check_name(str(data.name))
    size = data.size or 28
    volume = name in VOLUMES_3D
    if size not in MD5[name]:
        raise DataError(f"data.size: {size} is not a size of '{name}'; allowed: "
                        + ", ".join(str(k) for k in MD5[name]))
    if volume and data.channels not in (None, 1):
        raise DataError(f"data.channels: {data.channels} is not allowed for '{name}': 3D MedMNIST "
                        "volumes are grey; use 1 or leave it out")
    fname = file_name(name, size)
    md5 = MD5[name][size]
    path = Path(data.root).absolute() / fname
    if not path.is_file():
        _fetch(path, url_template.format(file=fname), md5, data.download, timeout)

    arrays = _read_npz(path)
    n_classes = len(LABELS[name])
    sets = {}
    for split in SPLITS:
        images, key = arrays[f"{split}_images"], f"{split}_images"
        images = _volumes(path, key, images, size) if volume else _images(path, name, key, images, size)
        labels = _labels(path, f"{split}_labels", arrays[f"{split}_labels"], len(images), n_classes)
        sets[split] = ImageSet(images=set_channels(images, None if volume else data.channels), labels=labels)
    what, source, license_ = _ABOUT[name]
    c = sets["train"].images.shape[1]
    shape = f"{size}x{size}x{size} volumes" if volume else f"{size}x{size}, {'RGB' if c == 3 else 'grey'}"
    return SourceData(
        train=sets["train"],
        val=sets["val"],
        test=sets["test"],
        class_names=list(LABELS[name]),
        description=f"{_title(name)} (MedMNIST v2, {shape}): {what}",
        citation=f"MedMNIST v2 (Yang et al., Scientific Data 2023), {license_}; source: {source}",
        files=[str(path)],
    )


def _title(name: str) -> str:
    """The set's own spelling: 'OCTMNIST', 'OrganAMNIST', 'VesselMNIST3D'."""
    stem, _, dims = name.partition("mnist")
    special = {"oct": "OCT", "organa": "OrganA", "organc": "OrganC", "organs": "OrganS"}
    return special.get(stem, stem.capitalize()) + "MNIST" + dims.upper()


def _check_name(name: str) -> str:
    key = name.strip().lower()
    if key in MULTI_LABEL:
        raise DataError(
            f"data.name: '{name}' is multi-label; multi-label not supported yet "
            f"(single-label sets: {', '.join(n for n in dataset_names() if n not in MULTI_LABEL)})"
        )
    if key not in MD5:
        close = difflib.get_close_matches(key, list(MD5), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise DataError(
            f"data.name: unknown MedMNIST dataset '{name}'{hint} (known: {', '.join(dataset_names())})"
        )
    return key


# --------------------------------------------------------------------------- download


def _fetch(path: Path, url: str, md5: str, allowed: bool, timeout: float) -> None:
    """Download `url` to `path` (atomically, MD5-checked) or raise a DataError saying what to do."""
    if allowed:
        try:
            download(url, path, md5, timeout)
            return
        except DownloadFailed as e:
            reason = str(e)
    else:
        reason = "data.download is false"
    page = PAGE_TEMPLATE.format(file=path.name)
    raise DataError(
        f"data.root: {path} not found and could not be downloaded ({reason}); download {page} "
        f"and place it at {path} (MD5 {md5})"
    )


class DownloadFailed(Exception):
    """A download did not produce the official file; the message is the short reason."""


def download(url: str, dest: Path, md5: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch `url` into a temporary sibling of `dest`, check its MD5, then rename it into place.

    Raises DownloadFailed and leaves nothing behind: no partial file, and no
    folder it had to create.
    """
    dest = Path(dest)
    created = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]
    tmp, done = None, False
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        h = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                h.update(chunk)
            f.flush()
            os.fsync(f.fileno())
        if h.hexdigest() != md5:
            raise DownloadFailed(f"downloaded MD5 {h.hexdigest()} is not the official {md5}")
        os.replace(tmp, dest)
        done = True
    except DownloadFailed:
        raise
    except Exception as e:  # urllib/http/socket errors have no common base; report the reason
        raise DownloadFailed(f"{type(e).__name__}: {_first_line(e)}") from None
    finally:
        if not done:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            for p in created:  # deepest first
                try:
                    p.rmdir()
                except OSError:
                    break


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:160] if lines else "no detail"


# --------------------------------------------------------------------------- reading


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    keys = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: not an .npz archive (a single .npy array?); expected keys {keys}")
        with z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise DataError(
                    f"{path}: missing key '{missing[0]}' (has {sorted(z.files)}); expected {keys}"
                )
            return {k: z[k] for k in keys}
    except DataError:
        raise
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError) as e:
        # np.load takes an unknown format for a pickle, and says so: not helpful here.
        reason = "unrecognised file format" if "pickle" in str(e) else _first_line(e)
        raise DataError(f"{path}: corrupt or not an .npz archive ({reason}); re-download it") from None


def _images(path: Path, name: str, key: str, images: np.ndarray, size: int) -> np.ndarray:
    """A 2D set's uint8 (N, H, W) or (N, H, W, 1 | 3) -> float32 (N, C, H, W) in [0, 1]."""
    if images.dtype != np.uint8:
        raise DataError(f"{path}: {key} has dtype {images.dtype}; expected uint8 (0-255)")
    if images.ndim == 4 and images.shape[3] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    elif images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4:
        raise DataError(
            f"{path}: {key} has shape {images.shape}, volumes, but '{name}' is a 2D set (expected "
            f"(N, H, W) or (N, H, W, 3)); the 3D sets are {', '.join(sorted(VOLUMES_3D))}"
        )
    else:
        raise DataError(f"{path}: {key} has shape {images.shape}; expected (N, H, W) or (N, H, W, 3)")
    if images.shape[2:] != (size, size):
        raise DataError(
            f"{path}: {key} are {images.shape[3]}x{images.shape[2]} px but data.size asks for "
            f"{size}x{size}; this is not the official {size} px file (re-download it)"
        )
    return images.astype(np.float32) / np.float32(255.0)


def _volumes(path: Path, key: str, images: np.ndarray, size: int) -> np.ndarray:
    """A 3D set's (N, D, H, W) volumes, uint8 or floats in [0, 1] -> float32 (N, 1, D, H, W) in
    [0, 1]."""
    if images.ndim != 4:
        raise DataError(
            f"{path}: {key} has shape {images.shape}; a 3D MedMNIST file holds volumes "
            f"(N, {size}, {size}, {size})"
        )
    if images.shape[1:] != (size, size, size):
        d, h, w = images.shape[1:]
        raise DataError(
            f"{path}: {key} are {d}x{h}x{w} voxels but data.size asks for {size}x{size}x{size}; "
            f"this is not the official {size} px file (re-download it)"
        )
    if images.dtype == np.uint8:
        out = images.astype(np.float32) / np.float32(255.0)
    elif np.issubdtype(images.dtype, np.floating):
        out = images.astype(np.float32)
        bad = ~((out >= 0) & (out <= 1))  # catches NaN too
        if bad.any():
            raise DataError(
                f"{path}: {key} holds the value {out[bad][0]:g}; float volumes must lie in [0, 1]"
            )
    else:
        raise DataError(f"{path}: {key} has dtype {images.dtype}; expected uint8 (0-255) or floats in [0, 1]")
    return out[:, None]


def _labels(path: Path, key: str, labels: np.ndarray, n_images: int, n_classes: int) -> np.ndarray:
    """(N, 1) integer class indices -> int64 (N,), each in 0..n_classes-1."""
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(f"{path}: {key} has shape {labels.shape}: multi-label not supported yet")
    labels = labels.reshape(-1)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {key} has dtype {labels.dtype}; expected integer class indices")
    images_key = key.replace("_labels", "_images")
    if len(labels) != n_images:
        raise DataError(f"{path}: {key} has {len(labels)} labels for {n_images} images in {images_key}")
    bad = labels[(labels < 0) | (labels >= n_classes)]
    if len(bad):
        raise DataError(f"{path}: {key} holds label {int(bad[0])}; allowed 0..{n_classes - 1}")
    return labels.astype(np.int64)

"""Data sources: each turns the `data` config into a SourceData of float32 (N, C, H, W) images (or
(N, C, D, H, W) volumes: the 3D MedMNIST sets).

    load_source(cfg.data, cfg.sites, cfg.seed) -> SourceData
Sources: "medmnist" (official .npz files, 2D and 3D), "image-folder" (PNG/JPEG class folders), "dicom"
(files listed in a CSV), "phantom" (synthetic; volumes with masks for the dense tasks), "ixi" (IXI
T1 brain volumes with label maps, for segmentation and reconstruction), "nifti" (volumes and masks
listed in a CSV), and the tabular "heart-disease" (UCI, as FLamby's
Fed-Heart-Disease) and "tcga-brca" (survival, as FLamby's Fed-TCGA-BRCA), whose float32 (N, D)
features take the place of images. Bad input raises privmed.errors.DataError.
"""

from __future__ import annotations

import json

from privmed import catalog
from privmed.config import DataConfig, SitesConfig
from privmed.data.base import ImageSet, SourceData
from privmed.errors import DataError

__all__ = ["ImageSet", "SourceData", "load_source", "preload"]

# sources loaded ahead of the run by `preload`, each taken once by the load_source call it was made for
_PRELOADED: dict[str, SourceData] = {}


def _key(data: DataConfig, sites: SitesConfig, seed: int, task: str) -> str:
    return json.dumps([data.model_dump(mode="json"), sites.model_dump(mode="json"), seed, task], sort_keys=True)


def preload(data: DataConfig, sites: SitesConfig, seed: int, task: str = "classification") -> None:
    """Load the source now and keep it for the run's own `load_source` call with the same arguments
    (in this process). The command line calls it before importing torch and the models, so that a
    data error (a missing folder, a bad CSV value) appears in about a second rather than after them."""
    _PRELOADED[_key(data, sites, seed, task)] = load_source(data, sites, seed, task)


def load_source(data: DataConfig, sites: SitesConfig, seed: int, task: str = "classification") -> SourceData:
    """The pooled train / test (and official val) sets of the configured source, for `task` (the
    phantom makes volumes with masks for the dense tasks).

    Deterministic: the same config and seed give identical arrays (what `preload` loaded for
    them, if it did).
    """
    preloaded = _PRELOADED.pop(_key(data, sites, seed, task), None)
    if preloaded is not None:
        return preloaded
    if data.channels not in (None, 1, 3):
        raise DataError(f"data.channels: {data.channels} is not allowed; use 1 (grey) or 3 (RGB)")
    entry = catalog.by_name(catalog.SOURCES).get(data.source)
    if entry is None or entry.loader is None:
        known = ", ".join(s.name for s in catalog.SOURCES if s.loader is not None)
        raise DataError(f"data.source: unknown source '{data.source}' (known: {known})")
    return catalog.load(entry.loader)(data, sites, seed, task)


# Each source's loader, as the catalog names it (privmed.catalog.SOURCES: `loader`): (data, sites,
# seed, task) -> SourceData. A new source's module may hold its own.


def _load_medmnist(data: DataConfig, sites: SitesConfig, seed: int, task: str) -> SourceData:
    from privmed.data.medmnist import load_medmnist

    return load_medmnist(data)


def _load_image_folder(data: DataConfig, sites: SitesConfig, seed: int, task: str) -> SourceData:
    from privmed.data.image_folder import load_image_folder

    return load_image_folder(data, seed)


def _load_dicom(data: DataConfig, sites: SitesConfig, seed: int, task: str) -> SourceData:
    from privmed.data.dicom import load_dicom

    return load_dicom(data, seed)


def _load_phantom(data: DataConfig, sites: SitesConfig, seed: int, task: str) -> SourceData:
    if task in ("segmentation", "reconstruction"):
        from privmed.data.phantom_volumes import load_phantom_volumes

        volumes = load_phantom_volumes(data, sites, seed, noise=task != "reconstruction")
        return _for_task(volumes, task, sites, seed, data)
    from privmed.data.phantom import load_phantom

    return load_phantom(data, sites, seed)


def _load_nifti(data: DataConfig, sites: SitesConfig, seed: int, task: str) -> SourceData:
    from privmed.data.nifti import load_nifti

    return _for_task(load_nifti(data, sites, seed), task, sites, seed, data)


def _load_ixi(data: DataConfig, sites: SitesConfig, seed: int, task: str) -> SourceData:
    from privmed.data.ixi import load_ixi

    return _for_task(load_ixi(data, sites, seed), task, sites, seed, data)


def _load_heart_disease(data: DataConfig, sites: SitesConfig, seed: int, task: str) -> SourceData:
    from privmed.data.heart_disease import load_heart_disease

    return load_heart_disease(data)


def _load_tcga_brca(data: DataConfig, sites: SitesConfig, seed: int, task: str) -> SourceData:
    from privmed.data.tcga_brca import load_tcga_brca

    return load_tcga_brca(data)


def _for_task(source: SourceData, task: str, sites: SitesConfig, seed: int, data: DataConfig) -> SourceData:
    """Volumes with masks as `task` uses them: as they are for segmentation; for reconstruction,
    each site's scanner's undersampled k-space of the slices (privmed.data.recon)."""
    if task != "reconstruction":
        return source
    from privmed.data.recon import as_reconstruction

    return as_reconstruction(source, sites, seed, data)

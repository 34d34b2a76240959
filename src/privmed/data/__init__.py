"""Data sources: each turns the `data` config into a SourceData of float32 (N, C, H, W) images (or
(N, C, D, H, W) volumes: the 3D MedMNIST sets).

    load_source(cfg.data, cfg.sites, cfg.seed) -> SourceData
Sources: "medmnist" (official .npz files, 2D and 3D), "image-folder" (PNG/JPEG class folders), "dicom" (files
listed in a CSV), "phantom" (synthetic), and the tabular "heart-disease" (UCI, as FLamby's
Fed-Heart-Disease) and "tcga-brca" (survival, as FLamby's Fed-TCGA-BRCA), whose float32 (N, D)
features take the place of images. Bad input raises privmed.errors.DataError.
"""

from __future__ import annotations

from privmed.config import DataConfig, SitesConfig
from privmed.data.base import ImageSet, SourceData
from privmed.errors import DataError

__all__ = ["ImageSet", "SourceData", "load_source"]


def load_source(data: DataConfig, sites: SitesConfig, seed: int) -> SourceData:
    """The pooled train / test (and official val) sets of the configured source.

    Deterministic: the same config and seed give identical arrays.
    """
    if data.channels not in (None, 1, 3):
        raise DataError(f"data.channels: {data.channels} is not allowed; use 1 (grey) or 3 (RGB)")
    if data.source == "medmnist":
        from privmed.data.medmnist import load_medmnist

        return load_medmnist(data)
    if data.source == "image-folder":
        from privmed.data.image_folder import load_image_folder

        return load_image_folder(data, seed)
    if data.source == "dicom":
        from privmed.data.dicom import load_dicom

        return load_dicom(data, seed)
    if data.source == "phantom":
        from privmed.data.phantom import load_phantom

        return load_phantom(data, sites, seed)
    if data.source == "heart-disease":
        from privmed.data.heart_disease import load_heart_disease

        return load_heart_disease(data)
    if data.source == "tcga-brca":
        from privmed.data.tcga_brca import load_tcga_brca

        return load_tcga_brca(data)
    raise DataError(
        f"data.source: unknown source '{data.source}' (known: medmnist, image-folder, dicom, "
        "phantom, heart-disease, tcga-brca)"
    )

"""Three hospitals, each with its own folder of images (a natural split of phantom data written as
PNG class folders), their own site configs, and a coordinator config that names no data: what a
deployment looks like, for the in-process tests and the Flower deployment test alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from privmed.config import DataConfig, SitesConfig
from privmed.data import load_source

HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")


def write_folders(root: Path, per_site: int = 60, size: int = 16) -> dict[str, Path]:
    """root/NAME/<class>/<i>.png for each hospital: one phantom site's images (its training and test
    images together: each hospital makes its own split)."""
    src = load_source(DataConfig(source="phantom", size=size, samples_per_site=per_site),
                      SitesConfig(count=len(HOSPITALS), partition="natural"), seed=0)
    out = {}
    for i, name in enumerate(HOSPITALS):
        folder = root / name
        site = f"site-{i + 1}"
        for part in (src.train, src.test):
            idx = np.flatnonzero(part.site == site)
            for j in idx:
                cls = src.class_names[int(part.labels[j])]
                path = folder / cls / f"{'tr' if part is src.train else 'te'}-{j:05d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray((part.images[j, 0] * 255).round().astype(np.uint8)).save(path)
        out[name] = folder
    return out


def site_config(root: Path, name: str, folder: Path, **privacy) -> Path:
    """A hospital's own config: its name, its folder only, its split, its budget."""
    cfg = {
        "site": name,
        "seed": 7,
        "data": {"source": "image-folder", "root": str(folder), "val_fraction": 0.2, "test_fraction": 0.25},
        "privacy": {"max_epsilon": 8.0, "delta": 1e-3, "accountant": "rdp", **privacy},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def coordinator_config(root: Path, name: str = "deploy", **over) -> Path:
    """The coordinator's config: task, model, strategy, rounds and privacy; no data."""
    cfg = {
        "name": name,
        "seed": 0,
        "data": {"source": "sites"},
        "sites": {"names": list(HOSPITALS)},
        "model": {"name": "cnn", "width": 8},
        "federation": {"strategy": "fedavg", "rounds": 2, "local_steps": 2, "secure_aggregation": True},
        "training": {"batch_size": 16, "optimizer": "sgd", "lr": 0.5, "momentum": 0.0, "augment": False},
        "privacy": {"mode": "dp-sgd", "noise_multiplier": 1.0, "delta": 1e-3, "accountant": "rdp"},
    }
    for key, value in over.items():
        node = cfg
        *path, last = key.split("__")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path

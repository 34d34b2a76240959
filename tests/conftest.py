import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Two cores on CI: keep torch from oversubscribing them when tests start subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def tiny_config(**over) -> dict:
    """A phantom run small enough for a test: 3 sites x 120 images of 16 px, 2 rounds."""
    cfg = {
        "name": "tiny",
        "seed": 0,
        "data": {"source": "phantom", "size": 16, "samples_per_site": 120},
        "sites": {"count": 3, "partition": "natural"},
        "model": {"name": "cnn", "width": 8},
        "federation": {"strategy": "fedavg", "rounds": 2},
        "training": {"batch_size": 32, "lr": 0.003, "optimizer": "adam"},
    }
    for key, value in over.items():
        node = cfg
        *path, last = key.split("__")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (../shared/data beside the repository)")
    return SHARED_DATA

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Two cores on CI: keep torch from oversubscribing them when tests start subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def tiny_config(**over) -> dict:
    """A phantom run small enough for a test: 3 sites x 120 images of 16 px, 2 rounds of one local
    epoch at a constant learning rate (named, so that the defaults that follow the data, which
    would take ~20 steps a round here, do not apply: tests/test_sizing.py tests those)."""
    cfg = {
        "name": "tiny",
        "seed": 0,
        "data": {"source": "phantom", "size": 16, "samples_per_site": 120},
        "sites": {"count": 3, "partition": "natural"},
        "model": {"name": "cnn", "width": 8},
        "federation": {"strategy": "fedavg", "rounds": 2, "local_epochs": 1},
        "training": {"batch_size": 32, "lr": 0.003, "optimizer": "adam", "lr_schedule": "constant"},
    }
    for key, value in over.items():
        node = cfg
        *path, last = key.split("__")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one torch thread than on two competing for two cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (../shared/data beside the repository)")
    return SHARED_DATA


def copy_keys(src: Path, dst: Path, hospitals: Path | None = None) -> Path:
    """A run directory `dst` that replays run `src` from its first round with the same secret keys,
    site ledgers and run id (and no checkpoints): `privmed.run(cfg, dst, resume=True)` then trains
    as an uninterrupted run with `src`'s keys would, each site replaying the releases its ledger
    holds (same digests: counted once). `hospitals`: where hospitals kept their own state
    (HOSPITALS/NAME/secret.key, as `privmed join --state` does), when they did not live in `src`."""
    import shutil

    dst.mkdir(parents=True)
    for name in ("config.yaml", "run.json"):
        shutil.copy(src / name, dst / name)
    private = [f for f in (src / "private").rglob("*") if f.name in ("secret.key", "site_ledger.json")]
    files = [(f, f.relative_to(src / "private")) for f in private]
    if hospitals is not None:
        files += [(f, Path("sites") / f.parent.name / f.name) for f in hospitals.glob("*/secret.key")]
        files += [(f, Path("sites") / f.parent.name / f.name) for f in hospitals.glob("*/site_ledger.json")]
    for f, rel in files:
        (dst / "private" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst / "private" / rel)
    return dst

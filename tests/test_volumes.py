"""3D MedMNIST volumes end to end: a config that names only the file gets a 3D model and trains
with fedavg (and with DP-SGD); a 2D model on volumes is refused; volumes are shifted as images are.
Generated 28^3 volumes keep it quick; the real VesselMNIST3D run skips without ../shared/data."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import privmed
from privmed.config import load_config, validate_config
from privmed.errors import ConfigError, PrivmedError
from privmed.federation.facts import DataFacts
from privmed.federation.site import random_shift

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def _tiny_vessels(root: Path, n=(48, 12, 18), seed=0) -> Path:
    """A vesselmnist3d.npz of uint8 28^3 volumes: a thin line (vessel, 0) or a line with a ball on
    it (aneurysm, 1) at a random place, as the real set's voxelised meshes (0 or 255)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(28)] * 3, indexing="ij"), axis=-1)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        labels = np.arange(k) % 2
        vols = np.zeros((k, 28, 28, 28), np.uint8)
        for i, y in enumerate(labels):
            c = rng.integers(8, 20, 3)
            vols[i, :, c[1] - 1 : c[1] + 1, c[2] - 1 : c[2] + 1] = 255
            if y:
                vols[i][np.linalg.norm(grid - c, axis=-1) <= 4] = 255
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = vols, labels[:, None].astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(root / "vesselmnist3d.npz", **arrays)
    return root


def _only_the_file(root: Path, **sections) -> dict:
    return {"data": {"source": "medmnist", "name": "vesselmnist3d", "root": str(root)},
            "sites": {"count": 3}, **sections}


# --------------------------------------------------------------------------- config defaults


def test_a_3d_set_gets_a_3d_model_and_its_defaults():
    cfg = validate_config(_only_the_file(Path("data")))
    assert cfg.model.name == "cnn3d" and cfg.federation.strategy == "fedavg"
    assert (cfg.training.lr, cfg.training.optimizer) == (0.05, "sgd")
    assert "local_epochs" not in cfg.federation.model_fields_set  # it follows the sites' sizes (test_sizing)
    named = validate_config(_only_the_file(Path("data"), model={"name": "resnet18-3d"},
                                           training={"optimizer": "adam"}, federation={"local_steps": 5}))
    assert named.model.name == "resnet18-3d"
    assert (named.training.lr, named.federation.local_epochs) == (0.01, 1)  # the generic ones
    dp = validate_config(_only_the_file(Path("data"), privacy={"mode": "dp-sgd", "epsilon": 8}))
    assert dp.model.name == "cnn3d"  # not the 2D dpcnn; the other DP defaults hold
    assert (dp.training.batch_size, dp.training.lr, dp.federation.local_steps) == (256, 0.5, 1)
    flat = _only_the_file(Path("data"))
    flat["data"]["name"] = "pneumoniamnist"
    flat = validate_config(flat)
    assert (flat.model.name, flat.training.lr, flat.federation.local_epochs) == ("cnn", 0.01, 1)


def test_shipped_config_names_only_the_file():
    raw = (REPO / "configs" / "vesselmnist3d-fedavg.yaml").read_text()
    cfg = load_config(REPO / "configs" / "vesselmnist3d-fedavg.yaml")
    assert "model:" not in raw and "training:" not in raw  # the defaults do the rest
    assert (cfg.data.name, cfg.model.name, cfg.sites.count) == ("vesselmnist3d", "cnn3d", 3)
    assert cfg.federation.strategy == "fedavg"


@pytest.mark.parametrize(
    "cfg, words",
    [
        ("volumes", ["model.name: 'cnn' takes images", "'medmnist' holds 3-D volumes (1x28x28x28)",
                     "use one of: cnn3d, resnet18-3d"]),
        ("images", ["model.name: 'cnn3d' takes 3-D volumes", "'phantom' holds images",
                    "use one of: cnn, dpcnn, resnet18"]),
    ],
)
def test_a_model_of_the_other_kind_is_refused(tmp_path, cfg, words):
    if cfg == "volumes":
        raw = _only_the_file(_tiny_vessels(tmp_path), model={"name": "cnn"})
    else:
        raw = {"data": {"source": "phantom", "size": 16, "samples_per_site": 30}, "model": {"name": "cnn3d"}}
    with pytest.raises(ConfigError) as e:
        privmed.run(raw)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_hospitals_with_images_and_volumes_do_not_agree():
    def facts(shape):
        return DataFacts(1, 28, 2, False, "medmnist", ("vessel", "aneurysm"), (), shape)

    assert DataFacts.agreed({"a": facts((1, 28, 28, 28)), "b": facts((1, 28, 28, 28))}).spatial_dims == 3
    assert DataFacts.agreed({"a": facts((1, 28, 28)), "b": facts((1, 28, 32))}).spatial_dims == 2
    with pytest.raises(PrivmedError, match="site 'b' holds data with spatial_dims 2, but site 'a' has 3"):
        DataFacts.agreed({"a": facts((1, 28, 28, 28)), "b": facts((1, 28, 28))})


# --------------------------------------------------------------------------- runs


def test_fedavg_on_generated_volumes_writes_a_report(tmp_path, one_thread):
    root = _tiny_vessels(tmp_path / "data")
    out = tmp_path / "run"
    cfg = _only_the_file(root, model={"width": 4}, federation={"rounds": 2, "local_epochs": 1},
                         training={"batch_size": 16})
    s = privmed.run(cfg, out=out).summary
    assert s["rounds_completed"] == 2 and s["strategy"] == "fedavg"
    assert s["model"]["name"] == "cnn3d" and s["data"]["image_shape"] == [1, 28, 28, 28]
    assert sum(v["n_train"] + v["n_val"] for v in s["sites"].values()) == 48 + 12
    assert s["data"]["n_test"] == 18  # the official test split, scored by the coordinator
    assert all(math.isfinite(s["test"][k]) for k in ("auc", "accuracy"))
    assert s["sample_gradient_steps"] == 2 * sum(v["n_train"] for v in s["sites"].values())
    report = (out / "report.html").read_text()
    assert "VesselMNIST3D" in report and "cnn3d" in report
    assert json.loads((out / "summary.json").read_text())["model"]["name"] == "cnn3d"


def test_dp_sgd_on_generated_volumes(tmp_path, one_thread):
    root = _tiny_vessels(tmp_path / "data")
    cfg = _only_the_file(root, model={"width": 4}, privacy={"mode": "dp-sgd", "epsilon": 8.0},
                         federation={"rounds": 1}, training={"batch_size": 16, "augment": True})
    s = privmed.run(cfg).summary
    assert s["model"]["name"] == "cnn3d" and s["privacy"]["mode"] == "dp-sgd"
    assert 0 < s["privacy"]["epsilon"] <= 8.0 and math.isfinite(s["test"]["auc"])


def test_real_vesselmnist3d_two_rounds(one_thread):
    root = SHARED / "medmnist"
    if not (root / "vesselmnist3d.npz").is_file():
        pytest.skip(f"VesselMNIST3D not present at {root} (see /work/shared/DATA.md)")
    cfg = _only_the_file(root, federation={"rounds": 2, "local_steps": 2})
    s = privmed.run(cfg).summary
    assert s["rounds_completed"] == 2 and s["model"]["name"] == "cnn3d"
    assert sum(v["n_train"] + v["n_val"] for v in s["sites"].values()) == 1335 + 191
    assert s["sample_gradient_steps"] == 2 * 3 * 2 * 64  # rounds x sites x steps x batch
    assert all(math.isfinite(s["test"][k]) for k in ("auc", "accuracy", "balanced_accuracy"))


# --------------------------------------------------------------------------- augmentation


def test_random_shift_moves_each_volume_within_the_bound():
    x = torch.rand(6, 2, 5, 6, 7)
    m = 2
    out = random_shift(x, m, torch.Generator().manual_seed(1))
    again = random_shift(x, m, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and torch.equal(out, again)  # draws from the generator only
    padded = F.pad(x, (m,) * 6, mode="reflect")
    offsets = []
    for i in range(len(x)):  # each volume is the padded one cut at some offset within the bound
        found = [o for o in itertools.product(range(2 * m + 1), repeat=3)
                 if torch.equal(out[i], padded[i, :, o[0] : o[0] + 5, o[1] : o[1] + 6, o[2] : o[2] + 7])]
        assert found, i
        offsets.append(found[0])
    assert len(set(offsets)) > 1 and len({o[0] for o in offsets}) > 1  # items and axes move apart

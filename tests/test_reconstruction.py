"""Reconstruction as a task: the sites' scanners, the per-volume metrics and their merge, and small
runs of the deep cascade through the runner (the k-space maths and the model: test_kspace.py,
test_cascade.py, test_recon_metrics.py)."""

from __future__ import annotations

from importlib.resources import files

import numpy as np
import pytest
import torch

import privmed
from privmed.config import DataConfig, SitesConfig, read_yaml, validate_config
from privmed.data import load_source
from privmed.data.recon import SCANNERS, TEST_NOISE
from privmed.tasks.counts import check_counts, merge_counts
from privmed.kspace import unpack_input, zero_filled
from privmed.tasks.recon_metrics import psnr, ssim
from privmed.tasks.reconstruction import reconstruction_counts, reconstruction_metrics_from_counts

PHANTOM = DataConfig(source="phantom", volumes_per_site=4, size=24)


def _source(data: DataConfig = PHANTOM, seed: int = 0):
    return load_source(data, SitesConfig(count=3), seed, task="reconstruction")


def test_each_site_acquires_with_its_own_scanner():
    src = _source()
    assert src.train.images.shape[1:] == (3, 24, 24) and src.train.target.shape[1:] == (1, 24, 24)
    masks = {}
    for i, site in enumerate(["site-1", "site-2", "site-3"]):
        rows = src.train.site == site
        k, mask = unpack_input(torch.from_numpy(src.train.images[rows]))
        lines = mask[:, 0, 0, :].numpy()  # (n, W): the phase-encode lines each slice acquired
        assert np.allclose(lines.mean(), 1 / 4, atol=0.07)  # 4x
        masks[site] = lines
        # the measured lines are the target's k-space plus the scanner's noise, nothing else
        clean = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(torch.from_numpy(src.train.target[rows][:, 0]),
                                                                      dim=(-2, -1)), norm="ortho"), dim=(-2, -1))
        measured = torch.complex(k[:, 0], k[:, 1])
        resid = (measured - clean * mask[:, 0]).abs()[mask[:, 0] > 0]
        noise = SCANNERS[i][1]
        assert float(resid.pow(2).mean().sqrt()) == pytest.approx(noise, abs=0.15 * noise + 1e-5)
    # random lines differ from slice to slice (each acquisition draws its own)
    assert len({tuple(r) for r in masks["site-1"]}) > 1
    assert src.test.site is None and len(src.test) > 0
    again = _source()
    np.testing.assert_array_equal(src.train.images, again.train.images)
    assert TEST_NOISE > 0


def test_targets_are_the_noiseless_slices():
    src = _source()
    assert 0.0 <= src.train.target.min() and src.train.target.max() <= 1.0
    seg = load_source(PHANTOM, SitesConfig(count=3), 0, task="segmentation")
    # the segmentation phantom carries the scanners' image noise; the reconstruction target does not
    assert seg.train.images.shape[0] == src.train.target.shape[0]
    assert not np.allclose(seg.train.images, src.train.target)


def test_counts_merge_over_sites_as_the_pooled_figures_and_the_baseline_is_zero_filling():
    src = _source()
    data = src.train
    rng = np.random.default_rng(0)
    pred = np.clip(data.target + rng.normal(0, 0.05, data.target.shape), 0, 1).astype(np.float32)
    patient = data.patient_ids()
    pooled = reconstruction_counts(pred, data.target, data.images, patient)
    check_counts(pooled)
    half = np.isin(patient, np.unique(patient)[:5])
    merged = merge_counts([reconstruction_counts(pred[m], data.target[m], data.images[m], patient[m])
                           for m in (half, ~half)])
    a, b = reconstruction_metrics_from_counts(pooled), reconstruction_metrics_from_counts(merged)
    for key in a:
        assert b[key] == pytest.approx(a[key]), key
    # per volume, then over volumes
    vols = np.unique(patient)
    per_slice = psnr(pred, data.target)
    assert a["psnr"] == pytest.approx(np.mean([per_slice[patient == v].mean() for v in vols]))
    zf = zero_filled(unpack_input(torch.from_numpy(data.images))[0]).numpy()
    per_zf = ssim(zf, data.target)
    assert a["ssim_zero_filled"] == pytest.approx(np.mean([per_zf[patient == v].mean() for v in vols]))
    assert a["volumes"] == len(vols) and a["n"] == len(pred)
    assert a["loss"] == pytest.approx(np.abs(pred - data.target).mean(), rel=1e-5)


def test_one_acceleration_per_site():
    src = _source(DataConfig(source="phantom", volumes_per_site=4, size=32, accelerations=[4, 8, 4]))
    _, mask = unpack_input(torch.from_numpy(src.train.images))
    share = {s: float(mask[torch.from_numpy(src.train.site == s)][:, 0, 0].mean()) for s in ("site-1", "site-2")}
    assert share["site-1"] == pytest.approx(1 / 4, abs=0.06) and share["site-2"] == pytest.approx(1 / 8, abs=0.05)


SMALL = {"task": "reconstruction", "data": {"source": "phantom", "volumes_per_site": 4, "size": 24},
         "sites": {"count": 3, "partition": "natural"}, "model": {"width": 8}}


def test_fedavg_cascade_beats_zero_filling_and_shows_its_examples(tmp_path):
    res = privmed.run({**SMALL, "federation": {"rounds": 6}}, tmp_path / "run")
    test = res.summary["test"]
    assert test["psnr"] > test["psnr_zero_filled"] + 2.0
    with np.load(tmp_path / "run" / "predictions.npz") as z:
        assert z["image:global"].shape == (test["n"], 1, 24, 24)
        assert z["example_input"].shape[1:] == (1, 24, 24)  # drawn as the zero-filled image
    html = (tmp_path / "run" / "report.html").read_text()
    assert "PSNR of zero-filling" in html and (tmp_path / "run" / "plots" / "examples.png").is_file()


@pytest.mark.parametrize("strategy", ["fedprox", "cyclic", "local", "pooled"])
def test_every_strategy_reconstructs(strategy):
    test = privmed.run({**SMALL, "federation": {"strategy": strategy, "rounds": 1}}, report=False).summary["test"]
    assert np.isfinite(test["psnr"]) and test["volumes"] == 3


def test_dp_sgd_reconstructs_under_the_ledger():
    res = privmed.run({**SMALL, "federation": {"rounds": 1},
                       "privacy": {"mode": "dp-sgd", "epsilon": 8, "delta": 1e-3}}, report=False)
    assert 0 < res.summary["privacy"]["epsilon"] <= 8 and np.isfinite(res.summary["test"]["psnr"])


@pytest.mark.parametrize("name", ["demo-segmentation", "demo-reconstruction"])
def test_the_dense_demos_are_valid_configs(name):
    cfg = validate_config(read_yaml(files("privmed") / "configs" / f"{name}.yaml"))
    assert cfg.data.source == "phantom" and cfg.task in ("segmentation", "reconstruction")

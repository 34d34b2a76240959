"""Segmentation: the loss per patient, Dice and HD95 against their definitions, counts that merge
across sites as the pooled figures, the phantom volumes and IXI, and small runs end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import privmed
from privmed.config import DataConfig, SitesConfig, validate_config
from privmed.data import load_source
from privmed.data.volumes import axial, normalise, remap, slices_with
from privmed.errors import ConfigError, PrivmedError
from privmed.tasks.base import get_task
from privmed.tasks.counts import check_counts, merge_counts
from privmed.tasks.segmentation import (
    DiceCELoss,
    hd95_per_slice,
    segmentation_counts,
    segmentation_metrics_from_counts,
    volume_dice,
)

CLASSES = ["background", "tissue", "ventricles"]


def _random_masks(rng, n=6, h=16, w=12, k=3):
    return rng.integers(0, k, size=(n, h, w))


# ------------------------------------------------------------------------------------ the loss


def test_dice_ce_loss_is_per_patient():
    """Each item's loss depends on that item alone (DP-SGD clips per patient): the (B,) losses of a
    batch equal the losses of each item alone, and 'mean' / 'sum' reduce them."""
    g = torch.Generator().manual_seed(0)
    out = torch.randn(4, 3, 8, 8, generator=g)
    y = torch.randint(0, 3, (4, 8, 8), generator=g)
    per = DiceCELoss(reduction="none")(out, y)
    alone = torch.stack([DiceCELoss()(out[i : i + 1], y[i : i + 1]) for i in range(4)])
    assert per.shape == (4,)
    torch.testing.assert_close(per, alone)
    torch.testing.assert_close(DiceCELoss()(out, y), per.mean())
    torch.testing.assert_close(DiceCELoss(reduction="sum")(out, y), per.sum())


def test_dice_ce_loss_is_near_zero_for_a_confident_right_answer_and_large_for_a_wrong_one():
    y = torch.zeros(2, 6, 6, dtype=torch.long)
    y[:, 2:4, 2:4] = 1
    right = torch.nn.functional.one_hot(y, 2).permute(0, 3, 1, 2).float() * 40 - 20
    assert DiceCELoss()(right, y) < 1e-3
    assert DiceCELoss()(-right, y) > 1.0


def test_dice_ce_loss_rejects_an_unknown_reduction():
    with pytest.raises(ValueError, match="reduction"):
        DiceCELoss(reduction="batch")


# ------------------------------------------------------------------------------------ metrics


def test_volume_dice_matches_its_definition_per_volume():
    rng = np.random.default_rng(1)
    pred, target = _random_masks(rng), _random_masks(rng)
    patient = np.array(["a", "a", "b", "b", "b", "c"])
    got = volume_dice(pred, target, patient, 3)
    for v, p in enumerate(["a", "b", "c"]):
        rows = patient == p
        for c in (1, 2):
            pp, tt = pred[rows] == c, target[rows] == c
            want = 2 * (pp & tt).sum() / (pp.sum() + tt.sum())
            assert got[v, c - 1] == pytest.approx(want)


def test_volume_dice_is_nan_for_a_class_in_neither_and_zero_for_one_missed():
    target = np.zeros((2, 4, 4), dtype=np.int64)
    target[0, 1:3, 1:3] = 1
    pred = np.zeros_like(target)
    d = volume_dice(pred, target, np.array(["p", "p"]), 3)
    assert d[0, 0] == 0.0 and np.isnan(d[0, 1])


def test_hd95_of_a_shifted_square_is_the_shift():
    target = np.zeros((1, 32, 32), dtype=np.int64)
    target[0, 8:20, 8:20] = 1
    pred = np.zeros_like(target)
    pred[0, 8:20, 11:23] = 1  # shifted 3 pixels
    assert hd95_per_slice(target, target, 2)[0, 0] == pytest.approx(0.0)
    assert hd95_per_slice(pred, target, 2)[0, 0] == pytest.approx(3.0)
    empty = np.zeros_like(target)
    assert np.isnan(hd95_per_slice(empty, target, 2)[0, 0])  # undefined where a mask is empty


def _probs(mask: np.ndarray, k: int, rng) -> np.ndarray:
    """Probabilities whose arg-max is `mask`."""
    p = rng.random((len(mask), k, *mask.shape[1:])) * 0.4
    np.put_along_axis(p, mask[:, None], 1.0, axis=1)
    return p / p.sum(axis=1, keepdims=True)


def test_counts_merged_over_sites_give_the_pooled_figures():
    """A volume lies at one site: the sums of two sites' counts give the metrics of both together."""
    rng = np.random.default_rng(2)
    target = _random_masks(rng, n=8)
    pred = _probs(_random_masks(rng, n=8), 3, rng)
    patient = np.repeat(["a", "b", "c", "d"], 2)
    pooled = segmentation_counts(pred, target, patient)
    check_counts(pooled)
    a, b = slice(0, 4), slice(4, 8)
    merged = merge_counts([segmentation_counts(pred[a], target[a], patient[a]),
                           segmentation_counts(pred[b], target[b], patient[b])])
    want = segmentation_metrics_from_counts(pooled, CLASSES, 2.0)
    got = segmentation_metrics_from_counts(merged, CLASSES, 2.0)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], nan_ok=True), key
    dice = volume_dice(pred.argmax(1), target, patient, 3)
    assert want["dice_tissue"] == pytest.approx(np.nanmean(dice[:, 0]))
    assert want["dice"] == pytest.approx(np.mean(np.nanmean(dice, axis=0)))
    ce = -np.log(np.take_along_axis(pred, target[:, None], axis=1)).mean()
    assert want["loss"] == pytest.approx(ce)
    assert want["volumes"] == 4 and want["n"] == 8


def test_hd95_is_reported_in_mm_when_the_pixel_side_is_known():
    rng = np.random.default_rng(3)
    target = _random_masks(rng)
    c = segmentation_counts(_probs(target, 3, rng), target, np.arange(6).astype(str))
    rng2 = np.random.default_rng(4)
    other = segmentation_counts(_probs(_random_masks(rng2), 3, rng2), target, np.arange(6).astype(str))
    px = segmentation_metrics_from_counts(other, CLASSES)["hd95"]
    mm = segmentation_metrics_from_counts(other, CLASSES, 2.0)["hd95"]
    assert mm == pytest.approx(2 * px) and px > 0
    perfect = segmentation_metrics_from_counts(c, CLASSES)
    assert perfect["dice"] == 1.0 and perfect["dice_foreground"] == 1.0 and perfect["hd95"] == 0.0


def test_counts_with_a_missing_key_or_a_wrong_shape_are_refused():
    rng = np.random.default_rng(5)
    target = _random_masks(rng)
    c = segmentation_counts(_probs(target, 3, rng), target, np.arange(6).astype(str))
    with pytest.raises(ValueError, match="hd95_n"):
        check_counts({k: v for k, v in c.items() if k != "hd95_n"})
    with pytest.raises(ValueError, match="dice_sum"):
        check_counts({**c, "dice_sum": np.zeros(5)})


# ------------------------------------------------------------------------------------ volumes


def test_volume_helpers():
    vol = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    slab = axial(vol, 1, (4, 5))  # 5 slices along axis 1; (2, 3) padded/cropped to (4, 5)
    assert slab.shape == (5, 4, 5)
    np.testing.assert_array_equal(slab[2, 1:3, 1:4], vol[:, 2, :])
    assert slab[2, 0].sum() == 0
    cropped = axial(np.ones((6, 2, 6)), 1, (4, 4))
    assert cropped.shape == (2, 4, 4) and cropped.min() == 1
    x = np.array([0, 1, 2, 200], dtype=np.float32)
    n = normalise(x, percentile=50)
    assert n.max() == 1.0 and n[0] == 0 and 0 < n[1] < 1
    labels = np.array([0, 4, 7, 51, 9])
    np.testing.assert_array_equal(remap(labels, {1: (4, 7, 51, 9), 2: (4, 51)}), [0, 2, 1, 2, 1])
    fg = np.zeros((3, 10, 10), dtype=bool)
    fg[1, :1, :2] = True  # 2% of the slice
    fg[2, :5] = True
    np.testing.assert_array_equal(slices_with(fg, 0.02), [1, 2])


def test_phantom_volumes_keep_each_volume_in_one_piece():
    src = load_source(DataConfig(source="phantom", volumes_per_site=4, size=24), SitesConfig(count=2), 0,
                      task="segmentation")
    assert src.train.images.shape[1:] == (1, 24, 24)
    assert src.train.target.shape == (len(src.train), 24, 24)
    assert set(np.unique(src.train.target)) == {0, 1, 2}
    assert src.test.site is None  # a public test set, from every scanner
    assert not set(src.test.patient) & set(src.train.patient)
    again = load_source(DataConfig(source="phantom", volumes_per_site=4, size=24), SitesConfig(count=2), 0,
                        task="segmentation")
    np.testing.assert_array_equal(src.train.images, again.train.images)


# ------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("raw, match", [
    ({"task": "segmentation", "sites": {"partition": "dirichlet"}}, "no class per item"),
    ({"task": "classification", "data": {"source": "ixi", "root": "x"}}, "does not fit data.source 'ixi'"),
])
def test_config_refusals(raw, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(raw)


def test_a_dense_task_defaults_to_its_model_and_refuses_a_classifier():
    assert validate_config({"task": "segmentation"}).model.name == "unet"
    assert validate_config({"data": {"source": "ixi", "root": "x"}}).task == "segmentation"
    with pytest.raises(PrivmedError, match="one per pixel"):
        privmed.run({"task": "segmentation", "model": {"name": "cnn"},
                     "data": {"source": "phantom", "volumes_per_site": 4, "size": 16},
                     "federation": {"rounds": 1}}, report=False)


# ------------------------------------------------------------------------------------ runs

SMALL = {"task": "segmentation", "data": {"source": "phantom", "volumes_per_site": 4, "size": 24},
         "sites": {"count": 3, "partition": "natural"}, "model": {"width": 8},
         "training": {"optimizer": "adam", "lr": 0.003, "batch_size": 16}}


def test_fedavg_learns_to_segment_the_phantom_and_reports_its_examples(tmp_path):
    first = privmed.run({**SMALL, "federation": {"rounds": 1}}, report=False).summary["test"]
    res = privmed.run({**SMALL, "federation": {"rounds": 6}}, tmp_path / "run")
    test = res.summary["test"]
    assert test["dice_foreground"] > 0.8 and test["dice_foreground"] > first["dice_foreground"]
    with np.load(tmp_path / "run" / "predictions.npz") as z:
        assert z["mask:global"].shape == (test["n"], 24, 24) and z["mask:global"].dtype == np.uint8
        assert len(z["example_index"]) == z["example_input"].shape[0] == z["example_target"].shape[0] > 0
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Dice, ventricles" in html and "input, prediction and target" in html
    assert (tmp_path / "run" / "plots" / "examples.png").stat().st_size > 1000
    from privmed.audit.run import audit

    with pytest.raises(ConfigError, match="task 'segmentation' is not audited yet"):
        audit(tmp_path / "run")
    assert not (tmp_path / "run" / "audit.json").exists()


def test_dp_sgd_samples_volumes_and_keeps_the_ledger(tmp_path):
    res = privmed.run({**SMALL, "federation": {"rounds": 1},
                       "privacy": {"mode": "dp-sgd", "epsilon": 8, "delta": 1e-3}}, tmp_path / "dp")
    privacy = res.summary["privacy"]
    assert 0 < privacy["epsilon"] <= 8
    assert "patient" in str(privacy.get("unit", "")).lower()


def test_get_task_names_the_data_classes():
    facts = type("F", (), {"class_names": CLASSES, "spacing_mm": 2.0})()
    task = get_task("segmentation", facts)
    assert task.class_names == tuple(CLASSES) and task.spacing_mm == 2.0
    assert get_task("segmentation").class_names == ()


# ------------------------------------------------------------------------------------ IXI


def test_ixi_source_merges_the_label_map_and_holds_out_whole_subjects(shared_data):
    from privmed.data.ixi import SLICE_SHAPE, VENTRICLES, subjects_in

    root = shared_data / "ixi-t1"
    src = load_source(DataConfig(source="ixi", root=root), SitesConfig(count=3), 0, task="segmentation")
    assert src.train.images.shape[1:] == (1, *SLICE_SHAPE) and src.spacing_mm == 2.0
    assert 0.0 <= src.train.images.min() and src.train.images.max() <= 1.0
    assert set(np.unique(src.train.target)) == {0, 1, 2}
    assert len(np.unique(src.test.patient)) == 3 and src.test.site is None
    assert not set(src.test.patient) & set(src.train.patient)
    assert set(src.train.site) == {"site-1", "site-2", "site-3"}
    for p in np.unique(src.train.patient):  # a subject lies at one site
        assert len(set(src.train.site[src.train.patient == p])) == 1
    # the ventricles are exactly the MUSE ventricle labels of the slices kept
    import nibabel as nib

    subject, image, label = subjects_in(root)[0]
    lab = np.asarray(nib.load(str(label)).dataobj)
    where = src.train if subject in set(src.train.patient) else src.test
    vent = (where.target[where.patient == subject] == 2).sum()
    full = axial(np.isin(lab, VENTRICLES), 1, SLICE_SHAPE).sum()
    assert 0.95 * full <= vent <= full


def test_ixi_refuses_an_unknown_subject(shared_data):
    with pytest.raises(PrivmedError, match="data.subjects: 'IXI999'"):
        load_source(DataConfig(source="ixi", root=shared_data / "ixi-t1", subjects=["IXI999"]),
                    SitesConfig(count=3), 0, task="segmentation")


def test_the_fast_hd95_equals_monais():
    """hd95_per_slice computes all slices at once; MONAI's metric, slice by slice, is the reference."""
    from scipy import ndimage

    from privmed.tasks.segmentation import hd95_monai

    rng = np.random.default_rng(6)

    def blobs():
        a = ndimage.gaussian_filter(rng.random((12, 32, 28)), (0, 3, 3)) > 0.5
        b = ndimage.gaussian_filter(rng.random((12, 32, 28)), (0, 2, 2)) > 0.55
        return a.astype(np.int64) + b

    pred, target = blobs(), blobs()
    pred[3] = 0  # a slice with nothing predicted: undefined
    fast, ref = hd95_per_slice(pred, target, 3), hd95_monai(pred, target, 3)
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(ref))
    np.testing.assert_allclose(fast[~np.isnan(fast)], ref[~np.isnan(ref)], atol=1e-4)
    assert np.nanmax(fast) > 1


@pytest.mark.parametrize("strategy", ["fedprox", "cyclic", "local", "pooled", "fedbn", "scaffold", "fedadam"])
def test_every_strategy_segments(strategy):
    """One round of each strategy on tiny volumes: it runs, and scores Dice on the test volumes."""
    cfg = {**SMALL, "data": {"source": "phantom", "volumes_per_site": 4, "size": 16},
           "federation": {"strategy": strategy, "rounds": 1}}
    if strategy == "scaffold":
        cfg["training"] = {"batch_size": 16}
    test = privmed.run(cfg, report=False).summary["test"]
    assert 0.0 <= test["dice"] <= 1.0 and test["volumes"] == 3


@pytest.mark.parametrize("task", ["segmentation", "reconstruction"])
def test_a_dense_task_runs_over_flower_messages_as_in_process(task, one_thread):
    """The Flower runner's messages carry a dense task's instructions, updates and per-volume
    sums: one round over a LocalGrid of hospitals scores exactly as the in-process run."""
    from privmed.federation.flower.coordinator import FlowerSites
    from privmed.federation.flower.secagg import LocalGrid, in_process_identity
    from privmed.federation.flower.site_app import make_client_app
    from privmed.federation.flower.site_service import SiteEndpoint
    from privmed.federation.hospital import Hospital

    cfg = validate_config({**SMALL, "task": task, "model": {"width": 8}, "federation": {"rounds": 1}})
    a = privmed.run(cfg, report=False).summary
    apps = {2001 + i: make_client_app(lambda _ctx, e=SiteEndpoint(Hospital.rehearsal(cfg, name)): e)
            for i, name in enumerate(cfg.sites.site_names())}
    with in_process_identity():
        b = privmed.run(cfg, sites=FlowerSites(cfg, LocalGrid(apps), connect_timeout=5), report=False).summary
    assert a["test"] == b["test"] and a["test"][{"segmentation": "dice", "reconstruction": "psnr"}[task]] > 0
    assert all(r["val"] for r in a["sites"].values())  # each site scores its own validation volumes
    assert {s: r["val"] for s, r in a["sites"].items()} == {s: r["val"] for s, r in b["sites"].items()}


def test_scoring_a_dense_task_sums_each_volume_once(monkeypatch):
    """HD95 and SSIM are most of a round's scoring: metrics and counts come from one pass."""
    from privmed.data.base import ImageSet
    from privmed.tasks.base import Segmentation, metrics_and_counts

    rng = np.random.default_rng(0)
    target = (rng.random((6, 16, 16)) > 0.5).astype(np.int64)
    data = ImageSet(images=rng.random((6, 1, 16, 16)).astype(np.float32), labels=np.zeros(6, np.int64),
                    patient=np.repeat(["a", "b"], 3), target=target)
    probs = rng.dirichlet(np.ones(2), size=(6, 16, 16)).transpose(0, 3, 1, 2)
    calls = []
    real = Segmentation._counts
    monkeypatch.setattr(Segmentation, "_counts", lambda self, p, d: calls.append(1) or real(self, p, d))
    task = get_task("segmentation")
    metrics, counts = metrics_and_counts(task, probs, data)
    assert len(calls) == 1
    assert metrics == task.metrics_from_counts(counts) and metrics["dice"] > 0

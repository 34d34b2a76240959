"""Every strategy runs from the defaults on every source it supports: a config that names only the
data, the sites and the strategy (here cut to one round of two local steps, to stay quick) trains,
is scored, and gives finite figures. Sources that need ../shared/data skip without it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import privmed
from privmed.config import STRATEGIES, validate_config
from privmed.errors import ConfigError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _image_folder(root: Path) -> dict:
    rng = np.random.default_rng(0)
    for cls, mean in (("normal", 70), ("pneumonia", 150)):
        for i in range(40):
            img = np.clip(rng.normal(mean, 30, (16, 16)), 0, 255).astype(np.uint8)
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / cls / f"{i:03d}.png")
    return {"source": "image-folder", "root": str(root)}


def _source(name: str, tmp_path: Path) -> tuple[dict, dict]:
    """(data section, sites section) of a config that names only what it must."""
    if name == "phantom":
        return {"source": "phantom", "size": 16, "samples_per_site": 60}, {"count": 3}
    if name == "image-folder":
        return _image_folder(tmp_path / "folder"), {"count": 3}
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: the real data for source '{name}' is not on this machine")
    if name == "medmnist":
        return ({"source": "medmnist", "name": "pneumoniamnist", "root": str(SHARED / "medmnist"),
                 "download": False}, {"count": 3, "partition": "dirichlet", "alpha": 0.5})
    folder = {"heart-disease": "uci-heart-disease", "tcga-brca": "tcga-brca"}[name]
    return {"source": name, "root": str(SHARED / folder)}, {}


# what a source's default model cannot do, and the reason privmed gives
UNSUPPORTED = {
    ("heart-disease", "fedbn"): "needs a model with normalisation layers",  # the linear model has none
    ("tcga-brca", "fedbn"): "needs a model with normalisation layers",
}


@pytest.mark.parametrize("source", ["phantom", "image-folder", "medmnist", "heart-disease", "tcga-brca"])
def test_every_strategy_runs_from_the_defaults(source, tmp_path, one_thread):
    data, sites = _source(source, tmp_path)
    for strategy in STRATEGIES:
        cfg = validate_config({
            "data": data, "sites": sites,
            "federation": {"strategy": strategy, "rounds": 1, "local_steps": 2},
        })
        if (source, strategy) in UNSUPPORTED:
            with pytest.raises(ConfigError, match=UNSUPPORTED[source, strategy]):
                privmed.run(cfg, report=False)
            continue
        s = privmed.run(cfg, report=False).summary
        metric = "c_index" if cfg.task == "survival" else "auc"
        assert s["rounds_completed"] == 1, (source, strategy)
        assert s["test"] and math.isfinite(s["test"]["loss"]), (source, strategy, s["test"])
        assert not math.isnan(s["test"][metric]) or s["test"]["n"] < 2, (source, strategy)


def test_logit_adjustment_shifts_by_each_sites_own_label_shares():
    """Label skew: a site trains softmax(z + log prior) with its own (smoothed) label shares; it is
    off under DP-SGD (the shares come from the training patients), refused 'on' there, and with
    one logit the shift is the log prior odds."""
    from conftest import tiny_config

    from privmed.federation.experiment import prepare_experiment

    exp = prepare_experiment(validate_config(tiny_config(sites__partition="dirichlet", sites__alpha=0.3)))
    # the reference: the federation's shares, from all sites' validation labels
    val = np.bincount(np.concatenate([s.data.val.labels for s in exp.trainers.values()]), minlength=2)
    reference = (val + 1) / (val.sum() + 2)
    assert exp.plan.label_shares == pytest.approx(reference)
    for name, site in exp.trainers.items():
        counts = np.bincount(site.data.train.labels, minlength=2)
        expected = np.log((counts + 1) / (counts.sum() + 2)) - np.log(reference)
        np.testing.assert_allclose(site._logit_shift.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert any(abs(float(s._logit_shift[0] - s._logit_shift[1])) > 1 for s in exp.trainers.values())
    # a site whose shares are the federation's trains unshifted; iid sites nearly so
    iid = prepare_experiment(validate_config(tiny_config(sites__partition="iid")))
    assert all(abs(float(s._logit_shift[0] - s._logit_shift[1])) < 0.5 for s in iid.trainers.values())
    # without validation data the reference is uniform: the shift is the site's own log shares
    noval = prepare_experiment(validate_config(tiny_config(data__val_fraction=0)))
    assert noval.plan.label_shares is None
    for site in noval.trainers.values():
        counts = np.bincount(site.data.train.labels, minlength=2)
        np.testing.assert_allclose(site._logit_shift.numpy(), np.log((counts + 1) / (counts.sum() + 2)), rtol=1e-6)
    # YAML reads a bare `off` as false: taken as meant
    off = prepare_experiment(validate_config(tiny_config(training__logit_adjustment=False)))
    assert all(s._logit_shift is None for s in off.trainers.values())
    dp = prepare_experiment(validate_config(tiny_config(privacy__mode="dp-sgd", privacy__epsilon=8.0)))
    assert all(s._logit_shift is None for s in dp.trainers.values())
    with pytest.raises(ConfigError, match="logit_adjustment: 'on' uses each site's label shares"):
        validate_config(tiny_config(privacy__mode="dp-sgd", privacy__epsilon=8.0, training__logit_adjustment="on"))


def test_logit_adjustment_with_one_logit_is_the_log_prior_odds():
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: the heart-disease data is not on this machine")
    from privmed.federation.experiment import prepare_experiment

    exp = prepare_experiment(validate_config({"data": {"source": "heart-disease",
                                                       "root": str(SHARED / "uci-heart-disease")}}))
    val = np.concatenate([s.data.val.labels for s in exp.trainers.values()])
    v1, v = int(val.sum()), len(val)
    for site in exp.trainers.values():
        n1, n = int(site.data.train.labels.sum()), len(site.data.train)
        expected = np.log((n1 + 1) / (n - n1 + 1)) - np.log((v1 + 1) / (v - v1 + 1))
        assert float(site._logit_shift[0]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("source", ["heart-disease", "tcga-brca"])
def test_a_tabular_source_fills_its_training_defaults_and_keeps_what_the_config_sets(source):
    """SOURCE_DEFAULTS fill only what the config leaves out; a config naming its optimizer keeps the
    generic learning rate and momentum (the source's go with plain SGD); DP-SGD keeps them too."""
    from privmed.config import SOURCE_DEFAULTS, TrainingConfig

    data = {"source": source, "root": "unused"}
    t = validate_config({"data": data}).training
    for key, value in SOURCE_DEFAULTS[source]["training"].items():
        assert getattr(t, key) == value, key
        assert value != getattr(TrainingConfig(), key), f"{key}: the source default is the generic one"
    t = validate_config({"data": data, "training": {"batch_size": 5, "lr": 0.3}}).training
    assert (t.batch_size, t.lr, t.momentum) == (5, 0.3, 0.0)
    t = validate_config({"data": data, "training": {"optimizer": "adam"}}).training
    assert (t.lr, t.momentum) == (TrainingConfig().lr, TrainingConfig().momentum)
    assert t.batch_size == SOURCE_DEFAULTS[source]["training"]["batch_size"]
    # an image source is untouched
    t = validate_config({"data": {"source": "phantom"}}).training
    assert t == TrainingConfig()

"""Attribute inference (privmed.audit.attribute): the MAP guess recovers a feature the model's output
depends on, falls back to the population's commoner value when the model ignores it, and refuses
features it cannot guess."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from privmed.audit.attribute import attribute_audit, pick_attribute
from privmed.audit.membership import Target
from privmed.data.base import ImageSet
from privmed.data.sites import SiteData
from privmed.errors import ConfigError

FEATURES = ("age", "sex", "chol")


def _target(weight_on_sex: float, seed: int = 0) -> Target:
    """Two sites of 200 + 100 patients, sex standardised per site (two values each, ~70% the
    second), the diagnosis equal to sex for 90% of them; a linear model with `weight_on_sex`."""
    rng = np.random.default_rng(seed)
    sites = []
    for s in range(2):
        def part(n: int) -> ImageSet:
            sex = (rng.random(n) < 0.7).astype(np.float32)
            x = np.stack([rng.normal(size=n), sex * 2.1 - 1.3 + 0.1 * s, rng.normal(size=n)], 1).astype(np.float32)
            y = np.where(rng.random(n) < 0.9, sex, 1 - sex).astype(np.int64)
            return ImageSet(x, y)
        sites.append(SiteData(f"site-{s + 1}", part(200), part(20), part(100)))
    model = torch.nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, weight_on_sex, 0.0]]))
        model.bias.fill_(-weight_on_sex * (0.4 - 1.3))  # the logit's sign follows sex
    return Target(Path("run"), SimpleNamespace(data=SimpleNamespace(source="test")), model.eval(), None, sites,
                  SimpleNamespace(feature_names=FEATURES, tabular=True), {})


def test_a_model_that_leans_on_the_feature_gives_it_away():
    r = attribute_audit(_target(weight_on_sex=3.0))
    assert r["attribute"] == "sex"
    for group in ("members", "non_members"):
        attack, base = r[group]["attack"], r[group]["baseline"]
        assert attack["accuracy"] > 0.85 > 0.75 > base["accuracy"]  # diagnosis = sex for 90%
        assert attack["ci"][0] > base["ci"][1]  # and not by chance
    assert 0.6 < r["population_share"] < 0.8


def test_a_model_that_ignores_the_feature_leaves_the_population_guess():
    r = attribute_audit(_target(weight_on_sex=0.0))
    for group in ("members", "non_members"):
        assert r[group]["attack"]["accuracy"] == r[group]["baseline"]["accuracy"]


def test_only_a_binary_feature_of_the_data_can_be_asked_for():
    t = _target(1.0)
    assert FEATURES[pick_attribute(t, None)] == "sex"
    with pytest.raises(ConfigError, match="--attribute: 'height' is not a feature of this data"):
        pick_attribute(t, "height")
    with pytest.raises(ConfigError, match="--attribute: 'age' is not binary at every site"):
        pick_attribute(t, "age")
    images = _target(1.0)
    images.facts = SimpleNamespace(feature_names=(), tabular=False)
    with pytest.raises(ConfigError, match="needs tabular data with named features"):
        pick_attribute(images, None)


HEART = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "uci-heart-disease"


@pytest.mark.skipif(not HEART.is_dir(), reason=f"needs the UCI Heart Disease files in {HEART}")
def test_privmed_audit_infers_sex_on_heart_disease_and_reports_it(tmp_path, capsys):
    import json

    import privmed
    from privmed.cli import main

    privmed.run({"data": {"source": "heart-disease", "root": str(HEART)}, "federation": {"rounds": 3}}, tmp_path / "run")
    assert main(["audit", str(tmp_path / "run"), "--attack", "attribute"]) == 0
    assert "attribute 'sex':" in capsys.readouterr().out
    a = json.loads((tmp_path / "run" / "private" / "audit.json").read_text())["attribute"]
    assert a["attribute"] == "sex" and a["members"]["attack"]["n"] + a["non_members"]["attack"]["n"] > 600
    assert "Attribute inference: guessing sex" in (tmp_path / "run" / "private" / "report.html").read_text()
    assert main(["audit", str(tmp_path / "run"), "--attack", "attribute", "--attribute", "age"]) == 2
    assert "--attribute: 'age' is not binary" in capsys.readouterr().err

"""Red team: a coordinator that asks a hospital for less privacy than it gives.

A hospital config that says nothing about privacy must not train without DP (issue 25, item 3):
by default it takes part only under DP it runs itself (DP-SGD, or central mode as a noise share it
adds), within a finite budget stated in the README (10 per patient), and refuses: privacy.mode
none; a noise multiplier of 0 (no accountant bounds it, so no budget may admit it); central mode
without a noise share for it to add; fine-tuning its training patients without DP-SGD, or beyond
what its plan counts; and scoring its training patients.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from hospital_endpoint import (
    DEPLOY, altered, finetune, honest_setup, hospital, initial_weights, score, set_up, train,
)

from privmed.config import DEFAULT_HOSPITAL_EPSILON
from privmed.federation.experiment import SiteSetup
from privmed.federation.flower.site_service import SiteEndpoint
from privmed.privacy.site_ledger import SiteRefused


@pytest.fixture
def silent(tmp_path):
    """hospital-a with its privacy section removed: a config that says nothing of privacy."""
    raw = yaml.safe_load((DEPLOY / "hospital-a.yaml").read_text())
    raw.pop("privacy")
    path = tmp_path / "hospital-a.yaml"
    path.write_text(yaml.safe_dump(raw))
    h = hospital(tmp_path / "state", path)
    return h, SiteEndpoint(h)


def test_a_silent_config_fails_closed(silent):
    h, _ = silent
    assert h.privacy.require_dp and h.privacy.max_epsilon == DEFAULT_HOSPITAL_EPSILON == 10.0
    assert h.guard.ledger.budget_epsilon == 10.0


def test_privacy_mode_none_is_refused_for_training_and_scoring(silent):
    h, endpoint = silent
    setup = honest_setup(h, privacy__mode="none", federation__secure_aggregation="false")
    set_up(endpoint, setup)
    w0 = initial_weights(h, setup)
    with pytest.raises(SiteRefused, match="takes part only under DP it runs itself"):
        train(endpoint, w0, 1)
    with pytest.raises(SiteRefused, match="takes part only under DP"):
        score(endpoint, w0, 1, "val")
    assert h.guard.ledger.releases == [] and h.guard.ledger.scorings == []


def test_a_noise_multiplier_of_zero_is_refused(silent):
    h, endpoint = silent
    setup = altered(honest_setup(h), noise_factor=0.0)
    set_up(endpoint, setup)
    with pytest.raises(SiteRefused, match=r"cannot bound this release \(noise multiplier 0"):
        train(endpoint, initial_weights(h, setup), 1)
    assert h.guard.ledger.releases == []


def test_central_mode_only_with_the_sites_own_noise(silent):
    # epsilon 6, not the shipped 8: a site charges its own noise share (what a coordinator that
    # cheats can isolate), at its own delta 1e-5, and 30 rounds of the epsilon-8 plan's share would
    # take it to 10.5, past the default budget of 10, which the site refuses before round 1
    h, endpoint = silent
    setup = honest_setup(h, privacy__mode="central", privacy__epsilon=6.0)
    d = json.loads(setup.to_json())
    no_share = SiteSetup(d["config"], d["data"], d["local_steps"], None, setup.label_shares, None, setup.scoring, None)
    set_up(endpoint, no_share)
    w0 = initial_weights(h, setup)
    with pytest.raises(SiteRefused, match="names no noise share"):
        train(endpoint, w0, 1)
    set_up(endpoint, altered(setup, noise_factor=0.0))
    with pytest.raises(SiteRefused, match="cannot bound this release"):
        train(endpoint, w0, 1)
    # the plan's own setup: the site clips its change and adds its share, and charges it
    set_up(endpoint, setup)
    sent = train(endpoint, w0, 1)
    change = np.concatenate([(s.astype(np.float64) - w).ravel() for s, w in zip(sent, w0)])
    sigma, clip = setup.release[0], setup.clip
    assert abs(change.std() / (sigma * clip) - 1) < 0.1  # noise dominates a change clipped to C
    assert [r.noise_multiplier for r in h.guard.ledger.releases] == [sigma]


def test_fine_tuning_only_under_dp_sgd_and_as_planned(silent):
    h, endpoint = silent
    central = honest_setup(h, privacy__mode="central", privacy__epsilon=6.0)
    set_up(endpoint, central)
    w0 = initial_weights(h, central)
    with pytest.raises(SiteRefused, match="refused 'finetune' for round 1 of run run-1: under privacy.mode central"):
        finetune(endpoint, w0, 1, steps=5)
    dp = honest_setup(h)  # a DP-SGD plan without fine-tuning: none is counted, none is done
    set_up(endpoint, dp)
    with pytest.raises(SiteRefused, match="refused 'finetune'.*the fine-tuning turn its privacy plan counts"):
        finetune(endpoint, w0, 1, steps=5)
    # planned: charged, and only its steps (epsilon 6: at the site's delta 1e-5, 30 rounds of the
    # epsilon-8 plan and its fine-tuning turn would pass the default budget, refused before round 1)
    planned = honest_setup(h, federation__finetune_steps=5, privacy__epsilon=6.0)
    set_up(endpoint, planned)
    w0 = initial_weights(h, planned)
    with pytest.raises(SiteRefused, match="refused 'finetune'"):
        finetune(endpoint, w0, 30, steps=50, run="run-2")
    metrics = finetune(endpoint, w0, 30, steps=5, run="run-2")
    assert metrics and [(r.purpose, r.steps) for r in h.guard.ledger.releases] == [("finetune", 5)]
    # its test score is a release on the test patients too, counted in the ledger's second line
    assert [(s.split, s.model_key) for s in h.guard.ledger.scorings] == [("test", "finetuned:hospital-a")]


def test_the_training_patients_are_never_scored(silent):
    h, endpoint = silent
    setup = honest_setup(h)
    set_up(endpoint, setup)
    with pytest.raises(SiteRefused, match="never its training patients"):
        score(endpoint, initial_weights(h, setup), 1, "train")

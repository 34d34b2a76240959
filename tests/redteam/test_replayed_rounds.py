"""Red team: a coordinator that replays a released round under another setup.

The attack (issue 25, item 2): the shipped hospital-a (DP required, budget 10) is set up and trains
rounds 1 and 2; the coordinator then sends a new setup under the same run id with the noise
multiplier doubled (or the clipping norm doubled) and asks for round 1 again. Were the site to
answer with the same noise, 2 d1 - d2 would be the noise-free clipped step. The hospital must refuse
any second release of a (run, round) whose digest differs, before and after it restarts, and keep
the privacy parameters a run id started with; the very same request again gets the very same reply,
counted once.
"""

from __future__ import annotations

import numpy as np
import pytest
from hospital_endpoint import altered, honest_setup, hospital, initial_weights, set_up, train

from privmed.federation.flower.site_service import SiteEndpoint
from privmed.privacy.site_ledger import SiteRefused


@pytest.fixture
def released(tmp_path):
    """hospital-a after rounds 1 and 2 of run-1 under the honest setup: its endpoint, state,
    setup, the weights sent and its two replies."""
    h = hospital(tmp_path / "state")
    setup = honest_setup(h)
    endpoint = SiteEndpoint(h)
    set_up(endpoint, setup)
    w0 = initial_weights(h, setup)
    d1 = train(endpoint, w0, 1)
    d2 = train(endpoint, w0, 2)
    return endpoint, tmp_path / "state", setup, w0, d1, d2


def _refused_round_1_under(endpoint, setup, w0) -> None:
    set_up(endpoint, setup)
    with pytest.raises(SiteRefused, match="refused round 1 of run run-1: it already released that round"):
        train(endpoint, w0, 1)


def test_a_doubled_noise_multiplier_cannot_replay_round_1(released):
    endpoint, _, setup, w0, _, _ = released
    _refused_round_1_under(endpoint, altered(setup, noise_factor=2.0), w0)
    # nor may the run go on under the new setup: a run id keeps its privacy parameters
    with pytest.raises(SiteRefused, match="run run-1 was set up before with other privacy parameters"):
        train(endpoint, w0, 3)
    assert [r for r, _ in endpoint.site.guard.ledger.releases_of("run-1")] == [1, 2]


def test_a_doubled_clipping_norm_cannot_replay_round_1(released):
    endpoint, _, setup, w0, _, _ = released
    _refused_round_1_under(endpoint, altered(setup, max_grad_norm=2.0), w0)


def test_a_doubled_learning_rate_cannot_replay_round_1(released):
    endpoint, _, setup, w0, _, _ = released
    lr = setup.config["training"]["lr"]
    _refused_round_1_under(endpoint, altered(setup, training={"lr": 2 * lr}), w0)


def test_the_refusals_outlive_a_restart_and_a_true_retry_gets_the_same_reply(released):
    endpoint, state, setup, w0, d1, _ = released
    restarted = SiteEndpoint(hospital(state))  # the hospital's process again, from its state alone
    _refused_round_1_under(restarted, altered(setup, noise_factor=2.0), w0)
    _refused_round_1_under(restarted, altered(setup, max_grad_norm=2.0), w0)
    set_up(restarted, setup)  # the honest setup: the very same request is answered as before
    again = train(restarted, w0, 1)
    assert all(np.array_equal(a, b) for a, b in zip(again, d1))
    assert [r for r, _ in restarted.site.guard.ledger.releases_of("run-1")] == [1, 2]


def test_other_weights_or_another_purpose_cannot_replay_round_1(released):
    endpoint, _, setup, w0, _, _ = released
    with pytest.raises(SiteRefused, match="already released that round"):
        train(endpoint, [w + np.float32(1e-3) for w in w0], 1)
    with pytest.raises(SiteRefused, match="refused 'finetune' for round 1"):
        train(endpoint, w0, 1, purpose="finetune", steps=3)

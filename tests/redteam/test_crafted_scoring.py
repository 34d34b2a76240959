"""Red team: scoring as a query interface (issue 25, item 3 of its list).

Before issue 25 a site scored any weights it was sent, as often as asked, and returned exact score
histograms: with crafted weights of the tabular `mlp`, one query isolated a test patient of a DP
hospital and 13 more read that patient's whole heart-disease record. Here the attacker is the
coordinator of a DP-SGD run, talking to the Cleveland hospital's own endpoint (a rehearsal
hospital of the heart-disease tables behind `SiteEndpoint`, with Flower's scoring messages):

- test patients: the plan counts one scoring of the test split per site; the attacker's query 1 is
  answered with noisy counts, and every further one of 100 is refused;
- validation patients: the plan's quota (its validation rounds) allows more queries than the 14 the
  attack needs on exact counts, and the noise, calibrated to that quota, leaves no record readable
  to 0.1 standardized units, though the attacker is handed the patient's band and label for free.
"""

from __future__ import annotations

import numpy as np
import pytest
from crafted_mlp import EXACT_EDGES, WIDTH, exact_oracle, isolate, read_record, target_record
from hospital_endpoint import score, set_up

from conftest import SHARED_DATA
from privmed.config import validate_config
from privmed.federation.experiment import prepare_experiment
from privmed.federation.flower.site_service import SiteEndpoint
from privmed.federation.hospital import Hospital
from privmed.privacy.site_ledger import SiteRefused
from privmed.tasks.counts import PRIVATE_EDGES

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "uci-heart-disease").is_dir(),
                                reason=f"UCI heart-disease tables not found in {SHARED_DATA}")


@pytest.fixture
def cleveland(tmp_path, one_thread):
    """Cleveland's endpoint, set up for a 100-round DP-SGD run of the crafted model's architecture
    (mlp of width 8; validation rounds: 20 by default), and its own validation data."""
    cfg = validate_config({
        "data": {"source": "heart-disease", "root": str(SHARED_DATA / "uci-heart-disease"), "val_fraction": 0.3},
        "model": {"name": "mlp", "width": WIDTH},
        "federation": {"rounds": 100, "local_steps": 1},
        "training": {"batch_size": 16, "optimizer": "sgd", "lr": 0.05},
        "privacy": {"mode": "dp-sgd", "epsilon": 1.0, "delta": 1e-3, "accountant": "pld"},
    })
    h = Hospital.rehearsal(cfg, "cleveland", tmp_path / "state")
    endpoint = SiteEndpoint(h)
    set_up(endpoint, prepare_experiment(cfg).plan.setup_for("cleveland"))
    return endpoint, h


def _oracle(endpoint, split: str):
    """The attacker's oracle: each query a scoring request of the next round; its counts."""
    rounds = iter(range(1, 10_000))

    def ask(weights):
        return score(endpoint, weights, next(rounds), split)[1]

    return ask


def test_test_patients_are_scored_once_then_refused(cleveland):
    endpoint, h = cleveland
    oracle = _oracle(endpoint, "test")
    answered = refused = 0
    rng = np.random.default_rng(0)
    for _ in range(100):
        try:
            isolate(oracle, PRIVATE_EDGES, rng)
            answered += 1
        except SiteRefused as e:
            assert "it has released the 1 scorings of its test patients this run's plan counts" in str(e)
            refused += 1
    assert (answered, refused) == (1, 99)
    assert len(h.guard.ledger.scorings_of(h.guard.ledger.scorings[0].run, "test")) == 1


def test_validation_records_stay_unread_within_the_quota(cleveland):
    endpoint, h = cleveland
    val = h.data.val
    rng = np.random.default_rng(1)
    band, label = isolate(exact_oracle(val), EXACT_EDGES, rng)  # handed to the attacker for free
    x, y = target_record(val, band)
    assert label == y
    # the control: 13 readouts of exact counts read the record, far better than the bar of 0.1
    assert np.abs(read_record(exact_oracle(val), EXACT_EDGES, band, label) - x).max() < 0.05
    # the same 13 queries to the hospital, within its quota of 20 validation scorings
    got = read_record(_oracle(endpoint, "val"), PRIVATE_EDGES, band, label)
    assert np.abs(got - x).max() > 0.1
    assert len(h.guard.ledger.scorings) == 13

"""Red team, issue 25 attack 1: crafted weights make a DP-SGD release a membership oracle.

The attacker is the coordinator. It knows one training patient's record (the target: the largest
value of feature 0 at the hospital, label 0) and sends weights for privmed's tabular 'mlp' whose
logit overflows for that record alone: its backpropagated gradient is then inf x 0 = NaN. Before
issue 25, Opacus' clip factor for that patient was NaN and the whole update NaN exactly when the
target was drawn: 40 keyed releases at sample rate 0.3 came back non-finite about a third of the
time with the target present and never with it replaced, an epsilon of infinity. Now a gradient
that is not finite counts as zero, and the attacker's counts must not differ: no non-finite
release, no error and no release equal to the weights it sent, with or without the target.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privmed.config import TrainingConfig
from privmed.data.base import ImageSet
from privmed.data.sites import SiteData
from privmed.federation.site import DPTraining, Site, get_weights
from privmed.federation.strategies import TrainTask
from privmed.models import build_model
from privmed.privacy.accountants import Release
from privmed.privacy.secret import SecretKey
from privmed.tasks.base import get_task

pytestmark = pytest.mark.usefixtures("one_thread")

FEATURES, PATIENTS, RELEASES = 13, 120, 40


def _hospital(x: np.ndarray, y: np.ndarray) -> Site:
    """A hospital's DP-SGD site on its table: one step a round at sample rate 0.3, sigma 1, C 1."""
    data = SiteData("h", train=ImageSet(x, y), val=ImageSet(x[:4], y[:4]))
    return Site(
        data, lambda: build_model("mlp", in_channels=FEATURES, num_classes=1, image_size=0, width=8),
        TrainingConfig(lr=0.1, momentum=0.0), local_epochs=1, seed=0,
        dp=DPTraining(Release(noise_multiplier=1.0, sample_rate=0.3, steps=1), 1.0, "ew"),
        task=get_task("tabular-classification"),
    )


def _crafted_weights(x: np.ndarray, target: int) -> list[np.ndarray]:
    """The attacker's 'mlp': hidden unit 0 = tanh(1000 (x0 - t)) is +1 on the target only (t halfway
    between the two largest x0); the next unit, 1000 (h + 1) - 1999.5, sits at 0.5 on the target and
    at -1999.5 elsewhere (tanh exactly -1, gradient exactly 0); the logit 3e38 (h' + 1) overflows on
    the target only, and backpropagated through the weight 1000 its gradient overflows too, for any
    batch under ~700 (mean loss: 1/B), meeting tanh's exact 0 on the target: inf x 0 = NaN."""
    model = build_model("mlp", in_channels=FEATURES, num_classes=1, image_size=0, width=8)
    top = np.sort(x[:, 0])
    assert np.argmax(x[:, 0]) == target
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.net[0].weight[0, 0] = 1000.0
        model.net[0].bias[0] = -1000.0 * float(top[-1] + top[-2]) / 2
        model.net[2].weight[0, 0] = 1000.0
        model.net[2].bias[0] = 0.5 - 1000.0
        model.net[4].weight[0, 0] = 3e38
        model.net[4].bias[0] = 3e38
    return get_weights(model)


def _answers(site: Site, weights: list[np.ndarray], key: SecretKey, run: str) -> dict[str, int]:
    """What the attacker counts over RELEASES keyed releases of `site`."""
    counts = {"non-finite": 0, "error": 0, "unchanged": 0}
    for rnd in range(1, RELEASES + 1):
        try:
            generator = key.torch_generator("train", run, rnd, "train")
            update = site.train(TrainTask("h", weights), rnd, generator=generator)
        except Exception:  # an error is a reply too
            counts["error"] += 1
            continue
        counts["non-finite"] += not all(np.isfinite(w).all() for w in update.weights)
        counts["unchanged"] += all(np.array_equal(w, s) for w, s in zip(update.weights, weights))
    return counts


def test_crafted_weights_make_no_membership_oracle():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(PATIENTS, FEATURES)).astype(np.float32)
    y = rng.integers(0, 2, PATIENTS)
    target = int(np.argmax(x[:, 0]))
    y[target] = 0
    replaced = x.copy()
    replaced[target] = rng.normal(size=FEATURES).astype(np.float32) * 0.1  # an ordinary patient
    weights = _crafted_weights(x, target)
    key = SecretKey.generate()  # the hospital's; the attacker never sees it
    present = _answers(_hospital(x, y), weights, key, "present")
    absent = _answers(_hospital(replaced, y), weights, key, "absent")
    assert present == absent == {"non-finite": 0, "error": 0, "unchanged": 0}, (present, absent)


def _endpoint(x: np.ndarray, y: np.ndarray, state):
    """The same table as a hospital in a deployment (`privmed join`'s endpoint, its key and ledger
    in `state`, no budget cap so that all 40 releases are answered), set up by the coordinator for a
    40-round DP-SGD run of the 'mlp' at sample rate 0.3."""
    from hospital_endpoint import set_up

    from privmed.config import SitePrivacyConfig, validate_config
    from privmed.federation.experiment import remote_experiment
    from privmed.federation.facts import DataFacts
    from privmed.federation.flower.site_service import SiteEndpoint
    from privmed.federation.hospital import Hospital

    data = SiteData("h", train=ImageSet(x, y), val=ImageSet(x[:4], y[:4]))
    facts = DataFacts(in_channels=FEATURES, image_size=0, n_classes=2, tabular=True, source="heart-disease",
                      class_names=("no", "yes"), feature_names=tuple(f"f{i}" for i in range(FEATURES)),
                      image_shape=(FEATURES,))
    hospital = Hospital(data, facts, SitePrivacyConfig(max_epsilon=None, delta=1e-3), state)
    cfg = validate_config({
        "data": {"source": "sites"}, "task": "tabular-classification", "sites": {"names": ["h"], "count": 1},
        "model": {"name": "mlp", "width": 8}, "federation": {"rounds": RELEASES, "local_steps": 1},
        "training": {"batch_size": 36, "lr": 0.1, "optimizer": "sgd", "momentum": 0.0},
        "privacy": {"mode": "dp-sgd", "noise_multiplier": 1.0, "delta": 1e-3, "accountant": "rdp"},
    })
    setup = remote_experiment(cfg, {"h": hospital.describe()}).plan.setup_for("h")
    assert setup.release == (1.0, 0.3, 1)
    endpoint = SiteEndpoint(hospital)
    set_up(endpoint, setup)
    return endpoint


def test_crafted_weights_make_no_membership_oracle_at_the_hospitals_endpoint(tmp_path):
    """The same attack as the coordinator runs it: Flower's training messages to the endpoint of
    `privmed join`, one per round, the replies counted (a refusal or error counts as an error)."""
    from hospital_endpoint import train

    rng = np.random.default_rng(1)
    x = rng.normal(size=(PATIENTS, FEATURES)).astype(np.float32)
    y = rng.integers(0, 2, PATIENTS)
    target = int(np.argmax(x[:, 0]))
    y[target] = 0
    replaced = x.copy()
    replaced[target] = rng.normal(size=FEATURES).astype(np.float32) * 0.1
    weights = _crafted_weights(x, target)
    seen = {}
    for name, table in (("present", x), ("absent", replaced)):
        endpoint = _endpoint(table, y, tmp_path / name)
        counts = {"non-finite": 0, "error": 0, "unchanged": 0}
        for rnd in range(1, RELEASES + 1):
            try:
                update = train(endpoint, weights, rnd, run=name)
            except Exception:  # noqa: BLE001 - an error is a reply too
                counts["error"] += 1
                continue
            counts["non-finite"] += not all(np.isfinite(w).all() for w in update)
            counts["unchanged"] += all(np.array_equal(w, s) for w, s in zip(update, weights))
        seen[name] = counts
    assert seen["present"] == seen["absent"] == {"non-finite": 0, "error": 0, "unchanged": 0}, seen

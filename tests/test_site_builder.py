"""One way to build a site: a simulation's sites come from the same public setup a hospital
receives, and a site's secure contribution is computed by its client (the platform only carries it)."""

import numpy as np
import pytest

from conftest import tiny_config
from privmed.config import validate_config
from privmed.federation.experiment import SiteSetup, prepare_experiment, site_from_setup
from privmed.federation.hospital import Hospital
from privmed.federation.instructions import Instruction
from privmed.federation.site import derive_seed, get_weights
from privmed.federation.strategies import TrainTask, contribution
from privmed.federation.transport import site_client


@pytest.fixture(scope="module")
def dp_exp():
    cfg = validate_config(tiny_config(privacy__mode="dp-sgd", privacy__epsilon=4.0, privacy__accountant="rdp",
                                      federation__rounds=1))
    return prepare_experiment(cfg)


def test_a_simulated_site_is_the_one_a_hospital_builds_from_the_setup_it_receives(dp_exp):
    plan, sd = dp_exp.plan, dp_exp.site_data[0]
    simulated = dp_exp.trainers[sd.name]
    received = SiteSetup.from_json(plan.setup_for(sd.name).to_json())  # as it travels to a hospital
    site = site_from_setup(received, sd, plan.data)
    assert simulated.dp is not None and simulated.dp.release == plan.privacy.release(sd.name)
    assert site.dp == simulated.dp
    assert (site.local_steps, site.rounds, site.seed) == (simulated.local_steps, simulated.rounds, simulated.seed)
    assert site.training == simulated.training and site.task.name == simulated.task.name
    assert all(np.array_equal(a, b) for a, b in zip(get_weights(site.model), get_weights(simulated.model)))


def test_a_hospital_builds_the_simulations_site_from_its_setup(dp_exp):
    h = Hospital.rehearsal(dp_exp.config, "site-2")
    client = h.setup(dp_exp.plan.setup_for("site-2"))
    simulated = dp_exp.trainers["site-2"]
    assert client.site.dp == simulated.dp and client.site.local_steps == simulated.local_steps
    assert all(np.array_equal(a, b) for a, b in zip(get_weights(client.site.model), get_weights(simulated.model)))


def test_the_config_is_validated_once_at_each_edge(monkeypatch):
    """The simulation's sites take the plan's validated config; a hospital validates what it
    receives, once, even when handed the plan's own setup object (whose `validated` it ignores)."""
    import privmed.federation.experiment as experiment

    calls = []
    real = experiment.validate_config
    monkeypatch.setattr(experiment, "validate_config", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cfg = validate_config(tiny_config(federation__rounds=1))
    exp = prepare_experiment(cfg)
    assert calls == [] and all(s.training is cfg.training for s in exp.trainers.values())
    setup = exp.plan.setup_for("site-2")
    h = Hospital.rehearsal(cfg, "site-2")
    client = h.setup(setup)
    assert len(calls) == 1 and client.site.training == cfg.training and client.site.training is not cfg.training
    tampered = SiteSetup(**{**{f: getattr(setup, f) for f in ("config", "data", "local_steps", "release")},
                            "validated": validate_config(tiny_config(federation__rounds=1, training__lr=9.0))})
    assert Hospital.rehearsal(cfg, "site-1").setup(tampered).site.training.lr == cfg.training.lr


@pytest.mark.parametrize(("weighting", "max_weight"), [("samples", 200.0), ("uniform", 1.0)])
def test_the_client_computes_its_secure_contribution(weighting, max_weight, one_thread):
    exp = prepare_experiment(validate_config(tiny_config(federation__rounds=1, federation__secure_aggregation=True)))
    name = exp.site_names[0]
    client = site_client(exp, exp.trainers[name], None)
    sent = exp.initial_weights
    ins = Instruction(TrainTask(name, sent), 1, run="r", secure=True, weighting=weighting, clip=0.5,
                      max_weight=max_weight, clipping_range=0.001)
    reply = client.contribute(ins)
    # the same training again, in the clear: the reply is its change, clipped to the instruction's norm
    trained = client.train(Instruction(TrainTask(name, sent), 1, run="r"))
    expected = contribution(sent, trained.weights, 0.5)
    assert all(np.array_equal(a, b) for a, b in zip(reply.arrays, expected))
    weight = trained.n_samples if weighting == "samples" else 1
    assert reply.weight == weight
    clipped = sum(int((np.abs(a * weight / max_weight) > 0.001).sum()) for a in expected)
    assert clipped > 0 and reply.update.metrics["secagg_clipped"] == clipped  # no privacy: reported
    assert reply.seed == derive_seed(exp.config.seed, "secagg", 1, name)

"""Gradient canaries (privmed.audit.canaries): a canary enters a step exactly as a clipped patient
would; the one-run lower bound stays below the epsilon a DP run claims and catches a canary that
escapes the clipping; without DP it is clearly above zero."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import privmed
from privmed.audit import canaries as canaries_module
from privmed.audit.canaries import GradientCanaries, canary_audit
from privmed.audit.membership import load_target
from privmed.errors import ConfigError

from conftest import tiny_config


def test_canaries_sit_on_distinct_coordinates_and_half_are_included():
    params = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(2, 2, 2))]
    c = GradientCanaries.draw(params, m=20, clip=1.0, seed=3)
    sizes = [p.numel() for p in params]
    assert all(0 <= f < sizes[k] for k, f in zip(c.param, c.flat))
    assert len({(int(k), int(f)) for k, f in zip(c.param, c.flat)}) == 20 == sum(sizes) - 5
    big = GradientCanaries.draw([torch.nn.Parameter(torch.zeros(10_000))], m=4000, clip=1.0, seed=0)
    assert abs(big.included.mean() - 0.5) < 0.03  # p = 1/2: 4 standard deviations
    with pytest.raises(ConfigError, match="only 25 parameters"):
        GradientCanaries.draw(params, m=26, clip=1.0, seed=0)


def test_an_included_canary_adds_its_clipped_gradient_over_the_divisor_and_nothing_else():
    params = [torch.nn.Parameter(torch.zeros(6)), torch.nn.Parameter(torch.zeros(2, 3))]
    for p in params:
        p.grad = torch.zeros_like(p)
    c = GradientCanaries.draw(params, m=8, clip=2.0, seed=1)
    c(params, rate=1.0, divisor=4.0)  # every included canary is in this step's batch
    got = torch.cat([p.grad.view(-1) for p in params]).numpy()
    want = np.zeros(12)
    offsets = [0, 6]
    for k, f, inc in zip(c.param, c.flat, c.included):
        want[offsets[k] + f] = 2.0 / 4.0 if inc else 0.0
    assert np.array_equal(got, want)
    c(params, rate=0.0, divisor=4.0)  # in no batch: nothing changes
    assert np.array_equal(torch.cat([p.grad.view(-1) for p in params]).numpy(), want)


def _dp_run(out, epsilon: float):
    """A DP-SGD run where each round is one full-batch step, so the coordinator's view of a site's
    update is one noisy gradient: the setting in which Dirac canaries audit most tightly. No report:
    the audit reads the run's summary, config and model."""
    cfg = tiny_config(federation__rounds=30, federation__local_steps=1, data__val_fraction=0.2,
                      training__batch_size=96, training__optimizer="sgd", training__lr=0.05,
                      training__momentum=0.0, model__name="dpcnn",
                      privacy={"mode": "dp-sgd", "epsilon": epsilon, "delta": 1e-5})
    return out, privmed.run(cfg, out, report=False).summary["privacy"]["epsilon"]


@pytest.fixture(scope="module")
def dp_runs(tmp_path_factory, one_thread):
    """Each DP target trained once for the module: (run directory, claimed epsilon) by the epsilon
    asked for, made on first use. The audits only read a run (each retrains its own copy with the
    canaries in), so the tests and negative controls below share the one run per epsilon."""
    made = {}

    def get(epsilon: float):
        if epsilon not in made:
            made[epsilon] = _dp_run(tmp_path_factory.mktemp(f"eps{epsilon:g}") / "run", epsilon)
        return made[epsilon]

    return get


@pytest.fixture(scope="module")
def nodp_run(tmp_path_factory, one_thread):
    """A 3-round run without DP, trained once: audited below and used for the refused requests
    (no report: the audit reads the run's summary, config and model)."""
    out = tmp_path_factory.mktemp("nodp") / "run"
    cfg = tiny_config(federation__rounds=3, data__val_fraction=0.2, training__optimizer="sgd",
                      training__lr=0.05, training__momentum=0.9)
    privmed.run(cfg, out, report=False)
    return out


def test_without_dp_the_canaries_stand_out(nodp_run):
    r = canary_audit(load_target(nodp_run), m=1000, seed=0)
    assert r["epsilon_lower"] >= 2.0, r
    assert r["site"] == "site-1" and r["canaries"] == 1000


@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_the_lower_bound_never_passes_the_claimed_epsilon(dp_runs, epsilon):
    run, claimed = dp_runs(epsilon)
    assert claimed <= epsilon
    r = canary_audit(load_target(run), m=1000, seed=0)
    assert r["epsilon_lower"] <= claimed, r
    if epsilon == 8.0:  # the audit has power here: the bound is well above zero
        assert r["epsilon_lower"] > 0.3, r


def test_with_the_noise_off_the_bound_passes_the_claimed_epsilon(dp_runs, monkeypatch):
    """Negative control of the test above at epsilon 1: the same run audited with DP-SGD's noise off
    where the noise multiplier reaches it (the claim still 1). Every canary is then told apart and
    the bound, 4.6, passes the claim. (1000 canaries bound epsilon by 4.6 at most, all guessed
    right, so the epsilon 8 case above can never be refuted: there it only shows the audit's power.)"""
    from privmed.federation import site as site_module

    run, claimed = dp_runs(1.0)  # the run the test above audits
    dp_train = site_module.dp_train
    monkeypatch.setattr(site_module, "dp_train",
                        lambda *args, noise_multiplier, **kw: dp_train(*args, noise_multiplier=0.0, **kw))
    r = canary_audit(load_target(run), m=1000, seed=0)
    assert r["epsilon_lower"] > claimed, r


def test_a_canary_that_escapes_the_clipping_is_caught(dp_runs, monkeypatch):
    """The same audit against a broken mechanism: canaries whose gradient is 10 C, a patient the
    clipping missed. The bound then passes the claimed epsilon (1): the test above could fail."""
    run, claimed = dp_runs(1.0)  # the run the tests above audit
    draw = GradientCanaries.draw.__func__
    monkeypatch.setattr(canaries_module.GradientCanaries, "draw",
                        classmethod(lambda cls, params, m, clip, seed: draw(cls, params, m, 10 * clip, seed)))
    r = canary_audit(load_target(run), m=1000, seed=0)
    assert r["epsilon_lower"] > claimed, r


def test_bad_requests_name_the_option(nodp_run):
    target = load_target(nodp_run)
    with pytest.raises(ConfigError, match="--site: 'nowhere' is not a site of this run"):
        canary_audit(target, m=10, site="nowhere")
    with pytest.raises(ConfigError, match="--canaries: 1; the audit needs at least 2"):
        canary_audit(target, m=1)


def test_privmed_audit_runs_the_canaries_and_the_report_states_the_bound(tmp_path, one_thread, capsys):
    from privmed.cli import main

    cfg = tiny_config(federation__rounds=2, data__val_fraction=0.2, training__optimizer="sgd",
                      training__lr=0.05, training__momentum=0.9)
    privmed.run(cfg, tmp_path / "run")
    assert main(["audit", str(tmp_path / "run"), "--attack", "canaries", "--canaries", "300", "--site", "site-2"]) == 0
    assert "canaries (white box): epsilon >= " in capsys.readouterr().out
    import json

    saved = json.loads((tmp_path / "run" / "private" / "audit.json").read_text())["canaries"]
    assert saved["site"] == "site-2" and saved["canaries"] == 300 and saved["claimed_epsilon"] is None
    html = (tmp_path / "run" / "private" / "report.html").read_text()
    assert "Gradient canaries (white box): a lower bound on epsilon" in html
    assert f"Epsilon is at least {np.floor(saved['epsilon_lower'] * 1000) / 1000:.3f}" in html
    # a later membership audit keeps the canaries' result
    assert main(["audit", str(tmp_path / "run"), "--attack", "loss", "--candidates", "20"]) == 0
    assert json.loads((tmp_path / "run" / "private" / "audit.json").read_text())["canaries"] == saved
    assert main(["audit", str(tmp_path / "run"), "--attack", "canaries", "--canaries", "0"]) == 2
    # and the site's privacy statement says what the canaries found
    assert main(["statement", str(tmp_path / "run"), "--site", "site-2", "--private"]) == 0
    page = (tmp_path / "run" / "private" / "statement-site-2.html").read_text()
    assert "Canary patients added at this site" in page and "the run claims no guarantee" in page

"""Differential privacy wired into runs: the plan, the ledger of a real run against dp-accounting,
refusal of rounds past the budget, kill-and-resume, central DP (DP-FedAvg), patient-level sampling,
and the `privmed privacy` commands."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import privmed
from conftest import copy_keys, tiny_config
from privmed.config import DP_SGD_DEFAULTS, PrivacyConfig, validate_config
from privmed.errors import ConfigError
from privmed.federation.experiment import prepare_experiment
from privmed.catalog import PrivacyMode
from privmed.federation.records import read_metrics, read_summary
from privmed.federation.runner import DIE_IN_ROUND
from privmed.federation.strategies import GLOBAL, DPFedAvg, SiteUpdate
from privmed.privacy.secret import SecretKey
from privmed.privacy.site_ledger import SiteLedger
from privmed.privacy import PrivacyLedger, Release, epsilon_spent, independent_epsilon
from privmed.privacy.dpsgd import patient_batches, poisson_batches
from privmed.privacy.figures import format_epsilon
from privmed.privacy.plan import SiteFacts, make_plan, sample_rate_and_steps
from privmed.cli.privacy import plan_site


def dp_config(**over) -> dict:
    """A tiny phantom run with DP-SGD: 3 sites x 80 training patients, SGD as DP wants it."""
    base = {
        "privacy__mode": "dp-sgd",
        "privacy__epsilon": 4.0,
        "privacy__accountant": "rdp",  # the fast one; the PRV default is checked below
        "training__batch_size": 32,
        "training__optimizer": "sgd",
        "training__lr": 0.5,
        "training__momentum": 0.0,
        "federation__rounds": 3,
    }
    return tiny_config(**{**base, **over})


def _run(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "privmed", *args], capture_output=True, text=True, env=env, **kw)


# ------------------------------------------------------------------------------------------ plan


def test_sample_rate_and_steps():
    assert sample_rate_and_steps(1000, 250, local_epochs=2, local_steps=None) == (0.25, 8)
    assert sample_rate_and_steps(1000, 300, local_epochs=1, local_steps=None) == (0.3, 4)  # 3.33 -> 4
    assert sample_rate_and_steps(1000, 250, local_epochs=9, local_steps=5) == (0.25, 5)
    assert sample_rate_and_steps(100, 250, local_epochs=1, local_steps=None) == (1.0, 1)


def test_plan_calibrates_each_site_to_the_budget_and_never_over():
    cfg = PrivacyConfig(mode="dp-sgd", epsilon=3.0, accountant="rdp")
    sites = {"big": SiteFacts(2000, turns=10), "small": SiteFacts(400, turns=10)}
    plan = make_plan(cfg, sites, batch_size=100, local_epochs=1, local_steps=None, patient_ids=True)
    for name, p in plan.sites.items():
        total = Release(p.release.noise_multiplier, p.release.sample_rate, p.release.steps * p.turns)
        eps = epsilon_spent([total], 1e-5, "rdp")
        assert eps == pytest.approx(p.planned_epsilon) and 3.0 * 0.97 < eps <= 3.0, name
    # The small site samples a larger share of its patients per step, so it needs more noise.
    assert plan.release("small").sample_rate == 0.25 and plan.release("big").sample_rate == 0.05
    assert plan.release("small").noise_multiplier > plan.release("big").noise_multiplier
    assert plan.budget == 3.0 and plan.unit == "patient"


def test_plan_with_fixed_noise_reports_its_epsilon_and_checks_the_budget():
    sites = {"a": SiteFacts(1000, turns=5)}
    fixed = make_plan(PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0, accountant="rdp"), sites,
                      batch_size=100, local_epochs=1, local_steps=None)
    eps = epsilon_spent([Release(1.0, 0.1, 50)], 1e-5, "rdp")
    assert fixed.budget == pytest.approx(eps) and not fixed.calibrated
    with pytest.raises(ConfigError, match=r"privacy\.noise_multiplier: 1 would spend epsilon .* site 'a'.*"
                       r"past privacy\.epsilon 1; allowed: a noise multiplier >= "):
        make_plan(PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0, epsilon=1.0, accountant="rdp"), sites,
                  batch_size=100, local_epochs=1, local_steps=None)


def test_delta_must_be_below_one_over_the_smallest_site():
    sites = {"a": SiteFacts(1000, 1), "tiny": SiteFacts(50, 1)}
    with pytest.raises(ConfigError, match=r"privacy\.delta: 0\.05 .* smallest site, 'tiny'.*1/50"):
        make_plan(PrivacyConfig(mode="dp-sgd", epsilon=1.0, delta=0.05), sites,
                  batch_size=10, local_epochs=1, local_steps=None)


def test_config_needs_a_budget_and_central_needs_fedavg():
    with pytest.raises(ConfigError, match=r"privacy\.epsilon.*or privacy\.noise_multiplier"):
        validate_config(tiny_config(privacy__mode="dp-sgd"))
    with pytest.raises(ConfigError, match=r"'central'.*fedavg.*got 'cyclic'"):
        validate_config(tiny_config(privacy__mode="central", privacy__epsilon=1.0,
                                    federation__strategy="cyclic"))
    with pytest.raises(ConfigError, match=r"privacy\.acountant.*did you mean 'accountant'"):
        validate_config(tiny_config(privacy__acountant="prv"))


def test_dp_sgd_defaults_fill_only_what_the_config_leaves_out():
    cfg = validate_config({"privacy": {"mode": "dp-sgd", "epsilon": 3}, "training": {"lr": 0.2}})
    for section, defaults in DP_SGD_DEFAULTS.items():
        for key, value in defaults.items():
            expected = 0.2 if (section, key) == ("training", "lr") else value
            assert getattr(getattr(cfg, section), key) == expected, (section, key)
    # a config that chose epochs keeps them; without dp-sgd nothing changes
    assert validate_config({"privacy": {"mode": "dp-sgd", "epsilon": 3},
                            "federation": {"local_epochs": 2}}).federation.local_steps is None
    plain = validate_config({"privacy": {"mode": "central", "epsilon": 3}})
    assert plain.model.name == "cnn" and plain.training == validate_config({}).training


def test_turns_come_from_the_strategy():
    for strategy in ("fedavg", "cyclic", "local"):
        exp = prepare_experiment(validate_config(dp_config(federation__strategy=strategy, federation__rounds=4)))
        assert {p.turns for p in exp.privacy.sites.values()} == {4}
        assert set(exp.privacy.sites) == {"site-1", "site-2", "site-3"}
    exp = prepare_experiment(validate_config(dp_config(federation__strategy="pooled")))
    assert list(exp.privacy.sites) == ["pooled"] and exp.privacy.sites["pooled"].n_patients == 3 * 102


# ------------------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp") / "run"
    result = privmed.run(dp_config(privacy__accountant="prv"), out=out, report=True)
    return out, result


def test_ledger_of_a_run_matches_dp_accounting_and_the_budget(dp_run):
    out, result = dp_run
    data = json.loads((out / "privacy_ledger.json").read_text())
    assert data["unit"] == "patient" and data["accountant"] == "prv" and data["budget_epsilon"] == 4.0
    expected = _releases_the_config_calls_for(validate_config(dp_config(privacy__accountant="prv")))
    assert set(data["sites"]) == set(expected)
    for site, entry in data["sites"].items():
        releases = [Release(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in entry["releases"]]
        _counts_each_round_once_at([(r["round"], x) for r, x in zip(entry["releases"], releases)], *expected[site], rounds=3)
        reference = independent_epsilon(releases, 1e-5, "pld")
        assert entry["epsilon"] == pytest.approx(reference, rel=0.02), site
        assert entry["epsilon"] <= 4.0
        assert result.summary["privacy"]["sites"][site] == entry["epsilon"]
    assert result.summary["privacy"]["epsilon"] == max(e["epsilon"] for e in data["sites"].values())


def test_summary_metrics_and_report_carry_the_privacy(dp_run):
    out, result = dp_run
    s = result.summary
    assert s["privacy"]["mode"] == "dp-sgd" and s["privacy"]["delta"] == 1e-5
    assert "validation and test patients" in s["privacy"]["statement"]
    assert s["best_round"] == 3 and "last round" in s["selection"]  # no validation data in the choice
    assert s["train_seconds"] > 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # nothing computed from training patients outside DP leaves a site: no training loss
    assert all(v is None or math.isnan(v) for row in rows for v in row["train_loss"].values())
    eps = [row["epsilon"]["site-1"] for row in rows]
    assert eps == sorted(eps) and eps[-1] == s["privacy"]["sites"]["site-1"]
    html = (out / "report.html").read_text()
    assert "Privacy" in html and (out / "plots" / "privacy_spent.png").is_file()


def test_privacy_spent_prints_the_ledger(dp_run):
    out, result = dp_run
    r = _run(["privacy", "spent", str(out)])
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("site-2 "))
    assert format_epsilon(result.summary["privacy"]["sites"]["site-2"]) in line.split()
    r = _run(["privacy", "spent", str(out / "plots")])
    assert r.returncode == 2 and "no privacy_ledger.json" in r.stderr and "Traceback" not in r.stderr


def test_non_private_run_says_so_and_writes_no_ledger(tmp_path):
    result = privmed.run(tiny_config(federation__rounds=1), out=tmp_path / "run", report=False)
    assert result.summary["privacy"]["mode"] == "none" and result.summary["privacy"]["epsilon"] is None
    assert not (tmp_path / "run" / "privacy_ledger.json").exists()


def test_a_round_past_the_budget_is_refused_and_nothing_is_recorded(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(dp_config(federation__rounds=2)))
    out = tmp_path / "run"
    r = _run(["run", str(cfg), "--out", str(out), "--quiet"])
    assert r.returncode == 0, r.stderr
    eps = json.loads((out / "summary.json").read_text())["privacy"]["epsilon"]
    shown = format_epsilon(eps)  # rounded up, never below the ledger's
    assert f"privacy: ({shown}, 1e-05)-differential privacy per patient at every site" in r.stdout
    before = {f: (out / f).read_bytes() for f in ("privacy_ledger.json", "config.yaml", "summary.json")}
    r = _run(["run", str(cfg), "--out", str(out), "--quiet", "--resume", "--set", "federation.rounds=4"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "round 3 refused before it starts" in r.stderr and "past its budget 4" in r.stderr
    for site in ("site-1", "site-2", "site-3"):
        assert f"site '{site}'" in r.stderr
    assert "allowed: federation.rounds <= 2 (round 2 completed)" in r.stderr
    assert {f: (out / f).read_bytes() for f in before} == before  # nothing written


def test_kill_and_resume_keeps_the_ledger_exact(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(dp_config(federation__rounds=3)))
    ref = tmp_path / "ref"
    assert _run(["run", str(cfg), "--out", str(ref), "--quiet"]).returncode == 0
    out = copy_keys(ref, tmp_path / "run")  # the same keys: bit for bit the same run, if uninterrupted
    # killed in round 2 (SIGKILL, by the runner's test-only crash point) once the sites have trained
    # and released it and both ledgers count it, before the round is checkpointed: the resume must
    # count round 2 once, not twice and not never
    env = {**os.environ, "OMP_NUM_THREADS": "1", DIE_IN_ROUND: "2"}
    r = subprocess.run([sys.executable, "-m", "privmed", "run", str(cfg), "--out", str(out), "--quiet", "--resume"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not (out / "summary.json").exists(), "the run finished before it was killed"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["round-0001.pt"]
    assert [rnd for rnd, _ in PrivacyLedger.load(out / "privacy_ledger.json").releases("site-1")] == [1, 2]
    r = _run(["run", str(cfg), "--out", str(out), "--quiet", "--resume"])
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "privacy_ledger.json").read_text()) == json.loads((ref / "privacy_ledger.json").read_text())
    a = torch.load(out / "model.pt", weights_only=True)["state_dicts"][GLOBAL]
    b = torch.load(ref / "model.pt", weights_only=True)["state_dicts"][GLOBAL]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # each site's own ledger and the coordinator's count, each round once, the release the config
    # calls for: recomputed here from the config and the sites' data, not read back from the plan
    # that both ledgers took it from (compared with each other, a wrong plan would agree with itself)
    ledger = PrivacyLedger.load(out / "privacy_ledger.json")
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    expected = _releases_the_config_calls_for(validate_config(dp_config(federation__rounds=3)))
    assert set(ledger.sites) == set(expected)
    for site, (rate, steps) in expected.items():
        own = SiteLedger.load(out / "private" / "sites" / site / "site_ledger.json")
        _counts_each_round_once_at(own.releases_of(run_id), rate, steps, rounds=3)
        _counts_each_round_once_at(ledger.releases(site), rate, steps, rounds=3)
        # the noise multiplier is the one calibrated to the budget (4, by the run's RDP accountant):
        # by dp-accounting's own RDP accountant the rounds spend within 3% below it, never over it
        reference = independent_epsilon([r for _, r in own.releases_of(run_id)], 1e-5, "rdp")
        assert 0.97 * 4.0 < reference <= 4.0, own.releases_of(run_id)
        assert own.epsilon == pytest.approx(reference, rel=1e-3)
        assert ledger.epsilon(site) == pytest.approx(reference, rel=1e-3)
        assert len({r.digest for r in own.releases if r.run == run_id}) == 3  # three releases, not one thrice


def _releases_the_config_calls_for(cfg) -> dict[str, tuple[float, int]]:
    """Each site's DP-SGD sample rate and steps per round, from the config and the site's training
    patients counted here: a batch of batch_size expected out of the site's patients, and the
    configured local steps (or the local epochs' worth of batches)."""
    from privmed.federation.experiment import simulated_sites

    _, site_data, _ = simulated_sites(cfg)
    out = {}
    for sd in site_data:
        n = len(sd.train) if sd.train.patient is None else len(np.unique(sd.train.patient))
        rate = min(1.0, cfg.training.batch_size / n)
        steps = cfg.federation.local_steps or math.ceil(cfg.federation.local_epochs / rate)
        out[sd.name] = (rate, steps)
    return out


def _counts_each_round_once_at(counted: list[tuple[int, Release]], rate: float, steps: int, rounds: int) -> None:
    """`counted` (round, release) holds rounds 1..rounds once each, every one at `rate` and `steps`
    with one noise multiplier."""
    assert [r for r, _ in counted] == list(range(1, rounds + 1))
    assert len({r.noise_multiplier for _, r in counted}) == 1, counted
    for _, r in counted:
        assert r.sample_rate == pytest.approx(rate, rel=1e-12) and r.steps == steps, r


def test_same_seed_fresh_keys_a_different_dp_run():
    """The seed is public; the DP noise and batches come from each site's secret key: two runs
    with the same seed (and fresh keys) release different models."""
    cfg = dp_config(federation__rounds=1)
    a, b = privmed.run(cfg), privmed.run(cfg)
    assert any(not torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


# --------------------------------------------------------------------------------------- central


def _w(*values: float) -> list[np.ndarray]:
    return [np.array(values, dtype=np.float32)]


def test_dp_fedavg_adds_what_the_sites_sent_and_divides_by_the_site_count():
    """The sites clip and noise their updates themselves (distributed DP): the server neither
    clips nor adds noise, and divides the sum by the configured number of sites."""
    s = DPFedAvg(clip=1.0, noise_multiplier=1.0, n_sites=4)
    state = {GLOBAL: _w(0.0, 0.0)}
    ups = [SiteUpdate("a", _w(3.0, 4.0), 10), SiteUpdate("b", _w(0.3, 0.4), 1000)]
    new = s.aggregate(state, ups, 1)[GLOBAL][0]
    np.testing.assert_allclose(new, (np.array([3.0, 4.0]) + np.array([0.3, 0.4])) / 4, rtol=1e-6)
    with pytest.raises(ValueError, match="noise_multiplier > 0"):
        DPFedAvg(clip=1.0, noise_multiplier=0.0, n_sites=4)


def _central_site(tmp_path, **over):
    from privmed.federation.hospital import Hospital

    cfg = validate_config(tiny_config(**{"privacy__mode": "central", "privacy__delta": 0.01,
                                         "training__optimizer": "sgd", "training__momentum": 0.0, **over}))
    return Hospital.rehearsal(cfg, "site-1", tmp_path / "state").setup(prepare_experiment(cfg).plan.setup_for("site-1"))


def _change(client, rnd: int) -> np.ndarray:
    """What site-1 sends back in round `rnd`, less the model it was sent (the run's initial one)."""
    from privmed.federation.instructions import Instruction
    from privmed.federation.site import get_weights
    from privmed.federation.strategies import TrainTask

    sent = get_weights(client.site.model_factory())
    update = client.train(Instruction(TrainTask("site-1", sent), rnd, run="r"))
    return np.concatenate([(u.astype(np.float64) - w).ravel() for u, w in zip(update.weights, sent)])


def test_a_central_site_noises_its_own_update_from_its_key(tmp_path):
    """Training that changes nothing (lr 1e-12): what leaves the site is its noise share alone,
    of std noise_multiplier x C on every entry; another round draws other noise, the same request
    again the same."""
    client = _central_site(tmp_path, privacy__noise_multiplier=2.0, privacy__max_grad_norm=0.5,
                           training__lr=1e-12, federation__rounds=2)
    first = _change(client, 1)
    # the sample std of n normals is within 5 / sqrt(2n) relative of the truth, with prob > 1 - 1e-6
    assert abs(first.std() / (2.0 * 0.5) - 1) < 5 / math.sqrt(2 * first.size), first.std()
    assert np.array_equal(_change(client, 1), first)  # a retry: the same reply, counted once
    second = _change(client, 2)
    assert abs(np.corrcoef(first, second)[0, 1]) < 5 / math.sqrt(first.size)
    assert [r for r, _ in client.guard.ledger.releases_of("r")] == [1, 2]


def test_a_central_site_clips_its_update_before_the_noise(tmp_path):
    client = _central_site(tmp_path, privacy__noise_multiplier=1e-4, privacy__max_grad_norm=0.5,
                           training__lr=5.0, federation__rounds=1)
    change = _change(client, 1)
    noise = 1e-4 * 0.5 * math.sqrt(change.size)  # the noise share's expected norm
    assert abs(np.linalg.norm(change) - 0.5) < 5 * noise  # clipped to C, from a far larger step


def test_central_run_accounts_every_site_at_the_site_level(tmp_path):
    cfg = tiny_config(privacy__mode="central", privacy__epsilon=20.0, privacy__delta=0.01,
                      privacy__max_grad_norm=0.5, federation__rounds=2)
    result = privmed.run(cfg, out=tmp_path / "run", report=False)
    ledger = PrivacyLedger.load(tmp_path / "run" / "privacy_ledger.json")
    assert ledger.unit == "site" and "DP-FedAvg" in ledger.mechanism and "own Gaussian noise" in ledger.mechanism
    sigma = result.summary["privacy"]["plan"]["site-1"]["noise_multiplier"]
    for site in ledger.sites:
        assert [r for _, r in ledger.releases(site)] == [Release(sigma, 1.0, 1)] * 2
        assert ledger.epsilon(site) <= 20.0
    assert "the coordinator included, even one that deviates from the protocol" in result.summary["privacy"]["statement"]
    summary = read_summary(tmp_path / "run")  # typed, and written out again byte for byte
    assert summary.privacy.mode is PrivacyMode.CENTRAL and summary.privacy.unit == "site"
    assert json.dumps(summary.to_json(), indent=2) + "\n" == (tmp_path / "run" / "summary.json").read_text()
    assert [json.dumps(r.to_json()) for r in read_metrics(tmp_path / "run")] == \
        (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    with pytest.raises(ConfigError, match=r"privacy\.delta: 0\.5 .*1 / \(sites\)"):
        privmed.run(tiny_config(privacy__mode="central", privacy__epsilon=1.0, privacy__delta=0.5))


# ------------------------------------------------------------------------- patient-level sampling


def test_patient_batches_draw_one_item_per_sampled_patient():
    patients = np.array(["p1", "p1", "p1", "p2", "p3", "p3"] * 50)  # 150 items of p1, ...
    patients = np.array([f"{p}-{i // 6}" for i, p in enumerate(patients)])  # 150 patients, 1-3 items
    n_pat = len(np.unique(patients))
    gen = torch.Generator().manual_seed(0)
    sizes, picked = [], np.zeros(len(patients))
    for idx in patient_batches(patients, 0.2, 400, gen):
        owners = patients[idx.numpy()]
        assert len(set(owners)) == len(owners)  # at most one item of any patient per step
        sizes.append(len(idx))
        picked[idx.numpy()] += 1
    # batch size ~ Binomial(patients, q): mean within 4 standard errors
    assert abs(np.mean(sizes) - 0.2 * n_pat) < 4 * math.sqrt(0.2 * 0.8 * n_pat / 400)
    # each of a 3-item patient's items is drawn about a third as often as a 1-item patient's item
    three = picked[np.isin(patients, [p for p in np.unique(patients) if p.startswith("p1")])].mean()
    one = picked[np.isin(patients, [p for p in np.unique(patients) if p.startswith("p2")])].mean()
    assert three / one == pytest.approx(1 / 3, rel=0.15)


def test_patient_batches_with_one_item_per_patient_are_poisson_batches():
    a = list(patient_batches(np.arange(50).astype(str), 0.3, 5, torch.Generator().manual_seed(1)))
    b = list(poisson_batches(50, 0.3, 5, torch.Generator().manual_seed(1)))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# -------------------------------------------------------------------------------- privacy plan


def test_privacy_plan_noise_meets_the_target():
    text = plan_site(epsilon=3.0, noise_multiplier=None, delta=1e-5, patients=1000, batch_size=100,
                     epochs=5, steps=None, accountant="rdp")
    sigma = float(text.split("noise multiplier ")[1].split()[0])
    eps = epsilon_spent([Release(sigma, 0.1, 50)], 1e-5, "rdp")
    assert eps <= 3.0  # the noise is printed rounded up: the printed noise still meets the budget
    last = text.strip().splitlines()[-1].split()
    # The table's epsilon (of the exact noise, rounded up) is at least that of the printed noise.
    assert last[:2] == ["5", "50"] and eps <= float(last[2]) <= eps * 1.011


def test_privacy_plan_command_and_its_errors(tmp_path):
    r = _run(["privacy", "plan", "--noise-multiplier", "1.0", "--patients", "500", "--batch-size", "50",
              "--steps", "30", "--accountant", "rdp"])
    assert r.returncode == 0, r.stderr
    assert f"spends epsilon {format_epsilon(epsilon_spent([Release(1.0, 0.1, 30)], 1e-5, 'rdp'))}" in r.stdout
    for args, message in [
        (["--epsilon", "1", "--batch-size", "5", "--epochs", "1"], "--patients is required"),
        (["--epsilon", "1", "--patients", "50", "--batch-size", "5"], "give --epochs or --steps"),
        (["--epsilon", "1", "--patients", "50", "--batch-size", "5", "--epochs", "1", "--delta", "0.1"],
         "privacy.delta: 0.1 is too large"),
        (["--epsilon", "1", "--patients", "50", "--batch-size", "5", "--epochs", "1", "--accountant", "prr"],
         "did you mean 'prv'"),
    ]:
        r = _run(["privacy", "plan", *args])
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(dp_config()))
    r = _run(["privacy", "plan", str(cfg)])
    assert r.returncode == 0, r.stderr
    assert "site-3" in r.stdout and "budget epsilon 4" in r.stdout


def test_packaged_dp_demo_config_is_valid_and_planned():
    from importlib.resources import files

    from privmed.config import read_yaml

    cfg = validate_config(read_yaml(Path(str(files("privmed") / "configs" / "demo-dp.yaml"))))
    assert cfg.privacy.mode == "dp-sgd" and cfg.model.name == DP_SGD_DEFAULTS["model"]["name"]
    plan = prepare_experiment(cfg).privacy
    assert set(plan.sites) == {"hospital-a", "hospital-b", "hospital-c"}
    assert all(p.planned_epsilon <= 8.0 and p.turns == cfg.federation.rounds for p in plan.sites.values())

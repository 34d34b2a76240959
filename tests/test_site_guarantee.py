"""The guarantee held at the hospital, tested as an attacker would try it.

- The seed attack: whoever holds a DP run's released files (config.yaml, summary.json, the seed)
  re-runs it; without the sites' secret keys the released model is not reproduced. With the keys
  (--resume) it is, bit for bit.
- The keys never leave the private folder, whose files only their owner can read.
- A site refuses, itself, a coordinator that asks for a round past the site's budget, for a round
  it already released with other weights, or for another purpose under DP; a repeated identical
  instruction gets the cached reply, counted once. The refusal reaches the coordinator's output,
  in process and through the Flower relay a hospital's SuperNode uses.
"""

from __future__ import annotations

import json
import math
import stat

import numpy as np
import pytest
import yaml
from conftest import copy_keys, tiny_config

import privmed
from privmed.config import validate_config
from privmed.federation.experiment import prepare_experiment
from privmed.federation.hospital import Hospital
from privmed.federation.flower import messages as M
from privmed.federation.flower.coordinator import FlowerSites, refusal
from privmed.federation.flower.secagg import LocalGrid, in_process_identity
from privmed.federation.flower.site_app import RelayEndpoint, make_client_app
from privmed.federation.flower.site_service import SiteEndpoint, serve_site
from privmed.federation.instructions import Instruction
from privmed.federation.strategies import TrainTask
from privmed.privacy.site_ledger import SITE_LEDGER_FILE, SiteLedger, SiteRefused


def dp_config(**over) -> dict:
    base = dict(privacy__mode="dp-sgd", privacy__epsilon=4.0, privacy__accountant="rdp",
                training__batch_size=32, training__optimizer="sgd", training__lr=0.5,
                training__momentum=0.0, federation__rounds=2)
    return tiny_config(**{**base, **over})


def prepare_site(cfg, name: str, state=None):
    """Site `name` of `cfg` as a hospital builds it: a rehearsal hospital (its budget the config's),
    set up with the run's setup as the coordinator plans it."""
    return Hospital.rehearsal(cfg, name, state).setup(prepare_experiment(cfg).plan.setup_for(name))


def _hospitals(cfg, state=None, own=None) -> dict:
    """A LocalGrid's apps: each site of `cfg` as a hospital (rehearsal of `own` or `cfg`) behind
    its endpoint, node ids 2001, 2002, ..."""
    apps = {}
    for i, name in enumerate(cfg.sites.site_names()):
        endpoint = SiteEndpoint(Hospital.rehearsal(own or cfg, name, None if state is None else state / name))
        apps[2001 + i] = make_client_app(lambda _ctx, e=endpoint: e)
    return apps


def _weights(model) -> np.ndarray:
    return np.concatenate([v.detach().numpy().ravel().astype(np.float64) for v in model.state_dict().values()])


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory, one_thread):
    """A DP-SGD run of dp_config(), trained once for the module: the tests below only read it (its
    files, keys and ledgers; a replay copies its keys elsewhere). (directory, its RunResult)"""
    out = tmp_path_factory.mktemp("dp") / "run"
    return out, privmed.run(dp_config(), out)


@pytest.mark.parametrize("every_patient", [False, True], ids=["poisson-batches", "sample-rate-1"])
def test_the_seed_attack_fails_without_the_keys_and_the_keys_replay_exactly(tmp_path, every_patient, one_thread, request):
    """With sample rate 1 (a batch larger than any site's patients) every step takes every patient,
    whoever draws the batches: the re-run must still miss, so the noise itself comes from the keys,
    not only the Poisson batches."""
    if every_patient:
        run = tmp_path / "released"
        released = privmed.run(dp_config(training__batch_size=256), run, report=False)
    else:
        run, released = request.getfixturevalue("dp_run")
    rates = {site: p["sample_rate"] for site, p in released.summary["privacy"]["plan"].items()}
    assert all((rate == 1.0) == every_patient for rate in rates.values()), rates
    # the attacker: the released config (with its seed) run again, as anyone can
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["seed"] == json.loads((run / "summary.json").read_text())["seed"]
    replay = privmed.run(cfg)
    w, r = _weights(released.model), _weights(replay.model)
    distance = float(np.linalg.norm(w - r) / np.linalg.norm(w))
    assert distance > 1e-3, distance  # the noise differs: nothing lines up with the release
    # the hospitals, with their keys: the very same model
    again = privmed.run(cfg, copy_keys(run, tmp_path / "with-keys"), resume=True, report=False)
    assert np.array_equal(_weights(again.model), w)


def test_the_keys_are_private_and_in_nothing_released(tmp_path, dp_run):
    run = tmp_path / "run"
    privmed.run(dp_config(privacy__mode="central", privacy__epsilon=20.0, privacy__delta=0.01,
                          privacy__max_grad_norm=0.5), run)
    dp = dp_run[0]
    # central mode's noise too comes from each site's key: the coordinator holds none
    assert not (run / "private" / "coordinator").exists()
    keys = [k for d in (run, dp) for k in sorted((d / "private" / "sites").glob("*/secret.key"))]
    assert len(keys) == 6
    for d in (run / "private", dp / "private"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700 and (d / "NEVER-SHARE.txt").is_file()
    secrets = []
    for k in keys:
        assert stat.S_IMODE(k.stat().st_mode) == 0o600
        hexkey = [ln for ln in k.read_text().splitlines() if not ln.startswith("#")][0]
        secrets += [hexkey.encode(), bytes.fromhex(hexkey)]
    released = [f for d in (run, dp) for f in d.rglob("*") if f.is_file() and "private" not in f.parts]
    assert any(f.name == "model.pt" for f in released) and any(f.suffix == ".pt" for f in released)
    for f in released:
        data = f.read_bytes()
        assert not any(s in data for s in secrets), f


@pytest.fixture
def hospital(tmp_path):
    """site-1 of a 2-round DP run (noise calibrated to spend epsilon 4 over 2 rounds), as a
    hospital builds it, with its state in tmp_path/state."""
    cfg = validate_config(dp_config())
    client = prepare_site(cfg, "site-1", tmp_path / "state")
    return client, [v.detach().numpy().copy() for v in client.site.model.state_dict().values()]


def _task(weights, shift: float = 0.0) -> TrainTask:
    """site-1's instruction to train from `weights` (+ `shift`)."""
    return TrainTask("site-1", [w + np.float32(shift) for w in weights])


def test_a_site_refuses_a_second_release_of_a_round_and_replays_an_identical_one(hospital):
    client, model = hospital
    first = client.train(Instruction(_task(model), 1, run="r"))
    again = client.train(Instruction(_task(model), 1, run="r"))  # a retry: the same reply, counted once
    assert all(np.array_equal(a, b) for a, b in zip(first.weights, again.weights))
    assert [r for r, _ in client.guard.ledger.releases_of("r")] == [1]
    with pytest.raises(SiteRefused, match="already released that round for other weights"):
        client.train(Instruction(_task(model, 0.01), 1, run="r"))
    assert [r for r, _ in client.guard.ledger.releases_of("r")] == [1]


def test_a_site_refuses_another_purpose_under_dp(hospital):
    client, model = hospital
    with pytest.raises(SiteRefused, match="refused 'finetune'.*trains only for the rounds"):
        client.train(Instruction(_task(model), 1, run="r", steps=3, purpose="finetune"))
    assert client.guard.ledger.releases == []


def test_a_site_refuses_a_round_past_its_budget_and_its_state_outlives_it(hospital, tmp_path):
    client, model = hospital
    client.train(Instruction(_task(model), 1, run="r"))
    client.train(Instruction(_task(model), 2, run="r"))
    spent = client.guard.ledger.epsilon
    assert 3.5 < spent <= 4.0
    with pytest.raises(SiteRefused, match=r"site 'site-1' refused round 3 of run r: .*past its budget 4"):
        client.train(Instruction(_task(model), 3, run="r"))
    # another run, or the same hospital restarted: its ledger is its own, and still full
    restarted = prepare_site(validate_config(dp_config()), "site-1", tmp_path / "state")
    assert restarted.guard.ledger.epsilon == pytest.approx(spent)
    with pytest.raises(SiteRefused, match="past its budget"):
        restarted.train(Instruction(_task(model), 1, run="another-run"))


def test_nothing_computed_outside_the_mechanism_leaves_a_private_site(hospital):
    client, model = hospital
    update = client.train(Instruction(_task(model), 1, run="r"))
    assert math.isnan(update.metrics["train_loss"])
    assert set(update.metrics) == {"train_loss", "sample_gradient_steps", "optimizer_steps"}
    # the release it made travels beside the metrics, for the coordinator's ledger: public numbers
    assert update.release is not None and update.release.steps == update.metrics["optimizer_steps"]


def test_a_refusal_reaches_the_coordinator_in_process(tmp_path):
    """The coordinator plans 3 rounds; the hospitals' own configs allow one round's epsilon at the
    same fixed noise. Each checks the whole run before its first release and says no then, with
    how many rounds it can afford, instead of spending round 1 and refusing round 2."""
    over = dict(privacy__noise_multiplier=1.0, privacy__epsilon=None, federation__rounds=3)
    cfg = validate_config(dp_config(**over))
    own = validate_config(dp_config(**{**over, "federation__rounds": 1}))  # budget: one round's epsilon
    grid = LocalGrid(_hospitals(cfg, tmp_path, own))
    refused = (r"site 'site-1' refused round 1 of run .*: the whole run it was set up for, 3 rounds .* past "
               r"its budget .* it can afford 1 such round: ask for fewer rounds or more noise")
    with in_process_identity(), pytest.raises(SiteRefused, match=refused):
        privmed.run(cfg, tmp_path / "run", sites=FlowerSites(cfg, grid, connect_timeout=5))
    for name in cfg.sites.site_names():  # nothing was released, so nothing was spent
        ledger = SiteLedger.load(tmp_path / name / SITE_LEDGER_FILE)
        assert ledger.releases == [] and ledger.scorings == []


def test_a_refusal_reaches_the_coordinator_under_secagg_too(tmp_path):
    """The same refusal in a SecAgg+ round: Flower's workflow drops a site whose reply is an error
    without saying why (the coordinator said only 'too few sites answered'); the hospital's own
    reason now reaches the coordinator, and nothing was released."""
    over = dict(privacy__noise_multiplier=1.0, privacy__epsilon=None, federation__rounds=3,
                federation__secure_aggregation=True)
    cfg = validate_config(dp_config(**over))
    own = validate_config(dp_config(**{**over, "federation__rounds": 1}))
    # the sites' errors come back as a deployment's coordinator gets them: as error replies
    grid = LocalGrid(_hospitals(cfg, tmp_path, own), errors_as_replies=True)
    refused = r"site 'site-\d' refused round 1 of run .*: the whole run it was set up for, 3 rounds"
    with in_process_identity(), pytest.raises(SiteRefused, match=refused):
        privmed.run(cfg, tmp_path / "run", sites=FlowerSites(cfg, grid, connect_timeout=5))
    for name in cfg.sites.site_names():
        assert SiteLedger.load(tmp_path / name / SITE_LEDGER_FILE).releases == []


def test_a_refusal_comes_back_through_the_relay_of_a_hospitals_supernode(hospital, tmp_path):
    client, model = hospital
    sock = tmp_path / "sock" / "site-1.sock"
    serve_site(SiteEndpoint(client), sock)
    relay = RelayEndpoint(str(sock))
    facts = relay.describe()
    assert facts["site"] == "site-1" and facts["n_train"] == client.site.n_train and "data" not in facts
    assert facts["n_patients"] == client.site.n_train and facts["patient_ids"] is True  # phantom: one each
    ins = Instruction(_task(model), 1, run="r", steps=2, purpose="finetune")
    with pytest.raises(RuntimeError) as e:
        relay.train(M.encode_instruction(ins))
    # as Flower's ClientApp runner reports the relay's exception to the coordinator
    reason = str(type(e.value)) + ":<'" + str(e.value) + "'>"
    assert refusal(reason).startswith("site 'site-1' refused 'finetune' for round 1 of run r")
    assert refusal("<class 'ConnectionError'>:<'the site's process is not listening'>") is None


def test_central_dp_noise_comes_from_the_sites_keys(tmp_path):
    cfg = dp_config(privacy__mode="central", privacy__epsilon=20.0, privacy__delta=0.01,
                    privacy__max_grad_norm=0.5, federation__rounds=1)
    a = privmed.run(cfg, tmp_path / "a", report=False)
    b = privmed.run(cfg)  # same seed, another server key
    assert not np.array_equal(_weights(a.model), _weights(b.model))
    c = privmed.run(cfg, copy_keys(tmp_path / "a", tmp_path / "c"), resume=True, report=False)
    assert np.array_equal(_weights(a.model), _weights(c.model))


def test_central_dp_with_secure_aggregation_leaves_room_for_the_rounding():
    """What enters the secure sum is the site's quantised contribution: its norm must stay within
    the clip the server's noise is calibrated to, rounding included."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    from privmed.errors import ConfigError
    from privmed.federation.experiment import prepare_experiment
    from privmed.federation.strategies import contribution

    over = dict(sites__count=3, federation__secure_aggregation=True, privacy__mode="central",
                privacy__noise_multiplier=1.0, privacy__epsilon=None, privacy__max_grad_norm=0.05,
                federation__secagg_clipping_range=1.0)
    with pytest.raises(ConfigError, match=r"secagg_quantization_bits: 8 rounds each site's update by up to .*"
                       r"allowed: \d+ bits or more"):
        prepare_experiment(validate_config(tiny_config(**over, federation__secagg_quantization_bits=8)))
    exp = prepare_experiment(validate_config(tiny_config(**over, federation__secagg_quantization_bits=14)))
    s, clip = exp.strategy, 0.05
    assert 0 < s.rounding_bound < clip / 2 and s.secure_clip == pytest.approx(clip - s.rounding_bound)
    rng = np.random.default_rng(0)
    np.random.seed(0)  # Flower's stochastic rounding draws from numpy's global generator
    sent = exp.initial_weights
    worst = 0.0
    for _ in range(20):
        trained = [w + rng.normal(0, 1, w.shape).astype(w.dtype) for w in sent]
        c = contribution(sent, trained, s.secure_clip)
        bits = exp.config.federation.secagg_quantization_bits
        q = dequantize(quantize(c, 1.0, 2**bits), 1.0, 2**bits)
        worst = max(worst, float(np.sqrt(sum(np.sum(x * x) for x in q))))
    assert worst <= clip
    # without the room the rounding takes, the clipped contribution would pass the clip
    c = contribution(sent, [w + rng.normal(0, 1, w.shape).astype(w.dtype) for w in sent], clip)
    q = dequantize(quantize(c, 1.0, 2**bits), 1.0, 2**bits)
    assert float(np.sqrt(sum(np.sum(x * x) for x in q))) > clip


def test_privacy_spent_reads_a_hospitals_own_ledger(dp_run):
    import subprocess
    import sys

    state = dp_run[0] / "private" / "sites" / "site-2"
    r = subprocess.run([sys.executable, "-m", "privmed", "privacy", "spent", str(state)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from privmed.privacy.figures import format_epsilon
    from privmed.privacy.site_ledger import SiteLedger

    own = SiteLedger.load(state / "site_ledger.json")
    assert "site 'site-2', its own privacy ledger" in r.stdout
    assert "budget 4 for each group of patients" in r.stdout
    assert f"training patients: epsilon {format_epsilon(own.epsilon)} spent, over 2 release(s)" in r.stdout
    assert len([ln for ln in r.stdout.splitlines() if " train " in ln]) == 2  # one row per round
    # the second line: its validation patients scored in both rounds, its test patients once
    assert f"validation patients: epsilon {format_epsilon(own.scoring_epsilon('val'))}" in r.stdout
    assert [s.split for s in own.scorings] == ["val", "val", "test"]


def test_the_plan_needs_only_the_sites_public_facts():
    """A coordinator plans from what the sites tell it (counts, the data's shape): the same model,
    initial weights and privacy plan as the simulation that holds the data."""
    from privmed.federation.experiment import remote_experiment

    cfg = validate_config(dp_config())
    exp = prepare_experiment(cfg)
    described = {name: Hospital.rehearsal(cfg, name).describe() for name in exp.trainer_names}
    remote = remote_experiment(cfg, described)
    plan = remote.plan
    assert plan.privacy.to_dict() == exp.privacy.to_dict()
    assert all(np.array_equal(a, b) for a, b in zip(plan.initial_weights, exp.initial_weights))
    assert plan.privacy.unit == "patient" and plan.trainers == exp.plan.trainers
    assert plan.data == exp.plan.data
    assert remote.public_test is None and remote.site_data == []  # the sites hold the test data


def test_the_coordinator_plans_from_what_the_hospitals_report():
    """A hospital with more patients than a simulation of the config would give it: the plan's
    sample rate for it follows its own count, and the run completes."""
    cfg = validate_config(dp_config(federation__rounds=1))
    other = validate_config(dp_config(data__samples_per_site=140, federation__rounds=1))
    apps = _hospitals(cfg)
    apps[2002] = make_client_app(lambda _ctx, e=SiteEndpoint(Hospital.rehearsal(other, "site-2")): e)
    ours = next(p for p in prepare_experiment(cfg).plan.trainers if p.name == "site-2").n_patients
    theirs = Hospital.rehearsal(other, "site-2").profile.n_patients
    assert theirs > ours
    with in_process_identity():
        sites = FlowerSites(cfg, LocalGrid(apps), connect_timeout=5)
        result = privmed.run(cfg, sites=sites, report=False)
    planned = result.summary["privacy"]["plan"]["site-2"]
    assert planned["n_patients"] == theirs
    assert planned["sample_rate"] == pytest.approx(32 / theirs)


def test_fine_tuned_models_stay_at_the_sites(tmp_path):
    """federation.finetune_steps: each site scores its fine-tuned model on its own test data and
    only the metrics come back, in process and over Flower messages (the same figures)."""
    cfg = validate_config(tiny_config(federation__rounds=1, federation__finetune_steps=3))
    a = privmed.run(cfg, report=False)
    grid = LocalGrid(_hospitals(cfg))
    grid.seen = []
    with in_process_identity():
        b = privmed.run(cfg, sites=FlowerSites(cfg, grid, connect_timeout=5), report=False)
    for site, row in a.summary["sites"].items():
        assert row["test_finetuned"] and row["test_finetuned"] == b.summary["sites"][site]["test_finetuned"]
        assert row["test_finetuned"] != row["test"]
    assert a.summary["test_finetuned_mean_over_sites"] == b.summary["test_finetuned_mean_over_sites"]
    finetune_replies = [m for m in grid.seen if m.metadata.group_id.startswith("finetune")]
    assert len(finetune_replies) == 3
    for m in finetune_replies:  # metrics only: no array of the fine-tuned model reaches the coordinator
        assert M.decode_scores(m.content)[1]["n"] > 0  # refuses a reply that carries arrays
    from privmed.federation.strategies import SiteUpdate

    weights = [np.ones(3, dtype=np.float32)]
    with pytest.raises(ValueError, match="carries arrays"):
        M.decode_scores(M.encode_update(SiteUpdate("site-1", weights, 5), weights, 5))

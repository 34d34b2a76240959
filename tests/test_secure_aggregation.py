"""Secure aggregation (Flower's SecAgg+) in one process, and the Flower message path.

Invariants checked: the unmasked aggregate equals plain aggregation within the quantisation bound;
nothing the coordinator receives is a site's plaintext update (the masked vectors are uniform
modulo 2^32, while a quantised plaintext lies below 2^bits); a site that dies mid-round is
dropped and the round completes with the others, or is retried; and the Flower message path
(`FlowerSites` over an in-memory Grid, sites built as a hospital builds its own) gives the
in-process runner's result bit for bit.
"""

import json

import numpy as np
import pytest
from conftest import copy_keys, tiny_config
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat

import privmed
from privmed.config import validate_config
from privmed.errors import ConfigError
from privmed.federation.client import LEDGER_FILE as SITE_LEDGER_FILE
from privmed.federation.experiment import prepare_experiment
from privmed.federation.hospital import Hospital
from privmed.federation.flower.coordinator import FlowerSites
from privmed.federation.flower import messages as M
from privmed.federation.flower.secagg import (
    LocalGrid, SecAggError, in_process_identity, quantization_bound, secure_stage,
)
from privmed.federation.flower.site_app import make_client_app
from privmed.federation.flower.site_service import SiteEndpoint
from privmed.federation.runner import RoundFailed
from privmed.federation.strategies import GLOBAL, TrainTask, contribution
from privmed.federation.transport import InProcessSites, StageFailed
from privmed.privacy.site_ledger import SiteLedger

BITS = 22


def _cfg(**over):
    base = dict(
        sites__count=4, sites__partition="quantity", sites__alpha=2.0, data__samples_per_site=80,
        federation__secure_aggregation=True,
    )
    base.update(over)
    return validate_config(tiny_config(**base))


def _plain_mean(exp, tasks, weighting, clip):
    """The weighted mean of the sites' contributions, computed in the clear (the reference)."""
    contribs, weights = [], []
    for t in tasks:
        upd = exp.trainers[t.site].train(t, 1)
        contribs.append(contribution(t.weights, upd.weights, clip))
        weights.append(upd.n_samples if weighting == "samples" else 1)
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    return [sum(wi * c[j] for wi, c in zip(w, contribs)) for j in range(len(contribs[0]))], weights


@pytest.mark.parametrize("privacy", [None, "central"])
def test_secure_mean_equals_plain_mean_within_the_quantisation_bound(privacy):
    # central: each site adds its own noise share; a negligible one here (1e-6 x C per entry, far
    # below the quantisation bound), as this checks the secure sum's arithmetic
    over = {} if privacy is None else dict(privacy__mode="central", privacy__noise_multiplier=1e-6,
                                          privacy__max_grad_norm=0.1)
    exp = prepare_experiment(_cfg(**over))
    s = exp.strategy
    tasks = s.configure(s.init_state(exp.initial_weights, exp.trainer_names), exp.trainer_names)
    ref, weights = _plain_mean(exp, tasks, s.secure_weighting, s.secure_clip)
    assert len(set(weights)) > 1 or privacy  # unequal weights: the weighting is exercised
    out = InProcessSites(exp).train_stage(tasks, 1, s, "run")
    assert out.secure is not None and sorted(out.sites) == sorted(exp.trainer_names)
    assert all(r.weights == [] for r in out.updates)  # reports only: no site's weights
    bound = quantization_bound(weights, exp.config.federation.secagg_clipping_range, BITS)
    err = max(float(np.max(np.abs(a - b))) for a, b in zip(out.secure.mean, ref))
    assert err <= bound, (err, bound)
    assert bound < 1e-4
    moved = max(float(np.max(np.abs(a))) for a in ref)
    assert moved > 100 * bound  # the updates are far larger than the error: the check has teeth
    if privacy == "central":  # the sites clipped below C by the rounding bound: the sum's norm,
        # rounding included, is at most n x C
        total = np.sqrt(sum(float(np.sum((len(tasks) * m) ** 2)) for m in out.secure.mean))
        assert total <= len(tasks) * 0.1


def test_the_coordinator_never_receives_a_plaintext_update():
    exp = prepare_experiment(_cfg())
    sites = InProcessSites(exp)
    grid, _ = sites._local_grid()
    grid.seen = []
    s = exp.strategy
    tasks = s.configure(s.init_state(exp.initial_weights, exp.trainer_names), exp.trainer_names)
    plain = {t.site: exp.trainers[t.site].train(t, 1).weights for t in tasks}
    sites.train_stage(tasks, 1, s, "run")
    masked = []
    for reply in grid.seen:
        content = reply.content
        for record in content.array_records.values():  # the mod empties the weights' record
            assert len(record) == 0
        cfg = content.config_records.get(RECORD_KEY_CONFIGS, {})
        for b in cfg.get(Key.MASKED_PARAMETERS, []):
            masked.append(bytes_to_ndarray(b).astype(np.float64).ravel())
    assert len(masked) == len(tasks) * (len(plain[tasks[0].site]) + 1)  # + the weight factor
    values = np.concatenate(masked)
    # A quantised plaintext entry is below 2^bits (times the sites' weight); masked entries are
    # uniform on [0, 2^32): almost all lie above 2^24.
    assert np.mean(values > 2**24) > 0.99
    assert abs(values.mean() / 2**31 - 1) < 0.02
    flat = {k: np.concatenate([np.ravel(a) for a in w]) for k, w in plain.items()}
    for v in masked:
        for w in flat.values():
            if v.size == w.size:
                assert not np.allclose(v, w, atol=1e-3)


class _DyingGrid(LocalGrid):
    """A LocalGrid whose node `victim` stops answering at its `at`-th message (1-based)."""

    def __init__(self, apps, victim, at):
        super().__init__(apps)
        self.victim, self.at, self.count = victim, at, 0

    def pull_messages(self, message_ids):
        ids = list(message_ids)
        for mid in ids:
            if self._pending[mid].metadata.dst_node_id == self.victim:
                self.count += 1
                if self.count >= self.at:
                    self.drop.add(self.victim)
        return super().pull_messages(ids)


def site_ledger(state):
    return SiteLedger.load(state / SITE_LEDGER_FILE)


def run_id(run_dir):
    return json.loads((run_dir / "run.json").read_text())["run_id"]


def _flower_sites(cfg, grid_cls=LocalGrid, state=None, **grid_kw):
    """Hospitals as `privmed join` builds them (their own state under `state`/NAME, or in memory)
    behind a LocalGrid, and the coordinator's FlowerSites over it."""
    apps = {}
    for i, name in enumerate(cfg.sites.site_names()):
        endpoint = SiteEndpoint(Hospital.rehearsal(cfg, name, None if state is None else state / name))
        apps[2001 + i] = make_client_app(lambda _ctx, e=endpoint: e)
    grid = grid_cls(apps, **grid_kw)
    return grid, lambda: FlowerSites(cfg, grid, connect_timeout=5)


# its messages: 1 'which site', 2 the run's setup, then SecAgg+'s setup, share keys, collect masked
# vectors, unmask, then scoring; it dies at share keys, collect masked vectors or unmask
@pytest.mark.parametrize("at", [4, 5, 6])
def test_a_site_dying_mid_round_is_dropped_and_the_round_completes(at):
    cfg = _cfg(sites__count=5, federation__min_sites=3, federation__rounds=1)
    grid, sites = _flower_sites(cfg, _DyingGrid, victim=2003, at=at)
    with in_process_identity():
        result = privmed.run(cfg, sites=sites())
    assert result.summary["rounds_completed"] == 1
    exp = prepare_experiment(cfg)
    s = exp.strategy
    state = s.init_state(exp.initial_weights, exp.trainer_names)
    tasks = s.configure(state, exp.trainer_names)
    if at == 6:  # its masked update was in the sum before it died: SecAgg+ keeps it
        kept = tasks
    else:
        kept = [t for t in tasks if t.site != "site-3"]
    ref, weights = _plain_mean(exp, kept, "samples", None)
    expected = s.aggregate_secure(state, type("S", (), {"mean": ref, "reports": kept})(), 1)[GLOBAL]
    got = list(result.model.state_dict().values())
    bound = quantization_bound(weights, cfg.federation.secagg_clipping_range, BITS)
    err = max(float(np.max(np.abs(g.numpy() - e))) for g, e in zip(got, expected))
    assert err <= bound + 1e-6  # + float32 rounding of the model


def test_a_node_is_believed_only_for_the_site_its_key_was_registered_as():
    cfg = _cfg(sites__count=3, federation__rounds=1)
    grid, _ = _flower_sites(cfg)  # nodes 2001, 2002, 2003 serve site-1, site-2, site-3
    with in_process_identity():
        sites = FlowerSites(cfg, grid, connect_timeout=1,
                            registered={"site-1": 2001, "site-2": 2002, "site-3": 2003})
        assert sites.node_of == {"site-1": 2001, "site-2": 2002, "site-3": 2003}
        # site-2's and site-3's keys swapped: both nodes' word is refused
        with pytest.raises(StageFailed, match=r"missing: site-2, site-3.*node 2002 says it serves 'site-2', "
                           r"whose key is node 2003's"):
            FlowerSites(cfg, grid, connect_timeout=1, registered={"site-1": 2001, "site-2": 2003, "site-3": 2002})


class _LosingGrid(_DyingGrid):
    """Node `victim`'s reply to its `at`-th message is lost; it answers again afterwards."""

    def pull_messages(self, message_ids):
        try:
            return super().pull_messages(message_ids)
        finally:
            if self.victim in self.drop:
                self.drop.discard(self.victim)
                self.at = float("inf")


def test_a_sum_over_fewer_than_min_sites_is_never_unmasked(monkeypatch):
    # A site's masked update is lost (at collect masked vectors); 3 of 4 would satisfy SecAgg+'s
    # threshold, but min_sites is 4: were that sum unmasked and the round retried with all 4, the
    # coordinator would hold both sums and so, by their difference, the lost site's update.
    from privmed.federation.flower.secagg import _SecAggPlus

    unmasked = []
    real = _SecAggPlus.unmask_stage

    def counting(self, grid, context, state):
        unmasked.append(sorted(state.active_node_ids))
        return real(self, grid, context, state)

    monkeypatch.setattr(_SecAggPlus, "unmask_stage", counting)
    cfg = _cfg(sites__count=4, federation__min_sites=4, federation__rounds=1)
    grid, sites = _flower_sites(cfg, _LosingGrid, victim=2003, at=5)  # collect masked vectors
    with in_process_identity(), pytest.warns(UserWarning, match="starting round 1 again"):
        result = privmed.run(cfg, sites=sites())
    assert result.summary["rounds_completed"] == 1
    assert unmasked == [[2001, 2002, 2003, 2004]]  # one sum, over every site (the retry)


def test_a_round_with_too_few_sites_is_retried_then_the_run_stops(tmp_path):
    cfg = _cfg(sites__count=4, federation__min_sites=4, federation__rounds=2, federation__round_retries=1)
    # 'which site', the run's setup, round 1 (4 SecAgg+ stages), its scoring: dies at round 2's start
    grid, sites = _flower_sites(cfg, _DyingGrid, victim=2002, at=8)
    with in_process_identity(), pytest.warns(UserWarning, match="starting round 2 again"):
        with pytest.raises(RoundFailed, match="gave up after 2 attempts"):
            privmed.run(cfg, tmp_path / "run", sites=sites())
    # round 1 is in the run directory, to resume from
    assert (tmp_path / "run" / "checkpoints" / "round-0001.pt").is_file()
    assert not (tmp_path / "run" / "checkpoints" / "round-0002.pt").exists()


def test_a_failed_round_is_charged_to_the_ledger_and_counted_once_on_resume(tmp_path):
    from privmed.privacy.ledger import LEDGER_FILE, PrivacyLedger

    dp = dict(privacy__mode="dp-sgd", privacy__noise_multiplier=1.0, privacy__delta=1e-3,
              federation__local_steps=2, training__batch_size=16)
    cfg = _cfg(sites__count=4, federation__min_sites=4, federation__rounds=2, federation__round_retries=0,
               federation__secure_aggregation=False, **dp)
    sites = cfg.sites.site_names()
    # plain path: 'which site', the run's setup, round 1, its scoring, round 2: site-2 dies at
    # round 2, after the others trained
    hospitals = tmp_path / "hospitals"  # each hospital's own key and ledger, kept across both runs
    _, dying = _flower_sites(cfg, _DyingGrid, state=hospitals, victim=2002, at=5)
    with in_process_identity(), pytest.raises(RoundFailed, match="privacy ledger counts round 2 for every site"):
        privmed.run(cfg, tmp_path / "run", sites=dying())
    ledger = PrivacyLedger.load(tmp_path / "run" / LEDGER_FILE)
    assert {s: [r for r, _ in ledger.releases(s)] for s in sites} == {s: [1, 2] for s in sites}
    # the hospitals that trained round 2 counted it; site-2 died before it released round 2
    counted = {s: [r for r, _ in site_ledger(hospitals / s).releases_of(run_id(tmp_path / "run"))] for s in sites}
    assert counted == {"site-1": [1, 2], "site-2": [1], "site-3": [1, 2], "site-4": [1, 2]}

    _, alive = _flower_sites(cfg, state=hospitals)
    with in_process_identity():
        result = privmed.run(cfg, tmp_path / "run", resume=True, sites=alive())
    resumed = PrivacyLedger.load(tmp_path / "run" / LEDGER_FILE)
    assert {s: [r for r, _ in resumed.releases(s)] for s in sites} == {s: [1, 2] for s in sites}
    for s in sites:  # each hospital's own ledger agrees with the coordinator's: round 2 counted once
        assert site_ledger(hospitals / s).releases_of(run_id(tmp_path / "run")) == resumed.releases(s)
    # uninterrupted, with the same keys
    fresh = privmed.run(cfg, copy_keys(tmp_path / "run", tmp_path / "ref", hospitals), resume=True)
    assert result.summary["privacy"]["sites"] == fresh.summary["privacy"]["sites"]
    assert result.summary["test"] == fresh.summary["test"]


@pytest.mark.parametrize("over", [
    dict(federation__strategy="fedprox", federation__secure_aggregation=False),
    dict(federation__strategy="scaffold", training__optimizer="sgd", training__momentum=0,
         federation__secure_aggregation=False),
    dict(federation__secure_aggregation=False, privacy__mode="dp-sgd", privacy__noise_multiplier=1.0,
         privacy__delta=1e-3, federation__local_steps=2, training__batch_size=16),
    dict(federation__secure_aggregation=True),
])
def test_the_flower_message_path_gives_the_in_process_result(over, tmp_path):
    """Sites built as hospitals build them, reached through Flower messages, give the in-process
    runner's model bit for bit (secure aggregation: the same protocol, the same seeds; DP: the
    in-process run given the hospitals' keys)."""
    cfg = _cfg(**over)
    _, sites = _flower_sites(cfg, state=tmp_path / "hospitals")
    with in_process_identity():
        b = privmed.run(cfg, tmp_path / "b", report=False, sites=sites())
    a = privmed.run(cfg, copy_keys(tmp_path / "b", tmp_path / "a", tmp_path / "hospitals"), resume=True,
                    report=False)
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert np.array_equal(x.numpy(), y.numpy())
    assert a.summary["test"] == b.summary["test"]
    assert a.summary["privacy"] == b.summary["privacy"]
    assert (tmp_path / "a" / "metrics.jsonl").read_text().count("\n") == 2


def test_secure_runs_reproduce_with_the_same_seed():
    cfg = _cfg(federation__rounds=2)
    a, b = privmed.run(cfg), privmed.run(cfg)
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert np.array_equal(x.numpy(), y.numpy())
    assert a.summary["secure_aggregation"]["protocol"].startswith("SecAgg+")


@pytest.mark.parametrize("over, match", [
    (dict(federation__strategy="scaffold", training__optimizer="sgd", training__momentum=0),
     "control variate per site"),
    (dict(federation__strategy="cyclic"), "travels"),
    (dict(sites__count=2), "3 sites or more"),
    (dict(federation__secagg_threshold=4), r"a strict majority of secagg_shares \(4: more than 2\) and below it"),
    (dict(federation__secagg_threshold=2), r"threshold: 2 must be at least 2, a strict majority"),
    (dict(federation__secagg_shares=5), "more than sites.count"),
    (dict(federation__min_sites=2), "below secagg_threshold 3"),
    (dict(federation__secagg_quantization_bits=28, sites__count=40, data__samples_per_site=20),
     "overflows"),
    (dict(federation__secure_aggregation=False, federation__secagg_shares=3), "needs federation.secure_aggregation"),
])
def test_bad_secure_aggregation_settings_are_refused(over, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**over)


# ---------------------------------------------------------------------------- the sites' own checks
# A site answers a SecAgg+ request only if it fits the rest of its session (site_app.secagg_checks_mod);
# tests/redteam/test_secagg_lying_coordinator.py shows what each refusal protects. Here: stub sites
# that train instantly, driven by privmed's own workflow up to the unmask stage, then sent requests.

class _InstantSite:
    def train(self, content):
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.full(4, 0.25)]), 1,
                     {"site": "s", "model_key": GLOBAL, "n_samples": 1})
        return compat.fitres_to_recorddict(res, keep_input=True), 7


def _stub_grid(n):
    grid = LocalGrid({3001 + i: make_client_app(lambda _ctx, e=_InstantSite(): e) for i in range(n)})
    grid.seen = []
    return grid


def _send(grid, nid, stage, **values):
    cfg = ConfigRecord({Key.STAGE: stage, **values})
    with in_process_identity():
        (reply,) = grid.send_and_receive([Message(RecordDict({RECORD_KEY_CONFIGS: cfg}), nid, MessageType.TRAIN,
                                                  group_id="1")])
    return reply


def _until_unmask(grid, monkeypatch):
    """Run privmed's workflow over `grid`'s sites up to the unmask stage; its state then."""
    from privmed.federation.flower import secagg

    held = {}

    class Halt(secagg._SecAggPlus):
        def unmask_stage(self, grid, context, state):
            held["state"] = state
            return False

    monkeypatch.setattr(secagg, "_SecAggPlus", Halt)
    cfg = _cfg(sites__count=len(grid.apps))
    tasks = [TrainTask(site=f"s{i}", weights=[np.zeros(4)]) for i in range(len(grid.apps))]
    shares, threshold = cfg.secagg_shares_threshold
    with in_process_identity(), pytest.raises(SecAggError):
        secure_stage(grid, {t.site: 3001 + i for i, t in enumerate(tasks)}, tasks, 1, "run", cfg.federation,
                     shares, threshold, n_samples={t.site: 1 for t in tasks}, weighting="uniform", clip=None)
    assert not any(m.has_error() for m in grid.seen)
    return held["state"]


def _refused(reply, why):
    return reply.has_error() and why in reply.error.reason and not reply.has_content()


@pytest.mark.parametrize("lie, why", [
    (lambda me, other: ([me, other], [other]), "both active and dropped"),
    (lambda me, other: ([other], [me]), "named dropped or not active"),
    (lambda me, other: ([other, 3003], []), "named dropped or not active"),
    (lambda me, other: ([me, 3003], []), "must be named once"),  # a partner left out
    (lambda me, other: ([me, other, 3003, 9999], []), "must be named once"),  # a node it never met
    (lambda me, other: ([me, other, other, 3003], []), "named twice"),
])
def test_a_site_refuses_unmask_lists_it_cannot_have_been_sent_honestly(lie, why, monkeypatch):
    grid = _stub_grid(3)
    _until_unmask(grid, monkeypatch)
    active, dead = lie(3001, 3002)
    reply = _send(grid, 3001, Stage.UNMASK, **{Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead})
    assert _refused(reply, why), reply.error if reply.has_error() else reply.content
    # the session is over for this site: the honest request now gets nothing either
    honest = {Key.ACTIVE_NODE_ID_LIST: [3001, 3002, 3003], Key.DEAD_NODE_ID_LIST: []}
    assert _refused(_send(grid, 3001, Stage.UNMASK, **honest), "aborted")


def test_a_site_answers_the_honest_unmask_lists_once(monkeypatch):
    grid = _stub_grid(3)
    _until_unmask(grid, monkeypatch)
    honest = {Key.ACTIVE_NODE_ID_LIST: [3001, 3002, 3003], Key.DEAD_NODE_ID_LIST: []}
    reply = _send(grid, 3002, Stage.UNMASK, **honest)
    assert not reply.has_error()
    assert reply.content.config_records[RECORD_KEY_CONFIGS][Key.NODE_ID_LIST] == [3001, 3002, 3003]
    assert _refused(_send(grid, 3002, Stage.UNMASK, **honest), "follows collect_masked_vectors")


def _setup(shares, threshold, modulus=2**32):
    return {Key.SAMPLE_NUMBER: shares, Key.SHARE_NUMBER: shares, Key.THRESHOLD: threshold,
            Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 2**22, Key.MOD_RANGE: modulus, Key.MAX_WEIGHT: 1.0}


@pytest.mark.parametrize("shares, threshold, modulus, why", [
    (5, 2, 2**32, "not a strict majority"),
    (4, 2, 2**32, "not a strict majority"),
    (2, 2, 2**32, "at least 3"),
    (3, 2, 2, "modulo 2^32"),
    (3, 2, None, None),  # privmed's setup for 3 sites: accepted
    (5, 3, None, None),
])
def test_a_site_refuses_a_setup_without_a_majority_threshold(shares, threshold, modulus, why):
    grid = _stub_grid(1)
    reply = _send(grid, 3001, Stage.SETUP, **_setup(shares, threshold, modulus or 2**32))
    if why is None:
        assert not reply.has_error() and Key.PUBLIC_KEY_1 in reply.content.config_records[RECORD_KEY_CONFIGS]
    else:
        assert _refused(reply, why)


def test_a_site_refuses_more_keys_than_shares_and_key_shares_it_cannot_count():
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

    def pk():
        return public_key_to_bytes(generate_key_pairs()[1])

    grid = _stub_grid(1)
    own = _send(grid, 3001, Stage.SETUP, **_setup(3, 2)).content.config_records[RECORD_KEY_CONFIGS]
    keys = {"3001": [own[Key.PUBLIC_KEY_1], own[Key.PUBLIC_KEY_2]], **{str(n): [pk(), pk()] for n in (3002, 3003, 3004)}}
    assert _refused(_send(grid, 3001, Stage.SHARE_KEYS, **keys), "4 keys for 3 shares")

    for srcs, why in [([3002, 3002], "same node twice"), ([3002, 3009], "outside this site's key list"),
                      ([3001, 3002], "outside this site's key list"), ([], "threshold 2")]:
        _send(grid, 3001, Stage.SETUP, **_setup(3, 2))  # a new session
        own = grid.seen[-1].content.config_records[RECORD_KEY_CONFIGS]
        keys = {"3001": [own[Key.PUBLIC_KEY_1], own[Key.PUBLIC_KEY_2]], "3002": [pk(), pk()], "3003": [pk(), pk()]}
        assert not _send(grid, 3001, Stage.SHARE_KEYS, **keys).has_error()
        reply = _send(grid, 3001, Stage.COLLECT_MASKED_VECTORS,
                      **{Key.CIPHERTEXT_LIST: [b"x"] * len(srcs), Key.SOURCE_LIST: srcs})
        assert _refused(reply, why), srcs


def test_a_plain_request_for_a_secure_instruction_is_refused():
    trained = []

    class Site(_InstantSite):
        def train(self, content):
            trained.append(M.decode_instruction(content).secure)
            return super().train(content)

    grid = LocalGrid({3001: make_client_app(lambda _ctx: Site())})
    task = TrainTask(site="s", weights=[np.zeros(4)])
    for secure in (True, False):
        content = M.encode_instruction(M.Instruction(task, 1, run="run", secure=secure))
        with in_process_identity():
            (reply,) = grid.send_and_receive([Message(content, 3001, M.TRAIN_PLAIN, group_id="1")])
        assert reply.has_error() == secure
    assert trained == [False]  # the secure one never reached the site


def test_an_even_share_number_below_the_site_count_gives_a_sum():
    # Flower's workflow gives each site 5 neighbours for 4 shares, and would tell the sites 4
    grid = _stub_grid(5)
    cfg = _cfg(sites__count=5, federation__secagg_shares=4, federation__secagg_threshold=3)
    tasks = [TrainTask(site=f"s{i}", weights=[np.zeros(4)]) for i in range(5)]
    shares, threshold = cfg.secagg_shares_threshold
    with in_process_identity():
        out = secure_stage(grid, {t.site: 3001 + i for i, t in enumerate(tasks)}, tasks, 1, "run", cfg.federation,
                           shares, threshold, n_samples={t.site: 1 for t in tasks}, weighting="uniform", clip=None)
    assert not any(m.has_error() for m in grid.seen)
    assert np.allclose(out.mean[0], 0.25, atol=1e-5)  # every stub site sends 0.25


def test_the_coordinator_says_each_stage_as_it_begins(tmp_path):
    """FlowerSites tells its on_stage what the hospitals are asked to do, SecAgg+'s four stages
    by name, and the Flower ServerApp's writer puts the words where `privmed run --runner flower`
    reads them for its progress bar."""
    from privmed.cli.flower import _read_stage
    from privmed.federation.flower.deploy import STAGE_FILE
    from privmed.federation.flower.secagg import SECURE_STAGES
    from privmed.flower_server import stage_writer

    cfg = _cfg(sites__count=3, federation__rounds=1)
    _grid, make = _flower_sites(cfg)
    said = []
    with in_process_identity():
        sites = make()
        sites.on_stage = said.append
        privmed.run(cfg, sites=sites)
    secure = [f"round 1: {w}" for w in SECURE_STAGES.values()]
    assert said[:4] == secure and "1/4" in said[0] and "4/4" in said[3]
    assert said[4:] and set(said[4:]) == {"round 1: the hospitals score the models"}
    write = stage_writer(tmp_path)
    write(said[1])
    assert _read_stage(tmp_path / STAGE_FILE) == said[1] and not list(tmp_path.glob("*.tmp"))
    assert _read_stage(tmp_path / "missing") == ""

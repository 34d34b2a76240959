"""Red team: a coordinator that lies in SecAgg+ (Flower 1.41's protocol, as privmed runs it) to
unmask ONE hospital's update.

Each attack is written as the attacker would write it: a subclass of privmed's own SecAgg+
workflow that deviates where it pays, driving real privmed sites (their `SiteClient`s behind the
ClientApp a hospital runs, `make_client_app`) over a `LocalGrid`. What a site computed is recorded
at the site's endpoint, before SecAgg+ quantises and masks it, and compared with what the attacker
rebuilt from the masked vector it received.

In Flower's protocol, site T's masked vector is q_T + PRG(b_T) +- sum_j PRG(DH(sk1_T, pk1_j)) mod
2^32: b_T is T's self-mask seed, sk1_T its mask key, and each is Shamir-shared among T's neighbours
with threshold t. An honest coordinator asks each neighbour for b_T's share if T sent its vector,
or sk1_T's if T dropped, never both. A coordinator that holds b_T and, for each of T's mask partners
j, sk1_T or sk1_j, strips every mask from T's vector.

- (a) one unmask request naming T both active and dropped: each neighbour gives both of T's shares.
- (c) a threshold of 2 of 5 in the setup, then two neighbours told T is active and two that it
  dropped (different lists to different sites): 2 shares of each secret suffice.
- (b) different lists to different sites, under privmed's own majority threshold: forward T the
  key shares of only t-1 partners (so T masks with those alone), and tell every other site that
  those partners dropped: each site's lists are consistent with a dropout it cannot see.
- (d) substituted keys: nothing binds a public key to a hospital, so the coordinator hands T a key
  list whose other "hospitals" are keys it made itself; T's shares are encrypted to it.
- (e) two sums of one round over different sets of sites; their difference is T's update.

After privmed's site-side checks (`secagg_checks_mod`), (a) and (c) are refused by the sites
(and a control shows both succeed against Flower's mod alone). (b), (d) and (e) still succeed, and
no check a site can make alone in this protocol stops them: (d) and (e) need no lie a site could
see, and (b)'s lists are each consistent (with 5 sites or more; a search over every assignment of
lists shows none passes the checks with 3 or 4). They are the evidence that each hospital must
account for its own update as released with its own share of the noise only.

Last, what even a coordinator that follows the protocol can search: every mask is drawn from a
32-bit seed, a pairwise mask from a 28-bit one (benchmarks/secagg_mask_search.py recovers every
update of a 3-site round from what the protocol hands the coordinator).
See benchmarks/results/secagg_cheating_coordinator.md.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import tiny_config
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract, parameters_addition, parameters_mod, parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import (
    pseudo_rand_gen, share_keys_plaintext_concat, share_keys_plaintext_separate,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key, bytes_to_public_key, generate_key_pairs, private_key_to_bytes, public_key_to_bytes,
)

from privmed.config import validate_config
from privmed.federation.experiment import prepare_experiment
from privmed.federation.flower import secagg
from privmed.federation.flower.secagg import (
    LocalGrid, SecAggError, in_process_identity, quantization_bound, secure_stage,
)
from privmed.federation.flower.site_app import make_client_app
from privmed.federation.flower.site_service import SiteEndpoint
from privmed.federation.transport import site_client

HonestWorkflow = secagg._SecAggPlus  # privmed's coordinator, which each attacker extends
TARGET = 2003  # the hospital whose update the attacker wants (node ids 2001.. in site order)


# ---------------------------------------------------------------------------- the hospitals

class RecordingEndpoint:
    """A site's endpoint that keeps what the site handed to SecAgg+ (its contribution, before
    quantising and masking): the ground truth the attacker's result is compared with."""

    def __init__(self, inner: SiteEndpoint):
        self.inner, self.sent = inner, None

    def __getattr__(self, name):  # noqa: ANN001, ANN204
        return getattr(self.inner, name)

    def train(self, content):  # noqa: ANN001, ANN201
        reply, seed = self.inner.train(content)
        self.sent = [a.copy() for a in parameters_to_ndarrays(compat.recorddict_to_fitres(reply, True).parameters)]
        return reply, seed


class Federation:
    """`n` phantom hospitals behind a LocalGrid, one secure round's instructions, and the run's
    SecAgg+ settings."""

    def __init__(self, n: int):
        self.cfg = validate_config(tiny_config(
            sites__count=n, sites__partition="quantity", sites__alpha=2.0, data__samples_per_site=40,
            federation__secure_aggregation=True, federation__rounds=1,
        ))
        self.exp = prepare_experiment(self.cfg)
        s = self.exp.strategy
        self.tasks = s.configure(s.init_state(self.exp.initial_weights, self.exp.trainer_names), self.exp.trainer_names)
        self.node_of, apps, self.endpoints = {}, {}, {}
        clients = {name: site_client(self.exp, site, None) for name, site in self.exp.trainers.items()}
        for i, (name, client) in enumerate(clients.items()):
            nid = 2001 + i
            self.endpoints[nid] = RecordingEndpoint(SiteEndpoint(client))
            self.node_of[name] = nid
            apps[nid] = make_client_app(lambda _ctx, e=self.endpoints[nid]: e)
        self.grid = LocalGrid(apps)
        self.grid.seen = []

    def secure_round(self, monkeypatch, workflow: type, sites: list[int] | None = None):  # noqa: ANN201
        """One secure stage of round 1 under `workflow` (privmed's code path, with the attacker's
        workflow in place of privmed's); the sum, or SecAggError when the attacker halted it."""
        monkeypatch.setattr(secagg, "_SecAggPlus", workflow)
        tasks = [t for t in self.tasks if sites is None or self.node_of[t.site] in sites]
        shares, threshold = self.cfg.secagg_shares_threshold
        s = self.exp.strategy
        with in_process_identity():
            return secure_stage(
                self.grid, self.node_of, tasks, 1, "run", self.cfg.federation, shares, threshold,
                n_samples={p.name: p.n_train for p in self.exp.plan.trainers},
                weighting=s.secure_weighting, clip=s.secure_clip,
            )

    def sent_by(self, nid: int) -> list[np.ndarray]:
        """What site `nid` handed to SecAgg+ in its last secure round."""
        assert self.endpoints[nid].sent is not None, f"node {nid} was never asked to train"
        return self.endpoints[nid].sent

    def refusals(self) -> dict[int, str]:
        """The sites that answered a request with an error, and the error's text."""
        return {m.metadata.src_node_id: m.error.reason for m in self.grid.seen if m.has_error()}


# ---------------------------------------------------------------------------- the attacker's tools

def strip_masks(masked: list[np.ndarray], nid: int, self_seed: bytes, pair_keys: dict[int, bytes],
                mod_range: int) -> list[np.ndarray]:
    """Site `nid`'s quantised vector: its masked vector less its self mask (seed `self_seed`) and its
    pairwise masks (`pair_keys`: partner node id -> the pair's shared key), as the site added them."""
    shapes = [a.shape for a in masked]
    out = parameters_subtraction([a.astype(np.int64) for a in masked], pseudo_rand_gen(self_seed, mod_range, shapes))
    for j, key in pair_keys.items():
        mask = pseudo_rand_gen(key, mod_range, shapes)
        out = parameters_subtraction(out, mask) if nid > j else parameters_addition(out, mask)
    return parameters_mod(out, mod_range)


def contribution_from(quantised: list[np.ndarray], clipping_range: float, target_range: int) -> list[np.ndarray]:
    """The float contribution a site quantised: SecAgg+'s weight factor and values, undone."""
    factor, values = factor_extract(quantised)
    share = int(factor) / target_range
    return [v / share for v in dequantize(values, clipping_range, target_range)]


def level(quantised: list[np.ndarray], clipping_range: float, target_range: int) -> float:
    """One quantisation level of a site's contribution (the rounding error bound of each entry)."""
    factor, _ = factor_extract(quantised)
    return 2 * clipping_range / target_range / (int(factor) / target_range)


class LyingCoordinator(HonestWorkflow):
    """privmed's workflow with the attacker's tools: sees every reply (the grid's record), sends its
    own unmask requests, and rebuilds `TARGET`'s contribution into `loot` when it can."""

    loot: dict = {}

    def masked_vector_of(self, grid: LocalGrid, nid: int) -> list[np.ndarray]:
        masked = None
        for m in grid.seen:
            if m.metadata.src_node_id == nid and not m.has_error():
                cfg = m.content.config_records.get(RECORD_KEY_CONFIGS, {})
                if Key.MASKED_PARAMETERS in cfg:
                    masked = [bytes_to_ndarray(b) for b in cfg[Key.MASKED_PARAMETERS]]
        assert masked is not None, f"node {nid} sent no masked vector"
        return masked

    def ask_unmask(self, grid, lists: dict[int, tuple[list[int], list[int]]]) -> dict[int, Message]:  # noqa: ANN001
        """Send each node its (active, dead) lists; its reply, by node."""
        msgs = []
        for nid, (active, dead) in lists.items():
            cfg = ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: list(active),
                                Key.DEAD_NODE_ID_LIST: list(dead)})
            msgs.append(Message(RecordDict({RECORD_KEY_CONFIGS: cfg}), nid, MessageType.TRAIN, group_id="1"))
        return {m.metadata.src_node_id: m for m in grid.send_and_receive(msgs)}

    @staticmethod
    def shares_of(replies: dict[int, Message], lists: dict, owner: int, part: str) -> list[bytes]:
        """Every share of `owner`'s self-mask seed (part 'active') or mask key (part 'dead') that
        came back: in a reply, the shares follow the active list, then the dead list."""
        out = []
        for nid, reply in replies.items():
            if reply.has_error():
                continue
            active, dead = lists[nid]
            shares = reply.content.config_records[RECORD_KEY_CONFIGS][Key.SHARE_LIST]
            if part == "active" and owner in active:
                out.append(shares[active.index(owner)])
            elif part == "dead" and owner in dead:
                out.append(shares[len(active) + dead.index(owner)])
        return out

    def rebuild(self, grid, state, self_seed: bytes, pair_keys: dict[int, bytes]) -> None:  # noqa: ANN001
        q = strip_masks(self.masked_vector_of(grid, TARGET), TARGET, self_seed, pair_keys, state.mod_range)
        self.loot["update"] = contribution_from(q, state.clipping_range, state.quantization_range)
        self.loot["level"] = level(q, state.clipping_range, state.quantization_range)

    def honest_lists(self, state, nid: int) -> tuple[list[int], list[int]]:  # noqa: ANN001
        nb = state.nid_to_neighbours[nid]
        return (sorted(nb & state.active_node_ids),
                sorted(nb & (state.sampled_node_ids - state.active_node_ids)))


def pair_key(sk1: bytes, pk1: bytes) -> bytes:
    return generate_shared_key(bytes_to_private_key(sk1), bytes_to_public_key(pk1))


class OverlappingLists(LyingCoordinator):
    """(a) Every neighbour is told TARGET is both active and dropped, in one request."""

    def unmask_stage(self, grid, context, state) -> bool:  # noqa: ANN001
        lists = {}
        for nid in state.active_node_ids:
            active, dead = self.honest_lists(state, nid)
            lists[nid] = (active, sorted(set(dead) | {TARGET}))
        replies = self.ask_unmask(grid, lists)
        self.loot["replies"] = replies
        b, sk1 = self.shares_of(replies, lists, TARGET, "active"), self.shares_of(replies, lists, TARGET, "dead")
        if min(len(b), len(sk1)) >= state.threshold:
            sk1_t = combine_shares(sk1)
            partners = state.nid_to_neighbours[TARGET] - {TARGET}
            self.rebuild(grid, state, combine_shares(b),
                         {j: pair_key(sk1_t, state.nid_to_publickeys[j][0]) for j in partners})
        return False


class LowThresholdSplitLists(LyingCoordinator):
    """(c) A threshold of 2 in the setup; then half of TARGET's neighbours are told it is active,
    the other half that it dropped (each list on its own is well formed)."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        kwargs["reconstruction_threshold"] = 2
        super().__init__(*args, **kwargs)

    def unmask_stage(self, grid, context, state) -> bool:  # noqa: ANN001
        holders = sorted(state.active_node_ids - {TARGET})
        told_dead = set(holders[len(holders) // 2:])
        lists = {}
        for nid in holders:
            active, dead = self.honest_lists(state, nid)
            if nid in told_dead:
                active, dead = [a for a in active if a != TARGET], sorted(set(dead) | {TARGET})
            lists[nid] = (active, dead)
        replies = self.ask_unmask(grid, lists)
        self.loot["replies"] = replies
        b, sk1 = self.shares_of(replies, lists, TARGET, "active"), self.shares_of(replies, lists, TARGET, "dead")
        if min(len(b), len(sk1)) >= state.threshold:
            sk1_t = combine_shares(sk1)
            partners = state.nid_to_neighbours[TARGET] - {TARGET}
            self.rebuild(grid, state, combine_shares(b),
                         {j: pair_key(sk1_t, state.nid_to_publickeys[j][0]) for j in partners})
        return False


class FewPartnersSplitLists(LyingCoordinator):
    """(b) Under the run's own (majority) threshold t: TARGET is forwarded the key shares of only
    t-1 partners, so it masks with those alone; every other site is told those partners dropped
    (and TARGET is active). Each site's two lists are disjoint, name itself active and name exactly
    the nodes it masked with: a dropout the site cannot see from where it stands."""

    def share_keys_stage(self, grid, context, state) -> bool:  # noqa: ANN001
        ok = super().share_keys_stage(grid, context, state)
        keep = sorted(state.forward_srcs[TARGET])[: state.threshold - 1]
        pairs = [(s, c) for s, c in zip(state.forward_srcs[TARGET], state.forward_ciphertexts[TARGET]) if s in keep]
        state.forward_srcs[TARGET] = [s for s, _ in pairs]
        state.forward_ciphertexts[TARGET] = [c for _, c in pairs]
        self.loot["partners"] = set(keep)
        return ok

    def unmask_stage(self, grid, context, state) -> bool:  # noqa: ANN001
        partners = self.loot["partners"]
        lists = {}
        for nid in state.active_node_ids - {TARGET}:
            everyone = state.nid_to_neighbours[nid]  # the nodes nid masked with, and itself
            dead = sorted(partners - {nid})
            lists[nid] = (sorted(everyone - set(dead)), dead)
        replies = self.ask_unmask(grid, lists)
        self.loot["replies"] = replies
        b = self.shares_of(replies, lists, TARGET, "active")
        keys = {j: self.shares_of(replies, lists, j, "dead") for j in partners}
        if len(b) >= state.threshold and all(len(k) >= state.threshold for k in keys.values()):
            pk1_t = state.nid_to_publickeys[TARGET][0]
            self.rebuild(grid, state, combine_shares(b),
                         {j: pair_key(combine_shares(k), pk1_t) for j, k in keys.items()})
        return False


class SubstitutedKeys(LyingCoordinator):
    """(d) The setup goes to every site as usual; then TARGET alone is sent a key list in which
    every other "hospital" is a key pair the coordinator made, and key shares it forged from them.
    TARGET encrypts its own shares to the coordinator's keys, trains, and masks with them."""

    def share_keys_stage(self, grid, context, state) -> bool:  # noqa: ANN001
        others = sorted(state.active_node_ids - {TARGET})
        fake = {j: (generate_key_pairs(), generate_key_pairs()) for j in others}
        keys = {str(TARGET): state.nid_to_publickeys[TARGET]}
        keys.update({str(j): [public_key_to_bytes(k1[1]), public_key_to_bytes(k2[1])] for j, (k1, k2) in fake.items()})
        msg = Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({**keys, Key.STAGE: Stage.SHARE_KEYS})}),
                      TARGET, MessageType.TRAIN, group_id="1")
        (reply,) = grid.send_and_receive([msg])
        self.loot["replies"] = {TARGET: reply}
        if reply.has_error():
            return False
        pk2_t = bytes_to_public_key(state.nid_to_publickeys[TARGET][1])
        cfg = reply.content.config_records[RECORD_KEY_CONFIGS]
        b, sk1 = [], []
        for dst, ciphertext in zip(cfg[Key.DESTINATION_LIST], cfg[Key.CIPHERTEXT_LIST]):
            secret = fake[dst][1][0]  # the coordinator's own key 2 "of" dst
            _, _, b_share, sk1_share = share_keys_plaintext_separate(decrypt(generate_shared_key(secret, pk2_t), ciphertext))
            b.append(b_share)
            sk1.append(sk1_share)
        self.loot["secrets"] = combine_shares(b), combine_shares(sk1)
        # key shares "from" each invented hospital, for TARGET to accept in the next stage
        forged = create_shares(os.urandom(32), state.threshold, state.num_shares)[0]
        state.forward_srcs = {TARGET: others}
        state.forward_ciphertexts = {TARGET: [
            encrypt(generate_shared_key(fake[j][1][0], pk2_t), share_keys_plaintext_concat(j, TARGET, forged, forged))
            for j in others
        ]}
        state.active_node_ids = {TARGET}
        self.loot["fake_pk1"] = {j: public_key_to_bytes(k1[1]) for j, (k1, _) in fake.items()}
        return True

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:  # noqa: ANN001
        super().collect_masked_vectors_stage(grid, context, state)
        if "secrets" in self.loot and TARGET in state.active_node_ids:
            b, sk1 = self.loot["secrets"]
            self.rebuild(grid, state, b, {j: pair_key(sk1, pk1) for j, pk1 in self.loot["fake_pk1"].items()})
        return False


# ---------------------------------------------------------------------------- the attacks

def flower_only_app(endpoint) -> ClientApp:  # noqa: ANN001
    """The control: a site as privmed ran it before its own checks, Flower's secaggplus_mod alone
    around the same training handler."""
    app = ClientApp()

    @app.train(mods=[secaggplus_mod])
    def train(msg: Message, _ctx) -> Message:  # noqa: ANN001
        content, seed = endpoint.train(msg.content)
        np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
        return Message(content, reply_to=msg)

    return app


def recovered_error(fed: Federation, loot: dict) -> float:
    """How far the attacker's copy of TARGET's contribution is from what TARGET computed, in
    quantisation levels (at most 1 when the attacker has it, up to rounding)."""
    got, want = loot["update"], fed.sent_by(TARGET)
    assert [g.shape for g in got] == [w.shape for w in want]
    return max(float(np.max(np.abs(g - w))) for g, w in zip(got, want)) / loot["level"]


def assert_attacker_has_the_target(fed: Federation, loot: dict) -> None:
    assert "update" in loot, "the attacker could not rebuild the target's contribution"
    assert recovered_error(fed, loot) <= 1 + 1e-6
    want = fed.sent_by(TARGET)
    moved = max(float(np.max(np.abs(w))) for w in want) / loot["level"]
    assert moved > 100  # far more than the rounding: the comparison has teeth
    for nid in fed.endpoints:  # and it is TARGET's, not another site's nor the mean
        if nid != TARGET and fed.endpoints[nid].sent is not None:
            other = fed.sent_by(nid)
            assert max(float(np.max(np.abs(g - o))) for g, o in zip(loot["update"], other)) / loot["level"] > 100


@pytest.fixture
def federation():
    return Federation(5)


@pytest.mark.parametrize("attack", [OverlappingLists, LowThresholdSplitLists])
def test_control_flower_alone_gives_the_target_to_a_coordinator_that_lies(attack, monkeypatch, federation):
    """Against Flower's secaggplus_mod alone (the site as privmed ran it before), both lies
    rebuild the target's contribution to within one quantisation level."""
    fed = federation
    for nid in list(fed.grid.apps):
        fed.grid.apps[nid] = flower_only_app(fed.endpoints[nid])
    attack.loot = {}
    with pytest.raises(SecAggError):
        fed.secure_round(monkeypatch, attack)
    assert fed.refusals() == {}
    assert_attacker_has_the_target(fed, attack.loot)


def test_a_request_naming_the_target_both_active_and_dropped_is_refused(monkeypatch, federation):
    fed = federation
    OverlappingLists.loot = {}
    with pytest.raises(SecAggError):
        fed.secure_round(monkeypatch, OverlappingLists)
    replies = OverlappingLists.loot["replies"]
    assert len(replies) == 5 and all(r.has_error() for r in replies.values())
    assert all("both" in r.error.reason for r in replies.values())
    assert "update" not in OverlappingLists.loot


def test_a_setup_with_a_minority_threshold_is_refused(monkeypatch, federation):
    fed = federation
    LowThresholdSplitLists.loot = {}
    with pytest.raises(SecAggError):
        fed.secure_round(monkeypatch, LowThresholdSplitLists)
    refused = fed.refusals()
    assert sorted(refused) == sorted(fed.endpoints)  # every site, at the setup
    assert all("majority" in why for why in refused.values())
    assert "replies" not in LowThresholdSplitLists.loot  # nothing went further than the setup
    assert all(e.sent is None for e in fed.endpoints.values())  # no site trained


def test_different_lists_that_each_look_like_a_dropout_still_give_the_target(monkeypatch, federation):
    """(b) succeeds after the checks: with 5 sites and the majority threshold 3, the target masks
    with 2 partners; each other site is told those 2 dropped, which every check a site can make
    alone accepts. The residual a hospital's own accounting must cover."""
    fed = federation
    FewPartnersSplitLists.loot = {}
    with pytest.raises(SecAggError):
        fed.secure_round(monkeypatch, FewPartnersSplitLists)
    assert fed.refusals() == {}
    assert_attacker_has_the_target(fed, FewPartnersSplitLists.loot)


def test_keys_the_coordinator_substitutes_give_it_the_target(monkeypatch, federation):
    """(d) succeeds after the checks: SecAgg+ here has no key authentication, so the target cannot
    tell that every other "hospital" in its key list is the coordinator. The threshold, the share
    number and the lists are all as an honest round's."""
    fed = federation
    SubstitutedKeys.loot = {}
    with pytest.raises(SecAggError):
        fed.secure_round(monkeypatch, SubstitutedKeys)
    assert fed.refusals() == {}
    assert_attacker_has_the_target(fed, SubstitutedKeys.loot)
    assert [e.sent is not None for e in fed.endpoints.values()] == [nid == TARGET for nid in fed.endpoints]


def test_two_sums_of_one_round_give_the_target_by_their_difference(monkeypatch, federation):
    """(e) succeeds after the checks: privmed's own workflow, run twice for round 1, over every
    site and over every site but the target. A site cannot tell this from a retry."""
    fed = federation
    everyone = fed.secure_round(monkeypatch, HonestWorkflow)
    others = [nid for nid in fed.endpoints if nid != TARGET]
    sent = fed.sent_by(TARGET)
    without = fed.secure_round(monkeypatch, HonestWorkflow, sites=others)
    assert fed.refusals() == {}
    n = {fed.node_of[p.name]: p.n_train for p in fed.exp.plan.trainers}
    assert fed.exp.strategy.secure_weighting == "samples"
    w_all, w_t = sum(n.values()), n[TARGET]
    got = [(a * w_all - b * (w_all - w_t)) / w_t for a, b in zip(everyone.mean, without.mean)]
    r, bits = fed.cfg.federation.secagg_clipping_range, fed.cfg.federation.secagg_quantization_bits
    bound = (quantization_bound(list(n.values()), r, bits) * w_all
             + quantization_bound([n[j] for j in others], r, bits) * (w_all - w_t)) / w_t
    err = max(float(np.max(np.abs(g - s))) for g, s in zip(got, sent))
    assert err <= bound
    assert max(float(np.max(np.abs(s))) for s in sent) > 100 * bound


def lists_that_unmask_one_site(n: int, t: int) -> dict | None:
    """Per-site unmask lists, each passing every check a site makes, that give site 0's self-mask
    seed and, for each of its mask partners S, that partner's mask key (t shares each); None when
    there are none. Every site holds a share of every other's secrets (privmed's default), and the
    coordinator picks S (the partners whose key shares it forwards to site 0, at least t-1).
    Site 0's own mask key is no way in: t sites naming it dropped and t others naming it active
    would take 2t > n answers. A site h names a set dead among its partners, itself and the rest
    active (at least t of them), or is not asked."""
    from itertools import combinations, product

    nodes = range(n)
    for k in range(t - 1, n):
        for partners in map(set, combinations(range(1, n), k)):
            options = []
            for h in nodes:
                mine = partners if h == 0 else set(nodes) - {h}
                options.append([frozenset(d) for r in range(len(mine) + 2 - t) for d in combinations(sorted(mine), r)]
                               + [None])
            for choice in product(*options):
                asked = {h: d for h, d in enumerate(choice) if d is not None}
                if (sum(0 not in d for d in asked.values()) >= t
                        and all(sum(j in d for d in asked.values()) >= t for j in partners)):
                    return {"partners": sorted(partners), "dead": {h: sorted(d) for h, d in asked.items()}}
    return None


def test_per_site_lists_that_pass_every_check_need_5_sites():
    """Where (b) starts: with privmed's majority threshold, no per-site lists that the sites accept
    unmask a site of 3 or 4; with 5, some do (the ones FewPartnersSplitLists sends)."""
    assert lists_that_unmask_one_site(3, 2) is None
    assert lists_that_unmask_one_site(4, 3) is None
    found = lists_that_unmask_one_site(5, 3)
    assert found is not None and len(found["partners"]) == 2


# ---------------------------------------------------------------------------- what an honest coordinator holds

def _fold(seed: bytes) -> int:
    out = 0
    for i in range(0, len(seed), 4):
        out ^= int.from_bytes(seed[i:i + 4], "little")
    return out


def test_every_mask_is_one_of_2_to_the_32_and_a_pairwise_mask_one_of_2_to_the_28():
    """Why a coordinator that follows the protocol can search the masks: Flower's pseudo_rand_gen
    seeds numpy's RandomState with the XOR of the key's 4-byte words, and a pairwise key is base64
    text (ASCII: each byte below 128). benchmarks/secagg_mask_search.py uses this to recover every
    update of a 3-site round from what the protocol hands the coordinator. When Flower draws masks
    from the whole key, this test fails: then update that benchmark and the guarantee text."""
    shapes = [(1,), (3, 4)]
    for _ in range(20):
        key = pair_key(private_key_to_bytes(generate_key_pairs()[0]), public_key_to_bytes(generate_key_pairs()[1]))
        assert len(key) == 44 and _fold(key) & 0x80808080 == 0  # 28 bits
        other = bytearray(os.urandom(44))  # any other seed with the same fold gives the same mask
        other[:4] = (int.from_bytes(other[:4], "little") ^ _fold(bytes(other)) ^ _fold(key)).to_bytes(4, "little")
        assert bytes(other) != key and _fold(bytes(other)) == _fold(key)
        masks = pseudo_rand_gen(key, 2**32, shapes)
        assert all(np.array_equal(a, b) for a, b in zip(masks, pseudo_rand_gen(bytes(other), 2**32, shapes)))
        drawn = np.random.RandomState(_fold(key)).randint(0, 2**32 - 1, 13, dtype=np.int64)
        assert np.array_equal(np.concatenate([m.ravel() for m in masks]), drawn)

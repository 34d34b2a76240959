"""The mechanism as a hospital runs it, checked end to end from what leaves the hospital.

The shipped hospital-a (configs/deploy/hospital-a.yaml: DP-SGD required, budget 10) answers the
shipped coordinator's honest setup (dpcnn, plain SGD at lr 0.5 without momentum or weight decay,
one DP-SGD step a round) through its own endpoint, in Flower's message records. The coordinator
sends weights whose last layer's weights are zero: the loss then reaches no other coordinate (its
gradient there is the last layer's weights times something), so every patient's gradient is exactly
zero on the M "silent" coordinates of every other layer. On those, one plain-SGD step gives

    released - sent = -lr x noise / (q x n)

with q x n the expected batch (the ledger's sample rate times the site's patients): the release is
the site's noise alone, whatever DP-SGD does inside as long as it adds Gaussian noise of std
sigma x C to the clipped sum. sigma is read from the site's own ledger (site_ledger.json), C from the
setup the site was sent.

- The noise a site adds is sigma x C, round after round; releases made with half the noise fail.
- No two releases share noise: the difference of two releases has the variance of two independent
  draws; releases whose generator ignores the digest (the same noise twice), or made with half the
  noise, fail.
- A hospital that lost its cached reply replays it from its key, bit for bit and charged once, and
  still refuses any other request for that round.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
from redteam.hospital_endpoint import honest_setup, hospital, initial_weights, set_up, train
from scipy import stats
from torch import nn

from privmed.federation import site as site_module
from privmed.federation.client import SiteGuard
from privmed.federation.flower.site_service import SiteEndpoint
from privmed.federation.site import Site
from privmed.privacy.site_ledger import SiteLedger, SiteRefused

ROUNDS = 5  # honest releases: 5 scale checks, 10 pairwise difference checks
ALPHA = 1e-6  # the false-failure probability of each test, split evenly over its checks


@dataclass(frozen=True)
class Deployed:
    """The honest setup for hospital-a, the weights the coordinator sends (last layer's weights
    zero), the keys of the silent state entries, and the plain-SGD step's settings."""

    setup: object
    sent: list[np.ndarray]
    silent: list[int]  # positions in the state of the entries whose data gradient is zero
    lr: float
    clip: float


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, one_thread) -> Deployed:
    h = hospital(tmp_path_factory.mktemp("plan") / "state")
    setup = honest_setup(h)
    t, fed, p = setup.config["training"], setup.config["federation"], setup.config["privacy"]
    # the premises of "release = -lr x noise / (q x n)": one plain-SGD step, the same lr every round
    assert (t["optimizer"], t["momentum"], t["weight_decay"], t["lr_schedule"]) == ("sgd", 0.0, 0.0, "constant")
    assert setup.local_steps == 1 and setup.release[2] == 1 and fed.get("finetune_steps") in (None, 0)
    sent = initial_weights(h, setup)
    model = h.setup(setup).site.model
    names = list(model.state_dict())
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    sent[names.index(f"{last}.weight")][:] = 0.0
    silent = [i for i, n in enumerate(names) if not n.startswith(f"{last}.")]
    return Deployed(setup, sent, silent, float(t["lr"]), float(p["max_grad_norm"]))


def _endpoint(state, d: Deployed) -> SiteEndpoint:
    endpoint = SiteEndpoint(hospital(state))
    set_up(endpoint, d.setup)
    return endpoint


def _noise(endpoint: SiteEndpoint, d: Deployed, rnd: int, state) -> tuple[np.ndarray, float]:
    """The noise of the hospital's release for round `rnd` on the silent coordinates, (M,) float64
    in the units of the clipped sum, and sigma x C by the hospital's own ledger file."""
    released = train(endpoint, d.sent, rnd)
    ledger = SiteLedger.load(state / "site_ledger.json")
    (entry,) = [r for r in ledger.releases if r.round == rnd and r.run == "run-1"]
    expected_batch = entry.sample_rate * endpoint.describe()["n_patients"]
    change = np.concatenate([released[i].astype(np.float64).ravel() - d.sent[i].astype(np.float64).ravel()
                             for i in d.silent])
    return -change * expected_batch / d.lr, entry.noise_multiplier * d.clip


@dataclass(frozen=True)
class Verdict:
    """A statistic and the interval it falls in with probability 1 - alpha under the hypothesis."""

    statistic: float
    low: float
    high: float

    @property
    def holds(self) -> bool:
        return self.low <= self.statistic <= self.high


def scale_check(noise: np.ndarray, std: float, alpha: float) -> Verdict:
    """H0: `noise` is M independent N(0, std^2) draws. Then sum((noise / std)^2) is chi-square with
    M degrees of freedom; the check holds inside its central 1 - alpha interval (M ~ 26,000: about
    +-4.6% on the variance at alpha 2e-7, so half the noise, a quarter of the variance, is far out)."""
    m = noise.size
    s = float(np.sum((noise / std) ** 2))
    return Verdict(s / m, float(stats.chi2.ppf(alpha / 2, m)) / m, float(stats.chi2.isf(alpha / 2, m)) / m)


def centre_check(noise: np.ndarray, std: float, alpha: float) -> Verdict:
    """H0 as above: the mean over sqrt(M) std is N(0, 1); it holds within +-z(alpha / 2)."""
    z = float(stats.norm.isf(alpha / 2))
    return Verdict(float(noise.mean() / std * math.sqrt(noise.size)), -z, z)


def difference_check(a: np.ndarray, b: np.ndarray, std: float, alpha: float) -> Verdict:
    """H0: `a` and `b` are independent draws of N(0, std^2) each: a - b is N(0, 2 std^2)."""
    return scale_check(a - b, math.sqrt(2.0) * std, alpha)


def _scaled_noise(monkeypatch, factor: float) -> None:
    """DP-SGD at the site runs with `factor` x the noise multiplier its ledger records (the broken
    mechanism the checks must catch): the point where the multiplier reaches dp_train."""
    dp_train = site_module.dp_train

    def scaled(*args, noise_multiplier: float, **kw):  # noqa: ANN002, ANN003, ANN202
        return dp_train(*args, noise_multiplier=noise_multiplier * factor, **kw)

    monkeypatch.setattr(site_module, "dp_train", scaled)


def _releases(state, d: Deployed, rounds: int) -> tuple[list[np.ndarray], list[float]]:
    endpoint = _endpoint(state, d)
    out = [_noise(endpoint, d, rnd, state) for rnd in range(1, rounds + 1)]
    return [n for n, _ in out], [s for _, s in out]


@pytest.fixture(scope="module")
def honest(tmp_path_factory, deployed):
    """ROUNDS releases of hospital-a, rounds 1..ROUNDS of one run, from the same weights."""
    return _releases(tmp_path_factory.mktemp("honest") / "state", deployed, ROUNDS)


@pytest.fixture(scope="module")
def halved(tmp_path_factory, deployed):
    """Three releases made with half the noise multiplier that the hospital's ledger records."""
    with pytest.MonkeyPatch.context() as mp:
        _scaled_noise(mp, 0.5)
        return _releases(tmp_path_factory.mktemp("halved") / "state", deployed, 3)


def test_the_noise_a_hospital_adds_is_its_ledgers_sigma_times_c_round_after_round(deployed, honest, halved, tmp_path, monkeypatch):
    """Each of the ROUNDS releases passes the scale check (chi-square, central interval) and the
    centre check (normal), each at alpha = ALPHA / (2 ROUNDS): the probability that an honest
    hospital fails this test is at most ALPHA = 1e-6 (Bonferroni). Releases made with half the noise
    fail the scale check, every one of them."""
    noises, stds = honest
    setup_sigma = deployed.setup.release[0]
    assert stds == [setup_sigma * deployed.clip] * ROUNDS  # the ledger counts the setup's release, each round
    alpha = ALPHA / (2 * ROUNDS)
    for rnd, (noise, std) in enumerate(zip(noises, stds), start=1):
        assert noise.size > 20_000
        scale, centre = scale_check(noise, std, alpha), centre_check(noise, std, alpha)
        assert scale.holds, (rnd, scale)
        assert centre.holds, (rnd, centre)
    # negative control: half the noise, while the ledger still says sigma, is rejected every round
    for rnd, (noise, std) in enumerate(zip(*halved), start=1):
        assert std == setup_sigma * deployed.clip
        verdict = scale_check(noise, std, alpha)
        assert not verdict.holds and verdict.statistic == pytest.approx(0.25, rel=0.05), (rnd, verdict)
    # the premise: without noise the silent coordinates do not move at all (no data reaches them)
    _scaled_noise(monkeypatch, 0.0)
    (silent,), _ = _releases(tmp_path / "no-noise", deployed, 1)
    assert np.count_nonzero(silent) == 0


def test_no_two_releases_share_noise(deployed, honest, halved, tmp_path, monkeypatch):
    """Each pair of the ROUNDS honest releases passes the difference check (chi-square, central
    interval), and one release of the digest-blind control below the scale check, each at alpha =
    ALPHA / (pairs + 1): an honest hospital fails this test with probability at most ALPHA = 1e-6.
    Two releases from a generator that ignores the release's digest (the same noise twice: a
    difference of 0) fail the difference check, and so do two releases made with half the noise."""
    noises, stds = honest
    pairs = list(itertools.combinations(range(ROUNDS), 2))
    alpha = ALPHA / (len(pairs) + 1)
    for i, j in pairs:
        verdict = difference_check(noises[i], noises[j], stds[i], alpha)
        assert verdict.holds, (i + 1, j + 1, verdict)
    # negative control: half the noise
    (a, b, _), (std, *_) = halved
    verdict = difference_check(a, b, std, alpha)
    assert not verdict.holds and verdict.statistic == pytest.approx(0.25, rel=0.05), verdict
    # negative control: every release's generator the same, whatever the digest
    monkeypatch.setattr(SiteGuard, "generator", lambda self, digest: self.key.torch_generator("train"))
    (a, b), (std, _) = _releases(tmp_path / "one-generator", deployed, 2)
    assert scale_check(a, std, alpha).holds  # each release alone has the right noise...
    verdict = difference_check(a, b, std, alpha)
    assert not verdict.holds and verdict.statistic == 0.0, verdict  # ...and both have the same


def test_a_hospital_that_lost_its_cached_reply_replays_it_from_its_key_and_charges_it_once(deployed, tmp_path, monkeypatch):
    """Round 1 answered; the hospital's process restarts without last_release.pt (deleted, or a
    disk restored without it). The very same instruction gets the very same reply, recomputed from
    the key (the site trains again) and charged once; any other request for round 1 is refused.
    The same when the cache holds a later round's reply instead."""
    state = tmp_path / "state"
    sent = initial_weights(hospital(tmp_path / "other"), deployed.setup)  # a real model: the data matter
    first = train(_endpoint(state, deployed), sent, 1)
    ledger = json.loads((state / "site_ledger.json").read_text())
    (state / "last_release.pt").unlink()

    trained = []
    site_train = Site.train

    def counted(self, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        trained.append(args[1] if len(args) > 1 else kw.get("rnd"))
        return site_train(self, *args, **kw)

    monkeypatch.setattr(Site, "train", counted)
    restarted = _endpoint(state, deployed)
    again = train(restarted, sent, 1)
    assert trained == [1]  # recomputed, not read from a cache
    assert len(again) == len(first) and all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(again, first))
    assert json.loads((state / "site_ledger.json").read_text()) == ledger  # charged once
    with pytest.raises(SiteRefused, match="refused round 1 of run run-1: it already released that round"):
        train(restarted, [w + np.float32(1e-3) for w in sent], 1)
    # the cache now holds round 2: round 1 again is replayed from the key once more
    train(restarted, sent, 2)
    third = train(restarted, sent, 1)
    assert trained == [1, 2, 1]
    assert all(np.array_equal(a, b) for a, b in zip(third, first))
    assert [r.round for r in SiteLedger.load(state / "site_ledger.json").releases] == [1, 2]

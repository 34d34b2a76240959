"""Robust aggregation (federation.aggregator) and simulated malicious sites (attack): the rules
against references, the attacks as their definitions say, the refusals, and a small federation in
which one malicious site breaks the mean but not the median."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import privmed
from privmed.config import aggregator_min_sites, validate_config
from privmed.data.base import ImageSet
from privmed.data.sites import SiteData
from privmed.errors import ConfigError
from privmed.federation.adversary import Adversary, little_is_enough_z, malicious_sites
from privmed.federation.robust import RobustAggregation, combine
from privmed.federation.strategies import FedAdam, FedAvg, SiteUpdate, TrainTask, weighted_mean

from conftest import tiny_config


def _deltas(n: int, seed: int = 0, shapes=((3, 4), (5,))) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=s) for s in shapes] for _ in range(n)]


def _flat(d: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.ravel() for a in d])


def test_median_and_trimmed_mean_match_numpy_and_scipy():
    d = _deltas(7)
    counts = [10, 20, 30, 40, 50, 60, 70]
    stack = np.stack([_flat(x) for x in d])
    assert np.allclose(_flat(combine("median", d, counts)), np.median(stack, axis=0))
    for f in (1, 2, 3):  # cut f of 7 at each end: scipy's proportion f / 7
        got = _flat(combine("trimmed-mean", d, counts, byzantine=f))
        assert np.allclose(got, stats.trim_mean(stack, f / 7, axis=0)), f
    assert np.allclose(_flat(combine("mean", d, counts)), np.average(stack, axis=0, weights=counts))


def test_krum_picks_the_update_closest_to_its_neighbours_and_never_the_outlier():
    d = _deltas(6, seed=1)
    d[2] = [100 * a for a in d[2]]  # far from everyone
    stack = np.stack([_flat(x) for x in d])
    n, f = len(d), 1
    dist = ((stack[:, None] - stack[None]) ** 2).sum(-1)
    scores = [np.sort(np.delete(row, i))[: n - f - 2].sum() for i, row in enumerate(dist)]
    got = _flat(combine("krum", d, [1] * n, byzantine=f))
    assert np.allclose(got, stack[int(np.argmin(scores))])
    assert not np.allclose(got, stack[2])
    # multi-krum: the n - f best, averaged by their counts; the outlier is the one left out
    counts = [1, 2, 3, 4, 5, 6]
    keep = [i for i in range(n) if i != 2]
    expect = np.average(stack[keep], axis=0, weights=[counts[i] for i in keep])
    assert np.allclose(_flat(combine("multi-krum", d, counts, byzantine=f)), expect)


def test_bulyan_and_median_stay_inside_the_honest_range_whatever_one_site_sends():
    honest = _deltas(6, seed=2)
    lo = np.min([_flat(x) for x in honest], axis=0)
    hi = np.max([_flat(x) for x in honest], axis=0)
    for bad in (1e6, -1e6):
        d = honest + [[np.full_like(a, bad) for a in honest[0]]]
        for rule in ("bulyan", "median", "trimmed-mean"):
            got = _flat(combine(rule, d, [1] * 7, byzantine=1))
            assert np.all((got >= lo - 1e-12) & (got <= hi + 1e-12)), rule
    # the mean is moved without bound
    assert np.max(np.abs(_flat(combine("mean", d, [1] * 7)))) > 1e4


def test_norm_clip_bounds_each_update_then_averages():
    d = _deltas(5, seed=3)
    d[4] = [50 * a for a in d[4]]
    counts = [1, 1, 2, 2, 4]
    norms = [np.linalg.norm(_flat(x)) for x in d]
    for bound in (None, 0.5):
        b = float(np.median(norms)) if bound is None else bound
        clipped = [[min(1.0, b / nm) * a for a in x] for x, nm in zip(d, norms)]
        got = combine("norm-clip", d, counts, clip=bound)
        assert np.allclose(_flat(got), _flat(weighted_mean(clipped, counts)))
        assert np.linalg.norm(_flat(got)) <= b + 1e-9  # a mean of vectors of norm <= b


def test_a_rule_refuses_fewer_sites_than_it_needs():
    for rule, f, n in (("krum", 1, 5), ("bulyan", 1, 7), ("median", 2, 5), ("trimmed-mean", 1, 3)):
        assert aggregator_min_sites(rule, f) == n
        combine(rule, _deltas(n), [1] * n, byzantine=f)
        with pytest.raises(ValueError, match=f"only with {n} updates or more; this round has {n - 1}"):
            combine(rule, _deltas(n - 1), [1] * (n - 1), byzantine=f)


def _state_and_updates(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = [rng.normal(size=(3, 4)).astype(np.float32), np.array(7, dtype=np.int64)]
    ups = [SiteUpdate(f"s{i}", [(x[0] + rng.normal(size=(3, 4))).astype(np.float32), np.array(7 + i)], 10 * (i + 1))
           for i in range(4)]
    return {"global": x}, ups


@pytest.mark.parametrize("inner", [FedAvg(), FedAvg(server_lr=0.5), FedAdam(server_lr=0.1)], ids=["fedavg", "fedavg-lr", "fedadam"])
def test_the_mean_rule_through_the_wrapper_is_the_strategy_itself(inner):
    state, ups = _state_and_updates()
    state = inner.init_state(state["global"], [u.site for u in ups])
    plain = inner.aggregate(state, ups, 1)
    wrapped = RobustAggregation(inner, "mean").aggregate(state, ups, 1)
    for a, b in zip(plain["global"], wrapped["global"]):
        assert a.dtype == b.dtype
        assert np.allclose(a, b, atol=1e-6)


def test_the_wrapper_steps_the_inner_strategy_by_the_robust_change():
    state, ups = _state_and_updates(1)
    got = RobustAggregation(FedAvg(server_lr=0.5), "median").aggregate(state, ups, 1)["global"]
    med = np.median([u.weights[0].astype(np.float64) - state["global"][0] for u in ups], axis=0)
    assert np.allclose(got[0], state["global"][0] + 0.5 * med, atol=1e-6)
    assert got[1] == np.rint(7 + np.average([0, 1, 2, 3], weights=[10, 20, 30, 40]))  # counters: the mean
    assert not hasattr(RobustAggregation(FedAvg(), "krum"), "aggregate_secure")


def _tasks_updates(n: int = 5):
    rng = np.random.default_rng(4)
    sent = [rng.normal(size=(4, 3)).astype(np.float32), np.array(3, dtype=np.int64)]
    tasks = [TrainTask(f"site-{i + 1}", sent) for i in range(n)]
    ups = [SiteUpdate(t.site, [(sent[0] + rng.normal(size=(4, 3))).astype(np.float32), np.array(4)], 10) for t in tasks]
    return sent, tasks, ups


def test_model_attacks_do_what_they_say_and_leave_honest_sites_alone():
    sent, tasks, ups = _tasks_updates()
    bad = malicious_sites(2, [t.site for t in tasks])
    assert bad == ("site-4", "site-5")
    delta = {u.site: u.weights[0].astype(np.float64) - sent[0] for u in ups}
    for kind in ("sign-flip", "scaling", "gaussian", "little-is-enough"):
        out = Adversary(kind, bad, scale=10, seed=3).tamper(tasks, ups, rnd=2)
        for u, o in zip(ups, out):
            if u.site not in bad:
                assert o is u
                continue
            got = o.weights[0].astype(np.float64) - sent[0]
            assert o.weights[1] == 4  # counters are not attacked
            if kind == "sign-flip":
                assert np.allclose(got, -10 * delta[u.site], atol=1e-4)
            elif kind == "scaling":
                assert np.allclose(got, 10 * delta[u.site], atol=1e-4)
            elif kind == "gaussian":
                rms = np.sqrt(np.mean(delta[u.site] ** 2))
                assert 3 * rms < np.sqrt(np.mean(got**2)) < 30 * rms
                again = Adversary(kind, bad, scale=10, seed=3).tamper(tasks, ups, rnd=2)
                assert np.array_equal(again[ups.index(u)].weights[0], o.weights[0])  # from the seed
            else:
                stack = np.stack(list(delta.values()))
                z = stats.norm.ppf((5 - (3 - 2)) / 5)
                assert little_is_enough_z(5, 2) == pytest.approx(z)
                assert np.allclose(got, stack.mean(0) - z * stack.std(0), atol=1e-5)


def test_label_flip_corrupts_only_the_malicious_sites_training_labels():
    imgs = np.zeros((6, 1, 2, 2), np.float32)
    part = lambda y: ImageSet(imgs[: len(y)], np.asarray(y, np.int64))  # noqa: E731
    sd = SiteData("site-2", part([0, 1, 2, 2, 1, 0]), part([0, 1, 2]), part([2, 1]))
    adv = Adversary("label-flip", ("site-2",))
    poisoned = adv.poison(sd, n_classes=3)
    assert poisoned.train.labels.tolist() == [2, 1, 0, 0, 1, 2]
    assert poisoned.val.labels.tolist() == [0, 1, 2] and poisoned.test.labels.tolist() == [2, 1]
    assert adv.poison(SiteData("site-1", sd.train, sd.val), 3).train is sd.train
    assert Adversary("sign-flip", ("site-2",)).poison(sd, 3) is sd


@pytest.mark.parametrize("over, says", [
    ({"federation__aggregator": "median", "federation__secure_aggregation": True}, "secure aggregation reveals only"),
    ({"federation__aggregator": "median", "privacy__mode": "central", "privacy__epsilon": 8}, "privacy.mode 'central'"),
    ({"federation__aggregator": "krum", "federation__strategy": "scaffold", "training__optimizer": "sgd",
      "training__momentum": 0}, "strategy 'scaffold' does not"),
    ({"federation__aggregator": "krum", "sites__count": 4}, "only with 5 sites or more per round; this run has 4"),
    ({"federation__aggregator": "bulyan", "sites__count": 5}, "only with 7 sites or more"),
    ({"federation__update_clip": 1.0}, "needs federation.aggregator: norm-clip"),
    ({"attack__kind": "sign-flip", "federation__strategy": "local"}, "shares no model"),
    ({"attack__kind": "sign-flip", "attack__sites": 3}, "between 1 and 2 of the 3 sites"),
    ({"attack__kind": "sign-flip", "attack__sites": ["site-9"]}, "name 1 to 2 distinct sites"),
    ({"attack__kind": "scaling", "federation__secure_aggregation": True}, "only their sum"),
    ({"attack__kind": "little-is-enough", "attack__sites": 2}, "a minority"),
])
def test_combinations_that_cannot_work_are_refused_with_the_reason(over, says):
    cfg = tiny_config(**over)
    with pytest.raises(ConfigError, match=says.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        validate_config(cfg)


def test_one_malicious_site_breaks_the_mean_but_not_the_median(one_thread):
    """5 phantom sites, one sending its update sign-flipped and scaled by 10: FedAvg's mean loses
    the model, the median keeps it near the honest run."""
    def auc(aggregator: str, attack: str) -> float:
        cfg = tiny_config(sites__count=5, federation__rounds=10, federation__aggregator=aggregator,
                          training__optimizer="sgd", training__lr=0.05, training__momentum=0.9,
                          attack__kind=attack, attack__sites=1, attack__scale=10)
        return privmed.run(cfg, None).summary["test"]["auc"]

    honest = auc("mean", "none")
    assert honest > 0.65  # the task is learnt at all
    attacked_mean, attacked_median = auc("mean", "sign-flip"), auc("median", "sign-flip")
    assert attacked_mean < honest - 0.1
    assert attacked_median > honest - 0.05
    # and the median of honest sites costs little
    assert auc("median", "none") > honest - 0.05


def test_the_report_says_which_rule_aggregated_and_who_attacked(tmp_path, one_thread):
    cfg = tiny_config(sites__count=5, federation__rounds=1, federation__aggregator="trimmed-mean",
                      attack__kind="sign-flip", attack__sites=["site-2"])
    privmed.run(cfg, tmp_path / "run")
    html = (tmp_path / "run" / "report.html").read_text()
    assert "aggregated by trimmed-mean (withstands 1 malicious sites)" in html
    assert "sign-flip ×10 by site-2" in html


def test_a_model_blown_up_by_a_malicious_site_stops_the_run_with_one_line(tmp_path, one_thread, capsys):
    from privmed.cli import main

    cfg = tiny_config(sites__count=5, federation__rounds=4, attack__kind="sign-flip", attack__sites=2,
                      attack__scale=1e6, training__optimizer="sgd", training__lr=0.1)
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "are not finite numbers (training diverged)" in err and "Traceback" not in err
    assert err.startswith("privmed: error: round ")
    assert len(err.strip().splitlines()) == 1, err

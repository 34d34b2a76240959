"""Strategies are pure: checked against hand computations and numpy references."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privmed.config import STRATEGIES, FederationConfig
from privmed.errors import ConfigError
from privmed.federation.strategies import (
    GLOBAL,
    POOLED_SITE,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedBN,
    FedProx,
    FedYogi,
    Scaffold,
    SiteUpdate,
    TrainTask,
    build_strategy,
    weighted_mean,
)


def _w(*vals):
    return [np.array(v, dtype=np.float32) for v in vals]


def _build(name, *, seed=0, local_lr=0.1, shared=None, **fed):
    fed = FederationConfig(strategy=name, **fed)
    return build_strategy(fed, seed=seed, local_lr=local_lr, shared=shared)


@given(
    st.lists(st.integers(1, 10_000), min_size=1, max_size=6),
    st.integers(0, 2**31 - 1),
)
@settings(max_examples=50, deadline=None)
def test_weighted_mean_equals_np_average(counts, seed):
    rng = np.random.default_rng(seed)
    models = [[rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=5).astype(np.float32)]
              for _ in counts]
    got = weighted_mean(models, counts)
    for i in range(2):
        ref = np.average(np.stack([m[i] for m in models]), axis=0, weights=counts)
        np.testing.assert_allclose(got[i], ref, rtol=1e-6, atol=1e-6)
        assert got[i].dtype == np.float32


def test_weighted_mean_rejects_bad_counts():
    with pytest.raises(ValueError):
        weighted_mean([_w([1.0])], [0])
    with pytest.raises(ValueError):
        weighted_mean([_w([1.0]), _w([2.0])], [1])


def test_fedavg_by_hand():
    s = _build("fedavg")
    state = s.init_state(_w([0.0, 0.0]), ["a", "b"])
    assert s.stages(1, ["a", "b"]) == [["a", "b"]]
    tasks = s.configure(state, ["a", "b"])
    assert [t.site for t in tasks] == ["a", "b"]
    ups = [SiteUpdate("a", _w([1.0, 2.0]), 1), SiteUpdate("b", _w([4.0, 8.0]), 3)]
    new = s.aggregate(state, ups, 1)
    # (1*[1,2] + 3*[4,8]) / 4 = [3.25, 6.5]
    np.testing.assert_allclose(new[GLOBAL][0], [3.25, 6.5])
    np.testing.assert_allclose(state[GLOBAL][0], [0.0, 0.0])  # the input state is not mutated


def test_cyclic_passes_model_on_and_shuffles_per_round():
    s = _build("cyclic")
    sites = ["a", "b", "c"]
    assert s.stages(1, sites) == [["a"], ["b"], ["c"]]
    state = s.init_state(_w([0.0]), sites)
    state = s.aggregate(state, [SiteUpdate("a", _w([5.0]), 10)], 1)
    (task,) = s.configure(state, ["b"])
    np.testing.assert_allclose(task.weights[0], [5.0])  # b trains on what a handed on

    sh = _build("cyclic", cyclic_order="shuffled", seed=3)
    orders = {tuple(x[0] for x in sh.stages(r, sites)) for r in range(1, 30)}
    assert len(orders) > 1 and all(sorted(o) == sites for o in orders)
    assert sh.stages(4, sites) == _build("cyclic", cyclic_order="shuffled", seed=3).stages(4, sites)


def test_local_keeps_one_model_per_site():
    s = _build("local")
    state = s.init_state(_w([0.0]), ["a", "b"])
    tasks = s.configure(state, ["a", "b"])
    assert [t.model_key for t in tasks] == ["a", "b"]
    new = s.aggregate(state, [SiteUpdate("a", _w([1.0]), 5, model_key="a"),
                              SiteUpdate("b", _w([2.0]), 50, model_key="b")], 1)
    assert new["a"][0][0] == 1.0 and new["b"][0][0] == 2.0


def test_pooled_trains_one_pooled_site():
    s = _build("pooled")
    assert s.pools_data and s.stages(1, [POOLED_SITE]) == [[POOLED_SITE]]
    state = s.init_state(_w([0.0]), [POOLED_SITE])
    new = s.aggregate(state, [SiteUpdate(POOLED_SITE, _w([7.0]), 100)], 1)
    assert new[GLOBAL][0][0] == 7.0


def test_unknown_strategy_suggests():
    fed = FederationConfig.model_construct(strategy="fedavgg")  # past the config's own check
    with pytest.raises(ConfigError, match="did you mean 'fedavg'"):
        build_strategy(fed, seed=0, local_lr=0.1)


def _f64(*vals):
    return [np.array(v, dtype=np.float64) for v in vals]


def _i64(*vals):
    return [np.array(v, dtype=np.int64) for v in vals]


def test_build_strategy_knows_every_configured_strategy():
    for name in STRATEGIES:
        s = _build(name, shared=[True, False] if name == "fedbn" else None)
        assert s.name == name
    assert _build("fedavg").server_lr == 1.0 and _build("fedadam").server_lr == 0.01  # defaults
    assert _build("fedavg", server_lr=0.5).server_lr == 0.5
    assert _build("scaffold", local_lr=0.3).local_lr == 0.3
    yogi = _build("fedyogi", server_lr=0.2, beta1=0.5, beta2=0.75, tau=0.125)
    assert isinstance(yogi, FedYogi)
    assert (yogi.server_lr, yogi.beta1, yogi.beta2, yogi.tau) == (0.2, 0.5, 0.75, 0.125)


def test_fedbn_without_normalisation_layers_is_a_config_error():
    with pytest.raises(ConfigError, match="'fedbn' needs a model with normalisation layers"):
        _build("fedbn")


def test_fedavg_server_lr_one_is_the_old_result_bit_for_bit():
    rng = np.random.default_rng(7)
    models = [[rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=5).astype(np.float32)]
              for _ in range(3)]
    counts = [17, 5, 301]
    ups = [SiteUpdate(s, m, n) for s, m, n in zip("abc", models, counts, strict=True)]
    state = {GLOBAL: [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=5).astype(np.float32)]}
    got = FedAvg(server_lr=1.0).aggregate(state, ups, 1)[GLOBAL]
    p = np.array(counts, dtype=np.float64) / sum(counts)
    for i in range(2):  # the former FedAvg, written out
        old = sum(pi * m[i].astype(np.float64) for pi, m in zip(p, models, strict=True))
        old = old.astype(np.float32)
        assert got[i].dtype == np.float32 and np.array_equal(got[i], old)


def test_fedavg_server_lr_by_hand_and_integer_entries():
    s = _build("fedavg", server_lr=0.5)
    state = {GLOBAL: _w([1.0, 2.0]) + _i64([0, 10])}
    ups = [SiteUpdate("a", _w([3.0, 2.0]) + _i64([2, 20]), 1),
           SiteUpdate("b", _w([5.0, 10.0]) + _i64([6, 40]), 3)]
    new = s.aggregate(state, ups, 1)[GLOBAL]
    # mean = ([3, 2] + 3 [5, 10]) / 4 = [4.5, 8]; x + 0.5 (mean - x) = [1 + 0.5*3.5, 2 + 0.5*6]
    np.testing.assert_allclose(new[0], [2.75, 5.0])
    assert new[0].dtype == np.float32
    # integer entry: the plain mean ([2, 20] + 3 [6, 40]) / 4 = [5, 35], not moved half way
    assert new[1].dtype == np.int64 and new[1].tolist() == [5, 35]
    assert state[GLOBAL][0].tolist() == [1.0, 2.0]  # not mutated


def test_fedprox_hands_mu_to_the_sites_and_averages_like_fedavg():
    s = _build("fedprox", mu=0.25)
    assert isinstance(s, FedProx) and s.name == "fedprox"
    state = s.init_state(_w([0.0, 0.0]), ["a", "b"])
    tasks = s.configure(state, ["a", "b"])
    assert [(t.site, t.prox_mu, t.correction) for t in tasks] == [("a", 0.25, None), ("b", 0.25, None)]
    assert tasks[0].weights is state[GLOBAL]
    new = s.aggregate(state, [SiteUpdate("a", _w([1.0, 2.0]), 1), SiteUpdate("b", _w([4.0, 8.0]), 3)], 1)
    np.testing.assert_allclose(new[GLOBAL][0], [3.25, 6.5])  # (1*[1,2] + 3*[4,8]) / 4
    # other strategies leave the new fields at their defaults
    (t,) = _build("fedavg").configure(state, ["a"])
    assert t.prox_mu == 0.0 and t.correction is None
    assert TrainTask("a", []).prox_mu == 0.0 and TrainTask("a", []).correction is None
    with pytest.raises(ValueError):
        FedProx(mu=-1.0)


def _scaffold_update(site, y, n, steps, k=4):
    return SiteUpdate(site, _f64(y) + _i64([k]), n, metrics={"optimizer_steps": steps})


def test_scaffold_two_rounds_by_hand():
    s = Scaffold(local_lr=0.1, server_lr=0.5)
    assert _build("scaffold", local_lr=0.1).name == "scaffold"
    state = s.init_state(_f64([1.0, 2.0]) + _i64([4]), ["a", "b"])
    assert set(state) == {GLOBAL, "_c", "_c/a", "_c/b"}
    for key in ("_c", "_c/a", "_c/b"):
        assert [a.dtype for a in state[key]] == [np.float64, np.float64]
        assert state[key][0].tolist() == [0.0, 0.0] and state[key][1].tolist() == [0.0]
    tasks = s.configure(state, ["a", "b"])
    assert [t.site for t in tasks] == ["a", "b"] and all(t.model_key == GLOBAL for t in tasks)
    assert tasks[0].correction[0].tolist() == [0.0, 0.0]

    # round 1: p = [1/4, 3/4]; a took K=2 steps (K lr = 0.2), b K=4 (0.4)
    state = s.aggregate(state, [_scaffold_update("a", [0.8, 2.4], 1, 2, k=2),
                                _scaffold_update("b", [1.4, 1.0], 3, 4, k=6)], 1)
    # c_a = (x - y_a) / 0.2 = [0.2, -0.4] / 0.2; c_b = (x - y_b) / 0.4 = [-0.4, 1.0] / 0.4
    np.testing.assert_allclose(state["_c/a"][0], [1.0, -2.0], atol=1e-12)
    np.testing.assert_allclose(state["_c/b"][0], [-1.0, 2.5], atol=1e-12)
    # x + 0.5 (0.25 [-0.2, 0.4] + 0.75 [0.4, -1.0]) = [1, 2] + 0.5 [0.25, -0.65]
    np.testing.assert_allclose(state[GLOBAL][0], [1.125, 1.675], atol=1e-12)
    # c = 0.25 [1, -2] + 0.75 [-1, 2.5]
    np.testing.assert_allclose(state["_c"][0], [-0.5, 1.375], atol=1e-12)
    # integer entry: weighted mean (2 + 3*6) / 4 = 5; no correction
    assert state[GLOBAL][1].dtype == np.int64 and state[GLOBAL][1].tolist() == [5]
    assert state["_c/a"][1].tolist() == [0.0] and state["_c"][1].tolist() == [0.0]

    # round 2: the corrections c - c_i, and they cancel under the weights 1/4, 3/4
    ta, tb = s.configure(state, ["a", "b"])
    np.testing.assert_allclose(ta.correction[0], [-1.5, 3.375], atol=1e-12)
    np.testing.assert_allclose(tb.correction[0], [0.5, -1.125], atol=1e-12)
    np.testing.assert_allclose(0.25 * ta.correction[0] + 0.75 * tb.correction[0], [0.0, 0.0], atol=1e-12)
    assert ta.correction[1].tolist() == [0.0]
    state = s.aggregate(state, [_scaffold_update("a", [1.025, 1.875], 1, 1, k=1),
                                _scaffold_update("b", [1.325, 1.275], 3, 2, k=9)], 2)
    # c_a = c_a - c + (x - y_a) / 0.1 = [1, -2] - [-0.5, 1.375] + [1, -2]
    np.testing.assert_allclose(state["_c/a"][0], [2.5, -5.375], atol=1e-12)
    # c_b = [-1, 2.5] - [-0.5, 1.375] + [-0.2, 0.4] / 0.2
    np.testing.assert_allclose(state["_c/b"][0], [-1.5, 3.125], atol=1e-12)
    # x + 0.5 (0.25 [-0.1, 0.2] + 0.75 [0.2, -0.4]) = [1.125, 1.675] + 0.5 [0.125, -0.25]
    np.testing.assert_allclose(state[GLOBAL][0], [1.1875, 1.55], atol=1e-12)
    np.testing.assert_allclose(state["_c"][0], [-0.5, 1.0], atol=1e-12)  # 0.25 c_a + 0.75 c_b
    assert state[GLOBAL][1].tolist() == [7]  # (1 + 3*9) / 4
    ta, tb = s.configure(state, ["a", "b"])
    np.testing.assert_allclose(0.25 * ta.correction[0] + 0.75 * tb.correction[0], [0.0, 0.0], atol=1e-12)


def test_scaffold_errors():
    s = Scaffold(local_lr=0.1)
    state = s.init_state(_f64([1.0]), ["a", "b"])
    ok = SiteUpdate("a", _f64([0.0]), 1, metrics={"optimizer_steps": 1})
    for bad in (0, -1, None):
        b = SiteUpdate("b", _f64([0.0]), 1, metrics={} if bad is None else {"optimizer_steps": bad})
        with pytest.raises(ValueError, match="local steps"):
            s.aggregate(state, [ok, b], 1)
    with pytest.raises(ValueError, match="every site"):
        s.aggregate(state, [ok], 1)
    with pytest.raises(ValueError):
        Scaffold(local_lr=0.0)


def _opt_round(s, state, offsets, ints):
    """Updates from sites a (1 sample) and b (3 samples): the current global model plus offsets."""
    x = state[GLOBAL][0]
    ups = [SiteUpdate(site, [x + np.array(off), np.array([k], dtype=np.int64)], n)
           for site, off, k, n in zip("ab", offsets, ints, (1, 3), strict=True)]
    return s.aggregate(state, ups, 1)


# Two rounds for each adaptive optimizer, server_lr 0.1, beta1 0.5, beta2 0.75, tau 0.5, sites a and b
# with weights 1/4 and 3/4. Round 1: a at x + [2, 0], b at x + [0, 4] -> Δ = [0.5, 3.0].
# Round 2: a at x + [1, 1], b at x + [-1, 1] -> Δ = [-0.5, 1.0].
# m1 = 0.5 Δ1 = [0.25, 1.5]; m2 = 0.5 m1 + 0.5 Δ2 = [-0.125, 1.25] for all three.
_R1, _R2 = ([2.0, 0.0], [0.0, 4.0]), ([1.0, 1.0], [-1.0, 1.0])


@pytest.mark.parametrize(
    "cls, v1, v2",
    [
        # adam: v1 = 0.25 Δ1² = [0.0625, 2.25]; v2 = 0.75 v1 + 0.25 [0.25, 1.0]
        (FedAdam, [0.0625, 2.25], [0.75 * 0.0625 + 0.25 * 0.25, 0.75 * 2.25 + 0.25 * 1.0]),
        # yogi: v1 = 0 - 0.25 Δ1² sign(0 - Δ1²) = [0.0625, 2.25]; round 2: v < Δ² = 0.25 in the first
        # entry (v grows by 0.25 Δ²), v > Δ² = 1 in the second (v shrinks by 0.25 Δ²)
        (FedYogi, [0.0625, 2.25], [0.0625 + 0.25 * 0.25, 2.25 - 0.25 * 1.0]),
        # adagrad: v1 = Δ1² = [0.25, 9]; v2 = v1 + [0.25, 1]
        (FedAdagrad, [0.25, 9.0], [0.5, 10.0]),
    ],
)
def test_adaptive_server_optimizers_two_rounds_by_hand(cls, v1, v2):
    s = cls(server_lr=0.1, beta1=0.5, beta2=0.75, tau=0.5)
    state = s.init_state(_f64([1.0, 2.0]) + _i64([4]), ["a", "b"])
    assert set(state) == {GLOBAL, "_m", "_v"}
    assert state["_m"][0].tolist() == [0.0, 0.0] and state["_v"][0].dtype == np.float64
    tasks = s.configure(state, ["a", "b"])
    assert [t.site for t in tasks] == ["a", "b"] and tasks[0].weights is state[GLOBAL]

    state = _opt_round(s, state, _R1, (2, 6))
    np.testing.assert_allclose(state["_m"][0], [0.25, 1.5], rtol=1e-12)
    np.testing.assert_allclose(state["_v"][0], v1, rtol=1e-12)
    x1 = [1.0 + 0.1 * 0.25 / (np.sqrt(v1[0]) + 0.5), 2.0 + 0.1 * 1.5 / (np.sqrt(v1[1]) + 0.5)]
    np.testing.assert_allclose(state[GLOBAL][0], x1, rtol=1e-12)
    assert state[GLOBAL][1].tolist() == [5] and state["_m"][1].tolist() == [0.0]  # (2 + 3*6) / 4

    state = _opt_round(s, state, _R2, (1, 9))
    np.testing.assert_allclose(state["_m"][0], [-0.125, 1.25], rtol=1e-12)
    np.testing.assert_allclose(state["_v"][0], v2, rtol=1e-12)
    x2 = [x1[0] + 0.1 * -0.125 / (np.sqrt(v2[0]) + 0.5), x1[1] + 0.1 * 1.25 / (np.sqrt(v2[1]) + 0.5)]
    np.testing.assert_allclose(state[GLOBAL][0], x2, rtol=1e-12)
    assert state[GLOBAL][1].tolist() == [7] and state["_v"][1].tolist() == [0.0]  # (1 + 3*9) / 4


def test_adaptive_first_round_numbers_and_names():
    # FedAdam round 1 written out: x1 = [1 + 0.1*0.25/0.75, 2 + 0.1*1.5/2.0]; FedAdagrad's
    # x1 = [1 + 0.1*0.25/1.0, 2 + 0.1*1.5/3.5]
    adam = FedAdam(server_lr=0.1, beta1=0.5, beta2=0.75, tau=0.5)
    st1 = _opt_round(adam, adam.init_state(_f64([1.0, 2.0]) + _i64([4]), ["a", "b"]), _R1, (2, 6))
    np.testing.assert_allclose(st1[GLOBAL][0], [1 + 0.1 * 0.25 / 0.75, 2.075], rtol=1e-12)
    ada = FedAdagrad(server_lr=0.1, beta1=0.5, beta2=0.75, tau=0.5)
    st1 = _opt_round(ada, ada.init_state(_f64([1.0, 2.0]) + _i64([4]), ["a", "b"]), _R1, (2, 6))
    np.testing.assert_allclose(st1[GLOBAL][0], [1.025, 2 + 0.15 / 3.5], rtol=1e-12)
    assert [c().name for c in (FedAdam, FedYogi, FedAdagrad)] == ["fedadam", "fedyogi", "fedadagrad"]
    with pytest.raises(ValueError):
        FedAdam(beta1=1.0)
    with pytest.raises(ValueError):
        FedYogi(tau=0.0)


def test_adaptive_keeps_float32():
    s = FedAdam(server_lr=0.1, beta1=0.5, beta2=0.75, tau=0.5)
    state = s.init_state(_w([1.0, 2.0]), ["a"])
    new = s.aggregate(state, [SiteUpdate("a", _w([1.5, 5.0]), 1)], 1)
    assert new[GLOBAL][0].dtype == np.float32 and new["_m"][0].dtype == np.float64
    np.testing.assert_allclose(new[GLOBAL][0], [1 + 0.1 * 0.25 / 0.75, 2.075], rtol=1e-6)


def test_fedbn_averages_shared_entries_and_keeps_local_ones():
    s = _build("fedbn", shared=[True, False, True])
    assert isinstance(s, FedBN) and s.stages(1, ["a", "b", "c"]) == [["a", "b", "c"]]
    init = _w([0.0, 0.0], [1.0]) + _i64([0])
    state = s.init_state(init, ["a", "b", "c"])
    assert set(state) == {"a", "b", "c"} and all(state[k] is init for k in "abc")
    tasks = s.configure(state, ["a", "b", "c"])
    assert [(t.site, t.model_key) for t in tasks] == [("a", "a"), ("b", "b"), ("c", "c")]
    ups = [SiteUpdate("a", _w([2.0, 4.0], [10.0]) + _i64([1]), 1, model_key="a"),
           SiteUpdate("b", _w([6.0, 0.0], [20.0]) + _i64([3]), 1, model_key="b"),
           SiteUpdate("c", _w([1.0, 1.0], [30.0]) + _i64([4]), 2, model_key="c")]
    new = s.aggregate(state, ups, 1)
    for site, own in zip("abc", (10.0, 20.0, 30.0), strict=True):
        # shared: ([2, 4] + [6, 0] + 2 [1, 1]) / 4 = [2.5, 1.5]; (1 + 3 + 2*4) / 4 = 3
        np.testing.assert_allclose(new[site][0], [2.5, 1.5])
        assert new[site][1].tolist() == [own]  # local: the site's own trained value
        assert new[site][2].dtype == np.int64 and new[site][2].tolist() == [3]
    assert state["a"][1].tolist() == [1.0]  # not mutated
    ta, tc = s.configure(new, ["a", "c"])
    assert ta.weights[1].tolist() == [10.0] and tc.weights[1].tolist() == [30.0]

    # a site that sent nothing still receives the shared entries and keeps its own local ones
    new2 = s.aggregate(new, [SiteUpdate("a", _w([4.0, 4.0], [11.0]) + _i64([5]), 1, model_key="a")], 2)
    np.testing.assert_allclose(new2["b"][0], [4.0, 4.0])
    assert new2["b"][1].tolist() == [20.0] and new2["a"][1].tolist() == [11.0]


def test_fedbn_errors():
    with pytest.raises(ValueError, match="FedAvg"):
        FedBN([True, True])
    with pytest.raises(ValueError, match="local training"):
        FedBN([False, False])
    s = FedBN([True, False])
    with pytest.raises(ValueError, match="mask"):
        s.init_state(_w([0.0], [0.0], [0.0]), ["a"])
    state = s.init_state(_w([0.0], [0.0]), ["a"])
    with pytest.raises(ValueError, match="mask"):
        s.aggregate(state, [SiteUpdate("a", _w([1.0]), 1, model_key="a")], 1)
    with pytest.raises(ValueError, match="does not hold"):
        s.aggregate(state, [SiteUpdate("z", _w([1.0], [1.0]), 1, model_key="z")], 1)


def test_server_lr_must_be_positive():
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            FedAvg(server_lr=bad)

"""Strategies are pure: checked against hand computations and numpy references."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privmed.errors import ConfigError
from privmed.federation.strategies import (
    GLOBAL,
    POOLED_SITE,
    SiteUpdate,
    build_strategy,
    weighted_mean,
)


def _w(*vals):
    return [np.array(v, dtype=np.float32) for v in vals]


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
    s = build_strategy("fedavg")
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
    s = build_strategy("cyclic")
    sites = ["a", "b", "c"]
    assert s.stages(1, sites) == [["a"], ["b"], ["c"]]
    state = s.init_state(_w([0.0]), sites)
    state = s.aggregate(state, [SiteUpdate("a", _w([5.0]), 10)], 1)
    (task,) = s.configure(state, ["b"])
    np.testing.assert_allclose(task.weights[0], [5.0])  # b trains on what a handed on

    sh = build_strategy("cyclic", cyclic_order="shuffled", seed=3)
    orders = {tuple(x[0] for x in sh.stages(r, sites)) for r in range(1, 30)}
    assert len(orders) > 1 and all(sorted(o) == sites for o in orders)
    assert sh.stages(4, sites) == build_strategy("cyclic", cyclic_order="shuffled", seed=3).stages(4, sites)


def test_local_keeps_one_model_per_site():
    s = build_strategy("local")
    state = s.init_state(_w([0.0]), ["a", "b"])
    tasks = s.configure(state, ["a", "b"])
    assert [t.model_key for t in tasks] == ["a", "b"]
    new = s.aggregate(state, [SiteUpdate("a", _w([1.0]), 5, model_key="a"),
                              SiteUpdate("b", _w([2.0]), 50, model_key="b")], 1)
    assert new["a"][0][0] == 1.0 and new["b"][0][0] == 2.0


def test_pooled_trains_one_pooled_site():
    s = build_strategy("pooled")
    assert s.pools_data and s.stages(1, [POOLED_SITE]) == [[POOLED_SITE]]
    state = s.init_state(_w([0.0]), [POOLED_SITE])
    new = s.aggregate(state, [SiteUpdate(POOLED_SITE, _w([7.0]), 100)], 1)
    assert new[GLOBAL][0][0] == 7.0


def test_unknown_strategy_suggests():
    with pytest.raises(ConfigError, match="did you mean 'fedavg'"):
        build_strategy("fedavgg")

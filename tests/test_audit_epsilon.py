"""The one-run audit's statistics (Steinke, Nasr & Jagielski 2023): the epsilon lower bound against
references computed independently here, its soundness on canaries that are exactly epsilon-DP, its
power on a perfect attack, its monotonicity, and its input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, special, stats

from privmed.audit.epsilon import (
    EPSILON_RESOLUTION,
    audit_from_scores,
    epsilon_lower_bound,
    p_value,
    simulate_dp_canaries,
)
from privmed.errors import PrivmedError


def _q(eps: float) -> float:
    """Accuracy of eps-DP randomized response."""
    return math.exp(eps) / (1.0 + math.exp(eps))


def _reference_pure(r: int, v: int, beta: float) -> float:
    """delta = 0: the epsilon solving P[Binomial(r, q(eps)) >= v] = beta, by root finding."""
    if stats.binom.sf(v - 1, r, 0.5) > beta:
        return 0.0
    return optimize.brentq(lambda e: stats.binom.sf(v - 1, r, _q(e)) - beta, 0.0, 30.0, xtol=1e-12)


def _reference_p(r: int, v: int, eps: float, delta: float, m: int) -> float:
    """Theorem 3.1 as printed: f(v) + 2 m delta max_{i=1..m} (f(v-i) - f(v)) / i, with the max over
    all i up to m (the module takes it over i <= v) and f from binom.sf (the module uses cdf)."""
    f = lambda x: stats.binom.sf(np.asarray(x) - 1, r, _q(eps))  # noqa: E731
    i = np.arange(1, m + 1)
    return min(1.0, float(f(v) + 2 * m * delta * np.max((f(v - i) - f(v)) / i)))


# ------------------------------------------------------------------------------- references


@pytest.mark.parametrize(
    ("r", "v", "beta"),
    [(100, 70, 0.05), (500, 300, 0.05), (50, 45, 0.01), (1000, 1000, 0.05), (20, 19, 0.1)],
)
def test_pure_dp_bound_is_the_binomial_tail_root(r, v, beta):
    got = epsilon_lower_bound(r, v, 0.0, beta)
    want = _reference_pure(r, v, beta)
    assert want > 0.0
    assert want - EPSILON_RESOLUTION <= got <= want  # rounded down, never above
    assert got / EPSILON_RESOLUTION == int(got / EPSILON_RESOLUTION)


def test_all_correct_guesses_have_a_closed_form():
    # P[Binomial(r, q) >= r] = q^r = beta  <=>  q = beta^(1/r)
    for r in (10, 200, 1000):
        want = special.logit(0.05 ** (1 / r))
        assert epsilon_lower_bound(r, r, 0.0, 0.05) == pytest.approx(want, abs=2e-6)


@pytest.mark.parametrize(
    ("r", "v", "m", "delta"),
    [(200, 180, 1000, 1e-5), (1000, 1000, 1000, 1e-5), (100, 90, 5000, 5e-5), (60, 50, 60, 1e-3)],
)
def test_approximate_dp_bound_matches_the_theorem(r, v, m, delta):
    beta = 0.05
    got = epsilon_lower_bound(r, v, delta, beta, m=m)
    assert got > 0.0
    # the p-value itself agrees with the theorem, written differently
    for eps in (0.0, 0.5 * got, got, got + 0.3):
        assert p_value(r, v, eps, delta, m=m) == pytest.approx(_reference_p(r, v, eps, delta, m),
                                                               rel=1e-9, abs=1e-12)
    # the largest rejected epsilon, to the resolution
    assert _reference_p(r, v, got, delta, m) <= beta
    assert _reference_p(r, v, got + 2 * EPSILON_RESOLUTION, delta, m) > beta
    # delta only ever weakens the bound
    assert got < epsilon_lower_bound(r, v, 0.0, beta)


def test_delta_term_uses_all_canaries_not_just_the_guesses():
    r, v = 200, 180
    few, many = (epsilon_lower_bound(r, v, 1e-4, m=m) for m in (200, 4000))
    assert many < few
    with pytest.raises(ValueError, match="m .* required when delta > 0"):
        epsilon_lower_bound(r, v, 1e-4)


# ------------------------------------------------------------------------------- soundness


def _first_v_above(r: int, eps: float, delta: float, m: int, beta: float) -> int:
    """Smallest v whose bound exceeds eps (bounds are non-decreasing in v), or r + 1 if none."""
    lo, hi = 0, r + 1  # bound(lo) <= eps; hi is either r + 1 or a v above eps
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if epsilon_lower_bound(r, mid, delta, beta, m=m) > eps:
            hi = mid
        else:
            lo = mid
    return hi


@pytest.mark.parametrize("eps", [1.0, 4.0])
@pytest.mark.parametrize("delta", [0.0, 1e-5])
def test_exact_false_claim_rate_on_randomized_response(eps, delta):
    """Exact, noise-free soundness: with randomized response at eps, V ~ Binomial(r, q(eps)), so
    P[bound > eps] = P[V >= first v whose bound exceeds eps], which must be <= beta."""
    r, m, beta = 500, 1000, 0.05
    v_star = _first_v_above(r, eps, delta, m, beta)
    assert v_star <= r  # some outcome does give a bound above eps (else the check is empty)
    rate = stats.binom.sf(v_star - 1, r, _q(eps))
    assert rate <= beta
    if delta == 0:  # and it is tight: one fewer correct guess would break the guarantee
        assert stats.binom.sf(v_star - 2, r, _q(eps)) > beta


@pytest.mark.parametrize("eps", [1.0, 4.0])
def test_simulated_audits_of_exactly_dp_canaries_rarely_overclaim(eps):
    """200 audits of m=1000 randomized-response canaries, exactly eps-DP each: the bound may exceed
    eps in about beta of them, no more (0.999 binomial quantile as the margin)."""
    trials, m, beta = 200, 1000, 0.05
    rng = np.random.default_rng(20230515)
    bounds = []
    for t in range(trials):
        scores, included = simulate_dp_canaries(m, eps, rng)
        res = audit_from_scores(scores, included, 0.0, beta, k_options=[250], seed=t)
        bounds.append(res["epsilon_lower"])
    bounds = np.array(bounds)
    over = int(np.sum(bounds > eps))
    assert over <= stats.binom.ppf(0.999, trials, beta)
    assert np.median(bounds) > 0.5 * eps  # and it is not trivially sound by always saying 0


def test_ties_are_not_broken_by_position():
    """Constant scores carry no information; breaking ties by index would guess the members when
    they are listed first and claim a large epsilon."""
    included = np.r_[np.ones(500, bool), np.zeros(500, bool)]
    res = audit_from_scores(np.zeros(1000), included, 0.0)
    assert res["epsilon_lower"] < 1.0


# ------------------------------------------------------------------------------------ power


@pytest.mark.parametrize("delta", [0.0, 1e-5])
def test_perfect_attack_gives_what_theory_allows(delta):
    m, beta = 1000, 0.05
    included = np.random.default_rng(7).random(m) < 0.5
    res = audit_from_scores(included.astype(float), included, delta, beta)
    n_opt = len(res["k_options"])
    assert res["beta_per_option"] == pytest.approx(beta / n_opt)
    # with perfect scores, option (k_plus, k_minus) gets min(k_plus, members) + min(k_minus,
    # non-members) right; theory then allows the binomial-tail root for each option at beta / n
    n_in, n_out = int(included.sum()), int((~included).sum())
    counts = [(kp + km, min(kp, n_in) + min(km, n_out)) for kp, km in res["k_options"]]
    assert [(o["r"], o["v"]) for o in res["per_option"]] == counts
    pure = [_reference_pure(r, v, beta / n_opt) for r, v in counts]
    if delta == 0:
        assert res["epsilon_lower"] == pytest.approx(max(pure), abs=2e-6)
        assert (res["r"], res["v"]) == counts[int(np.argmax(pure))]
    else:
        assert 0.95 * max(pure) < res["epsilon_lower"] < max(pure)
    assert res["epsilon_lower"] > 4.0


# ---------------------------------------------------------------------------- monotonicity


@pytest.mark.parametrize(("delta", "m"), [(0.0, None), (1e-5, 1000), (1e-3, 400)])
def test_bound_grows_with_correct_guesses_and_with_beta(delta, m):
    r = 200
    by_v = [epsilon_lower_bound(r, v, delta, 0.05, m=m) for v in range(100, r + 1, 4)]
    assert np.all(np.diff(by_v) >= 0) and by_v[-1] > 2.0
    by_beta = [epsilon_lower_bound(r, 160, delta, b, m=m) for b in (0.001, 0.01, 0.05, 0.2, 0.5)]
    # more confidence (smaller beta): smaller bound, strictly so once it is above 0
    assert np.all(np.diff(by_beta) >= 0) and by_beta[-1] > 0.0
    positive = np.array(by_beta)[np.array(by_beta) > 0]
    assert np.all(np.diff(positive) > 0)


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_chance_level_guessing_proves_nothing(r):
    assert epsilon_lower_bound(r, r // 2, 0.0) == 0.0
    assert epsilon_lower_bound(r, r // 2, 1e-5, m=2 * r) == 0.0
    assert epsilon_lower_bound(r, 0, 0.0) == 0.0
    # one more correct guess than chance is still not significant
    assert epsilon_lower_bound(r, r // 2 + 1, 0.0) == 0.0


def test_union_bound_over_options_costs_confidence():
    rng = np.random.default_rng(3)
    scores, included = simulate_dp_canaries(1000, 3.0, rng)
    one = audit_from_scores(scores, included, 0.0, k_options=[(100, 100)])
    many = audit_from_scores(scores, included, 0.0, k_options=[(100, 100), 10, 50, (200, 0)])
    assert one["beta_per_option"] == 0.05 and many["beta_per_option"] == 0.05 / 4
    assert many["k_options"] == [(100, 100), (10, 10), (50, 50), (200, 0)]
    same = next(o for o in many["per_option"] if (o["k_plus"], o["k_minus"]) == (100, 100))
    assert same["v"] == one["v"] and same["epsilon_lower"] < one["epsilon_lower"]
    assert many["epsilon_lower"] == max(o["epsilon_lower"] for o in many["per_option"])
    # the reported bound is the one recomputed from its own r, v at beta / n
    assert many["epsilon_lower"] == epsilon_lower_bound(many["r"], many["v"], 0.0, 0.05 / 4, m=1000)
    assert "union bound" in many["selection"]


def test_simulated_canaries_are_randomized_response():
    scores, included = simulate_dp_canaries(20000, 1.0, np.random.default_rng(0))
    assert scores.shape == included.shape == (20000,) and included.dtype == bool
    assert abs(included.mean() - 0.5) < 4 * math.sqrt(0.25 / 20000)
    accuracy = np.mean((scores == 1.0) == included)
    assert abs(accuracy - _q(1.0)) < 4 * math.sqrt(_q(1.0) * (1 - _q(1.0)) / 20000)


# -------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((10, 11, 0.0), {}, r"v \(correct guesses\) = 11 exceeds r \(number of guesses\) = 10"),
        ((10, -1, 0.0), {}, "v .* non-negative integer"),
        ((-5, 0, 0.0), {}, "r .* non-negative integer"),
        ((10.0, 5, 0.0), {}, "r .* non-negative integer"),
        ((10, 5, 0.0, 0.0), {}, r"beta .* must be in \(0, 1\)"),
        ((10, 5, 0.0, 1.0), {}, r"beta .* must be in \(0, 1\)"),
        ((10, 5, 0.0, float("nan")), {}, r"beta .* must be in \(0, 1\)"),
        ((10, 5, -1e-5), {}, r"delta must be in \[0, 1\)"),
        ((10, 5, 1.0), {"m": 10}, r"delta must be in \[0, 1\)"),
        ((10, 5, 1e-5), {"m": 9}, r"r \(number of guesses\) = 10 exceeds m"),
    ],
)
def test_bad_counts_are_refused(args, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        epsilon_lower_bound(*args, **kwargs)
    assert isinstance(info.value, PrivmedError)  # the CLI prints these on one line


def test_bad_scores_are_refused():
    ok = np.zeros(10, bool)
    with pytest.raises(ValueError, match="same shape"):
        audit_from_scores(np.zeros(10), np.zeros(9, bool), 0.0)
    with pytest.raises(ValueError, match="1-D"):
        audit_from_scores(np.zeros((2, 5)), ok.reshape(2, 5), 0.0)
    with pytest.raises(ValueError, match="finite"):
        audit_from_scores(np.r_[np.zeros(9), np.nan], ok, 0.0)
    with pytest.raises(ValueError, match="boolean"):
        audit_from_scores(np.zeros(10), np.full(10, 2), 0.0)
    with pytest.raises(ValueError, match=r"beta .* must be in \(0, 1\)"):
        audit_from_scores(np.zeros(10), ok, 0.0, beta=1.5)
    with pytest.raises(ValueError, match="need 1 to m=10"):
        audit_from_scores(np.zeros(10), ok, 0.0, k_options=[(6, 5)])
    with pytest.raises(ValueError, match="k_options is empty"):
        audit_from_scores(np.zeros(10), ok, 0.0, k_options=[])
    with pytest.raises(ValueError, match="at least 2 canaries"):
        audit_from_scores(np.zeros(1), np.zeros(1, bool), 0.0)

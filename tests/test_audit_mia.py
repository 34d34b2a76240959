"""privmed.audit.mia: membership-inference statistics against direct references, closed forms and
invariants. numpy only, small arrays (the whole file runs in seconds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import expit

from privmed.audit import mia

N_BOOT = 200


# ---------------------------------------------------------------------------------------------------
# Synthetic attack data


def synthetic(n: int, n_shadows: int, effect: float, seed: int, spread: float = 2.0) -> dict:
    """Per example n a difficulty c_n ~ N(0, spread^2); a model that trained on n has phi ~ N(c_n +
    effect, 1), one that did not phi ~ N(c_n, 1). The target trained on half the examples; each shadow
    on each example independently with probability 1/2; four reference models on none of them."""
    rng = np.random.default_rng(seed)
    c = rng.normal(0.0, spread, n)
    members = rng.permutation(np.arange(n) < n // 2)
    shadow_in = rng.random((n_shadows, n)) < 0.5
    return {
        "members": members,
        "target_phi": c + effect * members + rng.normal(size=n),
        "shadow_phi": c + effect * shadow_in + rng.normal(size=(n_shadows, n)),
        "shadow_in": shadow_in,
        "offline_phi": c + rng.normal(size=(4, n)),
    }


def binary_logits(phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """K = 1 logits and labels (all class 1) whose true-class confidence is `phi`."""
    return phi[:, None], np.ones(len(phi), dtype=np.int64)


def all_attacks(d: dict) -> dict[str, np.ndarray]:
    """Every attack's scores on a `synthetic` data set."""
    n = len(d["members"])
    logits, labels = binary_logits(d["target_phi"])
    # RMIA's population: a third of the non-members, known to the attacker as such
    population = np.flatnonzero(~d["members"])[: n // 6]
    return {
        "loss": mia.loss_attack(logits, labels),
        "lira-online": mia.lira(d["target_phi"], d["shadow_phi"], d["shadow_in"]),
        "lira-online-fixed": mia.lira(d["target_phi"], d["shadow_phi"], d["shadow_in"], fixed_variance=True),
        "lira-offline": mia.lira(d["target_phi"], d["offline_phi"], np.zeros((4, n), bool), online=False),
        "rmia-online": mia.rmia(expit(d["target_phi"]), expit(d["shadow_phi"]), d["shadow_in"], population),
        "rmia-offline": mia.rmia(expit(d["target_phi"]), expit(d["offline_phi"]), np.zeros((4, n), bool),
                                 population),
    }


@pytest.fixture(scope="module")
def signal() -> dict:
    return synthetic(2000, 16, effect=1.0, seed=1)


@pytest.fixture(scope="module")
def signal_metrics(signal) -> dict[str, dict]:
    return {name: mia.membership_metrics(s, signal["members"], seed=0, n_boot=N_BOOT)
            for name, s in all_attacks(signal).items()}


# ---------------------------------------------------------------------------------------------------
# Signals


def direct_phi(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """log(p_y) - log(1 - p_y) the naive way, in float64 (moderate logits only)."""
    if logits.shape[-1] == 1:
        p1 = 1.0 / (1.0 + np.exp(-logits[:, 0]))
        p = np.where(labels == 1, p1, 1.0 - p1)
    else:
        e = np.exp(logits)
        p = e[np.arange(len(labels)), labels] / e.sum(axis=1)
    return np.log(p) - np.log(1.0 - p)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_phi_prob_and_loss_match_direct_float64(k):
    rng = np.random.default_rng(k)
    logits = rng.normal(0.0, 3.0, (300, k))
    labels = rng.integers(0, max(k, 2), 300)
    phi = mia.true_class_confidence(logits, labels)
    np.testing.assert_allclose(phi, direct_phi(logits, labels), rtol=1e-9, atol=1e-9)
    p = expit(direct_phi(logits, labels))
    np.testing.assert_allclose(mia.true_class_prob(logits, labels), p, rtol=1e-12)
    np.testing.assert_allclose(mia.losses(logits, labels), -np.log(p), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mia.loss_attack(logits, labels), np.log(p), rtol=1e-9, atol=1e-12)


def test_phi_finite_and_right_for_extreme_logits():
    logits = np.array([[100.0, -100.0, -100.0], [-100.0, 100.0, -100.0], [100.0, 100.0, -100.0]])
    phi = mia.true_class_confidence(logits, np.array([0, 0, 0]))
    # y=0 dominant: 100 - logsumexp(-100, -100) = 200 - log 2; y=0 losing: -100 - 100; a tie: 0 - log(1 + e^-200)
    np.testing.assert_allclose(phi, [200.0 - math.log(2.0), -200.0, 0.0], atol=1e-12)
    binary = mia.true_class_confidence(np.array([[100.0], [-100.0], [100.0]]), np.array([1, 1, 0]))
    np.testing.assert_array_equal(binary, [100.0, -100.0, -100.0])
    for f in (mia.true_class_confidence, mia.losses, mia.true_class_prob):
        assert np.all(np.isfinite(f(logits, np.array([0, 1, 2]))))
    assert mia.losses(logits, np.array([1, 1, 1]))[0] == pytest.approx(200.0)  # not inf


def test_phi_broadcasts_over_shadow_models():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 50, 3))
    labels = rng.integers(0, 3, 50)
    stacked = np.stack([mia.true_class_confidence(m, labels) for m in logits])
    np.testing.assert_array_equal(mia.true_class_confidence(logits, labels), stacked)


def test_labels_out_of_range_rejected():
    with pytest.raises(ValueError, match="labels"):
        mia.true_class_confidence(np.zeros((3, 1)), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="labels"):
        mia.true_class_confidence(np.zeros((3, 2)), np.array([0.0, 1.0, 1.0]))


# ---------------------------------------------------------------------------------------------------
# LiRA


def exact_samples(rng, count: int, mean: float, std: float) -> np.ndarray:
    """`count` values whose sample mean is `mean` and sample std (ddof=1) is `std`, exactly."""
    x = rng.normal(size=count)
    return mean + std * (x - x.mean()) / x.std(ddof=1)


def known_shadows(seed: int = 0):
    """Five examples with 10 shadow values each, 3 to 7 of them IN (rows shuffled per example), whose
    IN and OUT sample means and standard deviations (ddof=1) are known exactly."""
    rng = np.random.default_rng(seed)
    n, total = 5, 10
    n_in = np.array([3, 4, 5, 6, 7])
    mu_in, sd_in = rng.normal(1.0, 1.0, n), rng.uniform(0.5, 2.0, n)
    mu_out, sd_out = rng.normal(0.0, 1.0, n), rng.uniform(0.5, 2.0, n)
    values = np.empty((total, n))
    inside = np.empty((total, n), bool)
    for j in range(n):
        col = np.concatenate([exact_samples(rng, n_in[j], mu_in[j], sd_in[j]),
                              exact_samples(rng, total - n_in[j], mu_out[j], sd_out[j])])
        flag = np.arange(total) < n_in[j]
        order = rng.permutation(total)
        values[:, j], inside[:, j] = col[order], flag[order]
    phi = rng.normal(0.5, 1.5, n)
    return phi, values, inside, (mu_in, sd_in, mu_out, sd_out)


def log_normal_ratio(phi, mu_in, sd_in, mu_out, sd_out):
    return np.log(sd_out / sd_in) - (phi - mu_in) ** 2 / (2 * sd_in**2) + (phi - mu_out) ** 2 / (2 * sd_out**2)


def test_online_lira_is_the_analytic_log_likelihood_ratio():
    phi, values, inside, (mu_in, sd_in, mu_out, sd_out) = known_shadows()
    got = mia.lira(phi, values, inside)
    np.testing.assert_allclose(got, log_normal_ratio(phi, mu_in, sd_in, mu_out, sd_out), rtol=1e-9, atol=1e-9)


def test_fixed_variance_lira_uses_the_pooled_within_example_variance():
    phi, values, inside, (mu_in, sd_in, mu_out, sd_out) = known_shadows(1)
    dof_in = np.array([3, 4, 5, 6, 7]) - 1  # each example's own mean costs one degree of freedom
    dof_out = 10 - np.array([3, 4, 5, 6, 7]) - 1
    pooled_in = np.sqrt(np.sum(dof_in * sd_in**2) / dof_in.sum())
    pooled_out = np.sqrt(np.sum(dof_out * sd_out**2) / dof_out.sum())
    got = mia.lira(phi, values, inside, fixed_variance=True)
    np.testing.assert_allclose(got, log_normal_ratio(phi, mu_in, pooled_in, mu_out, pooled_out), rtol=1e-9)


def test_offline_lira_is_the_log_normal_cdf_against_out():
    phi, values, inside, (_, _, mu_out, sd_out) = known_shadows(2)
    expected = [math.log(0.5 * math.erfc(-(p - m) / (s * math.sqrt(2.0)))) for p, m, s in zip(phi, mu_out, sd_out)]
    np.testing.assert_allclose(mia.lira(phi, values, inside, online=False), expected, rtol=1e-9)
    # the IN shadows play no part offline
    np.testing.assert_allclose(mia.lira(phi, values[~inside[:, 0]], inside[~inside[:, 0]], online=False)[0],
                               expected[0], rtol=1e-9)


def test_lira_fallbacks_for_missing_sides_and_tiny_variance():
    phi, values, inside, (mu_in, sd_in, mu_out, sd_out) = known_shadows(3)
    inside = inside.copy()
    inside[:, 0] = False  # example 0: only OUT shadows (all 10)
    values = values.copy()
    values[:, 1] = np.where(inside[:, 1], values[:, 1], 0.25)  # example 1: its OUT shadows all agree
    scores = mia.lira(phi, values, inside)
    assert np.all(np.isfinite(scores))
    # example 0's IN side: its OUT mean + the mean IN-OUT shift of the others, the pooled IN variance
    shift = np.mean(mu_in[1:] - np.r_[0.25, mu_out[2:]])
    mean0 = values[:, 0].mean()
    dof_in = np.array([4, 5, 6, 7]) - 1
    pooled_in = np.sqrt(np.sum(dof_in * sd_in[1:] ** 2) / dof_in.sum())
    sd0 = values[:, 0].std(ddof=1)
    np.testing.assert_allclose(scores[0], log_normal_ratio(phi[0], mean0 + shift, pooled_in, mean0, sd0), rtol=1e-9)
    # example 1's OUT side has zero spread: the floor, not a division by zero
    np.testing.assert_allclose(scores[1], log_normal_ratio(phi[1], mu_in[1], sd_in[1], 0.25, mia.MIN_STD), rtol=1e-9)
    with pytest.raises(ValueError, match="no example has both"):
        mia.lira(phi, values, np.zeros_like(inside), online=True)


def test_online_lira_beats_the_loss_attack(signal_metrics):
    loss = signal_metrics["loss"]
    for name in ("lira-online", "lira-online-fixed"):
        assert signal_metrics[name]["roc_auc_ci"][0] > loss["roc_auc_ci"][1], name
    # At low FPR only the shared variance wins with 16 shadows (8 IN, 8 OUT per example): per-example
    # variances from 8 values make the quadratic log ratio noisy in the tails (why Carlini et al.
    # recommend a fixed variance below 64 shadows). Per-example LiRA is not asserted here.
    assert signal_metrics["lira-online-fixed"]["tpr_at_fpr"]["0.01"] > loss["tpr_at_fpr"]["0.01"]


# ---------------------------------------------------------------------------------------------------
# RMIA


def test_rmia_scores_are_fractions_and_ignore_a_constant_factor_on_the_target():
    rng = np.random.default_rng(4)
    n = 300
    target = rng.uniform(0.05, 1.0, n)
    refs = rng.uniform(0.05, 1.0, (3, n))
    ref_in = rng.random((3, n)) < 0.5
    population = rng.choice(n, 60, replace=False)
    scores = mia.rmia(target, refs, ref_in, population)
    assert np.all((scores >= 0) & (scores <= 1))
    assert len(np.unique(scores)) > 20
    # Pr(x|theta) / Pr(z|theta) does not change when every target probability is scaled by c
    np.testing.assert_array_equal(mia.rmia(0.37 * target, refs, ref_in, population), scores)
    # online Pr(x) is a mean of the reference models: scaling all of them by c cancels too
    online = np.zeros((4, n), bool)
    online[:2] = True
    both = np.vstack([refs, target[None]])
    np.testing.assert_array_equal(mia.rmia(target, 0.5 * both, online, population),
                                  mia.rmia(target, both, online, population))


@pytest.mark.parametrize("a", [0.0, 0.3, 0.9])
def test_rmia_with_the_target_as_its_reference_ranks_by_the_target_probability(a):
    # One OUT reference model equal to the target: Pr(x) = ((1 + a) p(x) + 1 - a) / 2, so the ratio
    # p / Pr = 2p / ((1 + a) p + 1 - a) increases with p for a < 1, and LR(x, z) > 1 iff p(x) > p(z):
    # the score is the fraction of the population (x itself left out) with a smaller p.
    rng = np.random.default_rng(5)
    n = 200
    p = rng.uniform(0.01, 1.0, n)
    population = rng.choice(n, 50, replace=False)
    scores = mia.rmia(p, p[None], np.zeros((1, n), bool), population, a=a)
    pop_p = p[population]
    expected = np.array([(pop_p < p[i]).sum() / (50 - (i in population)) for i in range(n)])
    np.testing.assert_array_equal(scores, expected)


def test_rmia_with_the_target_as_its_reference_and_a_1_sees_nothing():
    # a = 1: Pr(x) = Pr_out(x) = p(x), every ratio is 1, and no LR exceeds gamma = 1
    p = np.random.default_rng(6).uniform(0.01, 1.0, 40)
    assert np.all(mia.rmia(p, p[None], np.zeros((1, 40), bool), np.arange(10), a=1.0) == 0)


def test_rmia_gamma_extremes_and_self_exclusion():
    # Every ratio lies within [1e-3, 1e3] here, so each LR beats a tiny gamma and none a huge one: the
    # scores are exactly 1 and 0, population members included (their own pair left out of both counts).
    rng = np.random.default_rng(8)
    p, refs = rng.uniform(0.1, 1.0, 30), rng.uniform(0.1, 1.0, (2, 30))
    ref_in = np.zeros((2, 30), bool)
    assert np.all(mia.rmia(p, refs, ref_in, np.arange(10), gamma=1e-9) == 1.0)
    assert np.all(mia.rmia(p, refs, ref_in, np.arange(10), gamma=1e9) == 0.0)


def test_rmia_marginal_online_offline_and_inverted():
    probs = np.array([[0.2, 0.4, 0.9], [0.6, 0.8, 0.7]])
    ref_in = np.array([[True, False, True], [False, False, True]])
    got = mia.rmia_marginal(probs, ref_in, a=0.5)
    expected = [0.4,  # both IN and OUT: mean of all
                (1.5 * 0.6 + 0.5) / 2,  # OUT only
                (0.8 + (0.8 - 0.5) / 0.5) / 2]  # IN only: Pr_out = (Pr_in - (1 - a)) / a
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_rmia_beats_random(signal, signal_metrics):
    assert signal_metrics["rmia-offline"]["roc_auc_ci"][0] > 0.55
    assert signal_metrics["rmia-online"]["roc_auc_ci"][0] > 0.55


# ---------------------------------------------------------------------------------------------------
# Evaluation


def test_no_signal_every_attack_ci_covers_half():
    d = synthetic(1000, 16, effect=0.0, seed=2)
    for name, scores in all_attacks(d).items():
        lo, hi = mia.membership_metrics(scores, d["members"], seed=0, n_boot=N_BOOT)["roc_auc_ci"]
        assert lo < 0.5 < hi, name


def brute_force(scores, members, target_fpr):
    """max TPR over thresholds t (score >= t is a member) with FPR <= target; and the balanced accuracy
    and the AUC (pairs, ties half) by definition."""
    best_tpr, best_bal = 0.0, 0.5
    for t in np.unique(scores):
        tpr = np.mean(scores[members] >= t)
        fpr = np.mean(scores[~members] >= t)
        if fpr <= target_fpr:
            best_tpr = max(best_tpr, tpr)
        best_bal = max(best_bal, (tpr + 1 - fpr) / 2)
    diff = scores[members][:, None] - scores[~members][None, :]
    auc = np.mean(diff > 0) + 0.5 * np.mean(diff == 0)
    return best_tpr, best_bal, auc


def test_tpr_at_fpr_balanced_accuracy_and_auc_match_brute_force():
    rng = np.random.default_rng(7)
    members = rng.permutation(np.arange(400) < 150)  # 250 non-members: FPR resolves down to 0.004
    scores = np.round(rng.normal(size=400) + 0.8 * members, 1)  # ties
    fprs = (0.001, 0.004, 0.01, 0.05, 0.3)
    got = mia.membership_metrics(scores, members, seed=0, n_boot=0, fprs=fprs)
    assert got["min_resolvable_fpr"] == 1 / 250
    assert got["tpr_at_fpr"]["0.001"] is None and got["tpr_at_fpr_ci"]["0.001"] is None
    assert mia.tpr_at_fpr(scores, members, 0.001) is None
    for f in fprs[1:]:
        expected = brute_force(scores, members, f)[0]
        assert got["tpr_at_fpr"][f"{f:g}"] == pytest.approx(expected, abs=1e-12), f
        assert mia.tpr_at_fpr(scores, members, f) == pytest.approx(expected, abs=1e-12)
    _, bal, auc = brute_force(scores, members, 1.0)
    assert got["balanced_accuracy"] == pytest.approx(bal, abs=1e-12)
    assert got["roc_auc"] == pytest.approx(auc, abs=1e-12)
    assert (got["n_members"], got["n_nonmembers"]) == (150, 250)


def test_tpr_at_fpr_inside_a_run_of_collinear_roc_points():
    # Tie groups of one member and one non-member: the ROC corners (0,0), (1/4,1/4), ..., (1,1) are
    # collinear; at FPR <= 1/2 the TPR is 1/2 (threshold 3), which a curve without its collinear
    # points (sklearn's drop_intermediate) would miss.
    scores = np.repeat([4.0, 3.0, 2.0, 1.0], 2)
    members = np.tile([True, False], 4)
    assert mia.tpr_at_fpr(scores, members, 0.5) == pytest.approx(0.5)
    assert mia.tpr_at_fpr(scores, members, 0.2) is None


def test_bootstrap_is_reproducible_and_brackets_the_estimate(signal, signal_metrics):
    scores = all_attacks(signal)["lira-online"]
    again = mia.membership_metrics(scores, signal["members"], seed=0, n_boot=N_BOOT)
    first = signal_metrics["lira-online"]
    assert again["roc_auc_ci"] == first["roc_auc_ci"]
    assert again["tpr_at_fpr_ci"] == first["tpr_at_fpr_ci"]
    other = mia.membership_metrics(scores, signal["members"], seed=1, n_boot=N_BOOT)
    assert other["roc_auc_ci"] != first["roc_auc_ci"]
    lo, hi = first["roc_auc_ci"]
    assert lo < first["roc_auc"] < hi
    for key in ("0.001", "0.01"):  # 1000 non-members: both resolvable
        lo, hi = first["tpr_at_fpr_ci"][key]
        assert lo <= first["tpr_at_fpr"][key] <= hi and lo < hi


def test_roc_points_thinned_exact_at_low_fpr(signal, signal_metrics):
    scores = all_attacks(signal)["lira-online"]
    got = signal_metrics["lira-online"]
    fpr, tpr = np.array(got["roc_fpr"]), np.array(got["roc_tpr"])
    from sklearn.metrics import roc_curve

    full_fpr, full_tpr, _ = roc_curve(signal["members"], scores, drop_intermediate=True)
    assert len(full_fpr) > mia.ROC_MAX_POINTS  # so that thinning is exercised
    assert len(fpr) <= mia.ROC_MAX_POINTS
    half = mia.ROC_MAX_POINTS // 2
    np.testing.assert_array_equal(fpr[:half], full_fpr[:half])
    np.testing.assert_array_equal(tpr[:half], full_tpr[:half])
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    full = set(zip(full_fpr.tolist(), full_tpr.tolist()))
    assert all(pt in full for pt in zip(fpr.tolist(), tpr.tolist()))

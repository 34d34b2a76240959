"""The scoring releases' mechanism (privmed.privacy.noisy_counts, privmed.tasks.counts.noisy_counts):
one patient moves every released block by at most its bound, whatever the predictions; the noise
has the standard deviation the noise multiplier says and comes from the Generator alone; no noise
gives today's exact counts; every consumer of counts takes noisy ones; the calibration agrees with
dp-accounting and with the Gaussian mechanism's exact privacy curve; and the crafted-MLP attack of
issue 25 reads a test record from exact counts but not from noisy ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from privmed.data.base import ImageSet
from privmed.privacy.accountants import Release, epsilon_spent, independent_epsilon
from privmed.privacy.noisy_counts import (
    Block,
    check_blocks,
    gaussian_release,
    release_grid,
    scoring_epsilon,
    scoring_noise,
    scoring_release,
    sensitivity,
)
from privmed.tasks.base import get_task
from privmed.tasks.counts import (
    LOGIT_MAX,
    LOSS_MAX,
    PRIVATE_EDGES,
    SCORE_BINS,
    check_counts,
    classification_counts,
    classification_metrics_from_counts,
    load_counts,
    merge_counts,
    noisy_counts,
    noisy_metrics_and_counts,
    one_vs_rest_auc,
    private_release,
    reliability_from_counts,
    roc_from_counts,
    save_counts,
    survival_counts,
    uniform_edges,
)

EXACT_EDGES = uniform_edges(SCORE_BINS, LOGIT_MAX)
CLASSIFICATION = get_task("classification")


# ------------------------------------------------------------------------------------- data


def _patients(rng, n_patients: int, max_items: int = 1) -> np.ndarray:
    """(N,) patient ids, 1..max_items items each."""
    k = rng.integers(1, max_items + 1, size=n_patients)
    return np.repeat([f"p{i}" for i in range(n_patients)], k)


def _adversarial_probs(rng, n: int, k: int) -> np.ndarray:
    """(n, K) probabilities as crafted weights give them: spread, saturated at 0 and 1, tied at
    1/K, and some rows not finite."""
    logits = rng.normal(0, 1, size=(n, k)) * rng.choice([0.1, 3.0, 40.0, 1e4], size=(n, 1))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[rng.random(n) < 0.1] = 1.0 / k
    p[rng.random(n) < 0.1, 0] = np.nan
    p[rng.random(n) < 0.05, -1] = np.inf
    return p


def _classification_set(rng, n_patients: int, k: int, max_items: int) -> tuple[np.ndarray, ImageSet]:
    patient = _patients(rng, n_patients, max_items)
    n = len(patient)
    data = ImageSet(images=np.zeros((n, 1), np.float32), labels=rng.integers(0, k, size=n), patient=patient)
    return _adversarial_probs(rng, n, k), data


def _subset(data: ImageSet, idx: np.ndarray) -> ImageSet:
    pick = lambda a: None if a is None else a[idx]  # noqa: E731
    return ImageSet(images=data.images[idx], labels=data.labels[idx], site=pick(data.site),
                    patient=pick(data.patient), time=pick(data.time), target=pick(data.target))


def _assert_neighbours_within_bounds(task, pred, data, **options) -> float:
    """For every patient of `data`: the released blocks with and without it differ, block by
    block, by at most the block's bound, and the whole weighted vector by at most the sensitivity
    (1). Returns the largest weighted distance seen (how close to the bound the worst case came)."""
    full, blocks, _ = private_release(task, pred, data, **options)
    worst = 0.0
    for patient in np.unique(data.patient_ids()):
        keep = np.flatnonzero(data.patient_ids() != patient)
        part, _, _ = private_release(task, pred[keep], _subset(data, keep), **options)
        weighted = 0.0
        for b in blocks:
            d = float(np.linalg.norm(np.asarray(full[b.key], float) - np.asarray(part[b.key], float)))
            assert d <= b.bound * (1 + 1e-9), f"patient {patient} moves '{b.key}' by {d} > {b.bound}"
            weighted += b.share * (d / b.bound) ** 2
        assert math.sqrt(weighted) <= sensitivity(blocks) * (1 + 1e-9)
        worst = max(worst, math.sqrt(weighted))
    return worst


# ------------------------------------------------------------------------------- the mechanism


def test_block_noise_has_the_standard_deviation_the_noise_multiplier_gives():
    """Each entry of block b gets N(0, (sigma bound / sqrt(share))^2): the sample sd of 20,000
    entries per block within 3% (its own sd is 0.5%), mean within 5 standard errors of 0."""
    blocks = [Block("a", 1.0, 0.9), Block("b", 8.0, 0.1)]
    exact = {"a": np.full((100, 100), 7.0), "b": np.full((100, 100), -3.0)}
    rng = np.random.default_rng(0)
    noisy = [gaussian_release(exact, blocks, 0.7, rng) for _ in range(2)]
    for b in blocks:
        noise = np.concatenate([(r[b.key] - exact[b.key]).ravel() for r in noisy])
        want = 0.7 * b.bound / math.sqrt(b.share)
        assert b.noise_std(0.7) == pytest.approx(want)
        assert noise.std() == pytest.approx(want, rel=0.03)
        assert abs(noise.mean()) < 5 * want / math.sqrt(noise.size)


def test_the_noise_comes_from_the_generator_alone_and_not_from_the_counts():
    """The same Generator state gives the same noise for any counts (the draws do not depend on the
    values), another state other noise; noise multiplier 0 draws nothing and returns the counts."""
    blocks = [Block("h", 1.0, 1.0)]
    a, b = {"h": np.arange(12.0)}, {"h": np.arange(12.0)[::-1] * 5}
    na = gaussian_release(a, blocks, 2.0, np.random.default_rng(5))["h"] - a["h"]
    nb = gaussian_release(b, blocks, 2.0, np.random.default_rng(5))["h"] - b["h"]
    np.testing.assert_allclose(na, nb, atol=2 * release_grid(2.0))
    nc = gaussian_release(a, blocks, 2.0, np.random.default_rng(6))["h"] - a["h"]
    assert not np.allclose(na, nc)
    rng = np.random.default_rng(7)
    state = rng.bit_generator.state
    out = gaussian_release(a, blocks, 0.0, rng)
    assert rng.bit_generator.state == state
    np.testing.assert_array_equal(out["h"], a["h"])


def test_released_values_sit_on_a_grid_far_below_the_noise():
    """Every noisy value is a multiple of a power of two at most 1/1024 of the noise's sd: the low
    bits of the float sum (Mironov 2012) are not released."""
    blocks = [Block("h", 3.0, 1.0)]
    out = gaussian_release({"h": np.arange(50.0) + 0.123456789}, blocks, 1.3, np.random.default_rng(0))["h"]
    grid = release_grid(blocks[0].noise_std(1.3))
    assert grid <= blocks[0].noise_std(1.3) / 1024 and math.log2(grid) == int(math.log2(grid))
    np.testing.assert_array_equal(out / grid, np.round(out / grid))


def test_blocks_must_split_the_whole_sensitivity_once():
    with pytest.raises(ValueError, match="sum to 1"):
        check_blocks([Block("a", 1.0, 0.5), Block("b", 1.0, 0.4)])
    with pytest.raises(ValueError, match="each key once"):
        check_blocks([Block("a", 1.0, 0.5), Block("a", 1.0, 0.5)])
    with pytest.raises(ValueError, match="bound"):
        Block("a", math.inf, 1.0)
    with pytest.raises(ValueError, match="share"):
        Block("a", 1.0, 0.0)
    with pytest.raises(ValueError, match="hold"):
        gaussian_release({"a": np.zeros(2), "b": np.zeros(2)}, [Block("a", 1.0, 1.0)], 1.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="not all finite"):
        gaussian_release({"a": np.array([np.nan])}, [Block("a", 1.0, 1.0)], 1.0, np.random.default_rng(0))


# ----------------------------------------------------------------------------- the sensitivity


@pytest.mark.parametrize("k, max_items", [(2, 1), (2, 4), (3, 1), (4, 3)])
def test_one_patient_moves_classification_counts_by_at_most_the_bound(k, max_items):
    """Remove each patient in turn (several items each, adversarial and non-finite probabilities):
    every block moves by at most its bound and the release by at most the sensitivity."""
    rng = np.random.default_rng(k * 10 + max_items)
    pred, data = _classification_set(rng, 25, k, max_items)
    assert _assert_neighbours_within_bounds(CLASSIFICATION, pred, data) > 0.5


def test_the_worst_classification_patient_reaches_the_bound():
    """A patient whose items all land in one score bin and one confidence bin, confident and right,
    with a clipped loss: its score histogram moves by exactly 1, its reliability sums by sqrt(3),
    its loss by LOSS_MAX (the bounds are tight, not loose guesses)."""
    labels = np.array([1, 1, 1, 0, 0])
    pred = np.array([[0.0, 1.0]] * 3 + [[1e-9, 1.0 - 1e-9], [0.3, 0.7]])  # b: sure and wrong
    data = ImageSet(images=np.zeros((5, 1), np.float32), labels=labels, patient=np.array(["a", "a", "a", "b", "c"]))
    full, blocks, _ = private_release(CLASSIFICATION, pred, data)
    without_a, _, _ = private_release(CLASSIFICATION, pred[3:], _subset(data, np.arange(3, 5)))
    without_b, _, _ = private_release(CLASSIFICATION, pred[[0, 1, 2, 4]], _subset(data, np.array([0, 1, 2, 4])))
    bound = {b.key: b.bound for b in blocks}
    assert np.linalg.norm(full["score_hist"] - without_a["score_hist"]) == pytest.approx(bound["score_hist"])
    assert np.linalg.norm(full["rel"] - without_a["rel"]) == pytest.approx(bound["rel"])
    assert abs(full["loss_sum"] - without_b["loss_sum"]) == pytest.approx(LOSS_MAX)


def test_without_patient_weights_a_patient_with_several_items_would_exceed_the_bound():
    """The 1/k weights are what keeps the bound: counting each of a patient's 4 items once moves
    the histogram by 4 (so the neighbour check above can fail)."""
    labels = np.ones(4, dtype=np.int64)
    pred = np.tile([[0.2, 0.8]], (4, 1))
    one_each = classification_counts(pred, labels, edges=PRIVATE_EDGES)
    assert np.linalg.norm(one_each["score_hist"][1].astype(float)) == pytest.approx(4.0)
    data = ImageSet(images=np.zeros((4, 1), np.float32), labels=labels, patient=np.array(["a"] * 4))
    released, _, _ = private_release(CLASSIFICATION, pred, data)
    assert np.linalg.norm(released["score_hist"]) == pytest.approx(1.0)


def test_one_patient_moves_survival_counts_by_at_most_the_bound():
    rng = np.random.default_rng(3)
    n = 30
    patient = _patients(rng, n, 2)
    m = len(patient)
    risk = rng.normal(size=m) * 3
    risk[rng.random(m) < 0.1] = np.nan
    data = ImageSet(images=np.zeros((m, 1), np.float32), labels=rng.integers(0, 2, m), patient=patient,
                    time=np.round(rng.exponential(5, m), 1))
    task = get_task("survival")
    worst = _assert_neighbours_within_bounds(task, risk, data, max_patients=n)
    assert worst > 0.3


def _segmentation_set(rng, n_patients: int, k: int = 3, slices: int = 3, size: int = 12,
                      scales: tuple[float, ...] = (0.5, 5.0, 50.0)):
    patient = _patients(rng, n_patients, slices)
    n = len(patient)
    target = rng.integers(0, k, size=(n, size, size))
    target[: n // 3] = 0  # some slices without any structure
    logits = rng.normal(size=(n, k, size, size)) * rng.choice(scales, size=(n, 1, 1, 1))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs[0, :, 0, 0] = np.nan
    data = ImageSet(images=np.zeros((n, 1, size, size), np.float32), labels=np.zeros(n, np.int64),
                    patient=patient, target=target)
    return probs, data


def test_one_patient_moves_segmentation_counts_by_at_most_the_bound():
    rng = np.random.default_rng(4)
    probs, data = _segmentation_set(rng, 8)
    assert _assert_neighbours_within_bounds(get_task("segmentation"), probs, data) > 0.3


def test_one_patient_moves_3d_patch_segmentation_counts_by_at_most_the_bound():
    rng = np.random.default_rng(5)
    n, k = 7, 2
    patient = np.array(["a", "a", "b", "c", "c", "c", "d"])
    target = rng.integers(0, k, size=(n, 3, 8, 8))
    probs = rng.dirichlet(np.ones(k), size=(n, 3, 8, 8)).transpose(0, 4, 1, 2, 3)
    data = ImageSet(images=np.zeros((n, 1, 3, 8, 8), np.float32), labels=np.zeros(n, np.int64),
                    patient=patient, target=target)
    _assert_neighbours_within_bounds(get_task("segmentation"), probs, data)


def _reconstruction_set(seed: int = 0):
    from privmed.config import DataConfig, SitesConfig
    from privmed.data import load_source

    src = load_source(DataConfig(source="phantom", volumes_per_site=2, size=16), SitesConfig(count=3), seed,
                      task="reconstruction")
    return src.test if len(src.test) else src.train


def test_one_patient_moves_reconstruction_counts_by_at_most_the_bound():
    data = _reconstruction_set()
    rng = np.random.default_rng(6)
    pred = (data.target + rng.normal(0, 0.3, data.target.shape) * rng.choice([0.0, 1.0, 30.0], (len(data), 1, 1, 1)))
    pred = pred.astype(np.float32)
    pred[0, 0, 0, 0] = np.nan
    assert _assert_neighbours_within_bounds(get_task("reconstruction"), pred, data) > 0.3


# ------------------------------------------------------------------------ no noise: today's counts


@pytest.mark.parametrize("k", [2, 3])
def test_no_noise_on_todays_grid_gives_todays_classification_counts(k):
    """noise_multiplier 0, the exact counts' grid, one item per patient, probabilities as softmax
    gives them: every count equals classification_counts' (the binary release reads the class-0
    histogram and the confusion matrix from the class-1 histogram: they come out the same)."""
    rng = np.random.default_rng(k)
    logits = rng.normal(0, 1.5, size=(300, k))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, k, 300)
    assert -np.log(probs[np.arange(300), labels]).max() < LOSS_MAX  # the loss clip does not bind
    data = ImageSet(images=np.zeros((300, 1), np.float32), labels=labels)
    exact = classification_counts(probs, labels)
    released = noisy_counts(CLASSIFICATION, probs, data, 0.0, np.random.default_rng(0), edges=EXACT_EDGES)
    assert set(released) == set(exact)
    for key in exact:
        np.testing.assert_allclose(released[key], exact[key], rtol=1e-12, atol=1e-9, err_msg=key)


def test_no_noise_gives_todays_survival_pairs():
    rng = np.random.default_rng(1)
    risk, time, event = rng.normal(size=60), np.round(rng.exponential(3, 60), 1), rng.integers(0, 2, 60)
    data = ImageSet(images=np.zeros((60, 1), np.float32), labels=event, time=time)
    exact = survival_counts(risk, time, event)
    released = noisy_counts(get_task("survival"), risk, data, 0.0, np.random.default_rng(0))
    for key in ("n", "events", "concordant", "comparable", "nonfinite"):
        assert float(released[key]) == float(exact[key]), key
    assert math.isnan(float(released["loss_sum"]))  # not released


def test_no_noise_gives_todays_dense_counts_with_one_slice_per_patient():
    rng = np.random.default_rng(2)
    probs, data = _segmentation_set(rng, 6, slices=1, scales=(0.5, 2.0))  # losses below LOSS_MAX
    probs[0, :, 0, 0] = 1 / 3  # finite: today's counts would not accept NaN either
    task = get_task("segmentation")
    exact = task.counts(probs, data)
    released = noisy_counts(task, probs, data, 0.0, np.random.default_rng(0))
    hd_clipped = np.any(exact["hd95_sum"] > 32 * exact["hd95_n"])
    for key in exact:
        if key.startswith("hd95") and hd_clipped:
            continue
        np.testing.assert_allclose(released[key], exact[key], rtol=1e-9, err_msg=key)
    data = _reconstruction_set(1)
    one = _subset(data, np.unique(data.patient_ids(), return_index=True)[1])
    pred = np.clip(one.target + 0.05, 0, 1).astype(np.float32)
    task = get_task("reconstruction")
    exact, released = task.counts(pred, one), noisy_counts(task, pred, one, 0.0, np.random.default_rng(0))
    for key in exact:
        np.testing.assert_allclose(released[key], exact[key], rtol=1e-6, err_msg=key)


def test_a_non_finite_prediction_is_scored_as_uniform_and_releases_nothing_of_it():
    """A NaN row counts as the uniform prediction (no error, no 'nonfinite' count that an overflow
    oracle could read): the release equals that of the same data with the row set to 1/K."""
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(2), size=40)
    data = ImageSet(images=np.zeros((40, 1), np.float32), labels=rng.integers(0, 2, 40))
    bad, uniform = probs.copy(), probs.copy()
    bad[7] = [np.nan, np.inf]
    uniform[7] = 0.5
    a = noisy_counts(CLASSIFICATION, bad, data, 1.0, np.random.default_rng(9))
    b = noisy_counts(CLASSIFICATION, uniform, data, 1.0, np.random.default_rng(9))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert float(a["nonfinite"]) == 0.0


# ---------------------------------------------------------------------- consumers of noisy counts


def _noisy_sites(sigma: float = 3.0, k: int = 2) -> list[dict]:
    rng = np.random.default_rng(10 + k)
    out = []
    for _ in range(3):
        n = 60
        labels = rng.integers(0, k, n)
        logits = rng.normal(size=(n, k)) + 2.0 * np.eye(k)[labels]
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        data = ImageSet(images=np.zeros((n, 1), np.float32), labels=labels)
        out.append(noisy_counts(CLASSIFICATION, probs, data, sigma, rng))
    return out


@pytest.mark.parametrize("k", [2, 3])
def test_every_consumer_of_counts_takes_noisy_ones(k, tmp_path):
    """Merged, saved and loaded, checked, turned into metrics, ROC and reliability bins, and drawn by
    the report: noisy counts (negative entries, non-integer n) go through and give figures in their
    ranges."""
    from privmed.report import plots

    parts = _noisy_sites(3.0, k)
    merged = merge_counts(parts)
    assert (merged["score_hist"] < 0).any() and float(merged["n"]) != round(float(merged["n"]))
    save_counts(tmp_path / "c.npz", {"global": merged, "site-a": parts[0]})
    loaded = load_counts(tmp_path / "c.npz")
    for key in merged:
        np.testing.assert_array_equal(loaded["global"][key], merged[key])
    check_counts(loaded["site-a"])
    for c in (merged, *parts):
        m = classification_metrics_from_counts(c)
        assert set(m) == {"auc", "accuracy", "balanced_accuracy", "ece", "loss", "n"}
        assert 0 <= m["auc"] <= 1 or (c is not merged and math.isnan(m["auc"]))
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["balanced_accuracy"] <= 1
        assert m["ece"] >= 0 and m["loss"] >= 0 and isinstance(m["n"], int) and m["n"] >= 0
        fpr, tpr = roc_from_counts(c, 1)
        assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
        assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
        assert 0 <= one_vs_rest_auc(c, 1) <= 1 or (c is not merged and math.isnan(one_vs_rest_auc(c, 1)))
        conf, acc, count = reliability_from_counts(c)
        seen = count > 0
        assert np.all(count >= 0) and np.all((conf[seen] >= 0) & (conf[seen] <= 1))
        assert np.all((acc[seen] >= 0) & (acc[seen] <= 1))
    png = plots.roc_curves({"global": (*roc_from_counts(merged, 1), one_vs_rest_auc(merged, 1))}, "ROC")
    assert png[:4] == b"\x89PNG"
    ece = {"global": classification_metrics_from_counts(merged)["ece"]}
    assert plots.calibration_bins({"global": reliability_from_counts(merged)}, ece, k)[:4] == b"\x89PNG"


def test_noisy_counts_with_nothing_left_give_nan_metrics_not_errors():
    """A noisy n at or below 0 (a tiny site, much noise) gives NaN metrics; an empty split
    releases nothing ({})."""
    rng = np.random.default_rng(0)
    data = ImageSet(images=np.zeros((2, 1), np.float32), labels=np.array([0, 1]))
    probs = np.array([[0.6, 0.4], [0.3, 0.7]])
    seen_nan = False
    for _ in range(40):
        c = noisy_counts(CLASSIFICATION, probs, data, 5.0, rng)
        m = classification_metrics_from_counts(c)
        if float(c["n"]) <= 0:
            seen_nan = True
            assert all(math.isnan(m[key]) for key in ("auc", "accuracy", "ece", "loss")) and m["n"] == 0
    assert seen_nan
    assert noisy_counts(CLASSIFICATION, probs[:0], _subset(data, np.arange(0)), 1.0, rng) == {}


@pytest.mark.parametrize("name", ["survival", "segmentation", "reconstruction"])
def test_other_tasks_metrics_take_noisy_counts(name):
    rng = np.random.default_rng(1)
    task = get_task(name)
    if name == "survival":
        n = 40
        pred = rng.normal(size=n)
        data = ImageSet(images=np.zeros((n, 1), np.float32), labels=rng.integers(0, 2, n),
                        time=rng.exponential(2, n))
    elif name == "segmentation":
        pred, data = _segmentation_set(rng, 4)
    else:
        data = _reconstruction_set(2)
        pred = np.clip(data.target + 0.1, 0, 1).astype(np.float32)
    for sigma in (0.5, 20.0):
        parts = [noisy_counts(task, pred, data, sigma, rng) for _ in range(3)]
        m = task.metrics_from_counts(merge_counts(parts))
        check_counts(merge_counts(parts))
        assert m["n"] >= 0
        for key, value in m.items():
            assert isinstance(value, (int, float)) and (math.isnan(value) or math.isfinite(value)), key
        headline = m[task.headline]
        if name != "reconstruction":  # c-index and Dice are clipped to [0, 1]
            assert math.isnan(headline) or 0 <= headline <= 1


def test_a_site_returns_metrics_computed_from_its_noisy_counts():
    """noisy_metrics_and_counts: the metrics are the task's metrics of the released counts (post-
    processing), not the exact ones."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 80)
    probs = np.clip(np.stack([1 - labels * 0.6 - 0.2, labels * 0.6 + 0.2], axis=1) + rng.normal(0, 0.1, (80, 2)), 0.01, 0.99)
    probs /= probs.sum(axis=1, keepdims=True)
    data = ImageSet(images=np.zeros((80, 1), np.float32), labels=labels)
    metrics, counts = noisy_metrics_and_counts(CLASSIFICATION, probs, data, 2.0, np.random.default_rng(3))
    assert metrics == classification_metrics_from_counts(counts)
    assert metrics != CLASSIFICATION.metrics(probs, data)
    again = noisy_counts(CLASSIFICATION, probs, data, 2.0, np.random.default_rng(3))
    for key in counts:
        np.testing.assert_array_equal(again[key], counts[key])


def test_a_binary_grid_must_be_symmetric():
    data = ImageSet(images=np.zeros((2, 1), np.float32), labels=np.array([0, 1]))
    with pytest.raises(ValueError, match="symmetric"):
        noisy_counts(CLASSIFICATION, np.array([[0.4, 0.6], [0.5, 0.5]]), data, 1.0, np.random.default_rng(0),
                     edges=np.array([-1.0, 0.0, 2.0]))


# -------------------------------------------------------------------------------- calibration


def _exact_delta(epsilon: float, sigma: float, releases: int) -> float:
    """The Gaussian mechanism's exact privacy curve (Balle and Wang 2018) for `releases` releases
    at noise multiplier sigma, sensitivity 1: one Gaussian mechanism with mu = sqrt(releases) / sigma."""
    mu = math.sqrt(releases) / sigma
    return norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * norm.cdf(-epsilon / mu - mu / 2)


@pytest.mark.parametrize("epsilon, releases", [(1.0, 1), (8.0, 1), (4.0, 20), (4.0, 200)])
def test_scoring_noise_meets_the_target_by_dp_accounting_and_the_exact_curve(epsilon, releases):
    """The calibrated noise never overshoots: its epsilon by our accountant and by dp-accounting's
    PLD on its fine grid is at most the target (to PLD's discretisation), and the exact curve's
    delta at the target epsilon is at most delta; it is tight: 3% less noise breaks the target."""
    delta = 1e-5
    sigma = scoring_noise(epsilon, delta, releases)
    assert scoring_epsilon(sigma, releases, delta) <= epsilon
    assert independent_epsilon([scoring_release(sigma, releases)], delta) <= epsilon * 1.001
    assert _exact_delta(epsilon, sigma, releases) <= delta
    assert _exact_delta(epsilon, 0.97 * sigma, releases) > delta


def test_a_scoring_release_composes_with_training_releases():
    """Release(sigma, 1.0, 1) per scoring release: the accountants take it beside DP-SGD's, and
    the epsilon of several is that of one with the steps summed."""
    assert scoring_release(2.0, 3) == Release(2.0, 1.0, 3)
    one_by_one = epsilon_spent([scoring_release(2.0)] * 3, 1e-5, "pld")
    assert one_by_one == pytest.approx(epsilon_spent([scoring_release(2.0, 3)], 1e-5, "pld"))
    mixed = epsilon_spent([scoring_release(2.0), Release(1.0, 0.01, 100)], 1e-5, "pld")
    assert mixed > one_by_one / 3


# ------------------------------------------------------------------------- the crafted-MLP attack


@pytest.fixture(scope="module")
def cleveland_test():
    from conftest import SHARED_DATA

    root = SHARED_DATA / "uci-heart-disease"
    if not root.is_dir():
        pytest.skip(f"UCI heart disease not found at {root}")
    from privmed.config import DataConfig
    from privmed.data.heart_disease import load_heart_disease

    src = load_heart_disease(DataConfig(source="heart-disease", root=str(root)))
    sel = src.test.site == "cleveland"
    return _subset(src.test, np.flatnonzero(sel))


def test_crafted_weights_read_a_test_record_from_exact_counts(cleveland_test, one_thread):
    """Today's exact counts: one query isolates a test patient, 13 more read its record to better
    than 0.01 standardized units (issue 25: 0.0023) and its label."""
    from redteam.crafted_mlp import EXACT_EDGES as GRID, exact_oracle, isolate, read_record, target_record

    oracle = exact_oracle(cleveland_test)
    band, label = isolate(oracle, GRID, np.random.default_rng(1))
    x, y = target_record(cleveland_test, band)
    assert label == y
    assert np.abs(read_record(oracle, GRID, band, label) - x).max() < 0.01


def test_crafted_weights_cannot_read_a_test_record_from_noisy_counts(cleveland_test, one_thread):
    """Through the mechanism, at the noise of epsilon 4 per test patient over 100 releases, the
    attacker given the isolated patient's band and label for free, 99 queries: no record is read
    to 0.1 (the record's max error), by repeated readouts or by bisection. Control: on the same
    coarse grid without noise, bisection reads every record to 0.1 (it is the noise that stops it)."""
    from redteam.crafted_mlp import (EXACT_EDGES as GRID, exact_oracle, isolate, noisy_oracle, read_record,
                                     read_record_bisection, target_record)

    sigma = scoring_noise(4.0, 1e-5, 100)
    rng = np.random.default_rng(2)
    for _ in range(3):
        band, label = isolate(exact_oracle(cleveland_test), GRID, rng)
        x, _ = target_record(cleveland_test, band)
        oracle = noisy_oracle(cleveland_test, sigma, rng)
        readout = read_record(oracle, PRIVATE_EDGES, band, label, repeats=7)
        bisection = read_record_bisection(oracle, PRIVATE_EDGES, band, label, 99, span=12.0)
        assert np.abs(readout - x).max() > 0.1
        assert np.abs(bisection - x).max() > 0.1
        control = read_record_bisection(noisy_oracle(cleveland_test, 0.0, rng), PRIVATE_EDGES, band, label, 99,
                                        span=12.0)
        assert np.abs(control - x).max() < 0.1

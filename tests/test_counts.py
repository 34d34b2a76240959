"""Evaluation counts (privmed.tasks.counts): metrics from the sites' sums against the metrics of the
pooled predictions (sklearn, classification_metrics, reliability_bins, lifelines), and merging
against counting the whole set."""

from __future__ import annotations

import math
import re
import zipfile

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from privmed.data.base import ImageSet
from privmed.errors import RunDirError
from privmed.tasks.base import get_task
from privmed.tasks.classification import classification_metrics, reliability_bins, roc_auc
from privmed.tasks.counts import (
    CLASSIFICATION_KEYS,
    LOGIT_MAX,
    SCORE_BINS,
    SURVIVAL_KEYS,
    auc_rounding_bound,
    classification_counts,
    classification_metrics_from_counts,
    load_counts,
    merge_counts,
    one_vs_rest_auc,
    reliability_from_counts,
    roc_from_counts,
    save_counts,
    score_bins,
    survival_counts,
    survival_metrics_from_counts,
)
from privmed.tasks.survival import cox_loss, survival_metrics

FLOAT_METRICS = ("accuracy", "balanced_accuracy", "ece", "loss")


def predictions(rng, n: int, k: int, scale: float = 1.0, sep: float = 2.0, missing: int | None = None):
    """(probs (n, k), labels (n,)): float32 softmax of noisy logits, as a model gives them; class
    `missing` never occurs in the labels."""
    classes = [c for c in range(k) if c != missing]
    labels = rng.choice(classes, n)
    logits = scale * rng.normal(size=(n, k)) + sep * np.eye(k)[labels]
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float32), dim=1).double().numpy()
    return probs, labels


def survival_set(rng, n: int):
    """(risk, time, event) with tied times, tied risks and censored times equal to event times."""
    risk = np.round(rng.normal(size=n), 1)
    time = rng.integers(1, 25, n).astype(np.float64)
    event = (rng.random(n) < 0.6).astype(np.int64)
    return risk, time, event


def brute_concordance(parts) -> tuple[float, int]:
    """(concordant + 1/2 tied, comparable) over pairs within each part, by an O(n^2) loop, with the
    rule lifelines uses: i before j is comparable when i had the event and t_i < t_j, or t_i == t_j
    and j was censored."""
    concordant, comparable = 0.0, 0
    for risk, time, event in parts:
        for i in range(len(risk)):
            if not event[i]:
                continue
            for j in range(len(risk)):
                if time[i] < time[j] or (time[i] == time[j] and not event[j]):
                    comparable += 1
                    concordant += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return concordant, comparable


def random_split(rng, n: int, parts: int) -> list[np.ndarray]:
    return np.array_split(rng.permutation(n), np.sort(rng.choice(np.arange(1, n), parts - 1, replace=False)))


def assert_counts_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        if np.issubdtype(a[key].dtype, np.integer):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:  # sums in another order
            np.testing.assert_allclose(a[key], b[key], rtol=1e-12, atol=1e-12, err_msg=key)


# ---------------------------------------------------------------------------------- classification


@pytest.mark.parametrize("k, missing", [(2, None), (3, 1), (5, 0), (5, None)])
def test_classification_metrics_from_counts_match_the_pooled_metrics(k, missing):
    probs, labels = predictions(np.random.default_rng(k), 1500, k, missing=missing)
    c = classification_counts(probs, labels)
    assert set(c) == set(CLASSIFICATION_KEYS) and all(isinstance(v, np.ndarray) for v in c.values())
    got, want = classification_metrics_from_counts(c), classification_metrics(probs, labels)
    assert set(got) == set(want) and got["n"] == want["n"] == 1500 and isinstance(got["n"], int)
    for key in FLOAT_METRICS:
        assert isinstance(got[key], float) and got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12)
    # The AUC is exactly that of the scores rounded to the grid (sklearn on the bin numbers) ...
    assert got["auc"] == pytest.approx(roc_auc(score_bins(probs), labels), abs=1e-12)
    # ... and rounding moves it by no more than the pairs sharing a bin allow, each counted 1/2
    # instead of 0 or 1 (the bound is > 0 here: the test would see a mistake in it).
    bound = auc_rounding_bound(c)
    assert 0 < bound < 1e-3 and abs(got["auc"] - want["auc"]) <= bound
    for cls in np.unique(labels):  # each class against the rest, as the report's ROC legend shows it
        ovr = one_vs_rest_auc(c, cls)
        assert ovr == pytest.approx(roc_auc_score(labels == cls, score_bins(probs[:, cls])), abs=1e-12)
        assert abs(ovr - roc_auc_score(labels == cls, probs[:, cls])) <= auc_rounding_bound(c, cls)
    if missing is not None:
        assert math.isnan(one_vs_rest_auc(c, missing)) and math.isnan(auc_rounding_bound(c, missing))


def test_the_rounding_bound_holds_for_over_confident_models_and_is_attained():
    rng = np.random.default_rng(7)
    for scale in (10.0, 30.0):  # logits beyond the grid: many scores tie in the end bins
        probs, labels = predictions(rng, 2000, 2, scale=scale, sep=scale)
        c = classification_counts(probs, labels)
        diff = abs(classification_metrics_from_counts(c)["auc"] - roc_auc_score(labels, probs[:, 1]))
        assert 0 < diff <= auc_rounding_bound(c)
    # Every positive just above every negative in one bin: exact AUC 1, rounded 1/2, bound 1/2.
    z = np.r_[np.full(5, 1e-4), np.zeros(7)]
    p = 1 / (1 + np.exp(-z))
    labels = np.r_[np.ones(5, int), np.zeros(7, int)]
    c = classification_counts(np.stack([1 - p, p], axis=1), labels)
    assert roc_auc_score(labels, p) == 1.0
    assert classification_metrics_from_counts(c)["auc"] == 0.5 == auc_rounding_bound(c)


def test_score_bins_are_monotone_on_the_logit_grid():
    w = 2 * LOGIT_MAX / SCORE_BINS
    idx = np.arange(1, SCORE_BINS, 97)
    edges = -LOGIT_MAX + w * idx  # the lower edge of bin idx
    # Where float64 p still resolves a quarter bin (1 - p >= 4e-11; beyond, p ties anyway).
    idx, edges = idx[np.abs(edges) < 24], edges[np.abs(edges) < 24]
    b = score_bins(1 / (1 + np.exp(-np.r_[edges + w / 4, edges - w / 4])))
    np.testing.assert_array_equal(b, np.r_[idx, idx - 1])
    p = np.sort(np.random.default_rng(0).random(10000) ** 8)
    assert np.all(np.diff(score_bins(np.r_[0.0, p, 1.0])) >= 0)
    assert score_bins(np.array([0.0, 1e-300, 0.5, 1 - 1e-15, 1.0])).tolist() == [
        0, 0, SCORE_BINS // 2, SCORE_BINS - 1, SCORE_BINS - 1]


@pytest.mark.parametrize("drop", [True, False])
@pytest.mark.parametrize("k, cls", [(2, 1), (3, 0), (3, 2)])
def test_roc_from_counts_is_sklearns_roc_of_the_rounded_scores(k, cls, drop):
    probs, labels = predictions(np.random.default_rng(10 + k), 400, k)
    fpr, tpr = roc_from_counts(classification_counts(probs, labels), cls, drop_intermediate=drop)
    want_fpr, want_tpr, _ = roc_curve(labels == cls, score_bins(probs[:, cls]), drop_intermediate=drop)
    np.testing.assert_allclose(fpr, want_fpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(tpr, want_tpr, rtol=0, atol=1e-15)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1) and len(fpr) > 10


def test_roc_from_counts_needs_both_sides():
    probs, labels = predictions(np.random.default_rng(1), 30, 3, missing=2)
    with pytest.raises(ValueError, match="class 2"):
        roc_from_counts(classification_counts(probs, labels), 2)


def test_reliability_from_counts_matches_reliability_bins():
    probs, labels = predictions(np.random.default_rng(2), 700, 3, scale=1.5)
    got = reliability_from_counts(classification_counts(probs, labels))
    for a, b in zip(got, reliability_bins(probs, labels)):
        np.testing.assert_allclose(a, b, rtol=1e-14, equal_nan=True)
    assert np.isnan(got[0]).any()  # some bins are empty, and stay NaN


@pytest.mark.parametrize("k, missing", [(2, None), (3, 2), (5, 3)])
def test_merged_parts_give_the_counts_and_metrics_of_the_whole(k, missing):
    rng = np.random.default_rng(20 + k)
    probs, labels = predictions(rng, 600, k, missing=missing)
    whole = classification_counts(probs, labels)
    for n_parts in (2, 3, 4):
        parts = [classification_counts(probs[i], labels[i]) for i in random_split(rng, 600, n_parts)]
        merged = merge_counts([{}, *parts, {}])
        assert_counts_equal(merged, whole)
        got, want = classification_metrics_from_counts(merged), classification_metrics_from_counts(whole)
        assert got["auc"] == want["auc"] and got["n"] == want["n"]
        for key in FLOAT_METRICS:
            assert got[key] == pytest.approx(want[key], rel=1e-12)


def test_a_part_with_one_class():
    rng = np.random.default_rng(4)
    probs, labels = predictions(rng, 300, 2)
    ones, zeros = labels == 1, labels == 0
    part = classification_counts(probs[ones], labels[ones])
    alone = classification_metrics_from_counts(part)
    assert math.isnan(alone["auc"]) and alone["accuracy"] == pytest.approx(
        classification_metrics(probs[ones], labels[ones])["accuracy"])
    merged = merge_counts([part, classification_counts(probs[zeros], labels[zeros])])
    assert classification_metrics_from_counts(merged)["auc"] == pytest.approx(
        roc_auc_score(labels, score_bins(probs[:, 1])), abs=1e-12)


def test_non_finite_probabilities_give_a_nan_auc():
    probs, labels = predictions(np.random.default_rng(5), 50, 2)
    probs[3] = np.nan
    c = classification_counts(probs, labels)
    assert int(c["nonfinite"]) == 1 and c["score_hist"][1].sum() == 49
    assert math.isnan(classification_metrics_from_counts(c)["auc"])


def test_counts_of_an_empty_set():
    c = classification_counts(np.zeros((0, 3)), np.zeros(0, dtype=int))
    assert int(c["n"]) == 0 and c["score_hist"].shape == (3, 2, SCORE_BINS)
    assert all(math.isnan(v) for k, v in classification_metrics_from_counts(c).items() if k != "n")


# ----------------------------------------------------------------------------------------- survival


def test_survival_counts_match_survival_metrics_and_lifelines():
    from lifelines.utils import concordance_index

    rng = np.random.default_rng(30)
    for n in (2, 40, 300):
        risk, time, event = survival_set(rng, n)
        c = survival_counts(risk, time, event)
        assert set(c) == set(SURVIVAL_KEYS) and all(isinstance(v, np.ndarray) for v in c.values())
        got, want = survival_metrics_from_counts(c), survival_metrics(risk, time, event)
        assert set(got) == set(want)
        for key in want:  # one set: the same figures, bit for bit
            assert got[key] == want[key] or (math.isnan(got[key]) and math.isnan(want[key])), key
        if n >= 40:
            assert got["c_index"] == concordance_index(time, -risk, event)
            assert (float(c["concordant"]), int(c["comparable"])) == brute_concordance([(risk, time, event)])


def test_survival_counts_without_events_or_with_a_non_finite_risk():
    rng = np.random.default_rng(31)
    risk, time, _ = survival_set(rng, 30)
    got = survival_metrics_from_counts(survival_counts(risk, time, np.zeros(30)))
    assert math.isnan(got["c_index"]) and math.isnan(got["loss"]) and got["events"] == 0
    risk[4] = np.inf
    event = np.ones(30)
    got = survival_metrics_from_counts(survival_counts(risk, time, event))
    want = survival_metrics(risk, time, event)
    assert math.isnan(got["c_index"]) and math.isnan(want["c_index"]) and got["n"] == 30


def test_merged_survival_counts_are_stratified_by_part():
    rng = np.random.default_rng(32)
    risk, time, event = survival_set(rng, 240)
    whole = survival_counts(risk, time, event)
    # Merging the whole set alone (or with empty parts) changes nothing.
    assert_counts_equal(merge_counts([{}, whole]), whole)
    assert survival_metrics_from_counts(merge_counts([whole, {}])) == survival_metrics(risk, time, event)
    for n_parts in (2, 3, 4):
        parts = [(risk[i], time[i], event[i]) for i in random_split(rng, 240, n_parts)]
        merged = merge_counts([survival_counts(*p) for p in parts])
        got = survival_metrics_from_counts(merged)
        concordant, comparable = brute_concordance(parts)
        assert comparable < int(whole["comparable"])  # pairs across parts are not counted
        assert got["c_index"] == pytest.approx(concordant / comparable, rel=1e-14)
        # Cox loss with each part's own risk sets, per event.
        loss = sum(float(cox_loss(*map(torch.from_numpy, (r, t, e.astype(float))))) * len(r)
                   for r, t, e in parts)
        assert got["loss"] == pytest.approx(loss / event.sum(), rel=1e-12)
        assert (got["n"], got["events"]) == (240, int(event.sum()))


# ------------------------------------------------------------------------------------------ merging


def test_merge_counts_rejects_parts_that_do_not_match():
    rng = np.random.default_rng(40)
    a = classification_counts(*predictions(rng, 20, 3))
    b = classification_counts(*predictions(rng, 20, 2))
    with pytest.raises(ValueError, match="'confusion' has shape"):
        merge_counts([a, b])
    with pytest.raises(ValueError, match="score_hist"):
        merge_counts([a, classification_counts(*predictions(rng, 20, 3), n_bins=64)])
    with pytest.raises(ValueError, match="key.*comparable"):
        merge_counts([survival_counts(*survival_set(rng, 10)), a])
    assert merge_counts([]) == {} and merge_counts([{}, {}]) == {}


def test_merge_counts_leaves_its_parts_alone():
    rng = np.random.default_rng(41)
    a, b = (classification_counts(*predictions(rng, 20, 2)) for _ in range(2))
    before = {k: v.copy() for k, v in a.items()}
    merged = merge_counts([a, b])
    assert_counts_equal(a, before)
    assert all(isinstance(v, np.ndarray) and v.dtype == a[k].dtype for k, v in merged.items())
    assert merged["n"].shape == () and int(merged["n"]) == 40


# ------------------------------------------------------------------------------------------- files


def test_save_and_load_counts(tmp_path):
    rng = np.random.default_rng(50)
    counts = {"global": classification_counts(*predictions(rng, 50, 3)),
              "site-a": survival_counts(*survival_set(rng, 20)), "empty": {}}
    path = tmp_path / "test_counts.npz"
    save_counts(path, counts)
    loaded = load_counts(path)
    assert list(loaded) == ["global", "site-a"]
    for model in loaded:
        assert_counts_equal(loaded[model], counts[model])
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("damage", ["text", "truncated", "bad shape", "bad name"])
def test_load_counts_of_a_damaged_file_names_it(tmp_path, damage):
    path = tmp_path / "test_counts.npz"
    c = classification_counts(*predictions(np.random.default_rng(51), 20, 2))
    if damage == "text":
        path.write_text("not an npz")
    elif damage == "truncated":
        save_counts(path, {"global": c})
        path.write_bytes(path.read_bytes()[:300])
    elif damage == "bad shape":
        save_counts(path, {"global": {**c, "rel_count": np.zeros(4, dtype=np.int64)}})
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("n.npy", b"")
    with pytest.raises(RunDirError, match=re.escape(str(path))):
        load_counts(path)


# ------------------------------------------------------------------------------------------- tasks


def test_tasks_count_and_score_from_counts():
    rng = np.random.default_rng(60)
    probs, labels = predictions(rng, 80, 2)
    data = ImageSet(np.zeros((80, 3), dtype=np.float32), labels)
    task = get_task("tabular-classification")
    got = task.metrics_from_counts(merge_counts([task.counts(probs[:30], data.subset(np.arange(30))),
                                                 task.counts(probs[30:], data.subset(np.arange(30, 80)))]))
    want = task.metrics(probs, data)
    assert got["accuracy"] == want["accuracy"] and got["loss"] == pytest.approx(want["loss"], rel=1e-12)
    empty = data.subset(np.arange(0))
    assert task.counts(probs[:0], empty) == {} and task.metrics_from_counts({}) == {}

    risk, time, event = survival_set(rng, 60)
    sdata = ImageSet(np.zeros((60, 3), dtype=np.float32), event, time=time)
    surv = get_task("survival")
    assert surv.metrics_from_counts(surv.counts(risk, sdata)) == surv.metrics(risk, sdata)
    assert surv.counts(risk[:0], sdata.subset(np.arange(0))) == {} and surv.metrics_from_counts({}) == {}

"""A useless model is flagged: one predicted class, a balanced accuracy near chance, an AUC below
0.5 (and the other tasks' equivalents), on the command line, in summary.json and at the top of the
report, which also names the positive class."""

import json

import numpy as np
import pytest
import yaml
from conftest import tiny_config

from privmed.tasks.classification import classification_metrics
from privmed.tasks.counts.classification import classification_counts
from privmed.tasks.usefulness import usefulness_warnings

NAMES = ("normal", "pneumonia")


def _scored(probs_1: np.ndarray, labels: np.ndarray) -> tuple[dict, dict]:
    probs = np.stack([1 - probs_1, probs_1], axis=1)
    return classification_metrics(probs, labels), classification_counts(probs, labels)


def _kinds(*args, **kw) -> list[str]:
    return [w["kind"] for w in usefulness_warnings(*args, **kw)]


def test_a_model_that_predicts_the_commonest_class_is_flagged_with_its_name():
    rng = np.random.default_rng(0)
    labels = (rng.random(200) < 0.7).astype(int)
    # ranks well (AUC high) but every probability above 0.5: it calls everyone 'pneumonia'
    test, counts = _scored(0.6 + 0.3 * labels * rng.random(200), labels)
    assert test["auc"] > 0.8 and test["accuracy"] == pytest.approx(labels.mean())  # the share of pneumonia
    ws = usefulness_warnings("classification", test, counts, NAMES)
    assert [w["kind"] for w in ws] == ["one-class"]
    assert "'pneumonia' for 100%" in ws[0]["message"] and "federation.local_epochs" in ws[0]["message"]
    # one patient predicted otherwise in 200 is still one class (>= 99%); three are not
    p = 0.6 + 0.3 * labels * rng.random(200)
    p[:3] = 0.1
    assert "one-class" not in _kinds("classification", *_scored(p, labels), NAMES)


def test_chance_and_worse_than_chance_and_a_good_model():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    test, counts = _scored(rng.random(400), labels)  # a coin: both classes predicted, at random
    assert abs(test["balanced_accuracy"] - 0.5) < 0.05
    assert _kinds("classification", test, counts, NAMES)[0] == "chance"
    inverted = np.clip(1 - labels * 0.6 - 0.2 * rng.random(400), 0, 1)  # ranks the classes backwards
    assert "auc-below-chance" in _kinds("classification", *_scored(inverted, labels), NAMES)
    good = np.clip(0.2 + 0.6 * labels + 0.1 * rng.standard_normal(400), 0, 1)
    test, counts = _scored(good, labels)
    assert test["auc"] > 0.9 and usefulness_warnings("classification", test, counts, NAMES) == []
    # K classes: chance is 1/K
    assert _kinds("classification", {"balanced_accuracy": 0.31, "auc": 0.6}, None, ("a", "b", "c", "d")) == []
    assert _kinds("classification", {"balanced_accuracy": 0.29, "auc": 0.6}, None, ("a", "b", "c", "d")) == ["chance"]


def test_the_other_tasks_and_missing_scores():
    assert _kinds("survival", {"c_index": 0.52}) == ["chance"]
    assert _kinds("survival", {"c_index": 0.62}) == []
    assert _kinds("segmentation", {"dice": 0.0}) == ["segments-nothing"]
    assert _kinds("segmentation", {"dice": 0.6}) == []
    assert _kinds("reconstruction", {"psnr": 18.7, "psnr_zero_filled": 18.8}) == ["no-better-than-input"]
    assert _kinds("reconstruction", {"psnr": 24.4, "psnr_zero_filled": 18.8}) == []
    # no scores, or scores that are null (NaN written to JSON): nothing to say
    assert usefulness_warnings("classification", {}) == []
    assert _kinds("classification", {"auc": None, "balanced_accuracy": None}, None, NAMES) == []
    assert _kinds("survival", {"c_index": float("nan")}) == []
    # under privacy the advice names the privacy budget too
    (w,) = usefulness_warnings("survival", {"c_index": 0.4}, private=True)
    assert "privacy.epsilon" in w["message"] and "below chance" in w["message"]


def test_a_run_that_predicts_one_class_says_so_everywhere(tmp_path, capsys):
    from privmed.cli import main

    # Adam at lr 1 saturates the tiny CNN in one round: it predicts one class for every image
    cfg = tiny_config(federation__rounds=1, training__lr=1.0)
    path = tmp_path / "useless.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    kinds = [w["kind"] for w in summary["warnings"]]
    assert kinds[0] == "one-class", summary["test"]
    assert summary["test"]["balanced_accuracy"] == pytest.approx(0.5)
    line = next(x for x in printed.splitlines() if x.startswith("fedavg:"))
    assert "balanced accuracy 0.500" in line
    assert f"WARNING: {summary['warnings'][0]['message']}" in printed
    html = (out / "report.html").read_text()
    top = html.index('id="warning-1"')
    assert top < html.index('id="headline"') and "it has learned the commonest class" in html[top:top + 1000]
    names = summary["data"]["class_names"]
    assert f"score &#39;{names[1]}&#39; as the positive class" in html or f"score '{names[1]}' as the positive" in html


def test_a_good_run_has_no_warnings_and_old_summaries_read(tmp_path):
    import privmed
    from privmed.config import validate_config
    from privmed.federation.records import Summary

    res = privmed.run(validate_config(tiny_config(federation__rounds=2)), tmp_path / "run", report=False)
    assert res.summary["test"]["auc"] > 0.8 and res.summary["warnings"] == []
    d = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert d["warnings"] == []
    del d["warnings"]  # a summary from before the field
    old = Summary.from_json(d)
    assert old.warnings is None and "warnings" not in old.to_json()

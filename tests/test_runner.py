"""The in-process runner end to end on small phantom federations."""

import json
import math

import numpy as np
import pytest
import torch

import privmed
from privmed.federation.records import read_metrics, read_summary
from privmed.federation.strategies import GLOBAL
from privmed.tasks.base import get_task
from privmed.tasks.classification import classification_metrics
from privmed.tasks.counts import load_counts
from conftest import tiny_config


def _weights(model):
    return [v.detach().numpy() for v in model.state_dict().values()]


def test_api_without_out_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = privmed.run(tiny_config())
    assert list(tmp_path.iterdir()) == []
    s = result.summary
    assert s["task"] == "classification" and s["strategy"] == "fedavg"
    assert s["rounds_completed"] == 2
    assert set(s["test"]) >= {"auc", "accuracy", "balanced_accuracy", "ece"}
    assert set(s["sites"]) == {"site-1", "site-2", "site-3"}
    for site in s["sites"].values():
        assert site["n_train"] > 0 and site["n_val"] > 0 and "val" in site
        assert "test" in site  # phantom sites have test data of their own
    assert s["sample_gradient_steps"] == 2 * sum(v["n_train"] for v in s["sites"].values())
    assert isinstance(result.model, torch.nn.Module)


def test_same_seed_same_result_and_global_rng_untouched():
    torch.manual_seed(123)
    np.random.seed(123)
    before = (torch.rand(1).item(), np.random.rand())
    torch.manual_seed(123)
    np.random.seed(123)
    a = privmed.run(tiny_config())
    after = (torch.rand(1).item(), np.random.rand())
    assert before == after  # a run draws from its own seeded generators only
    b = privmed.run(tiny_config())
    c = privmed.run(tiny_config(seed=1))
    for x, y in zip(_weights(a.model), _weights(b.model)):
        np.testing.assert_array_equal(x, y)
    assert a.summary["test"] == b.summary["test"]
    assert any(not np.array_equal(x, y) for x, y in zip(_weights(a.model), _weights(c.model)))


@pytest.mark.parametrize("strategy", ["fedavg", "cyclic", "local", "pooled"])
def test_every_strategy_does_equal_work(strategy):
    s = privmed.run(tiny_config(federation__strategy=strategy, federation__local_epochs=2)).summary
    n_train = sum(v["n_train"] for v in s["sites"].values())
    assert s["sample_gradient_steps"] == 2 * 2 * n_train  # rounds x epochs x all training data
    assert s["strategy"] == strategy
    if strategy == "local":
        assert s["best_round"] is None
        assert all("test_pooled" in v and "best_round" in v for v in s["sites"].values())
    else:
        assert 1 <= s["best_round"] <= 2


@pytest.mark.parametrize("strategy", ["fedavg", "cyclic", "local", "pooled"])
def test_local_steps_do_equal_work(strategy):
    # 120 phantom images per site, ~100 for training: 5 steps of 8 never wrap within a pass,
    # 20 steps of 8 wrap, and still count exactly.
    for steps in (5, 20):
        s = privmed.run(tiny_config(federation__strategy=strategy, federation__local_steps=steps,
                                    training__batch_size=8)).summary
        assert s["sample_gradient_steps"] == 2 * 3 * steps * 8  # rounds x sites x steps x batch


def test_fedavg_learns_the_phantom_task():
    cfg = tiny_config(federation__rounds=6)
    cfg["data"]["samples_per_site"] = 300
    s = privmed.run(cfg).summary
    assert s["test"]["auc"] > 0.8, s["test"]


def test_local_models_differ_and_are_scored_on_the_pooled_test():
    r = privmed.run(tiny_config(federation__strategy="local"))
    assert set(r.models) == {"site-1", "site-2", "site-3"}
    w = [_weights(m) for m in r.models.values()]
    assert not np.array_equal(w[0][0], w[1][0])
    mean_auc = np.mean([v["test_pooled"]["auc"] for v in r.summary["sites"].values()])
    assert math.isclose(r.summary["test"]["auc"], mean_auc, rel_tol=1e-9)


def test_run_directory_contents(tmp_path):
    out = tmp_path / "run"
    r = privmed.run(tiny_config(), out)
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "summary.json", "test_counts.npz", "model.pt",
            "report.html", "checkpoints"} <= names
    # the phantom's sites hold their own test patients: no prediction of theirs reaches the run
    # directory, only the counts the pooled figure is merged from
    assert "predictions.npz" not in names
    assert not [p for p in out.rglob("*.tmp")]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test"] == pytest.approx(r.summary["test"], nan_ok=True)
    # The selected model's test score is that of its round, as recorded during the run.
    assert summary["test"]["auc"] == pytest.approx(rows[summary["best_round"] - 1]["test"]["auc"])
    saved = torch.load(out / "model.pt", weights_only=True)
    assert saved["config"]["name"] == "tiny"
    for a, b in zip(saved["state_dicts"][GLOBAL].values(), _weights(r.model)):
        np.testing.assert_array_equal(a.numpy(), b)
    counts = load_counts(out / "test_counts.npz")[GLOBAL]
    assert get_task("classification").metrics_from_counts(counts) == summary["test"]
    # the typed records read back and write out the files byte for byte
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.dumps(row.to_json()) for row in read_metrics(out)] == lines
    assert json.dumps(read_summary(out).to_json(), indent=2) + "\n" == (out / "summary.json").read_text()


def test_config_yaml_shows_the_keys_that_apply_and_loads_back_the_same(tmp_path):
    """config.yaml holds only the data keys the run's source reads, not
    medmnist's download or reconstruction's acceleration for a phantom classification; loading it
    gives the run's config, and a run directory written with every key still resumes."""
    import yaml

    from privmed.config import validate_config
    from privmed.config.rules import source_reads

    out = tmp_path / "run"
    cfg = tiny_config(federation__rounds=1)
    privmed.run(cfg, out, report=False)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert set(saved["data"]) == source_reads("phantom", "classification")
    assert not {"download", "acceleration", "csv", "volumes_per_site"} & set(saved["data"])
    full = validate_config(cfg).to_dict()
    assert "download" in full["data"] and validate_config(saved).to_dict() == full
    # a run directory from before, with every key written out, is the same config to --resume
    (out / "config.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    resumed = privmed.run(tiny_config(federation__rounds=2), out, resume=True, report=False)
    assert resumed.summary["rounds_completed"] == 2


def test_a_public_test_set_is_scored_by_the_coordinator(tmp_path):
    """A test split no site owns (here: sites drawn iid, so the phantom's per-site test images
    belong to nobody) is public: the coordinator scores it itself and keeps its predictions."""
    out = tmp_path / "run"
    r = privmed.run(tiny_config(sites__partition="iid", federation__rounds=1), out, report=False)
    summary = json.loads((out / "summary.json").read_text())
    assert "public held-out test set" in summary["evaluation"]["test"]
    pred = np.load(out / "predictions.npz")
    assert pred["probs:global"].shape == (len(pred["labels"]), 2) == (summary["test"]["n"], 2)
    assert classification_metrics(pred["probs:global"].astype(np.float64), pred["labels"])["accuracy"] == (
        pytest.approx(r.summary["test"]["accuracy"]))

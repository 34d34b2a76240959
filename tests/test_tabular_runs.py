"""Tabular and survival runs end to end (FLamby's heart disease and TCGA-BRCA), the strategies for
heterogeneous sites inside the runner, fine-tuning, and FLamby's mean-over-sites score."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import privmed
from privmed.errors import ConfigError
from privmed.federation.strategies import GLOBAL
from privmed.tasks.base import get_task
from privmed.tasks.counts import load_counts
from conftest import tiny_config


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # linear models on a few hundred rows: threads only add overhead
    yield
    torch.set_num_threads(before)


def _heart(shared: object, **fed) -> dict:
    return {
        "name": "heart",
        "data": {"source": "heart-disease", "root": str(shared / "uci-heart-disease"), "val_fraction": 0},
        "federation": {"strategy": "fedavg", "rounds": 3, "local_steps": 20, **fed},
        "training": {"batch_size": 8, "optimizer": "sgd", "lr": 0.05, "momentum": 0.0},
    }


def _tcga(shared: object, **fed) -> dict:
    return {
        "name": "tcga",
        "data": {"source": "tcga-brca", "root": str(shared / "tcga-brca"), "val_fraction": 0,
                 "standardize": "per-site"},
        "federation": {"strategy": "fedavg", "rounds": 3, "local_steps": 20, **fed},
        "training": {"batch_size": 16, "optimizer": "sgd", "lr": 0.05, "momentum": 0.0},
    }


def _weights(model) -> list[np.ndarray]:
    return [v.detach().numpy().copy() for v in model.state_dict().values()]


def _site_mean(summary: dict, metric: str, key: str = "test") -> float:
    vals = [site[key][metric] for site in summary["sites"].values() if site.get(key)]
    return float(np.nanmean(vals))


def test_heart_disease_run_scores_each_site_and_their_mean(shared_data, tmp_path):
    out = tmp_path / "run"
    s = privmed.run(_heart(shared_data), out=out).summary
    assert s["task"] == "tabular-classification"
    assert list(s["sites"]) == ["cleveland", "hungarian", "switzerland", "va"]
    assert s["data"]["tabular"] and len(s["data"]["feature_names"]) == 13
    # FLamby's test split: 104 / 89 / 16 / 45 patients
    assert [v["n_test"] for v in s["sites"].values()] == [104, 89, 16, 45]
    assert s["test"]["n"] == 254
    assert s["test_mean_over_sites"]["accuracy"] == pytest.approx(_site_mean(s, "accuracy"))
    assert s["test_mean_over_sites"]["auc"] == pytest.approx(_site_mean(s, "auc"))
    # no validation data: the last round's model, and no validation scores anywhere
    assert s["best_round"] == 3 and "last round" in s["selection"]
    assert all(v["n_val"] == 0 and v["val"] == {} for v in s["sites"].values())
    assert s["test_mean_over_sites"]["accuracy"] > 0.6  # a linear model learns something here
    # the sites hold FLamby's test splits: the pooled figure is merged from the counts they
    # returned, and no prediction of a test patient reached the coordinator
    assert not (out / "predictions.npz").exists()
    counts = load_counts(out / "test_counts.npz")["global"]
    assert get_task("tabular-classification").metrics_from_counts(counts) == s["test"]
    assert (out / "report.html").is_file()


def test_tcga_survival_run_reports_concordance(shared_data, tmp_path):
    out = tmp_path / "run"
    s = privmed.run(_tcga(shared_data), out=out).summary
    assert s["task"] == "survival" and len(s["sites"]) == 6
    assert set(s["test"]) == {"c_index", "loss", "n", "events"}
    assert s["test_mean_over_sites"]["c_index"] == pytest.approx(_site_mean(s, "c_index"))
    assert s["test_mean_over_sites"]["events"] == s["test"]["events"]
    assert 0.55 < s["test"]["c_index"] <= 1.0
    assert not (out / "predictions.npz").exists()
    counts = load_counts(out / "test_counts.npz")["global"]
    assert get_task("survival").metrics_from_counts(counts) == s["test"]
    # the pooled C-index is over pairs of patients of one site: the sites' C-indices weighted by
    # their comparable pairs, so it lies between the lowest and the highest of them
    sites = [v["test"]["c_index"] for v in s["sites"].values() if not math.isnan(v["test"]["c_index"])]
    assert min(sites) <= s["test"]["c_index"] <= max(sites)
    assert "pairs of patients of one site" in s["evaluation"]["test"]


def test_fedprox_with_mu_zero_is_fedavg_and_with_mu_stays_closer(shared_data):
    avg = privmed.run(_heart(shared_data, rounds=1))
    prox0 = privmed.run(_heart(shared_data, rounds=1, strategy="fedprox", mu=0.0))
    for a, b in zip(_weights(avg.model), _weights(prox0.model)):
        np.testing.assert_array_equal(a, b)
    # The proximal term pulls every site towards the model it was sent: the round's step shrinks.
    start = _initial_weights(_heart(shared_data))

    def step(result) -> float:
        return math.sqrt(sum(float(np.sum((w - w0) ** 2)) for w, w0 in zip(_weights(result.model), start)))

    prox = privmed.run(_heart(shared_data, rounds=1, strategy="fedprox", mu=5.0))
    assert step(prox) < 0.8 * step(avg)


def _initial_weights(cfg: dict) -> list[np.ndarray]:
    from privmed.config import validate_config
    from privmed.federation.experiment import prepare_experiment

    return prepare_experiment(validate_config(cfg)).initial_weights


def test_scaffold_first_round_is_fedavg_then_corrects(shared_data):
    # Round 1: every control variate is zero, so SCAFFOLD's round is FedAvg's.
    avg1 = privmed.run(_heart(shared_data, rounds=1))
    sc1 = privmed.run(_heart(shared_data, rounds=1, strategy="scaffold"))
    for a, b in zip(_weights(avg1.model), _weights(sc1.model)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    avg2 = privmed.run(_heart(shared_data, rounds=2))
    sc2 = privmed.run(_heart(shared_data, rounds=2, strategy="scaffold"))
    assert any(not np.allclose(a, b) for a, b in zip(_weights(avg2.model), _weights(sc2.model)))


@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi", "fedadagrad", "scaffold", "fedprox"])
def test_stateful_strategies_resume_exactly(shared_data, tmp_path, strategy):
    """Server state (moments, control variates) lives in the checkpoint: 2 rounds, then 2 more on
    --resume, give the 4-round run's model."""
    server_lr = 0.05 if strategy.startswith("fedad") else None
    full = privmed.run(_heart(shared_data, rounds=4, strategy=strategy, server_lr=server_lr))
    out = tmp_path / "run"
    cfg = _heart(shared_data, rounds=2, strategy=strategy, server_lr=server_lr)
    privmed.run(cfg, out=out)
    cfg4 = copy.deepcopy(cfg)
    cfg4["federation"]["rounds"] = 4
    resumed = privmed.run(cfg4, out=out, resume=True)
    for a, b in zip(_weights(full.model), _weights(resumed.model)):
        np.testing.assert_array_equal(a, b)
    assert resumed.summary["test"] == full.summary["test"]


def test_fedbn_keeps_normalisation_layers_at_each_site():
    # the last round (per-site selection could pick each site's model from another round)
    s = privmed.run(tiny_config(federation__strategy="fedbn", federation__rounds=2,
                                federation__model_selection="last"))
    models = s.models
    assert set(models) == {"site-1", "site-2", "site-3"} and GLOBAL not in models
    states = [m.state_dict() for m in models.values()]
    from privmed.models import norm_state_mask

    mask = norm_state_mask(next(iter(models.values())))
    assert any(mask) and not all(mask)
    for (name, a), is_norm in zip(states[0].items(), mask):
        others = [st[name] for st in states[1:]]
        if is_norm:  # trained at each site alone
            assert any(not torch.equal(a, o) for o in others), name
        else:  # averaged across the sites
            assert all(torch.equal(a, o) for o in others), name
    assert s.summary["best_round"] is None


def test_fedbn_needs_normalisation_layers(shared_data):
    with pytest.raises(ConfigError, match="fedbn"):
        privmed.run(_heart(shared_data, strategy="fedbn"))


def test_finetuning_scores_each_site_after_federation(shared_data):
    s = privmed.run(_heart(shared_data, finetune_steps=10)).summary
    assert all("test_finetuned" in v for v in s["sites"].values())
    mean = s["test_finetuned_mean_over_sites"]
    assert mean["accuracy"] == pytest.approx(_site_mean(s, "accuracy", "test_finetuned"))
    # fine-tuning changes the models: some site's score moves
    assert any(v["test_finetuned"] != v["test"] for v in s["sites"].values())


def test_dp_sgd_on_tabular_data_stays_in_budget(shared_data, tmp_path):
    cfg = _heart(shared_data, rounds=3, strategy="fedprox", mu=0.1)
    cfg["privacy"] = {"mode": "dp-sgd", "epsilon": 1.0, "delta": 1e-3, "accountant": "rdp"}
    out = tmp_path / "run"
    s = privmed.run(cfg, out=out).summary
    p = s["privacy"]
    assert p["mode"] == "dp-sgd" and p["unit"] == "patient"
    assert 0 < p["epsilon"] <= 1.0 and set(p["sites"]) == set(s["sites"])
    assert (out / "privacy_ledger.json").is_file()
    assert math.isfinite(s["test_mean_over_sites"]["accuracy"])


@pytest.mark.parametrize(
    "over, match",
    [
        ({"privacy": {"mode": "dp-sgd", "epsilon": 1.0}}, "Cox partial likelihood"),
        ({"model": {"name": "cnn"}}, "takes images"),
        ({"task": "classification"}, "does not fit data.source"),
        ({"federation": {"model_selection": "best-validation"}}, "needs validation data"),
        ({"federation": {"strategy": "scaffold"}, "training": {"momentum": 0.9}}, "plain local SGD"),
    ],
)
def test_bad_tabular_configs_are_one_line_errors(shared_data, over, match):
    cfg = _tcga(shared_data)
    for section, values in over.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    with pytest.raises(ConfigError, match=match) as e:
        privmed.run(cfg)
    assert "\n" not in str(e.value)

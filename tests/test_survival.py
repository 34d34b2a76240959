"""Survival functions against references: the Cox loss against a plain O(n^2) loop and its gradient
against finite differences, a fitted linear Cox model against lifelines' CoxPHFitter, the
concordance index and the Kaplan-Meier curve against hand counts."""

import math

import numpy as np
import pytest
import torch

from privmed.tasks.survival import (
    CoxLoss,
    concordance_index,
    cox_loss,
    kaplan_meier,
    risk_groups,
    survival_metrics,
)


def _loop_cox(risk, time, event) -> float:
    """Breslow: sum over events of log sum_{j: t_j >= t_i} exp(r_j) - r_i, over the batch size."""
    total = 0.0
    for i in range(len(risk)):
        if event[i] == 1:
            s = sum(math.exp(risk[j]) for j in range(len(risk)) if time[j] >= time[i])
            total += math.log(s) - risk[i]
    return total / len(risk)


def _ties_and_censoring(n=40, seed=0):
    rng = np.random.default_rng(seed)
    time = rng.integers(1, 8, size=n).astype(np.float64)  # few distinct times: many ties
    event = (rng.random(n) < 0.6).astype(np.float64)
    risk = rng.normal(size=n)
    return risk, time, event


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cox_loss_matches_plain_loop_with_ties_and_censoring(seed):
    risk, time, event = _ties_and_censoring(seed=seed)
    assert len(np.unique(time)) < len(time) and 0 < event.sum() < len(event)
    got = cox_loss(torch.from_numpy(risk), torch.from_numpy(time), torch.from_numpy(event))
    assert got.item() == pytest.approx(_loop_cox(risk, time, event), rel=1e-12)
    # float32 inputs, the order of the patients does not matter
    perm = np.random.default_rng(seed).permutation(len(risk))
    got32 = cox_loss(*(torch.from_numpy(a[perm]).float() for a in (risk, time, event)))
    assert got32.dtype == torch.float32
    assert got32.item() == pytest.approx(_loop_cox(risk, time, event), rel=1e-5)


def test_cox_loss_small_case_by_hand():
    # times 3, 1, 1, 2 (events 1, 1, 0, 1); the tied pair at t=1 shares the risk set of everyone.
    risk = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    time = torch.tensor([3.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    event = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    e = math.exp
    expected = (
        (math.log(e(0.5)) - 0.5)  # patient 0 (t=3): only itself at risk
        + (math.log(e(0.5) + e(-1.0) + e(2.0) + e(0.0)) + 1.0)  # patient 1 (t=1): all four
        + (math.log(e(0.5) + e(0.0)) - 0.0)  # patient 3 (t=2): patients 0 and 3
    ) / 4
    assert cox_loss(risk, time, event).item() == pytest.approx(expected, rel=1e-12)


def test_cox_loss_gradient_passes_gradcheck():
    risk, time, event = _ties_and_censoring(n=12, seed=3)
    r = torch.from_numpy(risk).requires_grad_(True)
    t, ev = torch.from_numpy(time), torch.from_numpy(event)
    assert torch.autograd.gradcheck(lambda x: cox_loss(x, t, ev), (r,), eps=1e-6, atol=1e-8)


def test_cox_loss_without_events_is_zero_with_zero_gradient_and_is_stable():
    r = torch.randn(5, dtype=torch.float64, requires_grad=True)
    loss = cox_loss(r, torch.arange(5.0), torch.zeros(5))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(r.grad, torch.zeros(5, dtype=torch.float64))
    empty = cox_loss(torch.zeros(0, requires_grad=True), torch.zeros(0), torch.zeros(0))
    assert empty.item() == 0.0
    # large risks: finite (a naive log(sum(exp)) overflows past 710 in float64)
    big = cox_loss(torch.tensor([1000.0, 999.0, 0.0], dtype=torch.float64),
                   torch.tensor([1.0, 2.0, 3.0]), torch.ones(3))
    assert torch.isfinite(big)
    expected = (math.log(1 + math.exp(-1)) + 0.0 + 0.0) / 3  # 1000 vs {1000, 999}; the rest alone
    assert big.item() == pytest.approx(expected, rel=1e-12)


def test_cox_loss_module_takes_model_output_and_target():
    risk, time, event = _ties_and_censoring(n=10, seed=4)
    out = torch.from_numpy(risk).float()[:, None]
    target = torch.from_numpy(np.stack([time, event], axis=1)).float()
    crit = CoxLoss()
    assert crit.reduction == "mean"
    assert crit(out, target).item() == pytest.approx(_loop_cox(risk, time, event), rel=1e-5)
    assert crit(out[:, 0], target).item() == pytest.approx(crit(out, target).item())


def test_cox_loss_sums_under_sum_and_has_no_per_patient_losses():
    risk, time, event = _ties_and_censoring(n=10, seed=5)
    out = torch.from_numpy(risk)[:, None]
    target = torch.from_numpy(np.stack([time, event], axis=1))
    total = CoxLoss(reduction="sum")(out, target).item()
    assert total == pytest.approx(10 * _loop_cox(risk, time, event), rel=1e-12)
    with pytest.raises(ValueError, match=r"^reduction: 'none' is not available .*couples.*'mean', 'sum'"):
        CoxLoss(reduction="none")
    crit = CoxLoss()
    crit.reduction = "none"  # as Opacus' ghost clipping sets it: an error, not a silent mean
    with pytest.raises(ValueError, match=r"^reduction: 'none'"):
        crit(out, target)
    with pytest.raises(ValueError, match=r"^reduction: 'avg' is not a loss reduction"):
        CoxLoss(reduction="avg")


def test_dp_sgd_with_the_survival_task_is_refused_naming_the_fields():
    from privmed.config import validate_config
    from privmed.errors import ConfigError

    raw = {"data": {"source": "tcga-brca", "root": "unused"}, "privacy": {"mode": "dp-sgd", "epsilon": 3}}
    with pytest.raises(ConfigError, match=r"privacy.mode 'dp-sgd' cannot protect task 'survival'.*'central'"):
        validate_config(raw)
    raw["privacy"]["mode"] = "central"
    assert validate_config(raw).task == "survival"


def test_linear_cox_fit_matches_lifelines_coxph():
    import pandas as pd
    from lifelines import CoxPHFitter

    rng = np.random.default_rng(0)
    n, beta = 150, np.array([0.8, -0.5, 0.3])
    x = rng.normal(size=(n, 3))
    t_event = rng.exponential(1.0 / np.exp(x @ beta))
    t_cens = rng.exponential(1.5, size=n)
    time, event = np.minimum(t_event, t_cens), (t_event <= t_cens).astype(np.float64)
    assert len(np.unique(time)) == n and 0.3 < event.mean() < 0.95

    df = pd.DataFrame(x, columns=["a", "b", "c"]).assign(time=time, event=event)
    ref = CoxPHFitter(penalizer=0.0).fit(df, "time", "event").params_[["a", "b", "c"]].to_numpy()

    xt, tt, et = (torch.from_numpy(a) for a in (x, time, event))
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=200, tolerance_grad=1e-12,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = cox_loss(xt @ w, tt, et)
        loss.backward()
        return loss

    opt.step(closure)
    np.testing.assert_allclose(w.detach().numpy(), ref, atol=1e-4)
    assert np.abs(ref - beta).max() < 0.5  # and the fit found the generating coefficients roughly


def test_concordance_index_against_hand_count():
    time = [1, 2, 3, 4, 5]
    event = [1, 0, 1, 1, 0]
    risk = np.array([3.0, 5.0, 2.0, 2.0, 0.0])
    # Comparable pairs (earlier time is an event): (0,1..4), (2,3), (2,4), (3,4): 7 pairs.
    # Concordant (earlier has higher risk): (0,2) (0,3) (0,4) (2,4) (3,4) = 5; (0,1) discordant;
    # (2,3) tied risk = 1/2.  C = (5 + 0.5) / 7.
    assert concordance_index(time, risk, event) == pytest.approx(11 / 14, abs=1e-12)
    assert concordance_index(time, -risk, event) == pytest.approx(3 / 14, abs=1e-12)


def test_concordance_index_is_nan_without_comparable_pairs():
    assert math.isnan(concordance_index([1, 2, 3], [0.1, 0.2, 0.3], [0, 0, 0]))
    assert math.isnan(concordance_index([1], [0.1], [1]))
    assert math.isnan(concordance_index([1, 2], [np.nan, 0.2], [1, 1]))


def test_survival_metrics():
    risk, time, event = _ties_and_censoring(n=30, seed=5)
    m = survival_metrics(risk, time, event)
    assert m["n"] == 30 and m["events"] == int(event.sum())
    assert m["loss"] == pytest.approx(_loop_cox(risk, time, event) * 30 / event.sum(), rel=1e-12)
    assert m["c_index"] == pytest.approx(concordance_index(time, risk, event))
    assert all(type(m[k]) is float for k in ("c_index", "loss"))
    assert all(type(m[k]) is int for k in ("n", "events"))
    none = survival_metrics(risk, time, np.zeros(30))
    assert math.isnan(none["loss"]) and math.isnan(none["c_index"]) and none["events"] == 0


def test_kaplan_meier_by_hand():
    # t=1: 5 at risk, 1 dies -> 4/5; t=2: 4 at risk, 1 dies (1 censored) -> 0.8*3/4 = 0.6;
    # t=3: 2 at risk, 1 dies -> 0.3; t=4: censored -> 0.3.
    times, surv = kaplan_meier([1, 2, 2, 3, 4], [1, 1, 0, 1, 0])
    np.testing.assert_array_equal(times, [0, 1, 2, 3, 4])
    np.testing.assert_allclose(surv, [1.0, 0.8, 0.6, 0.3, 0.3], rtol=1e-12)


def test_risk_groups():
    risk = np.array([0.3, -1.0, 2.0, 0.1, 5.0, -0.2])  # median 0.2
    np.testing.assert_array_equal(risk_groups(risk), [1, 0, 1, 0, 1, 0])
    odd = np.array([3.0, 1.0, 2.0])  # median 2: not above it, so low risk
    np.testing.assert_array_equal(risk_groups(odd), [1, 0, 0])
    thirds = risk_groups(np.arange(9.0), n_groups=3)
    np.testing.assert_array_equal(thirds, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert risk_groups(np.arange(9.0)).dtype == np.int64
    with pytest.raises(ValueError):
        risk_groups(risk, n_groups=0)

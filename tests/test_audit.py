"""`privmed audit`: membership attacks on a finished run, end to end, on tiny phantom runs. An
overfit non-private model must give its members away measurably; a DP run must stay inside what its
epsilon allows; the shadow runs must include and leave out whole patients as they say."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

import privmed
from privmed.audit.attacks import ATTACKS
from privmed.audit.membership import draw_candidates, load_target, shadow_sites
from privmed.audit.run import audit, dp_roc_auc_bound
from privmed.cli import main
from privmed.report.html import UNITS

# small and overfit: 2 sites of 60 phantom images, many local epochs, no augmentation
OVERFIT = {
    "name": "overfit", "seed": 0,
    "data": {"source": "phantom", "size": 16, "samples_per_site": 60, "val_fraction": 0.25},
    "sites": {"count": 2, "partition": "natural"},
    "model": {"name": "cnn", "width": 16},
    "federation": {"strategy": "fedavg", "rounds": 8, "local_epochs": 4, "model_selection": "last"},
    "training": {"batch_size": 16, "lr": 0.003, "optimizer": "adam", "augment": False},
}


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("audit") / "overfit"
    privmed.run(OVERFIT, out)
    return out


def test_an_overfit_model_gives_its_members_away_and_the_report_says_so(overfit_run):
    result = audit(overfit_run, shadows=2, candidates=100, seed=3)
    written = json.loads((overfit_run / "private" / "audit.json").read_text())
    assert not (overfit_run / "audit.json").exists()  # computed from patients: private
    assert written == json.loads(json.dumps(result))
    assert set(written["attacks"]) == set(ATTACKS)
    assert written["claimed"]["epsilon"] is None and "max_roc_auc" not in written["claimed"]
    assert written["shadows"]["trained"] == 2 and written["seed"] == 3
    n = written["candidates"]
    assert n["members"] == n["non_members"] > 10
    for name, r in written["attacks"].items():
        assert r["sees"] and r["assumes"], name
        lo, hi = r["roc_auc_ci"]
        assert lo <= r["roc_auc"] <= hi
        assert r["n_members"] == n["members"] and r["n_nonmembers"] == n["non_members"]
    # the strongest attack tells members from non-members beyond chance, at 95% confidence
    best = max(written["attacks"].values(), key=lambda r: r["roc_auc"])
    assert best["roc_auc_ci"][0] > 0.5, best
    # the private report shows the attacks, and draws their ROC curves from audit.json
    html = (overfit_run / "private" / "report.html").read_text()
    assert "Audit: what an attacker learns" in html and "LiRA, online" in html and "audit-attacks" in html
    assert f"{best['roc_auc']:.3f}" in html
    assert (overfit_run / "private" / "plots" / "audit_membership.png").stat().st_size > 1000
    assert "no differential-privacy guarantee" in html
    # the report that may be shared names the attacks and shows none of their results
    shared = (overfit_run / "report.html").read_text()
    assert "LiRA, online" in shared and "audit-withheld" in shared and "audit-attacks" not in shared
    assert f"{best['roc_auc']:.3f} (" not in shared and not (overfit_run / "plots" / "audit_membership.png").exists()


@pytest.mark.parametrize("non_members", ["test", "validation"])
def test_shadow_runs_include_and_leave_out_whole_patients(overfit_run, non_members):
    target = load_target(overfit_run)
    cand = draw_candidates(target, 20, seed=1, non_members=non_members)
    if non_members == "test":
        assert cand.members.sum() == (~cand.members).sum() == 20
    else:  # half the validation patients, label-matched: non-members from the training split
        assert cand.members.sum() == (~cand.members).sum() >= 10
        val = {row.tobytes() for sd in target.site_data for row in sd.val.images.reshape(len(sd.val), -1)}
        outside = [cand.images[k].reshape(-1).tobytes() for k in np.flatnonzero(~cand.members)]
        assert all(x in val for x in outside)
        population = {row.tobytes() for row in cand.population_images.reshape(len(cand.population_images), -1)}
        assert not population & set(outside)  # the attacker's population sample is not asked about
    # members are matched to the non-members' labels: prevalence cannot pass for membership
    assert np.array_equal(np.bincount(cand.labels[cand.members], minlength=2),
                          np.bincount(cand.labels[~cand.members], minlength=2))
    rng = np.random.default_rng(0)
    include = rng.random(len(cand)) < 0.5
    sites = shadow_sites(target, cand, include, np.random.default_rng(1))
    before = sum(len(sd.train) for sd in target.site_data)
    left_out = sum(len(g) for g, m, i in zip(cand.item_groups, cand.members, include) if m and not i)
    joined = sum(len(g) for g, m, i in zip(cand.item_groups, cand.members, include) if not m and i)
    assert sum(len(sd.train) for sd in sites) == before - left_out + joined
    pooled = np.concatenate([sd.train.images.reshape(len(sd.train), -1) for sd in sites])
    rows = {row.tobytes() for row in pooled}
    for k in range(len(cand)):
        present = cand.images[k].reshape(-1).tobytes() in rows
        assert present == bool(include[k]), (k, cand.members[k], include[k])
    # validation data, which selects the model, is the target's
    for a, b in zip(sites, target.site_data):
        assert np.array_equal(a.val.images, b.val.images)


# Epsilon 0.25 (ROC-AUC at most 0.563): at epsilon 1 (0.731) this audit, 40 members against 40
# non-members, could not tell the run from one without noise (loss attack 0.77-0.79, its interval
# from 0.66: measured), so it proved nothing; the negative control below shows it can at 0.25.
DP_OVERFIT = {**OVERFIT, "name": "overfit-dp", "privacy": {"mode": "dp-sgd", "epsilon": 0.25, "delta": 1e-3}}


def _noise_off(monkeypatch) -> None:
    """DP-SGD at the sites without its noise, where the noise multiplier reaches it: the run's plan,
    ledger and claim still say what they said (a broken mechanism, for negative controls)."""
    from privmed.federation import site as site_module

    dp_train = site_module.dp_train

    def noiseless(*args, noise_multiplier: float, **kw):  # noqa: ANN002, ANN003, ANN202
        return dp_train(*args, noise_multiplier=0.0, **kw)

    monkeypatch.setattr(site_module, "dp_train", noiseless)


def _audited(out, report: bool = True) -> tuple[dict, dict]:
    """The DP run's summary and the audit of it (the loss attack and offline LiRA, 2 shadows)."""
    s = privmed.run(DP_OVERFIT, out, report=report).summary
    result = audit(out, ["loss", "lira-offline"], shadows=2, candidates=100, seed=0)
    claimed = result["claimed"]
    assert claimed["epsilon"] == s["privacy"]["epsilon"] <= 0.25
    assert claimed["max_roc_auc"] == pytest.approx(dp_roc_auc_bound(claimed["epsilon"], 1e-3), abs=1e-4)
    return s, result


def test_a_dp_run_stays_within_what_its_epsilon_allows(tmp_path, one_thread):
    out = tmp_path / "dp"
    s, result = _audited(out)
    claimed = result["claimed"]
    assert result["unit"] == s["privacy"]["unit"]
    for name, r in result["attacks"].items():
        # an attack whose whole interval lies above the bound would refute the claimed epsilon
        assert r["roc_auc_ci"][0] <= claimed["max_roc_auc"], (name, r["roc_auc_ci"])
    html = (out / "report.html").read_text()
    assert "a lower bound on the leak" in html
    # the claim names the run's unit of privacy (this data names no patients: one image) and prints
    # the bound rounded up, never below what the epsilon gives
    assert f"unit of privacy is {UNITS[s['privacy']['unit']][1].format(item='image', items='images')}" in html
    shown = float(re.search(r"ROC-AUC by (0\.\d{3})", html).group(1))
    assert claimed["max_roc_auc"] <= shown < claimed["max_roc_auc"] + 1e-3


def test_the_same_audit_refutes_the_claim_of_a_run_without_noise(tmp_path, one_thread, monkeypatch):
    """Negative control of the test above: the same run and audit with DP-SGD's noise off (its plan,
    ledger and claim unchanged). An attack's whole interval lies above the bound the DP run stays
    within: that test can fail."""
    _noise_off(monkeypatch)
    _, result = _audited(tmp_path / "no-noise", report=False)
    best = max(result["attacks"].values(), key=lambda r: r["roc_auc_ci"][0])
    assert best["roc_auc_ci"][0] > result["claimed"]["max_roc_auc"], result["attacks"]


def test_the_roc_auc_bound_of_an_epsilon():
    for eps in (0.1, 1.0, 3.0):  # with delta 0 the area is e^eps / (1 + e^eps)
        assert dp_roc_auc_bound(eps) == pytest.approx(math.exp(eps) / (1 + math.exp(eps)), abs=1e-6)
    assert dp_roc_auc_bound(1.0, 1e-3) > dp_roc_auc_bound(1.0)
    assert dp_roc_auc_bound(1e-9) == pytest.approx(0.5, abs=1e-6)


def test_audit_errors_name_the_input(tmp_path, capsys, overfit_run):
    assert main(["audit", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "config.yaml: not found" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["audit", str(overfit_run), "--attack", "guess"]) == 2
    assert "unknown attack 'guess' (allowed: loss, lira-online" in capsys.readouterr().err
    assert main(["audit", str(overfit_run), "--shadows", "0"]) == 2
    assert "--shadows: 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["audit", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ATTACKS)


def test_a_corrupt_run_file_is_one_line(tmp_path, capsys, overfit_run):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(overfit_run, broken)
    (broken / "model.pt").write_bytes(b"not a model")
    before = sorted(p.name for p in broken.iterdir())
    assert main(["audit", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "a run file is corrupt" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in broken.iterdir()) == before  # nothing written

"""The privacy ledger: refusal before a round, no double counting, exact resume, atomic file."""

import json
import math

import pytest

import privmed.privacy.ledger as ledger_module
from privmed.errors import ConfigError
from privmed.privacy import LEDGER_FILE, BudgetExceeded, LedgerError, PrivacyLedger, Release, epsilon_spent
from privmed.privacy.figures import format_epsilon
from privmed.privacy.ledger import LedgerRelease

DELTA = 1e-5
STEP = dict(noise_multiplier=1.0, sample_rate=0.02, steps=100)


def ledger_after(rounds, accountant="rdp", budget=8.0, sites=("a", "b")):
    ledger = PrivacyLedger(budget, DELTA, accountant, sites=sites)
    for r in rounds:
        for site in sites:
            ledger.record(site, r, **STEP)
    return ledger


def test_epsilon_equals_epsilon_spent_of_the_releases():
    ledger = PrivacyLedger(8.0, DELTA)  # default accountant: prv
    ledger.record("a", 1, 1.0, 0.02, 100)
    ledger.record("a", 2, 1.5, 0.03, 200)
    expected = epsilon_spent([Release(1.0, 0.02, 100), Release(1.5, 0.03, 200)], DELTA, "prv")
    assert ledger.epsilon("a") == expected
    assert ledger.to_dict()["sites"]["a"]["epsilon"] == expected


def test_round_past_the_budget_is_refused_before_anything_is_recorded():
    ledger = ledger_after([1, 2, 3], budget=4.0)
    before = ledger.to_dict()
    spent = ledger.epsilon("b")
    big = Release(1.0, 0.02, 2000)
    with pytest.raises(BudgetExceeded) as info:
        ledger.check_round({"a": [Release(**STEP)], "b": [big]}, round=4)
    message = str(info.value)
    after = epsilon_spent([Release(**STEP)] * 3 + [big], DELTA, "rdp")
    assert "round 4 refused" in message and "site 'b'" in message and "site 'a'" not in message
    # Both figures rounded up to 4 digits: the message never says less was or would be spent.
    assert f"spent epsilon {format_epsilon(spent, 4)} " in message and "budget 4" in message
    assert f"would bring it to {format_epsilon(after, 4)}," in message
    assert float(format_epsilon(spent, 4)) >= spent and float(format_epsilon(after, 4)) >= after
    assert "\n" not in message
    assert ledger.to_dict() == before


def test_every_site_past_the_budget_is_named():
    ledger = ledger_after([1], budget=1.0)
    with pytest.raises(BudgetExceeded, match=r"site 'a'.*; site 'b'"):
        ledger.check_round({"a": Release(1.0, 0.05, 3000), "b": Release(1.0, 0.05, 3000)}, round=2)


def test_check_round_projects_and_record_matches_it(monkeypatch):
    ledger = ledger_after([1, 2])
    projected = ledger.check_round({"a": [Release(**STEP)]}, round=3)
    assert ledger.releases("a")[-1][0] == 2  # nothing recorded yet
    calls = []
    monkeypatch.setattr(ledger_module, "epsilon_spent", lambda *a: calls.append(a) or 0.0)
    ledger.record("a", 3, **STEP)
    assert ledger.epsilon("a") == projected["a"]  # the checked history, from the cache
    assert ledger.epsilon("a") == projected["a"]
    assert calls == []


def test_epsilon_is_cached_but_follows_record_and_truncate(monkeypatch):
    ledger = ledger_after([1, 2])
    calls = []
    real = ledger_module.epsilon_spent
    monkeypatch.setattr(ledger_module, "epsilon_spent", lambda *a: calls.append(a) or real(*a))
    first = ledger.epsilon("a")
    assert ledger.epsilon("a") == first and len(calls) == 1
    ledger.record("a", 3, **STEP)
    assert ledger.epsilon("a") > first and len(calls) == 2
    ledger.truncate(2)
    assert ledger.epsilon("a") == first and len(calls) == 2  # that history is still cached


def test_no_release_is_counted_twice():
    ledger = ledger_after([1, 3])
    with pytest.raises(LedgerError, match=r"round 3 for site 'a' is already recorded"):
        ledger.record("a", 3, **STEP)
    with pytest.raises(LedgerError, match=r"round 2 for site 'a' comes before the last one"):
        ledger.record("a", 2, 2.0, 0.01, 10)
    with pytest.raises(LedgerError, match=r"round 3 would be counted twice"):
        ledger.check_round({"b": [Release(**STEP)]}, round=3)
    assert [r for r, _ in ledger.releases("a")] == [1, 3]


def test_dict_round_trip_and_layout():
    ledger = PrivacyLedger(8.0, DELTA, "rdp", sites=("a", "b", "idle"))
    for r in (1, 2):
        ledger.record("a", r, **STEP)
        ledger.record("b", r, **STEP)
    data = ledger.to_dict()
    assert data["unit"] == "patient" and data["mechanism"] == "DP-SGD (Poisson-sampled Gaussian)"
    assert (data["accountant"], data["delta"], data["budget_epsilon"]) == ("rdp", DELTA, 8.0)
    assert data["sites"]["a"]["releases"][1] == {"round": 2, **STEP}
    assert data["sites"]["idle"] == {"epsilon": 0.0, "releases": []}
    again = PrivacyLedger.from_dict(json.loads(json.dumps(data)))
    assert again.to_dict() == data
    # the file's releases as typed records, written key for key as they are read
    assert again.records("a") == [LedgerRelease(r, **STEP) for r in (1, 2)]
    assert [json.dumps(r.to_json()) for r in again.records("a")] == [json.dumps(d) for d in data["sites"]["a"]["releases"]]
    assert again.records("a")[0].release == Release(**STEP)


@pytest.mark.parametrize("unit", ["patient", "record", "site"])
def test_every_unit_round_trips(tmp_path, unit):
    ledger = PrivacyLedger(8.0, DELTA, "rdp", sites=("a",), unit=unit)
    ledger.record("a", 1, **STEP)
    ledger.save(tmp_path / LEDGER_FILE)
    again = PrivacyLedger.load(tmp_path / LEDGER_FILE)
    assert again.unit == unit and again.to_dict() == ledger.to_dict()
    with pytest.raises(LedgerError, match=r"unit 'image' is not one of 'patient', 'record', 'site'"):
        PrivacyLedger(8.0, DELTA, "rdp", unit="image")


def test_resume_from_a_checkpoint_is_exact(tmp_path):
    uninterrupted = ledger_after([1, 2, 3, 4, 5])
    # A run saved its ledger after round 4 but its last checkpoint is round 2: rewind, then redo 3-5.
    ledger_after([1, 2, 3, 4]).save(tmp_path / LEDGER_FILE)
    resumed = PrivacyLedger.load(tmp_path / LEDGER_FILE)
    resumed.truncate(2)
    assert [r for r, _ in resumed.releases("a")] == [1, 2]
    assert resumed.epsilon("a") == epsilon_spent([Release(**STEP)] * 2, DELTA, "rdp")
    for r in (3, 4, 5):
        for site in ("a", "b"):
            resumed.record(site, r, **STEP)
    assert resumed.to_dict() == uninterrupted.to_dict()


def test_save_is_atomic_json(tmp_path):
    path = tmp_path / "run" / LEDGER_FILE
    ledger = ledger_after([1])
    ledger.save(path)
    ledger.record("a", 2, 0.0, 0.02, 10)  # no noise: epsilon is infinite, written as null
    ledger.save(path)
    data = json.loads(path.read_text())
    assert data["sites"]["a"]["epsilon"] is None and math.isfinite(data["sites"]["b"]["epsilon"])
    assert sorted(p.name for p in path.parent.iterdir()) == [LEDGER_FILE]  # no temp files left
    assert PrivacyLedger.load(path).epsilon("a") == math.inf


def test_bad_input_is_named():
    with pytest.raises(ConfigError, match=r"privacy\.epsilon"):
        PrivacyLedger(0.0, DELTA)
    with pytest.raises(ConfigError, match=r"privacy\.delta"):
        PrivacyLedger(1.0, 1.5)
    with pytest.raises(ConfigError, match=r"privacy\.accountant.*did you mean 'prv'"):
        PrivacyLedger(1.0, DELTA, "prvv")
    with pytest.raises(LedgerError, match=r"unknown site 'c'"):
        ledger_after([1]).epsilon("c")
    with pytest.raises(LedgerError, match=r"malformed"):
        PrivacyLedger.from_dict({"unit": "patient"})
    data = ledger_after([1]).to_dict()
    data["unit"] = "image"
    with pytest.raises(LedgerError, match=r"unit"):
        PrivacyLedger.from_dict(data)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_a_site_ledger_checks_a_whole_run_and_says_how_many_rounds_it_affords(accountant):
    """SiteLedger.check_run: the largest affordable number of rounds is exact (one more passes the
    budget, as the accountant counts it), and a run that fits passes."""
    from privmed.privacy.site_ledger import SiteLedger, SiteRelease

    turn = Release(1.0, 0.1, 50)
    budget = epsilon_spent([turn] * 7, 1e-5, accountant) + 1e-9  # room for exactly 7 turns
    ledger = SiteLedger("a", budget, 1e-5, accountant, "patient")
    ledger.add(SiteRelease("old", 1, "train", "d", 1.0, 0.1, 50))  # one spent in an earlier run
    ledger.check_run(turn, 6, [], "round 1 of run new")  # 1 + 6 = 7: fits
    with pytest.raises(BudgetExceeded) as e:
        ledger.check_run(turn, 10, [], "round 1 of run new")
    msg = str(e.value)
    assert "refused round 1 of run new: the whole run it was set up for, 10 rounds" in msg
    assert "it can afford 6 such rounds" in msg and f"past its budget {budget:g}" in msg
    with pytest.raises(BudgetExceeded, match="it can afford the 6 rounds but not the fine-tuning turn too"):
        ledger.check_run(turn, 6, [Release(1.0, 0.5, 20)], "round 1 of run new")
    # the validation patients: their own line, their own quota
    ledger.check_run_scoring("val", Release(4.0, 1.0, 1), 3, "round 1 of run new")
    with pytest.raises(BudgetExceeded, match=r"the run's 400 scorings of its validation patients"):
        ledger.check_run_scoring("val", Release(4.0, 1.0, 1), 400, "round 1 of run new")

"""The run directory's typed records (privmed.federation.records): written as privmed always wrote
them, read back, and old or damaged files answered with one line."""

import json

import pytest

from privmed._version import __version__
from privmed.catalog import PrivacyMode
from privmed.errors import RunDirError
from privmed.federation.records import (
    MetricsRow, PrivacySummary, Summary, read_ledger, read_metrics, read_summary, read_summary_json,
)
from privmed.io import write_json, write_jsonl
from privmed.privacy.ledger import LedgerRelease, PrivacyLedger

SCORES = {"auc": 0.75, "accuracy": 0.5, "n": 9}
ROW = {"round": 2, "finished": "2026-12-07T12:36:43+00:00", "seconds": 1.5, "train_seconds": 1.25,
       "sample_gradient_steps": 306, "train_loss": {"a": 0.5}, "dropped": ["b"], "attempts": 2,
       "epsilon": {"a": 1.5}, "val": SCORES, "test": SCORES, "test_mean_over_sites": SCORES,
       "sites": {"a": {"val": SCORES}}, "unscored": ["b"], "best_round": 1}
UNSCORED = {"round": 1, "finished": "2026-12-07T12:36:43+00:00", "seconds": 1.5, "train_seconds": 1.25,
            "sample_gradient_steps": 3, "train_loss": {}, "val": {}, "test": {}, "sites": {},
            "scored": False, "best_round": None, "best_round_per_site": {"a": 1}}
DP_PRIVACY = {"mode": "central", "unit": "site", "mechanism": "DP-FedAvg", "epsilon": 3.5, "delta": 0.01,
              "accountant": "rdp", "budget_epsilon": 4.0, "sites": {"a": 3.5}, "max_grad_norm": 0.5,
              "plan": {"a": {"noise_multiplier": 2.0}}, "scoring": None, "honest_secure_epsilon": 1.5,
              "honest_min_sites": 2, "statement": "(3.5, 0.01)-DP per site"}


def _summary(privacy: dict | None, finetuned: bool) -> dict:
    d = {"name": "tiny", "task": "classification", "strategy": "fedavg", "rounds_completed": 2,
         "rounds_planned": 2, "best_round": 2, "selection": "the last round's model", "selection_rule": "last",
         "test": SCORES, "evaluation": {"test": "pooled", "sites": "own"}, "test_mean_over_sites": SCORES}
    if finetuned:
        d["test_finetuned_mean_over_sites"] = SCORES
    return {**d, "val": SCORES, "sites": {"a": {"n_train": 3}}, "wall_seconds": 2.5, "train_seconds": 2.0,
            "sample_gradient_steps": 9, "privacy": privacy, "secure_aggregation": None,
            "data": {"source": "phantom"}, "model": {"name": "cnn", "parameters": 10}, "seed": 0,
            "privmed_version": __version__}


@pytest.mark.parametrize("row", [ROW, UNSCORED], ids=["scored", "not-scored"])
def test_a_metrics_row_is_written_as_it_was_read(row):
    assert json.dumps(MetricsRow.from_json(row).to_json()) == json.dumps(row)


@pytest.mark.parametrize("privacy", [DP_PRIVACY, {k: v for k, v in DP_PRIVACY.items() if "honest" not in k},
                                     {"mode": "none", "epsilon": None, "statement": "no DP"}],
                         ids=["central-secure", "dp", "none"])
@pytest.mark.parametrize("finetuned", [False, True])
def test_a_summary_is_written_as_it_was_read(privacy, finetuned):
    d = _summary(privacy, finetuned)
    s = Summary.from_json(d)
    assert isinstance(s.privacy, PrivacySummary) and s.privacy.mode == PrivacyMode(privacy["mode"])
    assert isinstance(s.privacy.mode, PrivacyMode)
    assert json.dumps(s.to_json()) == json.dumps(d)


def test_readers_read_what_the_writer_wrote(tmp_path):
    write_jsonl(tmp_path / "metrics.jsonl", [UNSCORED, ROW])
    write_json(tmp_path / "summary.json", _summary(DP_PRIVACY, False))
    rows = read_metrics(tmp_path)
    assert [r.round for r in rows] == [1, 2] and rows[1].epsilon == {"a": 1.5} and rows[0].scored is False
    s = read_summary(tmp_path)
    assert s.selection_rule == "last" and s.privacy.honest_min_sites == 2
    assert read_ledger(tmp_path) is None
    ledger = PrivacyLedger(8.0, 1e-5, "rdp", sites=["a"])
    ledger.record("a", 1, 1.1, 0.25, 4)
    ledger.save(tmp_path / "privacy_ledger.json")
    assert read_ledger(tmp_path).records("a") == [LedgerRelease(1, 1.1, 0.25, 4)]


def test_an_older_summary_reads_with_what_it_lacks_as_none(tmp_path):
    d = {k: v for k, v in _summary(None, False).items()
         if k not in ("selection_rule", "evaluation", "privacy", "secure_aggregation")}
    write_json(tmp_path / "summary.json", d)
    s = read_summary(tmp_path)
    assert s.selection_rule is None and s.privacy is None and s.evaluation is None


def test_a_summary_without_a_field_every_privmed_wrote_is_one_line(tmp_path):
    d = _summary(None, False)
    del d["rounds_completed"]
    d["privmed_version"] = "0.0.1"
    write_json(tmp_path / "summary.json", d)
    with pytest.raises(RunDirError) as e:
        read_summary(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "summary.json: no field 'rounds_completed'" in msg
    assert "privmed 0.0.1" in msg and f"this privmed {__version__}" in msg


def test_a_metrics_line_without_its_round_names_the_line(tmp_path):
    write_jsonl(tmp_path / "metrics.jsonl", [ROW, {k: v for k, v in ROW.items() if k != "round"}])
    with pytest.raises(RunDirError, match=r"metrics\.jsonl line 2: no field 'round' .*privmed of unknown version"):
        read_metrics(tmp_path)


def test_damaged_files_and_unknown_modes_are_one_line(tmp_path):
    (tmp_path / "summary.json").write_text("{", encoding="utf-8")
    with pytest.raises(RunDirError, match=r"summary\.json: not valid JSON"):
        read_summary(tmp_path)
    with pytest.raises(RunDirError, match=r"summary\.json: cannot be read"):
        read_summary(tmp_path / "nothing")
    write_json(tmp_path / "summary.json", _summary({**DP_PRIVACY, "mode": "dpsgd"}, False))
    with pytest.raises(RunDirError, match=r"privacy\.mode 'dpsgd' is not one of 'none', 'dp-sgd', 'central'"):
        read_summary(tmp_path)
    assert read_metrics(tmp_path) == []  # no round completed yet


def test_a_partial_summary_reads_as_far_as_it_goes(tmp_path):
    """What the report reads: missing fields None, an unknown privacy mode None, the rest as written;
    read strictly, the same summary is an error."""
    d = {"name": "old", "rounds_completed": 3, "privacy": {"mode": "dpsgd", "epsilon": 3.2, "unit": "patient"}}
    s = Summary.from_json(d, partial=True)
    assert (s.name, s.rounds_completed, s.task, s.seed, s.data) == ("old", 3, None, None, None)
    assert (s.privacy.mode, s.privacy.epsilon, s.privacy.unit, s.privacy.statement) == (None, 3.2, "patient", None)
    assert Summary.from_json({**d, "privacy": {"mode": "central"}}, partial=True).privacy.mode == PrivacyMode.CENTRAL
    assert Summary.from_json({**d, "privacy": "garbled"}, partial=True).privacy is None
    with pytest.raises(RunDirError, match="no field 'task'"):
        Summary.from_json(d)
    write_json(tmp_path / "summary.json", [d])
    with pytest.raises(RunDirError, match=r"summary\.json: expected a JSON object, got list"):
        read_summary_json(tmp_path)
    write_json(tmp_path / "summary.json", d)
    assert read_summary_json(tmp_path) == d

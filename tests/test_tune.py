"""`privmed tune`: trial 0 is the config as written, the choice uses validation data only, the best
settings are written and reproduce their trial's score, and a private config is refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import tiny_config

from privmed.config import load_config, validate_config
from privmed.errors import ConfigError
from privmed.tune import tune


def test_tune_writes_the_trials_and_the_best_settings_which_reproduce_their_score(tmp_path, one_thread):
    cfg = validate_config(tiny_config(federation__rounds=1))
    out = tmp_path / "tune"
    r = tune(cfg, trials=3, out=out)
    for f in ("best.yaml", "tuning.json", "tuning.md", "tuning.html", "trials.png", "best/summary.json",
              "best/report.html"):
        assert (out / f).is_file(), f
    saved = json.loads((out / "tuning.json").read_text())
    assert [t["trial"] for t in saved["trials"]] == [0, 1, 2] and "no differential-privacy" in saved["statement"]
    # trial 0 is the config as written
    first = saved["trials"][0]["params"]
    assert first["training.lr"] == cfg.training.lr and first["training.batch_size"] == cfg.training.batch_size
    scores = [t["score"] for t in saved["trials"] if t["score"] is not None]
    assert r.best["score"] == max(scores) and saved["best_trial"] == r.best["trial"]
    # best.yaml is the config with the best trial's settings, and its run selects on validation data
    best = load_config(out / "best.yaml")
    for key, value in r.best["params"].items():
        section, name = key.split(".")
        assert getattr(getattr(best, section), name) == value, key
    # same seed, same settings: the rerun's validation score is the trial's
    summary = json.loads((out / "best" / "summary.json").read_text())
    assert summary["val"]["auc"] == pytest.approx(r.best["score"], rel=1e-9)


def test_tune_refuses_what_it_cannot_do_honestly(tmp_path):
    with pytest.raises(ConfigError, match="spends privacy the ledger does not count"):
        tune(validate_config(tiny_config(privacy__mode="dp-sgd", privacy__epsilon=8.0)), 2, tmp_path / "a")
    with pytest.raises(ConfigError, match="no validation data to tune on"):
        tune(validate_config(tiny_config(data__val_fraction=0)), 2, tmp_path / "b")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config()))
    r = subprocess.run([sys.executable, "-m", "privmed", "tune", str(path), "--trials", "0", "--out",
                        str(tmp_path / "c")], capture_output=True, text=True)
    assert r.returncode == 2 and "--trials: 0" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "c").exists()

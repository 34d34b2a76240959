"""Each hospital has only its own data, and the models are scored at the sites.

- A hospital is configured by what it holds: its own folder, split by itself; what it tells the
  coordinator is its counts and its data's shape.
- A coordinator config names no data; it runs on the hospitals (here simulated from their own
  configs, `privmed run --hospital`, as `privmed join` would load them).
- Pooled validation and test figures are merged from the counts the sites return: they equal the
  figures of the pooled predictions (the AUC within the rounding bound the counts themselves give).
- A hospital's own budget, from its own config, holds in the simulation too.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml
from hospital_folders import HOSPITALS, coordinator_config, site_config, write_folders

import privmed
from privmed.config import load_site_config, validate_config
from privmed.data.base import ImageSet
from privmed.errors import ConfigError
from privmed.federation.experiment import prepare_experiment
from privmed.federation.hospital import Hospital
from privmed.federation.site import get_weights, predict
from privmed.privacy.site_ledger import SiteRefused
from privmed.tasks.counts import auc_rounding_bound, load_counts, merge_counts


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hospitals")
    return root, write_folders(root)


def _run_config(path):
    return validate_config(yaml.safe_load(path.read_text()))


def _configs(root, folders, **privacy):
    return [site_config(root, name, folders[name], **privacy) for name in HOSPITALS]


def test_a_hospital_loads_only_its_own_folder_and_splits_it_itself(folders, tmp_path):
    root, dirs = folders
    cfg = load_site_config(site_config(tmp_path, "hospital-b", dirs["hospital-b"]))
    h = Hospital.from_config(cfg)
    n_images = len(list(dirs["hospital-b"].rglob("*.png")))
    p = h.profile
    assert p.n_train + p.n_val + p.n_test == n_images and min(p.n_train, p.n_val, p.n_test) > 0
    # its own seed and name fix its split: the same folder gives the same split again
    again = Hospital.from_config(cfg)
    assert np.array_equal(again.data.train.labels, h.data.train.labels) and again.profile == p
    # all the coordinator learns: counts and the data's shape, no record; of the labels only the
    # validation items' count per class (which every round's evaluation counts release anyway)
    d = h.describe()
    assert set(d) == {"site", "name", "n_train", "n_patients", "patient_ids", "n_val", "n_test",
                      "val_label_counts", "data"}
    assert d["val_label_counts"] == np.bincount(h.data.val.labels).tolist()
    assert d["data"]["class_names"] == ["lesion", "no lesion"]  # its class folders, sorted
    assert d["data"]["image_shape"] == [1, 16, 16]
    assert "root" not in json.dumps(d) and str(dirs["hospital-b"]) not in json.dumps(d)


def test_site_config_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("site: a b\ndata: {source: image-folder, root: x}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: site: String should match pattern"):
        load_site_config(bad)
    bad.write_text("site: a\ndata: {source: sites}\n")
    with pytest.raises(ConfigError, match="a hospital's config names its own data"):
        load_site_config(bad)
    bad.write_text("site: a\ndata: {source: phantom}\nprivacy: {max_epsilon: 8, budget: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'privacy.budget'.*allowed here: max_epsilon"):
        load_site_config(bad)


def test_a_coordinator_config_names_no_data(tmp_path):
    with pytest.raises(ConfigError, match=r"data.source 'sites' names no data.*data.root has no meaning"):
        validate_config({"data": {"source": "sites", "root": "/data"}})
    path = coordinator_config(tmp_path)
    r = subprocess.run([sys.executable, "-m", "privmed", "run", str(path), "--out", str(tmp_path / "run")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "data.source: 'sites' names no data" in r.stderr and "--hospital" in r.stderr
    assert not (tmp_path / "run").exists()


def test_the_hospitals_simulated_from_their_own_configs(folders, tmp_path, one_thread):
    root, dirs = folders
    coord = coordinator_config(tmp_path, federation__rounds=2, federation__model_selection="last")
    hospitals = _configs(tmp_path, dirs)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "privmed", "run", str(coord), "--out", str(out), "--quiet",
                        *[a for h in hospitals for a in ("--hospital", str(h))]],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((out / "summary.json").read_text())
    # the coordinator held no test data: the pooled figure is merged from the sites' counts
    assert not (out / "predictions.npz").exists()
    counts = load_counts(out / "test_counts.npz")["global"]
    # under DP the sites' test counts are noisy (one scoring release each): the pooled figure is
    # computed from them as released, and n is near the test patients' number
    n_test = sum(s["n_test"] for s in summary["sites"].values())
    assert summary["test"]["n"] == round(float(counts["n"])) and abs(summary["test"]["n"] - n_test) < 0.5 * n_test
    assert not np.allclose(counts["score_hist"], np.round(counts["score_hist"]))  # noisy, not whole counts
    assert "each site's own test patients" in summary["evaluation"]["test"]
    assert set(summary["sites"]) == set(HOSPITALS) and all(s["test"]["n"] for s in summary["sites"].values())
    # a site whose noisy test counts leave a class empty has no AUC (null in the file); the keys are
    # fresh each run, so this happens now and then
    aucs = [np.nan if s["test"]["auc"] is None else s["test"]["auc"] for s in summary["sites"].values()]
    mean = summary["test_mean_over_sites"]["auc"]
    assert (mean is None and np.isnan(aucs).all()) or mean == pytest.approx(np.nanmean(aucs))
    # each hospital guarded itself with its own budget, and its ledger agrees with the coordinator's
    ledger = json.loads((out / "privacy_ledger.json").read_text())
    for name in HOSPITALS:
        own = json.loads((out / "private" / "sites" / name / "site_ledger.json").read_text())
        assert own["budget_epsilon"] == 8.0 and own["delta"] == 1e-3
        assert [r["round"] for r in own["releases"]] == [r["round"] for r in ledger["sites"][name]["releases"]]
    assert (out / "report.html").is_file()


def test_pooled_figures_from_the_sites_counts_equal_the_pooled_predictions(folders, tmp_path, one_thread):
    """Without privacy (hospitals that accept it), the counts are exact and merge to the pooled
    predictions' figures."""
    root, dirs = folders
    cfg = _run_config(coordinator_config(tmp_path, federation__rounds=1, privacy={"mode": "none"}))
    hospitals = [load_site_config(p) for p in _configs(tmp_path, dirs, require_dp=False)]
    result = privmed.run(cfg, hospitals=hospitals, report=False)
    exp = prepare_experiment(cfg, hospitals=hospitals)
    weights = get_weights(result.model)
    task = exp.task
    for split in ("val", "test"):
        data = ImageSet.concat([getattr(sd, split) for sd in exp.site_data])
        pred = predict(exp.model_factory(), weights, data.images, 256, task)
        direct = task.metrics(pred, data)
        merged = merge_counts([task.counts(predict(exp.model_factory(), weights, getattr(sd, split).images,
                                                   256, task), getattr(sd, split)) for sd in exp.site_data])
        got = result.summary["test" if split == "test" else "val"]
        for key in ("accuracy", "balanced_accuracy", "ece", "loss", "n"):
            assert got[key] == pytest.approx(direct[key], rel=1e-9, abs=1e-12), (split, key)
        assert abs(got["auc"] - direct["auc"]) <= auc_rounding_bound(merged) + 1e-12


def test_a_hospitals_own_budget_holds_in_a_simulation(folders, tmp_path):
    root, dirs = folders
    cfg = _run_config(coordinator_config(tmp_path, federation__rounds=3))
    hospitals = [load_site_config(p) for p in _configs(tmp_path, dirs, max_epsilon=1.0)]
    with pytest.raises(SiteRefused, match=r"site 'hospital-a' refused round \d of run .*past its budget 1 "):
        privmed.run(cfg, tmp_path / "run", hospitals=hospitals, report=False)


def test_privacy_plan_of_a_coordinator_config_from_the_hospitals_configs(folders, tmp_path):
    root, dirs = folders
    coord = coordinator_config(tmp_path, privacy__noise_multiplier=None, privacy__epsilon=4.0)
    hospitals = _configs(tmp_path, dirs)
    r = subprocess.run([sys.executable, "-m", "privmed", "privacy", "plan", str(coord),
                        *[a for h in hospitals for a in ("--hospital", str(h))]], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in HOSPITALS:
        n = Hospital.from_config(load_site_config(tmp_path / f"{name}.yaml")).profile.n_patients
        assert any(line.split()[:2] == [name, str(n)] for line in r.stdout.splitlines()), r.stdout


def test_privacy_plan_shows_what_each_hospital_can_still_afford(folders, tmp_path):
    """By each hospital's own terms and ledger: one with a small budget of its own cannot afford
    the run, and the plan says how many of its rounds it could."""
    root, dirs = folders
    coord = coordinator_config(tmp_path, federation__rounds=5)
    paths = []
    for name in HOSPITALS:
        raw = yaml.safe_load(site_config(tmp_path, name, dirs[name]).read_text())
        raw["state"] = str(tmp_path / "state" / name)  # never the machine's own ~/.privmed
        if name == "hospital-c":
            raw["privacy"]["max_epsilon"] = 3.0
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
        paths.append(tmp_path / f"{name}.yaml")
    # hospital-b has taken part before: its ledger, in its state, has spent some of its budget
    from privmed.privacy.site_ledger import SITE_LEDGER_FILE, SiteLedger, SiteRelease

    before = SiteLedger("hospital-b", 8.0, 1e-3, "rdp", "patient")
    before.add(SiteRelease("earlier", 1, "train", "d", 1.0, 0.5, 20))
    (tmp_path / "state" / "hospital-b").mkdir(parents=True)
    before.save(tmp_path / "state" / "hospital-b" / SITE_LEDGER_FILE)
    r = subprocess.run([sys.executable, "-m", "privmed", "privacy", "plan", str(coord),
                        *[a for h in paths for a in ("--hospital", str(h))]], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = r.stdout[r.stdout.index("what each hospital can still afford"):]
    rows = {line.split()[0]: line for line in out.splitlines()[3:] if line.strip()}
    assert set(rows) == set(HOSPITALS), out
    assert rows["hospital-a"].rstrip().endswith("yes") and "(no ledger here)" in rows["hospital-a"]
    assert re.search(r"no: [1-4] of 5 rounds$", rows["hospital-c"].rstrip()), out
    spent = rows["hospital-b"].split()[4]
    assert "(no ledger here)" not in rows["hospital-b"] and float(spent) >= before.epsilon > 0


def test_a_hospital_holding_one_class_joins_when_the_classes_are_named(folders, tmp_path, one_thread):
    """Label skew at its extreme: hospital-c holds one class only. Its folder alone cannot say what
    the other class is called, so it is refused with the way out; with the federation's classes
    named in every hospital's data.class_names it joins, trains and is scored."""
    import shutil

    root, dirs = folders
    names = sorted(p.name for p in dirs["hospital-c"].iterdir())
    one = tmp_path / "one-class"
    shutil.copytree(dirs["hospital-c"] / names[1], one / names[1])
    own = dict(dirs, **{"hospital-c": one})
    cfg = _run_config(coordinator_config(tmp_path, federation__rounds=2, federation__model_selection="last"))
    with pytest.raises(privmed.errors.DataError, match="data.class_names"):
        Hospital.from_config(load_site_config(site_config(tmp_path, "hospital-c", one)))
    hospitals = []
    for name in HOSPITALS:
        raw = yaml.safe_load(site_config(tmp_path, name, own[name]).read_text())
        raw["data"]["class_names"] = names
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
        hospitals.append(load_site_config(tmp_path / f"{name}.yaml"))
    result = privmed.run(cfg, tmp_path / "run", hospitals=hospitals, report=False)
    c = result.summary["sites"]["hospital-c"]
    assert c["n_train"] > 0 and c["test"]["n"] > 0
    assert result.summary["data"]["class_names"] == names
    ledger = json.loads((tmp_path / "run" / "privacy_ledger.json").read_text())
    assert len(ledger["sites"]["hospital-c"]["releases"]) == 2  # it trained both rounds

"""Privacy figures as users read them: every epsilon shown is rounded UP (never below the ledger's),
and the unit of privacy is said exactly: 'patient' where the data names patients, 'record' (one
image or row) where it does not, 'site' under central DP."""

from __future__ import annotations

import contextlib
import io
import json
import math
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image

import privmed
from conftest import tiny_config
from privmed.config import PrivacyConfig, validate_config
from privmed.federation.experiment import prepare_experiment
from privmed.privacy import PrivacyLedger
from privmed.privacy.figures import format_budget, format_epsilon, unit_note
from privmed.privacy.plan import SiteFacts, guarantee_statement, make_plan

# ------------------------------------------------------------------------------------ rounding up


@given(
    st.floats(min_value=0.0, max_value=1e12, allow_nan=False, allow_infinity=False, exclude_min=True)
    | st.floats(min_value=1e-12, max_value=100.0),
    st.integers(min_value=1, max_value=6),
)
@example(0.99649, 3)
@example(9.9996, 3)
@example(1.0, 3)
@example(2.0000000000000004, 3)
@example(5e-324, 3)
def test_format_epsilon_never_rounds_down_and_is_within_one_unit(eps, digits):
    text = format_epsilon(eps, digits)
    assert float(text) >= eps, (eps, text)
    shown, given_ = Decimal(text), Decimal(repr(eps))
    assert len(shown.normalize().as_tuple().digits) <= digits
    # at most one unit of the last digit kept, in the input's own decade
    assert shown - given_ <= Decimal(1).scaleb(given_.adjusted() - digits + 1), (eps, text)


@pytest.mark.parametrize("eps, digits, text", [
    (0.99649, 3, "0.997"), (0.996, 3, "0.996"), (1.0, 3, "1"), (8, 3, "8"), (8.0, 4, "8"),
    (3.914, 3, "3.92"), (2.5634, 4, "2.564"), (9.996, 3, "10"), (12.01, 3, "12.1"), (1234.5, 3, "1240"),
    (0.0123, 3, "0.0123"), (5e-5, 3, "5e-5"), (1.2345e-6, 3, "1.24e-6"), (2.5e7, 3, "2.5e+7"),
    (0.0, 3, "0"), (math.inf, 3, "inf"),
])
def test_format_epsilon_examples(eps, digits, text):
    assert format_epsilon(eps, digits) == text


def test_format_epsilon_rejects_what_is_no_epsilon():
    for bad in (-0.1, math.nan):
        with pytest.raises(ValueError, match=r"format_epsilon: eps .* is not allowed \(a number >= 0\)"):
            format_epsilon(bad)
    with pytest.raises(ValueError, match=r"digits 0 is not allowed"):
        format_epsilon(1.0, 0)


def test_format_budget_keeps_a_given_budget_and_rounds_a_computed_one_up():
    assert [format_budget(b) for b in (8, 8.0, 3.5, 0.5, 1e-5)] == ["8", "8", "3.5", "0.5", "1e-05"]
    assert format_budget(3.98412345) == "3.985"  # e.g. the planned epsilon of a fixed noise


# ------------------------------------------------------------------------------------------- unit


def _plan(mode="dp-sgd", **kw):
    cfg = PrivacyConfig(mode=mode, epsilon=3.0, accountant="rdp")
    return make_plan(cfg, {"a": SiteFacts(400, turns=3), "b": SiteFacts(500, turns=3)},
                     batch_size=50, local_epochs=1, local_steps=None, **kw)


def test_the_plan_unit_follows_the_data():
    assert _plan(patient_ids=True).unit == "patient"
    assert _plan(patient_ids=False).unit == "record"
    assert _plan().unit == "record"  # not told: the weaker claim
    assert _plan("central", patient_ids=True).unit == "site"
    plan = _plan(patient_ids=False)
    assert plan.to_dict()["unit"] == "record"
    ledger = plan.new_ledger()
    assert ledger.unit == "record"
    assert PrivacyLedger.from_dict(json.loads(json.dumps(ledger.to_dict()))).unit == "record"


def test_statements_say_the_unit_exactly():
    record = guarantee_statement("dp-sgd", "0.997", "1e-05", "record")
    assert record.startswith("Each site's training records have (0.997, 1e-05)-differential privacy")
    assert "the unit is one image/record: the source gives no patient ids" in record
    assert "a patient with k images or records has only the group guarantee (k x epsilon, " \
           "k x e^((k-1) x epsilon) x delta)" in record
    patient = guarantee_statement("dp-sgd", "0.997", "1e-05", "patient")
    assert "(the unit is one patient, with all of their images)" in patient and "record" not in patient
    assert "Each site, as a whole" in guarantee_statement("central", "1", "1e-05", "site")
    with pytest.raises(ValueError, match=r"unit 'site' is not allowed under mode 'dp-sgd'"):
        guarantee_statement("dp-sgd", unit="site")
    assert unit_note("record") and unit_note("patient") is None and unit_note("site") is None


# --------------------------------------------------------------------------------- runs, end to end


def _dp(cfg: dict, **over) -> dict:
    base = {"privacy": {"mode": "dp-sgd", "epsilon": 2.0, "delta": 1e-3, "accountant": "rdp"},
            "training": {"batch_size": 16, "optimizer": "sgd", "lr": 0.5, "momentum": 0.0}}
    cfg = {**cfg, **base}
    cfg["federation"] = {**cfg.get("federation", {}), "rounds": 2}
    cfg.update(over)
    return cfg


def _medmnist(root: Path) -> dict:
    """A MedMNIST-like npz: images without patient ids, like every MedMNIST file."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 255, (60, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (60, 1))
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "pneumoniamnist.npz", **arrays)
    cfg = tiny_config()
    cfg["data"] = {"source": "medmnist", "name": "pneumoniamnist", "root": str(root), "download": False}
    cfg["sites"] = {"count": 2, "partition": "iid", "min_samples": 5}
    return _dp(cfg)


def _image_folder_with_patients(root: Path) -> dict:
    """Class folders of PNGs and an index CSV naming each image's patient (2 images per patient)."""
    lines = ["file,patient"]
    for c in ("normal", "pneumonia"):
        (root / c).mkdir(parents=True)
        for i in range(40):
            Image.fromarray(np.full((16, 16), 6 * i % 255, np.uint8)).save(root / c / f"{i}.png")
            lines.append(f"{c}/{i}.png,{c}-{i // 2}")
    (root / "index.csv").write_text("\n".join(lines) + "\n")
    cfg = tiny_config()
    cfg["data"] = {"source": "image-folder", "root": str(root), "csv": str(root / "index.csv"), "size": 16}
    cfg["sites"] = {"count": 2, "partition": "iid", "min_samples": 5}
    return _dp(cfg)


def _cli(*args) -> SimpleNamespace:
    """`privmed ARGS` through the CLI's `main` in this process (a Python start-up and its imports per
    command cost ~6 s; tests/test_cli.py runs the command as a process): returncode, stdout, stderr."""
    from privmed.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_a_source_with_patient_ids_is_planned_per_patient(tmp_path):
    exp = prepare_experiment(validate_config(_image_folder_with_patients(tmp_path / "folder")))
    assert exp.privacy.unit == "patient"
    # the plan counts patients (2 images each), not images
    assert all(sd.train.patient is not None for sd in exp.site_data)
    assert {p.n_patients for p in exp.privacy.sites.values()} == {
        len(np.unique(sd.train.patient)) for sd in exp.site_data}


def test_a_run_without_patient_ids_says_record_everywhere(tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(_medmnist(tmp_path / "data")))
    out = tmp_path / "run"
    r = _cli("run", cfg_path, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr

    privacy = json.loads((out / "summary.json").read_text())["privacy"]
    ledger = json.loads((out / "privacy_ledger.json").read_text())
    assert privacy["unit"] == "record" and ledger["unit"] == "record"
    spent = max(site["epsilon"] for site in ledger["sites"].values())
    assert privacy["epsilon"] == spent

    # The statement, the run's output and the ledger table: per record, epsilon never below the ledger's.
    shown = format_epsilon(spent)
    assert float(shown) >= spent
    assert privacy["statement"].startswith(f"Each site's training records have ({shown}, 0.001)-")
    assert "the unit is one image/record" in privacy["statement"]
    assert f"privacy: ({shown}, 0.001)-differential privacy per record at every site" in r.stdout
    assert "unit: one image/record, not one patient" in r.stdout
    line = next(x for x in r.stdout.splitlines() if x.startswith("privacy: ("))
    assert float(line.split("(")[1].split(",")[0]) >= spent

    html = (out / "report.html").read_text()
    assert "Differential privacy per image: epsilon ≤ " + shown in html
    assert "one image, not one patient" in html and "per patient" not in html

    r = _cli("privacy", "spent", out)
    assert r.returncode == 0, r.stderr
    assert "unit: record;" in r.stdout and "unit: one image/record, not one patient" in r.stdout
    for site, entry in ledger["sites"].items():
        row = next(x for x in r.stdout.splitlines() if x.startswith(site + " ")).split()
        assert float(row[1]) >= entry["epsilon"] and row[1] == format_epsilon(entry["epsilon"])

    r = _cli("privacy", "plan", cfg_path)
    assert r.returncode == 0, r.stderr
    assert "(unit: record;" in r.stdout and "budget epsilon 2;" in r.stdout
    header = next(x for x in r.stdout.splitlines() if x.startswith("site "))
    assert header.split()[:2] == ["site", "records"]


def test_the_phantom_names_one_patient_per_image():
    """The phantom source gives every generated image its own patient id: per patient, as the data says."""
    exp = prepare_experiment(validate_config(_dp(tiny_config())))
    assert exp.privacy.unit == "patient"
    assert all(len(np.unique(sd.train.patient)) == len(sd.train) for sd in exp.site_data)


def test_an_in_process_run_summary_never_shows_less_than_the_ledger(tmp_path):
    result = privmed.run(_medmnist(tmp_path / "data"), out=tmp_path / "run", report=False)
    privacy = result.summary["privacy"]
    shown = privacy["statement"].split("have (")[1].split(",")[0]
    assert float(shown) >= privacy["epsilon"] and shown == format_epsilon(privacy["epsilon"])

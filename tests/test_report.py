"""The HTML report, on run directories written by hand in the runner's formats."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from privmed.errors import RunDirError
from privmed.report import plots, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SITES = ("site-a", "site-b", "site-c")


def _scores(auc: float, n: int) -> dict:
    return {"auc": auc, "accuracy": auc - 0.05, "balanced_accuracy": auc - 0.07, "ece": 0.04,
            "loss": 0.31, "n": n}


def make_run(
    root: Path,
    *,
    strategy: str = "fedavg",
    rounds: int = 5,
    planned: int | None = None,
    synthetic: bool = False,
    k: int = 2,
    predictions: bool = True,
    name: str = "pneumonia-fedavg",
) -> Path:
    """A run directory as the runner writes it: 3 sites; site-a has its own test data."""
    run = root / name
    run.mkdir()
    rng = np.random.default_rng(0)
    config = {
        "name": name, "seed": 0, "task": "classification",
        "data": {"source": "phantom" if synthetic else "medmnist", "name": "pneumoniamnist",
                 "root": "data", "size": 28},
        "sites": {"count": 3, "partition": "dirichlet", "alpha": 0.5, "names": list(SITES)},
        "model": {"name": "cnn"},
        "federation": {"strategy": strategy, "rounds": planned or rounds, "local_epochs": 1},
        "training": {"batch_size": 32, "lr": 0.01, "optimizer": "sgd"},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    rows, best = [], None
    for r in range(1, rounds + 1):
        # Rises, saturates, then drifts down after round 12: the selected round is not the last.
        auc = 0.95 - 0.25 * math.exp(-r / 2.5) - 0.004 * max(0, r - 12) + 0.005 * math.sin(3 * r)
        sites = {s: {"val": _scores(auc + 0.02 * (i - 1) - 0.005, 170)} for i, s in enumerate(SITES)}
        sites["site-a"]["test"] = _scores(auc - 0.02, 100)
        if strategy == "local":
            for s in SITES:
                sites[s]["test_pooled"] = _scores(auc - 0.03, 524)
        if best is None or auc > best["val"]["auc"]:
            best = {"round": r, "val": _scores(auc, 524), "test": _scores(auc - 0.01, 524),
                    "sites": sites}
        rows.append({
            "round": r, "seconds": 4.1, "train_seconds": 3.2, "sample_gradient_steps": 4708 * r,
            "train_loss": {s: 0.25 + 0.45 * math.exp(-r / 3) + 0.03 * i for i, s in enumerate(SITES)},
            "val": _scores(auc, 524), "test": _scores(auc - 0.01, 524), "sites": sites,
            "best_round": best["round"],
        })
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    summary = {
        "name": name, "task": "classification", "strategy": strategy,
        "rounds_completed": rounds, "rounds_planned": planned or rounds,
        "best_round": best["round"] if best else None,
        "selection": "round with the highest pooled validation AUC",
        "test": best["test"] if best else None, "val": best["val"] if best else None,
        "sites": {s: {"n_train": 1500, "n_val": 170, "n_test": 100 if s == "site-a" else 0,
                      **(best["sites"][s] if best else {})} for s in SITES},
        "wall_seconds": 81.2, "train_seconds": 60.3, "sample_gradient_steps": 4708 * rounds,
        "data": {"source": config["data"]["source"], "synthetic": synthetic,
                 "description": "Chest X-rays, normal vs pneumonia.",
                 "citation": "Yang et al. MedMNIST v2 (2023).",
                 "class_names": ["normal", "pneumonia", "covid"][:k]},
        "model": {"name": "cnn", "parameters": 146258}, "seed": 0, "privmed_version": "0.1.0",
    }
    (run / "summary.json").write_text(json.dumps(summary))

    if predictions:
        n = 200
        labels = rng.integers(0, k, n)
        models = list(SITES) if strategy == "local" else ["global"]
        arrays = {"labels": labels}
        for m in models:
            logits = rng.normal(size=(n, k)) + 2.0 * np.eye(k)[labels]
            p = np.exp(logits)
            arrays[f"probs:{m}"] = p / p.sum(axis=1, keepdims=True)
        np.savez(run / "predictions.npz", **arrays)
    return run


def _pngs_in(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)]


def _text(html: str) -> str:
    """The page without its embedded images (base64 can spell anything)."""
    return re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html)


def test_fedavg_report(tmp_path):
    run = make_run(tmp_path)
    out = write_report(run)
    assert out == run / "report.html"
    html = out.read_text()
    test_auc = json.loads((run / "summary.json").read_text())["test"]["auc"]
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert "pneumonia-fedavg" in html
    for site in SITES:
        assert site in html
    assert f">{test_auc:.3f}<" in html
    assert "SYNTHETIC DATA" not in html
    pngs = _pngs_in(html)
    assert len(pngs) == 3 and all(p.startswith(PNG_MAGIC) for p in pngs)
    for name in ("learning_curves", "roc", "calibration"):
        assert (run / "plots" / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    assert "Own-test AUC" in html and "Pooled-test AUC" not in html
    assert not list(run.glob(".*.tmp")) and not list((run / "plots").glob(".*.tmp"))


def test_synthetic_banner(tmp_path):
    html = write_report(make_run(tmp_path, synthetic=True)).read_text()
    assert "SYNTHETIC DATA — generated phantom images, not patient data" in html


def test_local_strategy_has_a_curve_per_site(tmp_path):
    run = make_run(tmp_path, strategy="local")
    html = write_report(run).read_text()
    assert "Pooled-test AUC" in html and "mean over the sites" in html
    assert len(_pngs_in(html)) == 3


def test_multiclass_roc_is_one_vs_rest(tmp_path):
    html = write_report(make_run(tmp_path, k=3)).read_text()
    assert len(_pngs_in(html)) == 3 and "one class against the rest" in html


def test_multiclass_local_skips_roc_with_a_note(tmp_path):
    html = write_report(make_run(tmp_path, k=3, strategy="local")).read_text()
    assert len(_pngs_in(html)) == 2 and "single model" in html


def test_missing_predictions_skips_roc_and_calibration(tmp_path):
    run = make_run(tmp_path, predictions=False)
    html = write_report(run).read_text()
    assert len(_pngs_in(html)) == 1 and "predictions.npz" in html
    assert not (run / "plots" / "roc.png").exists()


def test_zero_rounds(tmp_path):
    run = make_run(tmp_path, rounds=0, planned=20, predictions=False)
    text = _text(write_report(run).read_text())
    assert "No training rounds were completed" in text and "0 of 20" in text
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)


def test_nan_metrics_show_na(tmp_path):
    run = make_run(tmp_path)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows[1]["val"]["auc"] = math.nan
    rows[2]["sites"]["site-b"]["val"]["auc"] = None
    rows[3]["train_loss"]["site-c"] = math.nan
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # writes NaN
    assert "NaN" in (run / "metrics.jsonl").read_text()
    summary = json.loads((run / "summary.json").read_text())
    summary["test"]["auc"] = math.nan
    summary["sites"]["site-c"]["val"]["accuracy"] = None
    (run / "summary.json").write_text(json.dumps(summary))
    text = _text(write_report(run).read_text())
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)
    assert "n/a" in text


def test_missing_summary_raises_with_the_path(tmp_path):
    run = make_run(tmp_path)
    (run / "summary.json").unlink()
    with pytest.raises(RunDirError, match=re.escape(str(run)) + ".*summary.json"):
        write_report(run)


def test_not_a_directory_raises(tmp_path):
    with pytest.raises(RunDirError, match="not a directory"):
        write_report(tmp_path / "nope")


def test_privacy_scalars_shown(tmp_path):
    run = make_run(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    summary["privacy"] = {"epsilon": 3.2, "delta": 1e-5, "accountant": "rdp", "per_site": {"a": 1}}
    (run / "summary.json").write_text(json.dumps(summary))
    html = write_report(run).read_text()
    assert "Privacy" in html and "epsilon" in html and "rdp" in html and "per_site" not in html


def test_html_escapes_names(tmp_path):
    run = make_run(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    summary["name"] = "<script>x</script>"
    (run / "summary.json").write_text(json.dumps(summary))
    html = write_report(run).read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_twenty_rounds_report_is_stable(tmp_path):
    # Rendering twice gives the same page: nothing in it depends on when it was written.
    run = make_run(tmp_path, rounds=20)
    first = write_report(run).read_text()
    assert write_report(run).read_text() == first


def test_plot_functions_return_png():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    probs = np.clip(0.5 + 0.3 * (labels - 0.5) + rng.normal(0, 0.2, 300), 0.01, 0.99)
    probs = np.stack([1 - probs, probs], axis=1)
    assert plots.roc({"global": probs}, labels, ["normal", "pneumonia"]).startswith(PNG_MAGIC)
    assert plots.calibration({"global": probs}, labels).startswith(PNG_MAGIC)
    assert plots.calibration({"a": probs, "b": probs[::-1]}, labels).startswith(PNG_MAGIC)
    curves = plots.learning_curves([1, 2], {"a": [0.6, math.nan]}, {"a": [0.7, 0.5]},
                                   [0.6, 0.7], [None, 0.65], best_round=2)
    assert curves.startswith(PNG_MAGIC)


def test_roc_rejects_undefined_inputs():
    probs = np.full((4, 2), 0.5)
    with pytest.raises(ValueError, match="two classes"):
        plots.roc({"global": probs}, np.zeros(4, dtype=int))
    probs3 = np.full((4, 3), 1 / 3)
    with pytest.raises(ValueError, match="one model"):
        plots.roc({"a": probs3, "b": probs3}, np.array([0, 1, 2, 0]))

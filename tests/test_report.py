"""The HTML report, on run directories written by hand in the runner's formats."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import markupsafe
import numpy as np
import pytest
import yaml

from privmed.errors import RunDirError
from privmed.report import plots, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SITES = ("site-a", "site-b", "site-c")
# Each site's epsilon after the last planned round, and its plan (as the runner writes them).
SPENT = {"dp-sgd": {"site-a": 3.98, "site-b": 3.914, "site-c": 3.5},
         "central": {s: 2.47 for s in SITES}}
PLANS = {
    "dp-sgd": {"site-a": (102, 1.55, 0.314), "site-b": (240, 1.0321, 0.1333), "site-c": (57, 2.2, 0.5614)},
    "central": {s: (n, 0.93, 1.0) for s, n in zip(SITES, (102, 240, 57))},
}


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
    privacy: str | None = None,
) -> Path:
    """A run directory as the runner writes it: 3 sites; site-a has its own test data. `privacy`:
    "dp-sgd", "central" or "none" (summary['privacy'] as the runner writes it, and each row's epsilon
    when private); None writes no privacy entry, as runs before privacy reporting."""
    private = privacy in SPENT
    total = planned or rounds

    def spent(site: str, r: int) -> float:  # grows with the rounds, reaches SPENT after the last
        return SPENT[privacy][site] * (r / total) ** 0.6
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
            **({"epsilon": {s: spent(s, r) for s in SITES}} if private else {}),
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
    if privacy == "none":
        summary["privacy"] = {"mode": "none", "epsilon": None, "statement": (
            "No differential privacy (privacy.mode: none): the model and its updates may reveal the "
            "patients they were trained on.")}
    elif private:
        sites_spent = {s: spent(s, rounds) for s in SITES}
        epsilon = max(sites_spent.values())
        summary["privacy"] = {
            "mode": privacy, "unit": "patient" if privacy == "dp-sgd" else "site",
            "mechanism": ("DP-SGD (Poisson-sampled Gaussian)" if privacy == "dp-sgd" else
                          "DP-FedAvg (clipped site updates, Gaussian noise added by the server)"),
            "epsilon": epsilon, "delta": 1e-05, "accountant": "prv", "budget_epsilon": 4.0,
            "sites": sites_spent, "max_grad_norm": 1.0 if privacy == "dp-sgd" else 0.5,
            "plan": {s: {"n_patients": n, "turns": total, "noise_multiplier": noise, "sample_rate": q,
                         "steps": 4 if privacy == "dp-sgd" else 1, "planned_epsilon": SPENT[privacy][s]}
                     for s, (n, noise, q) in PLANS[privacy].items()},
            "statement": (f"Each site's patients have ({epsilon:.3g}, 1e-05)-differential privacy "
                          "against everything the site released. Not covered: the scores on "
                          "validation and test patients. With model_selection 'last' the final "
                          "model does not depend on them."),
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


def _table(html: str, table_id: str) -> list[list[str]]:
    """The cells of each row of the table with id `table_id` (its header row included)."""
    body = re.search(rf'<table id="{table_id}">(.*?)</table>', html, re.DOTALL)
    assert body, f"no table {table_id}"
    return [re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.DOTALL)
            for row in re.findall(r"<tr>(.*?)</tr>", body.group(1), re.DOTALL)]


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


def test_privacy_section_dp_sgd(tmp_path):
    run = make_run(tmp_path, privacy="dp-sgd")
    html = write_report(run).read_text()
    text = _text(html)
    privacy = json.loads((run / "summary.json").read_text())["privacy"]
    assert "Differential privacy per patient: epsilon ≤ 3.98 at delta = 1e-05 for every site." in text
    assert "DP-SGD (Poisson-sampled Gaussian)" in text
    assert "PRV (privacy random variables, Gopi et al. 2021, via Opacus)" in text
    assert "<tr><th>Budget</th><td>epsilon ≤ 4 per site</td></tr>" in text
    assert "<tr><th>Clipping norm</th><td>1</td></tr>" in text
    assert "one patient, with all of their images" in text
    assert "the sites do not report their training loss" in text
    assert _table(html, "privacy-sites") == [
        ["Site", "Patients", "Epsilon spent", "Budget", "Noise multiplier", "Sample rate",
         "Steps per turn", "Turns"],
        ["site-a", "102", "3.98", "4", "1.55", "0.314", "4", "5"],
        ["site-b", "240", "3.91", "4", "1.032", "0.1333", "4", "5"],
        ["site-c", "57", "3.5", "4", "2.2", "0.5614", "4", "5"],
    ]
    assert "model_selection &#39;last&#39;" in html  # the statement, verbatim and escaped
    assert str(markupsafe.escape(privacy["statement"])) in html
    # Before the figures, where a reader meets it first; the overview names it too.
    assert text.index('<h2 id="privacy">') < text.index("<h2>Figures</h2>")
    assert "Privacy: <b>DP per patient, ε ≤ 3.98</b>" in text
    assert "No differential privacy" not in text and "not recorded" not in text
    pngs = _pngs_in(html)
    assert len(pngs) == 4 and all(p.startswith(PNG_MAGIC) for p in pngs)
    assert (run / "plots" / "privacy_spent.png").read_bytes() in pngs
    assert "never passes the budget line" in text and "accountant: PRV" in text


def test_privacy_section_central(tmp_path):
    run = make_run(tmp_path, privacy="central")
    html = write_report(run).read_text()
    assert "Differential privacy per site: epsilon ≤ 2.47 at delta = 1e-05 for every site." in html
    assert "DP-FedAvg (clipped site updates, Gaussian noise added by the server)" in html
    assert "<tr><th>Clipping norm</th><td>0.5</td></tr>" in html
    assert _table(html, "privacy-sites")[1:] == [
        [s, n, "2.47", "4", "0.93", "1", "1", "5"] for s, n in zip(SITES, ("102", "240", "57"))
    ]
    assert "the lines coincide" in html
    assert "do not report their training loss" not in html  # central: sites train without DP


def test_privacy_figure_plots_the_ledger_epsilons(tmp_path, monkeypatch):
    calls = []

    def fake(rounds, epsilon_by_site, budget=None, delta=None):
        calls.append((rounds, epsilon_by_site, budget, delta))
        return PNG_MAGIC

    monkeypatch.setattr(plots, "privacy_spent", fake)
    run = make_run(tmp_path, rounds=3, privacy="dp-sgd")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    del rows[1]["epsilon"]["site-c"]  # site-c made no release in round 2: its spend stays
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(run)
    [(rounds, series, budget, delta)] = calls
    assert rounds == [0, 1, 2, 3] and budget == 4.0 and delta == 1e-05
    assert list(series) == list(SITES)
    assert series["site-a"] == [0.0] + [row["epsilon"]["site-a"] for row in rows]
    c = [row["epsilon"].get("site-c") for row in rows]
    assert series["site-c"] == [0.0, c[0], c[0], c[2]]
    assert series["site-a"][-1] == pytest.approx(3.98)


def test_no_privacy_shows_a_notice(tmp_path):
    run = make_run(tmp_path, privacy="none")
    html = write_report(run).read_text()
    text = _text(html)
    assert re.search(r'<div class="notice alert"[^>]*>No differential privacy \(privacy.mode: none\): '
                     r"the model and its updates may reveal", text)
    assert "Privacy: <b>none</b>" in text
    assert "Differential privacy per" not in text and "Privacy spent" not in text
    assert len(_pngs_in(html)) == 3 and not (run / "plots" / "privacy_spent.png").exists()


def test_summary_without_privacy_says_not_recorded(tmp_path):
    run = make_run(tmp_path)  # no "privacy" key, as runs before privacy reporting
    assert "privacy" not in json.loads((run / "summary.json").read_text())
    text = _text(write_report(run).read_text())
    assert "Privacy: not recorded." in text and "Privacy: <b>not recorded</b>" in text
    assert "No differential privacy" not in text and "Privacy spent" not in text


def test_private_run_without_rounds_notes_the_missing_figure(tmp_path):
    run = make_run(tmp_path, rounds=0, planned=5, predictions=False, privacy="dp-sgd")
    html = write_report(run).read_text()
    assert 'id="fig-privacy_spent"' in html and "No completed rounds recorded a privacy spend" in html
    assert "epsilon ≤ 0 at delta = 1e-05" in html
    assert _pngs_in(html) == [] and not (run / "plots" / "privacy_spent.png").exists()


def test_partial_privacy_summary_renders(tmp_path):
    run = make_run(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    summary["privacy"] = {"epsilon": 3.2, "delta": 1e-5, "accountant": "rdp",
                          "statement": "<script>alert(1)</script>"}
    (run / "summary.json").write_text(json.dumps(summary))
    html = write_report(run).read_text()
    assert "Differential privacy: epsilon ≤ 3.2 at delta = 1e-05 for every site." in html
    assert "RDP (Rényi DP, via Opacus)" in html
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert 'id="privacy-sites"' not in html and "Privacy spent" in html  # a note: no epsilon rows


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
    spent = plots.privacy_spent([0, 1, 2, 3], {"a": [0, 1.2, 2.0, 2.6], "b": [0, 1.0, math.nan, 3.9]},
                                budget=4.0, delta=1e-5)
    assert spent.startswith(PNG_MAGIC)
    assert plots.privacy_spent([1], {"a": [None]}).startswith(PNG_MAGIC)  # nothing known, no budget


def test_roc_rejects_undefined_inputs():
    probs = np.full((4, 2), 0.5)
    with pytest.raises(ValueError, match="two classes"):
        plots.roc({"global": probs}, np.zeros(4, dtype=int))
    probs3 = np.full((4, 3), 1 / 3)
    with pytest.raises(ValueError, match="one model"):
        plots.roc({"a": probs3, "b": probs3}, np.array([0, 1, 2, 0]))

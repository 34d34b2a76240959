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
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body.group(1), re.DOTALL)]


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
        ["site-b", "240", "3.92", "4", "1.032", "0.1333", "4", "5"],  # 3.914 rounded up, not down
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


def test_privacy_section_per_record_when_the_data_names_no_patients(tmp_path):
    run = make_run(tmp_path, privacy="dp-sgd")
    summary = json.loads((run / "summary.json").read_text())
    summary["privacy"]["unit"] = "record"
    summary["privacy"]["epsilon"] = 0.99649  # .3g would show 0.996, below the ledger's figure
    (run / "summary.json").write_text(json.dumps(summary))
    html = write_report(run).read_text()
    text = _text(html)
    assert "Differential privacy per image: epsilon ≤ 0.997 at delta = 1e-05 for every site." in text
    assert "Privacy: <b>DP per image, ε ≤ 0.997</b>" in text
    assert ("one image, not one patient: the data names no patient ids, so each image counts as its "
            "own patient, and a patient with k images has only the group guarantee") in text
    assert "one patient, with all of their" not in text and "per patient" not in text
    assert _table(html, "privacy-sites")[0][:3] == ["Site", "Images", "Epsilon spent"]


def test_report_epsilons_never_round_down():
    from privmed.report.html import fmt_budget, fmt_epsilon

    assert [fmt_epsilon(x) for x in (0.99649, 1.0, 3.914, 8, None, float("nan"))] == [
        "0.997", "1", "3.92", "8", "n/a", "n/a"]
    assert [fmt_budget(x) for x in (8, 3.5, 3.98412345)] == ["8", "3.5", "3.985"]


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


# ------------------------------------------------------------------ runs that report evaluation counts


def counts_instead_of_predictions(run: Path) -> dict:
    """Replace the run's predictions.npz with test_counts.npz, the counts of each model on the same
    pooled test data (as a deployment writes them: the sites' counts merged); return the
    predictions, for reference."""
    from privmed.tasks.counts import classification_counts, save_counts, survival_counts

    z = dict(np.load(run / "predictions.npz"))
    counts = {}
    for key, pred in z.items():
        if key.startswith("probs:"):
            counts[key.removeprefix("probs:")] = classification_counts(pred, z["labels"])
        elif key.startswith("risk:"):
            counts[key.removeprefix("risk:")] = survival_counts(pred, z["time"], z["labels"])
    save_counts(run / "test_counts.npz", counts)
    (run / "predictions.npz").unlink()
    return z


@pytest.mark.parametrize("k, strategy", [(2, "fedavg"), (2, "local"), (3, "fedavg")])
def test_counts_draw_roc_and_calibration_without_predictions(tmp_path, monkeypatch, k, strategy):
    from privmed.tasks.classification import reliability_bins
    from privmed.tasks.counts import SCORE_BINS, score_bins
    from sklearn.metrics import roc_curve

    roc_curves, calibration_bins = plots.roc_curves, plots.calibration_bins
    drawn = {}

    def roc_spy(curves, title):
        drawn["roc"] = curves
        return roc_curves(curves, title)

    def calibration_spy(bins, *args, **kw):
        drawn["cal"] = bins
        return calibration_bins(bins, *args, **kw)

    monkeypatch.setattr(plots, "roc_curves", roc_spy)
    monkeypatch.setattr(plots, "calibration_bins", calibration_spy)
    run = make_run(tmp_path, k=k, strategy=strategy)
    z = counts_instead_of_predictions(run)
    html = write_report(run).read_text()
    text = _text(html)
    for name in ("roc", "calibration"):
        assert (run / "plots" / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    assert len(_pngs_in(html)) == 3 and "no predictions.npz" not in text
    assert text.count("Computed from counts the sites reported, no patient&#39;s prediction left a "
                      "site") == 2
    assert f"{SCORE_BINS:,} bins of the logit scale" in text
    # The curves are sklearn's on the scores rounded to the grid; the bins those of the predictions.
    labels = z["labels"]
    models = list(SITES) if strategy == "local" else ["global"]
    assert list(drawn["cal"]) == models
    for m in models:
        for got, want in zip(drawn["cal"][m], reliability_bins(z[f"probs:{m}"], labels)):
            np.testing.assert_allclose(got, want, rtol=1e-12, equal_nan=True)
    names = ["normal", "pneumonia", "covid"]
    curves = ({m: (labels, z[f"probs:{m}"][:, 1]) for m in models} if k == 2 else
              {names[c]: (labels == c, z["probs:global"][:, c]) for c in range(k)})
    assert list(drawn["roc"]) == list(curves)
    for name, (y, score) in curves.items():
        fpr, tpr, _ = roc_curve(y, score_bins(score))
        np.testing.assert_allclose(drawn["roc"][name][0], fpr, atol=1e-15)
        np.testing.assert_allclose(drawn["roc"][name][1], tpr, atol=1e-15)


def test_truncated_predictions_raise_naming_the_file(tmp_path):
    run = make_run(tmp_path)
    path = run / "predictions.npz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(RunDirError, match=re.escape(str(path)) + ": cannot read"):
        write_report(run)


def test_corrupt_test_counts_raise_naming_the_file(tmp_path):
    run = make_run(tmp_path)
    counts_instead_of_predictions(run)
    path = run / "test_counts.npz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(RunDirError, match=re.escape(str(path)) + ": cannot read"):
        write_report(run)
    path.write_text("not numpy")
    with pytest.raises(RunDirError, match=re.escape(str(path))):
        write_report(run)


# ------------------------------------------------------------------ survival and tabular run directories

REGIONS = ("region-0", "region-1", "region-2")
FEATURES = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak",
            "slope", "ca", "thal"]


def _cox(c: float, n: int, events: int) -> dict:
    return {"c_index": c, "loss": 3.1 - c, "n": n, "events": events}


def make_survival_run(
    root: Path,
    *,
    strategy: str = "fedavg",
    rounds: int = 4,
    validation: bool = True,
    finetune: bool = False,
    name: str = "tcga-fedavg",
) -> Path:
    """A survival run directory as the runner writes it (task: survival on tcga-brca): 3 regions,
    each with its own test patients; predictions hold labels (event indicator), time and risk."""
    run = root / name
    run.mkdir()
    personalised = strategy in ("local", "fedbn")
    config = {
        "name": name, "seed": 0, "task": "survival",
        "data": {"source": "tcga-brca", "root": "data", "val_fraction": 0.2 if validation else 0},
        "sites": {"names": list(REGIONS)},
        "model": {"name": "cox"},
        "federation": {"strategy": strategy, "rounds": rounds, "local_steps": 20,
                       **({"finetune_steps": 10} if finetune else {})},
        "training": {"batch_size": 16, "lr": 0.05, "optimizer": "sgd"},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    n_test = (40, 25, 15)

    def site_rows(r: int) -> dict:
        out = {}
        for i, s in enumerate(REGIONS):
            c = 0.6 + 0.02 * r + 0.03 * i
            out[s] = {"val": _cox(c - 0.01, 20, 4) if validation else {},
                      "test": _cox(c, n_test[i], 5 + i)}
            if personalised:
                out[s]["test_pooled"] = _cox(c - 0.02, sum(n_test), 18)
        return out

    rows = []
    for r in range(1, rounds + 1):
        sites = site_rows(r)
        mean = _cox(float(np.mean([v["test"]["c_index"] for v in sites.values()])), sum(n_test), 18)
        rows.append({
            "round": r, "seconds": 0.4, "train_seconds": 0.3,
            "train_loss": {s: 3.0 - 0.1 * r for s in REGIONS},
            "val": _cox(0.6 + 0.02 * r, 60, 12) if validation else {},
            "test": _cox(0.62 + 0.02 * r, sum(n_test), 18), "test_mean_over_sites": mean,
            "sites": sites, "best_round": r,
        })
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    last = rows[-1]
    summary = {
        "name": name, "task": "survival", "strategy": strategy,
        "rounds_completed": rounds, "rounds_planned": rounds,
        "best_round": None if personalised else rounds,
        "selection": ("highest validation concordance index over all sites' validation data "
                      "(pooled), earliest round on ties" if validation else
                      "the last round's model (no validation data plays a part in the choice)"),
        "test": last["test"], "test_mean_over_sites": last["test_mean_over_sites"],
        "val": last["val"],
        "sites": {s: {"n_train": 120, "n_val": 20 if validation else 0, "n_test": n,
                      **last["sites"][s]} for s, n in zip(REGIONS, n_test)},
        "wall_seconds": 3.2, "train_seconds": 2.0, "sample_gradient_steps": 9000, "seed": 0,
        "data": {"source": "tcga-brca", "synthetic": False, "tabular": True,
                 "description": "TCGA-BRCA clinical data, 6 regions, survival.",
                 "citation": "FLamby (du Terrail et al. 2022).", "class_names": ["censored", "event"],
                 "image_shape": [39], "feature_names": [f"f{i}" for i in range(39)], "n_test": 80},
        "model": {"name": "cox", "parameters": 40}, "privmed_version": "0.1.0",
        "privacy": {"mode": "none", "epsilon": None},
    }
    if personalised:  # the mean over the site models of their pooled-test scores: counts added up
        summary["test"] = _cox(last["test"]["c_index"], 3 * sum(n_test), 3 * 18)
    if finetune:
        for i, s in enumerate(REGIONS):
            summary["sites"][s]["test_finetuned"] = _cox(0.75 + 0.01 * i, n_test[i], 5 + i)
        summary["test_finetuned_mean_over_sites"] = _cox(0.76, sum(n_test), 18)
    (run / "summary.json").write_text(json.dumps(summary))

    rng = np.random.default_rng(3)
    n = sum(n_test)
    risk = rng.normal(size=n)
    event_time = rng.exponential(np.exp(-1.5 * risk)) * 1000
    censor = rng.uniform(0, 2500, n)
    arrays = {"labels": (event_time <= censor).astype(np.int64),
              "time": np.minimum(event_time, censor)}
    for m in (list(REGIONS) if personalised else ["global"]):
        arrays[f"risk:{m}"] = (risk + 0.3 * rng.normal(size=n)).astype(np.float32)
    np.savez(run / "predictions.npz", **arrays)
    return run


def test_survival_report(tmp_path):
    run = make_survival_run(tmp_path)
    html = write_report(run).read_text()
    text = _text(html)
    summary = json.loads((run / "summary.json").read_text())
    pooled, mean = summary["test"]["c_index"], summary["test_mean_over_sites"]["c_index"]
    # headline: the pooled C-index and, beside it, the mean over sites
    assert re.search(rf'id="headline-pooled">.*C-index.*>{pooled:.3f}<', text, re.DOTALL)
    assert re.search(rf'id="headline-mean-over-sites">.*mean over sites.*>{mean:.3f}<', text, re.DOTALL)
    head = _table(html, "headline-table")
    assert head[0] == ["Metric", "Pooled test", "Own test, mean over sites", "Validation"]
    assert head[1] == ["C-index (concordance)", f"{pooled:.3f}", f"{mean:.3f}", "0.680"]
    assert ["Events", "18", "18", "12"] in head and ["Patients", "80", "80", "60"] in head
    # per site: C-index, events, n; and a row of the mean over sites (the runner's figure)
    sites = _table(html, "sites")
    assert sites[0] == ["Site", "Train patients", "Validation patients", "Own test patients",
                        "Validation C-index", "Own-test C-index", "Own-test events"]
    assert sites[1] == ["region-0", "120", "20", "40", "0.670", "0.680", "5"]
    assert sites[-1] == ["Mean over sites", "360", "60", "80", "0.700", f"{mean:.3f}", "18"]
    # Kaplan-Meier by risk group replaces ROC and calibration; C-index replaces AUC over rounds
    for name in ("learning_curves", "kaplan_meier"):
        assert (run / "plots" / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    assert not (run / "plots" / "roc.png").exists() and not (run / "plots" / "calibration.png").exists()
    assert 'id="fig-kaplan_meier"' in html and 'id="fig-roc"' not in html
    assert 'id="fig-calibration"' not in html and "ROC" not in text and "AUC" not in text
    assert re.search(r"Log-rank test .*: p (=|<) 0\.\d+", text)
    assert "Learning curves: C-index over rounds" in text and "validation C-index" in text
    assert len(_pngs_in(html)) == 2
    assert not re.search(r"\bimages?\b", text, re.IGNORECASE)
    assert "Classes:" not in text and "Features (39)" in text
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)


def test_kaplan_meier_splits_at_the_median_risk(tmp_path, monkeypatch):
    from lifelines.statistics import logrank_test

    calls = []
    monkeypatch.setattr(plots, "kaplan_meier", lambda panels, **kw: calls.append(panels) or PNG_MAGIC)
    run = make_survival_run(tmp_path)
    html = write_report(run).read_text()
    [panels] = calls
    [(title, (low, high))] = panels.items()
    z = np.load(run / "predictions.npz")
    risk, time, event = z["risk:global"], z["time"], z["labels"].astype(bool)
    is_high = risk > np.median(risk)
    assert low["label"] == f"lower risk (n = 40, {event[~is_high].sum()} events)"
    assert high["label"] == f"higher risk (n = 40, {event[is_high].sum()} events)"
    assert np.array_equal(np.sort(high["censored_times"]), np.sort(time[is_high & ~event]))
    assert low["survival"][0] == 1.0 and np.all(np.diff(low["survival"]) <= 0)
    assert low["survival"][-1] > high["survival"][-1]  # the model ranks: low risk lives longer
    p = logrank_test(time[~is_high], time[is_high], event[~is_high], event[is_high]).p_value
    shown = f"p = {p:.2g}" if p >= 1e-4 else "p < 0.0001"
    assert p < 0.05 and title.endswith(shown)
    assert f"the two groups&#39; survival: {shown}" in html  # the caption


def test_survival_without_validation_with_finetuning(tmp_path):
    run = make_survival_run(tmp_path, validation=False, finetune=True)
    html = write_report(run).read_text()
    text = _text(html)
    head = _table(html, "headline-table")
    assert head[0] == ["Metric", "Pooled test", "Own test, mean over sites",
                       "Own test after fine-tuning, mean over sites"]
    assert head[1][-1] == "0.760" and 'id="headline-finetuned"' in html
    assert "no validation data" in text and "the last round&#39;s model" in text
    sites = _table(html, "sites")
    assert "Validation C-index" not in sites[0] and sites[0][-1] == "Own-test C-index after fine-tuning"
    assert sites[1][-1] == "0.750" and sites[-1][-1] == "0.760"
    assert "10 steps more" in text
    assert (run / "plots" / "kaplan_meier.png").read_bytes().startswith(PNG_MAGIC)


def test_personalised_survival_has_a_panel_per_site(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(plots, "kaplan_meier", lambda panels, **kw: calls.append(panels) or PNG_MAGIC)
    run = make_survival_run(tmp_path, strategy="fedbn")
    html = write_report(run).read_text()
    [panels] = calls
    assert [t.split(":")[0] for t in panels] == list(REGIONS)
    assert "Pooled-test C-index" in html and "One panel per site" in html
    head = _table(html, "headline-table")
    assert head[0][1] == "Pooled test (mean over the sites&#39; own models)"
    # every site model scores the same 80 pooled patients: not 3 x 80
    assert ["Patients", "80", "80"] in [row[:3] for row in head]
    assert ["Events", "18", "18"] in [row[:3] for row in head]


def test_kaplan_meier_without_the_survival_module_agrees(tmp_path, monkeypatch):
    from privmed.report import survival as report_survival

    def panels() -> dict:
        calls = []
        monkeypatch.setattr(plots, "kaplan_meier", lambda p, **kw: calls.append(p) or PNG_MAGIC)
        write_report(run)
        return calls[0]

    run = make_survival_run(tmp_path)
    first = panels()
    monkeypatch.setattr(report_survival, "_survival_helpers", lambda: None)  # lifelines directly
    second = panels()
    assert list(first) == list(second)
    for a, b in zip(*first.values(), *second.values()):
        assert a["label"] == b["label"]
        np.testing.assert_allclose(a["survival"], b["survival"])
        np.testing.assert_allclose(a["censored_survival"], b["censored_survival"])


def test_kaplan_meier_with_one_risk_for_all(tmp_path):
    run = make_survival_run(tmp_path)
    z = dict(np.load(run / "predictions.npz"))
    z["risk:global"] = np.zeros_like(z["risk:global"])  # a model that learned nothing
    np.savez(run / "predictions.npz", **z)
    text = _text(write_report(run).read_text())
    assert "form a single group" in text and "p n/a" in text
    assert (run / "plots" / "kaplan_meier.png").read_bytes().startswith(PNG_MAGIC)


def test_survival_without_predictions_notes_the_missing_figure(tmp_path):
    run = make_survival_run(tmp_path)
    (run / "predictions.npz").unlink()
    html = write_report(run).read_text()
    assert 'id="fig-kaplan_meier"' in html and "no predictions.npz" in html
    assert len(_pngs_in(html)) == 1


def test_survival_counts_explain_the_missing_kaplan_meier(tmp_path):
    run = make_survival_run(tmp_path)
    counts_instead_of_predictions(run)
    html = write_report(run).read_text()
    assert 'id="fig-kaplan_meier"' in html and "no predictions.npz" not in html
    assert "the sites keep their patients&#39; predicted risks" in html
    assert "would need a second round of counts" in html
    assert len(_pngs_in(html)) == 1 and not (run / "plots" / "kaplan_meier.png").exists()


def make_tabular_run(root: Path, **kw) -> Path:
    """A tabular-classification run directory (heart-disease: 4 hospitals, 13 features, no
    validation data), from make_run's classification run with the summary a tabular run writes."""
    run = make_run(root, name="heart-fedavg", **kw)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["task"] = "tabular-classification"
    config["data"] = {"source": "heart-disease", "root": "data", "val_fraction": 0}
    config["model"] = {"name": "logreg"}
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    summary = json.loads((run / "summary.json").read_text())
    summary["task"] = "tabular-classification"
    summary["data"] = {"source": "heart-disease", "synthetic": False, "tabular": True,
                       "feature_names": FEATURES, "image_shape": [13], "class_names": ["absent", "present"],
                       "description": "UCI heart disease, 4 hospitals.", "citation": "Janosi et al. (1988)."}
    summary["test_mean_over_sites"] = _scores(0.81, 100)
    summary["model"] = {"name": "logreg", "parameters": 14}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_tabular_classification_report(tmp_path, monkeypatch):
    calibration = plots.calibration
    items = []
    monkeypatch.setattr(plots, "calibration",
                        lambda *a, **kw: items.append(kw.get("items")) or calibration(*a, **kw))
    run = make_tabular_run(tmp_path, privacy="dp-sgd")
    html = write_report(run).read_text()
    text = _text(html)
    summary = json.loads((run / "summary.json").read_text())
    assert f">{summary['test']['auc']:.3f}<" in html
    assert re.search(r'id="headline-mean-over-sites">.*AUC, mean over sites.*>0\.810<', text, re.DOTALL)
    head = _table(html, "headline-table")
    assert head[0][:3] == ["Metric", "Pooled test", "Own test, mean over sites"]
    assert ["Patients", "524", "100", "524"] in head
    sites = _table(html, "sites")
    assert sites[0][:4] == ["Site", "Train patients", "Validation patients", "Own test patients"]
    assert sites[-1][0] == "Mean over sites" and sites[-1][sites[0].index("Own-test AUC")] == "0.810"
    for name in ("learning_curves", "roc", "calibration"):
        assert (run / "plots" / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    assert items == ["patients"]
    assert "Features (13): age, sex, cp" in text and "Classes: absent, present" in text
    assert "one patient, with all of their records" in text
    assert not re.search(r"\bimages?\b", text, re.IGNORECASE), re.findall(r".{60}\bimages?\b.{20}", text)
    assert "C-index" not in text and "Kaplan" not in text


def test_tabular_synthetic_banner_says_records(tmp_path):
    run = make_tabular_run(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    summary["data"]["synthetic"] = True
    (run / "summary.json").write_text(json.dumps(summary))
    text = _text(write_report(run).read_text())
    assert "SYNTHETIC DATA — generated records, not patient data" in text
    assert "image" not in text.lower()


def test_kaplan_meier_plot_returns_png():
    curve = {"label": "a", "times": np.array([0.0, 1, 2, 5]), "survival": np.array([1.0, 0.9, 0.7, 0.7]),
             "censored_times": np.array([5.0]), "censored_survival": np.array([0.7])}
    assert plots.kaplan_meier({"one": [curve, curve]}).startswith(PNG_MAGIC)
    assert plots.kaplan_meier({f"p{i}": [curve] for i in range(4)}, time_label="days").startswith(PNG_MAGIC)


@pytest.mark.parametrize("rule, selection, last", [
    ("last", "the result, worded as a future privmed may word it", True),
    ("best-validation", "not the last round's model, as a future privmed may word it", False),
    (None, "the last round's model (no validation data plays a part in the choice)", True),  # before the field
    (None, "highest validation AUC over all sites' validation data (pooled), earliest round on ties", False),
])
def test_the_selection_is_read_from_the_typed_rule(tmp_path, rule, selection, last):
    run = make_run(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    summary["selection"] = selection
    if rule is not None:
        summary["selection_rule"] = rule
    (run / "summary.json").write_text(json.dumps(summary))
    text = _text(write_report(run).read_text())
    assert ("The model reported here is <b>the last round's model</b>" in text) is last
    assert ("<b>chosen on validation data only</b>" in text) is not last


def test_the_task_view_takes_the_headline_and_density_from_the_catalog():
    from privmed import catalog
    from privmed.report.task_view import DENSE_ROWS, TaskView

    for task in catalog.TASKS:
        view = TaskView(task.name, tabular=False, personalised=False)
        assert view.metric == task.headline and view.dense == task.dense
    assert set(DENSE_ROWS) == {t.name for t in catalog.TASKS if t.dense}

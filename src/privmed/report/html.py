"""Turn a finished (or stopped) run directory into one self-contained report.html.

Reading, figure making and rendering are separate steps: `read_run` loads the files the runner
wrote, `make_figures` draws them (pure), `render` fills the template (pure), and `write_report` is
the only function that writes (plots/<name>.png and report.html, atomically).
"""

from __future__ import annotations

import base64
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import yaml

from privmed.errors import RunDirError
from privmed.io import write_bytes, write_text
from privmed.report import plots

REQUIRED_FILES = ("summary.json", "config.yaml", "metrics.jsonl")
NA = "n/a"
METRIC_ROWS = (  # (key, label) of the metrics shown in the headline table, in order
    ("auc", "AUC"),
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("ece", "ECE (calibration error)"),
    ("loss", "Loss (cross-entropy)"),
    ("n", "Images"),
)
ACCOUNTANTS = {  # summary['privacy']['accountant'] -> what the report calls it
    "prv": "PRV (privacy random variables, Gopi et al. 2021, via Opacus)",
    "rdp": "RDP (Rényi DP, via Opacus)",
    "pld": "PLD (privacy loss distributions, via Google's dp-accounting)",
}
PRIVATE_MODES = ("dp-sgd", "central")
UNITS = {  # summary['privacy']['unit'] -> (guarantee wording, unit of privacy)
    "patient": ("per patient", "one patient, with all of their images"),
    "site": ("per site", "one whole site, all of its patients together"),
}


@dataclass(frozen=True)
class RunFiles:
    """What the report reads from a run directory. `probs` maps a model name ("global" or a site) to
    (N, K) test-set probabilities aligned with `labels` (N,); both empty/None without predictions."""

    path: Path
    config: dict
    summary: dict
    metrics: list[dict]
    labels: np.ndarray | None = None
    probs: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class FigureOut:
    """One figure slot of the report: PNG bytes, or a note saying why it is missing."""

    name: str
    title: str
    caption: str
    png: bytes | None = None
    note: str | None = None


def write_report(run_dir: Path) -> Path:
    """Write `run_dir/report.html` (and each figure as `run_dir/plots/<name>.png`); return its path.

    Raises RunDirError when `run_dir` is not a privmed run directory or one of its files is corrupt.
    """
    run = read_run(Path(run_dir))
    figures = make_figures(run)
    for fig in figures:
        if fig.png is not None:
            write_bytes(run.path / "plots" / f"{fig.name}.png", fig.png)
    out = run.path / "report.html"
    write_text(out, render(run, figures))
    return out


# ---------------------------------------------------------------------------------------- reading


def read_run(run_dir: Path) -> RunFiles:
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: not a directory")
    for name in REQUIRED_FILES:
        if not (run_dir / name).is_file():
            raise RunDirError(f"{run_dir}: not a privmed run directory (missing {name})")
    summary = _read_json(run_dir / "summary.json")
    config = _read_yaml(run_dir / "config.yaml")
    metrics = _read_jsonl(run_dir / "metrics.jsonl")
    labels, probs = _read_predictions(run_dir / "predictions.npz")
    return RunFiles(run_dir, config, summary, metrics, labels, probs)


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise RunDirError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _read_yaml(path: Path) -> dict:
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(obj, dict):
        raise RunDirError(f"{path}: expected a YAML mapping, got {type(obj).__name__}")
    return obj


def _read_jsonl(path: Path) -> list[dict]:
    """Rows sorted by round; a round written twice (a resumed run) keeps its last row."""
    by_round: dict[Any, dict] = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)  # accepts NaN, as Python's json writes it
        except ValueError as e:
            raise RunDirError(f"{path}:{i}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            raise RunDirError(f"{path}:{i}: expected an object with an integer 'round'")
        by_round[row["round"]] = row
    return [by_round[r] for r in sorted(by_round)]


def _read_predictions(path: Path) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
    if not path.is_file():
        return None, {}
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {key: z[key] for key in z.files}
    except (OSError, ValueError) as e:
        raise RunDirError(f"{path}: cannot read ({e})") from None
    labels = arrays.get("labels")
    if labels is None or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise RunDirError(f"{path}: missing an integer 1-D array 'labels'")
    probs = {}
    for key, arr in arrays.items():
        if not key.startswith("probs:"):
            continue
        if arr.ndim != 2 or arr.shape[0] != len(labels) or arr.shape[1] < 2:
            raise RunDirError(
                f"{path}: {key} has shape {arr.shape}, expected ({len(labels)}, K) with K >= 2"
            )
        probs[key.removeprefix("probs:")] = arr.astype(np.float64)
    k = max((p.shape[1] for p in probs.values()), default=0)
    if probs and len(labels) and (labels.min() < 0 or labels.max() >= k):
        raise RunDirError(f"{path}: labels outside 0..{k - 1}")
    return labels, probs


# ---------------------------------------------------------------------------------------- figures


def make_figures(run: RunFiles) -> list[FigureOut]:
    privacy = _privacy_figure(run)
    return [_learning_curves(run), *([privacy] if privacy else []), *_prediction_figures(run)]


def _learning_curves(run: RunFiles) -> FigureOut:
    title = "Learning curves"
    if run.summary.get("strategy") == "local":
        scored = "each site's own model on that site's validation data"
        val_label, test_label = "mean of site models, validation", "mean of site models, test"
        choice = "the mean over the site models' validation AUC (used to choose the round)"
    else:
        scored = "the shared model on each site's validation data"
        val_label, test_label = "pooled validation", "pooled test"
        choice = "all sites' validation data pooled (used to choose the round)"
    caption = (
        f"Top: validation AUC per round of {scored}; of {choice}; and of the test data, for "
        "information only (it plays no part in the choice). The dotted red line marks the selected "
        "round. Bottom: mean training loss of each site's local training in that round."
    )
    if _dict(run.summary.get("privacy")).get("mode") == "dp-sgd":
        caption += (" Under DP-SGD the sites do not report their training loss (it is computed from "
                    "training patients outside the privacy mechanism), so that panel is empty.")
    if not run.metrics:
        return FigureOut("learning_curves", title, caption, note="No completed rounds: nothing to plot.")
    sites = _site_names(run)
    rows = run.metrics
    png = plots.learning_curves(
        rounds=[row["round"] for row in rows],
        val_auc_by_site={s: [_get(row, "sites", s, "val", "auc") for row in rows] for s in sites},
        train_loss_by_site={s: [_get(row, "train_loss", s) for row in rows] for s in sites},
        pooled_val_auc=[_get(row, "val", "auc") for row in rows],
        pooled_test_auc=[_get(row, "test", "auc") for row in rows],
        best_round=_best_round(run),
        val_label=val_label,
        test_label=test_label,
    )
    return FigureOut("learning_curves", title, caption, png=png)


def _privacy_figure(run: RunFiles) -> FigureOut | None:
    """Epsilon spent per site over the rounds; None for a run without differential privacy."""
    privacy = _dict(run.summary.get("privacy"))
    rows = [row for row in run.metrics if isinstance(row.get("epsilon"), dict)]
    if not rows and _privacy_status(privacy) != "private":
        return None
    title = "Privacy spent"
    accountant = privacy.get("accountant")
    budget = _num(privacy.get("budget_epsilon"))
    how = f"delta = {fmt_number(privacy.get('delta'))}"
    if accountant:
        how = f"accountant: {ACCOUNTANTS.get(accountant, accountant)}; {how}"
    caption = (
        f"Epsilon each site has spent after each round, as the privacy ledger accounts it ({how}). "
        "It only grows, and it never passes the budget line (dashed): the run refuses a round that "
        "would take a site past its budget."
    )
    if budget is None:
        caption += " The run recorded no budget, so no budget line is drawn."
    if privacy.get("mode") == "central":
        caption += " Under central DP every site takes part in every round, so the lines coincide."
    if not rows:
        return FigureOut("privacy_spent", title, caption,
                         note="No completed rounds recorded a privacy spend: nothing to plot.")
    rounds, series = _epsilon_series(run, rows)
    png = plots.privacy_spent(rounds, series, budget=budget, delta=_num(privacy.get("delta")))
    return FigureOut("privacy_spent", title, caption, png=png)


def _epsilon_series(run: RunFiles, rows: list[dict]) -> tuple[list[int], dict[str, list[float]]]:
    """Rounds and each site's epsilon after them, from the rows' ledger figures. A site a row does not
    name made no release that round: its epsilon stays where it was (0 before its first). The series
    start at round 0 with nothing spent when the rows start at round 1."""
    named = [s for row in rows for s in row["epsilon"]]
    sites = [s for s in _site_names(run) if s in named]
    sites += [s for s in dict.fromkeys(named) if s not in sites]
    rounds = [row["round"] for row in rows]
    series: dict[str, list[float]] = {s: [] for s in sites}
    for site in sites:
        last = 0.0
        for row in rows:
            if site in row["epsilon"]:
                x = _num(row["epsilon"][site])
                last = math.nan if x is None else x
            series[site].append(last)
    if rounds[0] == 1:
        rounds = [0, *rounds]
        series = {s: [0.0, *v] for s, v in series.items()}
    return rounds, series


def _prediction_figures(run: RunFiles) -> list[FigureOut]:
    roc_title, roc_caption = "ROC curve", (
        "Sensitivity against 1 − specificity of the selected model(s) on the pooled test set as the "
        "decision threshold varies. The dashed diagonal is a model that guesses; the closer a curve "
        "runs to the top-left corner, the better the model separates the classes."
    )
    cal_title, cal_caption = "Calibration", (
        "Top: for test images grouped by the model's confidence in its prediction, the share it got "
        "right. A calibrated model lies on the diagonal: of the predictions made with 80% "
        "confidence, 80% are right. Below the diagonal the model is over-confident. Bottom: how "
        "many test images fall in each confidence bin."
    )
    if run.labels is None or not run.probs:
        why = "Not drawn: the run directory has no predictions.npz (or it holds no probabilities)."
        return [FigureOut("roc", roc_title, roc_caption, note=why),
                FigureOut("calibration", cal_title, cal_caption, note=why)]
    if len(run.labels) == 0:
        why = "Not drawn: the test set is empty."
        return [FigureOut("roc", roc_title, roc_caption, note=why),
                FigureOut("calibration", cal_title, cal_caption, note=why)]
    probs = {m: p for m, p in run.probs.items() if np.isfinite(p).all()}
    dropped = [m for m in run.probs if m not in probs]
    skipped = f" Left out, their probabilities are not finite: {', '.join(dropped)}." if dropped else ""
    if not probs:
        why = "Not drawn: no model has finite test probabilities (training diverged?)."
        return [FigureOut("roc", roc_title, roc_caption, note=why),
                FigureOut("calibration", cal_title, cal_caption, note=why)]
    k = next(iter(probs.values())).shape[1]
    if len(np.unique(run.labels)) < 2:
        roc_out = FigureOut("roc", roc_title, roc_caption,
                            note="Not drawn: the test labels hold a single class, so ROC is undefined.")
    elif k > 2 and len(probs) > 1:
        roc_out = FigureOut("roc", roc_title, roc_caption, note=(
            f"Not drawn: with {k} classes the one-vs-rest curves are drawn for a single model, and "
            f"this run has {len(probs)}; see each site's AUC in the table above."))
    else:
        if k > 2:
            roc_caption += " With more than two classes, each curve is one class against the rest."
        png = plots.roc(probs, run.labels, _class_names(run, k))
        if len(probs) > 1:
            roc_caption += " One curve per site's own model, all on the same pooled test set."
        roc_out = FigureOut("roc", roc_title, roc_caption + skipped, png=png)
    cal_png = plots.calibration(probs, run.labels)
    return [roc_out, FigureOut("calibration", cal_title, cal_caption + skipped, png=cal_png)]


# ---------------------------------------------------------------------------------------- rendering


def render(run: RunFiles, figures: list[FigureOut]) -> str:
    """The report page as one HTML string, figures embedded as data URIs."""
    return _template().render(**context(run, figures))


def context(run: RunFiles, figures: list[FigureOut]) -> dict:
    s = run.summary
    data = _dict(s.get("data"))
    local = s.get("strategy") == "local"
    return {
        "name": str(s.get("name") or run.path.name),
        "synthetic": data.get("synthetic") is True,
        "overview": _overview(run),
        "no_rounds": not run.metrics and not s.get("rounds_completed"),
        "headline": _headline(s),
        "test_label": "Test (mean over the sites' own models)" if local else "Test",
        "val_label": "Validation (mean over the sites' own models)" if local else "Validation",
        "run_rows": _run_rows(run),
        "sites": _sites_table(run),
        "figures": [_figure_context(f) for f in figures],
        "privacy": _privacy(s.get("privacy")),
        "data_description": data.get("description"),
        "data_citation": data.get("citation"),
        "class_names": data.get("class_names"),
        "config_yaml": yaml.safe_dump(run.config, sort_keys=False, default_flow_style=False,
                                      allow_unicode=True),
        "version": s.get("privmed_version") or NA,
    }


def _overview(run: RunFiles) -> list[tuple[str, str]]:
    s, cfg = run.summary, run.config
    data, model = _dict(s.get("data")), _dict(s.get("model"))
    source = data.get("source") or _get(cfg, "data", "source")
    name = _get(cfg, "data", "name")
    params = _num(model.get("parameters"))
    model_text = str(model.get("name") or _get(cfg, "model", "name") or NA)
    if params is not None:
        model_text += f" ({_int(params)} parameters)"
    rounds = f"{_int(s.get('rounds_completed'))} of {_int(s.get('rounds_planned'))}"
    return [
        ("Task", str(s.get("task") or _get(cfg, "task") or NA)),
        ("Strategy", str(s.get("strategy") or _get(cfg, "federation", "strategy") or NA)),
        ("Sites", str(len(_site_names(run)))),
        ("Rounds completed", rounds),
        ("Model", model_text),
        ("Data", f"{source or NA}" + (f" / {name}" if name else "")),
        ("Privacy", _privacy_overview(s.get("privacy"))),
    ]


def _headline(s: dict) -> list[dict]:
    test, val = _dict(s.get("test")), _dict(s.get("val"))
    return [{"label": label, "test": fmt_metric(key, test.get(key)), "val": fmt_metric(key, val.get(key))}
            for key, label in METRIC_ROWS]


def _run_rows(run: RunFiles) -> list[tuple[str, str]]:
    s = run.summary
    best = _best_round(run)
    return [
        ("Selected round", NA if best is None else str(best)),
        ("How it was chosen", str(s.get("selection") or NA)),
        ("Wall time", fmt_seconds(s.get("wall_seconds"))),
        ("Training time", fmt_seconds(s.get("train_seconds"))),
        ("Sample-gradient steps", _int(s.get("sample_gradient_steps"))),
        ("Seed", _int(s.get("seed"))),
    ]


def _sites_table(run: RunFiles) -> dict:
    """Columns present for at least one site, and one row of formatted cells per site."""
    sites = _dict(run.summary.get("sites"))
    columns = [("n_train", "Train images"), ("n_val", "Validation images"), ("n_test", "Own test images"),
               ("val.auc", "Validation AUC"), ("val.accuracy", "Validation accuracy")]
    optional = [("test.auc", "Own-test AUC"), ("test.accuracy", "Own-test accuracy"),
                ("test_pooled.auc", "Pooled-test AUC"), ("test_pooled.accuracy", "Pooled-test accuracy")]
    columns += [(key, label) for key, label in optional
                if any(isinstance(_dict(v).get(key.split(".")[0]), dict) for v in sites.values())]
    rows = []
    for name in _site_names(run):
        site = _dict(sites.get(name))
        cells = []
        for key, _ in columns:
            value = _get(site, *key.split("."))
            metric = key.split(".")[-1]
            cells.append(_int(value) if metric.startswith("n_") else fmt_metric(metric, value))
        rows.append({"name": name, "cells": cells})
    return {"columns": [label for _, label in columns], "rows": rows}


def _privacy_status(privacy: Any) -> str:
    """"private", "none" (trained without differential privacy) or "unknown" (not recorded)."""
    if not isinstance(privacy, dict):
        return "unknown"
    if privacy.get("mode") == "none":
        return "none"
    if privacy.get("mode") in PRIVATE_MODES or _num(privacy.get("epsilon")) is not None:
        return "private"
    return "unknown"


def _privacy_epsilon(privacy: dict) -> float | None:
    """The run's epsilon: the largest any site spent."""
    eps = _num(privacy.get("epsilon"))
    if eps is None:
        eps = max((x for x in map(_num, _dict(privacy.get("sites")).values()) if x is not None),
                  default=None)
    return eps


def _privacy_overview(privacy: Any) -> str:
    status = _privacy_status(privacy)
    if status == "none":
        return "none"
    if status == "unknown":
        return "not recorded"
    unit = UNITS.get(privacy.get("unit"), (None,))[0]
    return f"DP {unit + ', ' if unit else ''}ε ≤ {fmt_epsilon(_privacy_epsilon(privacy))}"


def _privacy(privacy: Any) -> dict:
    """The Privacy section: the guarantee in a sentence, its terms, each site's spend and plan, and
    what the guarantee covers (the runner's statement, verbatim)."""
    status = _privacy_status(privacy)
    privacy = _dict(privacy)
    statement = privacy.get("statement")
    statement = str(statement) if statement else None
    if status == "none":
        if statement is None:
            statement = "the model and its updates may reveal the patients they were trained on."
        if not statement.lower().startswith("no differential privacy"):
            statement = "No differential privacy: " + statement
        return {"status": status, "notice": statement}
    if status == "unknown":
        return {"status": status, "notice": (
            "Privacy: not recorded. This run's summary.json has no privacy entry (it was written "
            "before privmed reported privacy), so this report cannot state a differential-privacy "
            "guarantee for the model.")}
    unit_words, unit_text = UNITS.get(privacy.get("unit"), (None, None))
    delta = fmt_number(privacy.get("delta"))
    budget = _num(privacy.get("budget_epsilon"))
    guarantee = (
        f"Differential privacy{' ' + unit_words if unit_words else ''}: epsilon ≤ "
        f"{fmt_epsilon(_privacy_epsilon(privacy))} at delta = {delta} for every site."
    )
    accountant = privacy.get("accountant")
    rows = [
        ("Mechanism", str(privacy.get("mechanism") or NA)),
        ("Unit of privacy", unit_text or str(privacy.get("unit") or NA)),
        ("Delta", delta),
        ("Accountant", ACCOUNTANTS.get(accountant, str(accountant or NA))),
        ("Budget", NA if budget is None else f"epsilon ≤ {fmt_number(budget)} per site"),
        ("Clipping norm", fmt_number(privacy.get("max_grad_norm"))),
    ]
    spent, plan = _dict(privacy.get("sites")), _dict(privacy.get("plan"))
    sites = []
    for name in dict.fromkeys([*plan, *spent]):
        p = _dict(plan.get(name))
        sites.append({"name": str(name), "cells": [
            _int(p.get("n_patients")), fmt_epsilon(spent.get(name)), fmt_number(budget),
            fmt_number(p.get("noise_multiplier")), fmt_number(p.get("sample_rate")),
            _int(p.get("steps")), _int(p.get("turns")),
        ]})
    return {"status": status, "guarantee": guarantee, "rows": rows, "sites": sites,
            "statement": statement}


def _figure_context(fig: FigureOut) -> dict:
    uri = None
    if fig.png is not None:
        uri = "data:image/png;base64," + base64.b64encode(fig.png).decode("ascii")
    return {"name": fig.name, "title": fig.title, "caption": fig.caption, "src": uri, "note": fig.note}


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("template.html.j2")


# ---------------------------------------------------------------------------------------- formatting


def fmt_metric(name: str, value: Any) -> str:
    """AUC, ECE and loss to 3 decimals, accuracies as a percentage, counts as integers; "n/a" for a
    missing or non-finite value."""
    x = _num(value)
    if x is None:
        return NA
    if name in ("accuracy", "balanced_accuracy"):
        return f"{100 * x:.1f}%"
    if name == "n":
        return _int(x)
    return f"{x:.3f}"


def fmt_seconds(value: Any) -> str:
    x = _num(value)
    if x is None:
        return NA
    if x < 60:
        return f"{x:.1f} s"
    minutes, seconds = divmod(round(x), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def fmt_number(value: float) -> str:
    x = _num(value)
    if x is None:
        return NA
    if float(x).is_integer() and abs(x) < 1e15:
        return _int(x)
    return f"{x:.4g}"


def fmt_epsilon(value: Any) -> str:
    """Epsilon to 3 significant digits; "n/a" for a missing or non-finite value."""
    x = _num(value)
    return NA if x is None else f"{x:.3g}"


def _int(value: Any) -> str:
    x = _num(value)
    return NA if x is None else f"{int(round(x)):,}"


def _num(value: Any) -> float | None:
    """A finite number, or None for None, NaN, infinities, booleans and non-numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return None
    x = float(value)
    return x if math.isfinite(x) else None


def _get(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _dict(obj: Any) -> dict:
    return obj if isinstance(obj, dict) else {}


def _site_names(run: RunFiles) -> list[str]:
    """Sites in summary order, then any that only the metrics name."""
    names = list(_dict(run.summary.get("sites")))
    if not names:
        names = [str(n) for n in (_get(run.config, "sites", "names") or [])]
    for row in run.metrics:
        for part in ("sites", "train_loss"):
            names += [n for n in _dict(row.get(part)) if n not in names]
    return names


def _best_round(run: RunFiles) -> int | None:
    best = run.summary.get("best_round")
    if best is None and run.metrics:
        best = run.metrics[-1].get("best_round")
    return best if isinstance(best, int) and not isinstance(best, bool) else None


def _class_names(run: RunFiles, k: int) -> list[str]:
    names = _get(run.summary, "data", "class_names")
    if isinstance(names, list) and len(names) == k:
        return [str(n) for n in names]
    return [f"class {i}" for i in range(k)]

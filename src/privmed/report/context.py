"""The report template's context: every section as text and rows (nothing here reads a file or
draws). The Audit section is in context_audit."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import yaml

from privmed.report.context_audit import audit_section
from privmed.report.figure import FigureOut
from privmed.report.formatting import COUNTS, fmt_metric
from privmed.report.private import PRIVATE_NOTE
from privmed.report.run_files import RunFiles, site_names
from privmed.report.task_view import TaskView, task_view, view_unit_words
from privmed.report.words import NA, fmt_epsilon, fmt_number, fmt_seconds, privacy_section
from privmed.report.words import as_dict as _dict
from privmed.report.words import as_int as _int
from privmed.report.words import get as _get
from privmed.report.words import num as _num
from privmed.report.words import privacy_epsilon as _privacy_epsilon
from privmed.report.words import privacy_status as _privacy_status


def context(run: RunFiles, figures: list[FigureOut]) -> dict:
    f, view = run.facts, task_view(run)
    headline = _headline(run, view)
    class_names = f.data.class_names
    return {
        "name": f.name,
        "private": run.private,
        "private_note": PRIVATE_NOTE,
        "shareable_report": str(run.path / "report.html"),
        "synthetic": f.data.synthetic,
        "synthetic_what": "records" if view.tabular else "phantom images",
        "task": view.task,
        "survival": view.survival,
        "items": view.items,
        "metric_label": view.metric_label,
        "overview": _overview(run),
        "no_rounds": not run.metrics and not f.rounds_completed,
        "warnings": _warnings(run),
        "positive_class": _positive_class(view, class_names),
        "key_figures": _key_figures(run, view),
        "headline": headline,
        "selected_last": f.selected_last,
        "run_rows": _run_rows(run),
        "sites": _sites_table(run, view),
        "figures": [_figure_context(fig) for fig in figures],
        "privacy": _privacy(f.privacy, view),
        "audit": audit_section(run, view),
        "data_description": f.data.description,
        "data_citation": f.data.citation,
        "class_names": list(class_names) if class_names is not None and not view.survival else None,
        "feature_names": list(f.data.feature_names or ()) if view.tabular else [],
        "config_yaml": yaml.safe_dump(run.config, sort_keys=False, default_flow_style=False,
                                      allow_unicode=True),
        "version": f.version or NA,
    }


def _warnings(run: RunFiles) -> list[str]:
    """summary.json's `warnings`: what is wrong with the selected model (privmed.tasks.usefulness), and
    what the DP-SGD plan warned of before training (privmed.privacy.outlook)."""
    ws = _get(run.summary, "warnings")
    if not isinstance(ws, list):
        return []
    return [w["message"] for w in ws if isinstance(w, dict) and isinstance(w.get("message"), str)]


def _positive_class(view: TaskView, class_names: tuple[str, ...] | None) -> str | None:
    """Which class the AUC and the ROC curves score (classification only), in words."""
    if view.survival or view.dense or not class_names or len(class_names) < 2:
        return None
    if len(class_names) == 2:
        return (f"The AUC and the ROC curve score '{class_names[1]}' as the positive class (against "
                f"'{class_names[0]}').")
    return "The AUC is the mean, over the classes, of each class's AUC against the rest."


def _overview(run: RunFiles) -> list[tuple[str, str]]:
    f = run.facts
    model_text = f.model or NA
    if f.parameters is not None:
        model_text += f" ({_int(f.parameters)} parameters)"
    rounds = f"{_int(f.rounds_completed)} of {_int(f.rounds_planned)}"
    strategy = f.strategy or NA
    rule = f.aggregator
    if rule and rule != "mean":
        strategy += f", aggregated by {rule}"
        if rule not in ("median", "norm-clip"):
            strategy += f" (withstands {f.byzantine} malicious sites)"
    rows = [
        ("Task", f.task or NA),
        ("Strategy", strategy),
        ("Sites", str(len(site_names(run)))),
        ("Rounds completed", rounds),
        ("Model", model_text),
        ("Data", f"{f.data.source or NA}" + (f" / {f.data.name}" if f.data.name else "")),
        ("Privacy", _privacy_overview(f.privacy, task_view(run))),
    ]
    attack = f.attack
    if attack.get("kind", "none") != "none":
        who = attack.get("sites")
        who = f"{who} site{'s' if who != 1 else ''}" if isinstance(who, int) else ", ".join(map(str, who or []))
        scale = f" ×{fmt_number(attack.get('scale'))}" if attack["kind"] in ("sign-flip", "scaling", "gaussian") else ""
        rows.append(("Simulated attack", f"{attack['kind']}{scale} by {who} (a robustness test: "
                     "these sites were made malicious on purpose)"))
    return rows


def _finetune_steps(run: RunFiles) -> str:
    steps = run.facts.finetune_steps
    return f"{_int(steps)} steps" if steps else "a few steps"


def _key_figures(run: RunFiles, view: TaskView) -> list[dict]:
    """The headline metric on the pooled test data, its mean over the sites' own test data and, when
    the run fine-tuned at each site, that mean after fine-tuning."""
    s, m, label, items = run.summary, view.metric, view.metric_label, view.items
    models = "the sites' own models" if view.personalised else "the selected model"
    out = [{"id": "pooled", "value": fmt_metric(m, _get(s, "test", m)),
            "label": f"Test {label}, pooled",
            "detail": f"{models} on all sites' test {items} together"
                      + (" (mean over the site models)" if view.personalised else "")}]
    if "test_mean_over_sites" in s:
        mean = _dict(s.get("test_mean_over_sites"))
        out.append({"id": "mean-over-sites", "value": fmt_metric(m, mean.get(m)),
                    "label": f"Test {label}, mean over sites",
                    "detail": (f"{models} on each site's own test {items}, averaged with every site "
                               "counting equally" if mean else "no site has test data of its own")})
    if "test_finetuned_mean_over_sites" in s:
        ft = _dict(s.get("test_finetuned_mean_over_sites"))
        out.append({"id": "finetuned", "value": fmt_metric(m, ft.get(m)),
                    "label": f"Test {label}, mean over sites after fine-tuning",
                    "detail": (f"each site trained the selected model {_finetune_steps(run)} more on "
                               f"its own training {items} before its own test {items} scored it")})
    return out


def _headline(run: RunFiles, view: TaskView) -> dict:
    s = run.summary
    own = " (each site's own model)" if view.personalised else ""
    columns = [("test", "Pooled test (mean over the sites' own models)" if view.personalised
                else "Pooled test")]
    if "test_mean_over_sites" in s:
        columns.append(("test_mean_over_sites", f"Own test, mean over sites{own}"))
    if "test_finetuned_mean_over_sites" in s:
        columns.append(("test_finetuned_mean_over_sites", "Own test after fine-tuning, mean over sites"))
    no_val = _no_validation(run)
    if not no_val:
        columns.append(("val", "Validation (mean over the sites' own models)" if view.personalised
                        else "Validation"))
    pooled_counts = _pooled_counts(run) if view.personalised else {}
    noisy = run.facts.scoring
    public = _public_counts(run) if noisy else {}

    def cell(part: str, key: str) -> str:
        if key == "n" and part in public:  # under noisy scoring n is noisy too: the sites' public counts
            return fmt_metric(key, public[part])
        if part == "test" and key in pooled_counts:
            return fmt_metric(key, pooled_counts[key])
        return fmt_metric(key, _get(s, part, key))

    rows = [{"label": label, "cells": [cell(part, key) for part, _ in columns]} for key, label in view.metric_rows]
    return {"columns": [label for _, label in columns], "rows": rows, "no_validation": no_val, "noisy": noisy}


def _public_counts(run: RunFiles) -> dict:
    """Each column's item count from the sites' public counts (summary.json's sites), where the
    scores themselves come from noisy counts."""
    sites = [_dict(v) for v in _dict(run.summary.get("sites")).values()]
    n_test = sum(int(_num(v.get("n_test")) or 0) for v in sites)
    return {"test": n_test, "test_mean_over_sites": n_test, "test_finetuned_mean_over_sites": n_test,
            "val": sum(int(_num(v.get("n_val")) or 0) for v in sites)}


def _pooled_counts(run: RunFiles) -> dict:
    """For a personalised run: the pooled test set's patient and event counts. Every site's model
    scores the same pooled test set, so its counts are one site's `test_pooled` counts (the summary's
    mean over the site models adds them up); {} when the sites disagree or do not say."""
    out = {}
    pooled = [_dict(_dict(v).get("test_pooled")) for v in _dict(run.summary.get("sites")).values()]
    for key in COUNTS:
        values = {_num(p.get(key)) for p in pooled if p}
        if len(values) == 1 and None not in values:
            out[key] = values.pop()
    return out


def _no_validation(run: RunFiles) -> bool:
    """Whether the run completed rounds without any validation data (data.val_fraction 0)."""
    s = run.summary
    if not run.metrics and not run.facts.rounds_completed:
        return False
    sites = [_dict(v) for v in _dict(s.get("sites")).values()]
    site_vals = [v.get("val") for v in sites if "val" in v]
    return s.get("val") == {} and all(v == {} for v in site_vals)


def _run_rows(run: RunFiles) -> list[tuple[str, str]]:
    f = run.facts
    return [
        ("Selected round", NA if f.best_round is None else str(f.best_round)),
        ("How it was chosen", f.selection or NA),
        ("Wall time", fmt_seconds(f.wall_seconds)),
        ("Training time", fmt_seconds(f.train_seconds)),
        ("Sample-gradient steps", _int(f.sample_gradient_steps)),
        ("Seed", _int(f.seed)),
    ]


def _sites_table(run: RunFiles, view: TaskView | None = None) -> dict:
    """Columns present for at least one site, one row of formatted cells per site, and a last row of
    the unweighted mean over sites (counts: totals)."""
    view = view or task_view(run)
    s = run.summary
    sites = _dict(s.get("sites"))
    columns = [("n_train", f"Train {view.items}"), ("n_val", f"Validation {view.items}"),
               ("n_test", f"Own test {view.items}")]
    val, per_part = view.site_columns()
    if not _no_validation(run):
        columns += val
    for part, cols in per_part.items():
        if any(isinstance(_dict(v).get(part), dict) for v in sites.values()):
            columns += cols
    names = site_names(run)
    rows = []
    for name in names:
        site = _dict(sites.get(name))
        rows.append({"name": name, "cells": [_cell(key, _get(site, *key.split("."))) for key, _ in columns]})
    recorded = {"test": _dict(s.get("test_mean_over_sites")) if "test_mean_over_sites" in s else None,
                "test_finetuned": (_dict(s.get("test_finetuned_mean_over_sites"))
                                   if "test_finetuned_mean_over_sites" in s else None)}
    mean = []
    for key, _ in columns:
        part, metric = key.split(".") if "." in key else (None, key)
        if recorded.get(part) is not None:  # the runner's own figure: FLamby's headline
            mean.append(_cell(key, recorded[part].get(metric)))
            continue
        values = [x for x in (_num(_get(_dict(sites.get(n)), *key.split("."))) for n in names)
                  if x is not None]
        if not values:
            mean.append(NA)
        elif metric.startswith("n_") or metric in COUNTS:
            mean.append(_int(sum(values)))
        else:
            mean.append(fmt_metric(metric, float(np.mean(values))))
    mean_row = {"name": "Mean over sites", "cells": mean} if len(rows) > 1 else None
    return {"columns": [label for _, label in columns], "rows": rows, "mean": mean_row,
            "finetuned": "test_finetuned" in [k.split(".")[0] for k, _ in columns],
            "finetune_steps": _finetune_steps(run), "personalised": view.personalised}


def _cell(key: str, value: Any) -> str:
    metric = key.split(".")[-1]
    return _int(value) if metric.startswith("n_") else fmt_metric(metric, value)


def _privacy_overview(privacy: Any, view: TaskView | None = None) -> str:
    status = _privacy_status(privacy)
    if status == "none":
        return "none"
    if status == "unknown":
        return "not recorded"
    unit = view_unit_words(privacy.get("unit"), view)[0]
    return f"DP {unit + ', ' if unit else ''}ε ≤ {fmt_epsilon(_privacy_epsilon(privacy))}"


def _privacy(privacy: Any, view: TaskView | None = None) -> dict:
    """The Privacy section (privmed.report.words.privacy_section) for the run's task."""
    return privacy_section(privacy, tabular=bool(view and view.tabular))


def _figure_context(fig: FigureOut) -> dict:
    uri = None
    if fig.png is not None:
        uri = "data:image/png;base64," + base64.b64encode(fig.png).decode("ascii")
    return {"name": fig.name, "title": fig.title, "caption": fig.caption, "src": uri, "note": fig.note}

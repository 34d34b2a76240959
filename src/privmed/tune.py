"""`privmed tune CONFIG --trials N`: hyper-parameter search with Optuna, on validation data only.

    result = tune(cfg, trials=20, out=Path("runs/x-tune"))

Trial 0 is the config as written; Optuna's TPE sampler (seeded by the config's seed) proposes the
others over the learning rate, momentum, batch size, local work and logit adjustment. Each trial is a
whole run, scored by its selection score: the validation AUC (C-index for survival) of the model it
selected; no test figure plays a part. The best trial's settings are written as a config
(`best.yaml`) and run once more into `best/`, a run directory with its report; `tuning.html`,
`tuning.md` and `tuning.json` hold every trial.

Privacy: the choice of settings depends on the validation patients, and every trial trains on the
training patients. Under a privacy mode that would spend privacy beyond the ledger (Papernot and
Steinke 2022 account for it with a random number of trials); privmed does not account for that
yet, so it refuses to tune a private config: tune a stand-in without privacy (public or synthetic
data, or the same data where the hospitals agree) and carry the settings over.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from privmed import catalog, io
from privmed.config import RunConfig, validate_config
from privmed.errors import ConfigError
from privmed.report import plots
from privmed.tasks.base import get_task

STATEMENT = (
    "Tuned on the validation data of this config, without privacy (privacy.mode none): the settings "
    "chosen depend on the validation patients, and each trial trained on the training patients; no "
    "differential-privacy guarantee covers them. The test data played no part in the choice."
)


@dataclass
class TuneResult:
    trials: list[dict]  # number, params, score, seconds
    best: dict  # the best trial
    best_config: dict
    summary: dict  # the best config's run, run again into OUT/best


def search_space(cfg: RunConfig) -> dict:
    """What each trial may change, from the config: {key: (kind, choices or bounds)}."""
    space = {
        "training.lr": ("log", (1e-3, 0.3)),
        "training.momentum": ("choice", (0.0, 0.5, 0.9)),
        "training.batch_size": ("choice", (16, 32, 64, 128)),
    }
    if cfg.federation.local_steps is not None:
        space["federation.local_steps"] = ("int", (1, max(2, 4 * cfg.federation.local_steps)))
    else:
        space["federation.local_epochs"] = ("int", (1, 3))
    if cfg.task != "survival":
        space["training.logit_adjustment"] = ("choice", ("on", "off"))
    return space


def _get(d: dict, key: str):
    for part in key.split("."):
        d = d[part]
    return d


def _set(d: dict, key: str, value) -> None:
    *path, last = key.split(".")
    for part in path:
        d = d.setdefault(part, {})
    d[last] = value


def tune(cfg: RunConfig, trials: int, out: Path, progress: bool = False) -> TuneResult:
    """Run `trials` trials (the first: the config as written), write OUT's files and run the best
    config into OUT/best. ConfigError for a private config, no validation data, or trials < 1."""
    import optuna

    from privmed.api import run

    _check_tunable(cfg, trials, out)
    base = cfg.to_dict()
    base["federation"]["model_selection"] = "best-validation"
    space = _space(cfg, base)
    headline = catalog.task(cfg.task).headline
    records: list[dict] = []
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=cfg.seed))
    study.enqueue_trial({k: _get(base, k) for k in space})  # trial 0: the config as written
    study.optimize(_objective(base, space, get_task(cfg.task), headline, records, progress), n_trials=trials)
    scored = [r for r in records if r["score"] is not None]
    if not scored:
        raise ConfigError("no trial gave a validation score (every setting was refused or diverged)")
    best = max(scored, key=lambda r: (r["score"], -r["trial"]))
    best_cfg = _with(base, best["params"])
    best_cfg["name"] = f"{cfg.name or 'run'}-tuned"
    out.mkdir(parents=True, exist_ok=True)
    io.write_text(out / "best.yaml", yaml.safe_dump(best_cfg, sort_keys=False))
    summary = run(validate_config(best_cfg), out / "best", progress=progress).summary
    result = TuneResult(records, best, best_cfg, summary)
    _write(out, cfg, result, headline)
    return result


def _check_tunable(cfg: RunConfig, trials: int, out: Path) -> None:
    """ConfigError (one line) for trials < 1, a private config, no validation data or a used OUT."""
    if trials < 1:
        raise ConfigError(f"--trials: {trials} is not a number of trials; give 1 or more")
    if cfg.private:
        raise ConfigError(
            f"privacy.mode '{cfg.privacy.mode}': tuning on the sites' private data spends privacy the "
            "ledger does not count (every trial trains on the patients, and the choice depends on "
            "them); privmed does not account for that yet. Tune a copy with privacy.mode none on data "
            "that may be used so (public, synthetic, or agreed by the hospitals) and carry the "
            "settings over"
        )
    if cfg.data.val_fraction == 0:
        raise ConfigError("data.val_fraction: 0 leaves no validation data to tune on; give e.g. 0.15")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out: {out} is not empty; tuning writes a new directory")


def _space(cfg: RunConfig, base: dict) -> dict:
    """search_space(cfg), with the config's own value (from `base`) among every key's choices."""
    space = search_space(cfg)
    for key, (kind, arg) in space.items():
        if kind == "choice" and _get(base, key) not in arg:
            space[key] = (kind, (*arg, _get(base, key)))
    return space


def _with(base: dict, params: dict) -> dict:
    """A deep copy of the config dict `base` with each dotted key of `params` set."""
    out = json.loads(json.dumps(base))
    for key, value in params.items():
        _set(out, key, value)
    return out


def _objective(base: dict, space: dict, task, headline: str, records: list[dict], progress: bool):
    """Optuna's objective: one whole run per trial, scored by the task's selection score of its
    validation metrics (-inf where NaN); each trial appended to `records`, a refused one pruned."""
    import optuna

    from privmed.api import run

    def objective(trial: optuna.Trial) -> float:
        params = {}
        for key, (kind, arg) in space.items():
            if kind == "log":
                params[key] = trial.suggest_float(key, *arg, log=True)
            elif kind == "int":
                params[key] = trial.suggest_int(key, *arg)
            else:
                params[key] = trial.suggest_categorical(key, list(arg))
        trial_cfg = _with(base, params)
        started = time.perf_counter()
        try:
            summary = run(validate_config(trial_cfg, source=f"trial {trial.number}"), report=False).summary
            score = task.selection_score(summary["val"])
        except ConfigError as e:  # e.g. scaffold with momentum: a setting the run refuses
            records.append({"trial": trial.number, "params": params, "score": None, "refused": str(e),
                            "seconds": time.perf_counter() - started})
            raise optuna.TrialPruned(str(e)) from None
        records.append({"trial": trial.number, "params": params,
                        "score": None if math.isnan(score) else score, "seconds": time.perf_counter() - started})
        if progress:
            print(f"trial {trial.number}: validation {headline} {score:.4f}  {params}", flush=True)
        return score if not math.isnan(score) else -math.inf

    return objective


def _write(out: Path, cfg: RunConfig, r: TuneResult, metric: str) -> None:
    label = {"auc": "AUC", "c_index": "C-index"}.get(metric, metric)
    keys = list(r.trials[0]["params"])
    io.write_json(out / "tuning.json", {
        "config": cfg.name, "objective": f"validation {label} of the model each trial selected",
        "statement": STATEMENT, "trials": r.trials, "best_trial": r.best["trial"],
        "best_test": r.summary["test"],
    })
    head = "| trial | " + " | ".join(keys) + f" | validation {label} | seconds |"
    rows = [head, "|---:|" + "---|" * len(keys) + "---:|---:|"]
    for t in r.trials:
        cells = [_fmt(t["params"][k]) for k in keys]
        score = "refused" if t.get("refused") else ("n/a" if t["score"] is None else f"{t['score']:.4f}")
        mark = " (best)" if t is r.best else (" (as written)" if t["trial"] == 0 else "")
        rows.append(f"| {t['trial']}{mark} | " + " | ".join(cells) + f" | {score} | {t['seconds']:.0f} |")
    test = r.summary["test"].get(metric, math.nan)
    text = "\n".join([
        f"# Tuning {cfg.name or 'run'}: {len(r.trials)} trials", "",
        f"Objective: the validation {label} of the model each trial selected (trial 0: the config as "
        f"written). Best: trial {r.best['trial']}, validation {label} {r.best['score']:.4f}; its settings "
        f"run again (best/): test {label} {test:.4f}.", "", STATEMENT, "", *rows, "",
    ])
    io.write_text(out / "tuning.md", text)
    png = plots.tuning_trials([t["trial"] for t in r.trials], [t["score"] for t in r.trials], f"validation {label}")
    io.write_bytes(out / "trials.png", png)
    table = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in row.strip("|").split("|")) + "</tr>"
        for row in rows[2:]
    )
    header = "".join(f"<th>{html.escape(c.strip())}</th>" for c in rows[0].strip("|").split("|"))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>privmed tuning: {html.escape(cfg.name or 'run')}</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:14px}}th{{background:#f2f4f7}}.note{{background:#fff8e1;padding:8px}}</style>
</head><body><h1>Tuning {html.escape(cfg.name or 'run')}</h1>
<p>{len(r.trials)} trials; objective: the validation {label} of the model each trial selected (trial 0: the
config as written). Best: trial {r.best['trial']} (validation {label} {r.best['score']:.4f}); its settings are in
<code>best.yaml</code>, and their run in <code>best/</code> (test {label} {test:.4f}, <a href="best/report.html">report</a>).</p>
<p class="note">{html.escape(STATEMENT)}</p>
<img alt="validation score per trial" src="data:image/png;base64,{base64.b64encode(png).decode()}">
<table><tr>{header}</tr>{table}</table></body></html>
"""
    io.write_text(out / "tuning.html", page)


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)

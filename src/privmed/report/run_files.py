"""Reading a run directory for the report: the only module of the report that opens the run's
files (summary.json, config.yaml, metrics.jsonl, predictions.npz, test_counts.npz and, under
private/, audit.json and audit_inversion.npz). What it reads comes back as one RunFiles; every
error is a RunDirError naming the file."""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from privmed.catalog import PrivacyMode
from privmed.errors import RunDirError
from privmed.federation.records import PrivacySummary, Summary, read_metrics_json, read_summary_json
from privmed.report.private import audit_file, inversion_file, shareable_audit
from privmed.report.readers import read_json as _read_json
from privmed.report.readers import read_yaml as _read_yaml
from privmed.report.words import as_dict as _dict
from privmed.report.words import get as _get
from privmed.report.words import num as _num
from privmed.tasks import counts as evaluation_counts


REQUIRED_FILES = ("summary.json", "config.yaml", "metrics.jsonl")


def _text(value: Any) -> str | None:
    """A value the run files give as text, as text; None where missing or empty."""
    return str(value) if value else None


def _count(value: Any) -> int | None:
    """A count or other whole number (rounded), None where missing or not a finite number."""
    x = _num(value)
    return None if x is None else int(round(x))


def _names(value: Any) -> tuple[str, ...] | None:
    """A list of names as strings; None where the files give no list."""
    return tuple(str(n) for n in value) if isinstance(value, list) else None


@dataclass(frozen=True)
class DataFacts:
    """What summary.json says of the run's data ("data"; the config's data.source where it is silent).
    Summary keeps "data" as the dict the run wrote (privmed.federation.facts.DataFacts is the
    coordinator's, with fields the summary does not hold): this reads it leniently, for any summary."""

    source: str | None
    name: str | None  # the config's data.name (a MedMNIST set)
    synthetic: bool  # generated phantoms or records, not patients' data
    tabular: bool | None  # a feature table; None: an older summary that does not say
    image_shape: tuple[int, ...] | None  # (D,) for a table of D features; None: not recorded
    class_names: tuple[str, ...] | None  # None: not recorded as a list
    feature_names: tuple[str, ...] | None
    spacing_mm: float | None  # segmentation: the pixel side, where known
    time_unit: str | None  # survival: the unit of the survival times
    description: str | None
    citation: str | None

    @classmethod
    def read(cls, summary: Summary, config: dict) -> DataFacts:
        data = _dict(summary.data)
        tabular, shape = data.get("tabular"), data.get("image_shape")
        unit = data.get("time_unit")
        return cls(
            source=_text(data.get("source") or _get(config, "data", "source")),
            name=_text(_get(config, "data", "name")), synthetic=data.get("synthetic") is True,
            tabular=tabular if isinstance(tabular, bool) else None,
            image_shape=tuple(shape) if isinstance(shape, list) else None,
            class_names=_names(data.get("class_names")), feature_names=_names(data.get("feature_names")),
            spacing_mm=_num(data.get("spacing_mm")), time_unit=unit if isinstance(unit, str) and unit else None,
            description=_text(data.get("description")), citation=_text(data.get("citation")),
        )


@dataclass(frozen=True)
class RunFacts:
    """summary.json's facts of the run as a whole (the config's where an older summary is silent),
    typed: what the report's steps read instead of the summary's dicts. The scores (per part, per
    site, per round) stay in RunFiles.summary and RunFiles.metrics."""

    name: str  # the run's name, else its directory's
    task: str | None  # None: neither file says (the report then words a classification)
    strategy: str | None
    aggregator: str | None  # federation.aggregator (config)
    byzantine: Any  # federation.byzantine (config), as written
    finetune_steps: float | None  # federation.finetune_steps (config)
    model: str | None
    parameters: float | None
    rounds_completed: int | None
    rounds_planned: int | None
    best_round: int | None  # the selected round (the last metrics row's where the summary has none)
    selection: str | None  # how the result was chosen, in words
    selection_rule: str | None  # "last" or "best-validation"; None: a summary from before the field
    wall_seconds: float | None
    train_seconds: float | None
    sample_gradient_steps: int | None
    seed: int | None
    version: str | None  # privmed's version that wrote the summary
    privacy: Any  # summary.json's "privacy" as written (privmed.report.words reads it)
    privacy_mode: PrivacyMode | None
    privacy_unit: str | None  # "patient", "record" or "site"; None: not recorded
    accountant: str | None  # "prv", "rdp" or "pld"
    delta: float | None
    budget_epsilon: float | None  # each site's budget; None: not recorded
    scoring: bool  # the sites' scores came as noisy counts (privacy.scoring)
    attack: dict[str, Any]  # the config's simulated attack ({} without one)
    data: DataFacts

    @property
    def selected_last(self) -> bool:
        """Whether the result is the last round's model: the summary's selection_rule; for a summary
        from before that field, its selection in words."""
        if self.selection_rule is not None:
            return self.selection_rule == "last"
        return "last round" in (self.selection or "")

    @classmethod
    def read(cls, path: Path, s: Summary, privacy: Any, config: dict, metrics: list[dict]) -> RunFacts:
        """The facts of `s` (summary.json read with partial=True, so any field may be None or not of
        its type: each is checked here), its `privacy` entry as written, the config's where the
        summary is silent."""
        model, p = _dict(s.model), s.privacy or PrivacySummary(mode=None, epsilon=None, statement=None)
        return cls(
            name=str(s.name or path.name), task=_text(s.task or _get(config, "task")),
            strategy=_text(s.strategy or _get(config, "federation", "strategy")),
            aggregator=_text(_get(config, "federation", "aggregator")),
            byzantine=_get(config, "federation", "byzantine"),
            finetune_steps=_num(_get(config, "federation", "finetune_steps")),
            model=_text(model.get("name") or _get(config, "model", "name")), parameters=_num(model.get("parameters")),
            rounds_completed=_count(s.rounds_completed), rounds_planned=_count(s.rounds_planned),
            best_round=_best_round(s, metrics), selection=_text(s.selection),
            selection_rule=_text(s.selection_rule), wall_seconds=_num(s.wall_seconds),
            train_seconds=_num(s.train_seconds), sample_gradient_steps=_count(s.sample_gradient_steps),
            seed=_count(s.seed), version=_text(s.privmed_version), privacy=privacy,
            privacy_mode=p.mode, privacy_unit=p.unit if isinstance(p.unit, str) else None,
            accountant=_text(p.accountant), delta=_num(p.delta), budget_epsilon=_num(p.budget_epsilon),
            scoring=bool(p.scoring), attack=_dict(_get(config, "attack")), data=DataFacts.read(s, config),
        )


@dataclass(frozen=True)
class RunFiles:
    """What the report reads from a run directory. `probs` maps a model name ("global" or a site) to
    (N, K) test-set probabilities aligned with `labels` (N,); a survival run has `risk` instead (model
    name -> (N,) predicted risk, higher = earlier event), `labels` is then the event indicator and
    `time` (N,) the time to the event or to censoring. All empty/None without predictions.
    `counts` maps a model name to its evaluation counts on the pooled test data, merged over the
    sites (test_counts.npz, privmed.tasks.counts): what a run has where no patient's prediction left
    its site; {} without the file."""

    path: Path
    config: dict
    summary: dict
    metrics: list[dict]
    facts: RunFacts  # the summary's facts of the run, typed
    labels: np.ndarray | None = None
    probs: dict[str, np.ndarray] = field(default_factory=dict)
    time: np.ndarray | None = None
    risk: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    audit: dict | None = None  # private/audit.json (privmed audit); shareable_audit's view of it unless private
    # private/audit_inversion.npz (private reports only): per attacked setting, '<setting>__originals'
    # and '__reconstructions'
    inversion_images: dict[str, np.ndarray] = field(default_factory=dict)
    private: bool = False  # the report that shows the audit's results (never shared)
    # every array of predictions.npz ({} without it): a dense task's examples are read from here
    predictions: dict[str, np.ndarray] = field(default_factory=dict)


def read_run(run_dir: Path, private: bool = False) -> RunFiles:
    """The run's files as the report reads them. The audit (private/audit.json) comes whole, with
    the inversion's images, only when `private`; else as privmed.report.private.shareable_audit
    gives it, with none of its results."""
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: not a directory")
    for name in REQUIRED_FILES:
        if not (run_dir / name).is_file():
            raise RunDirError(f"{run_dir}: not a privmed run directory (missing {name})")
    summary = read_summary_json(run_dir)
    config = _read_yaml(run_dir / "config.yaml")
    metrics = read_metrics_json(run_dir)
    predictions_file = run_dir / "predictions.npz"
    arrays = _read_arrays(predictions_file)
    labels, probs, time, risk = (_predictions(predictions_file, arrays) if predictions_file.is_file()
                                 else (None, {}, None, {}))
    counts = _read_counts(run_dir / "test_counts.npz")
    audit = _read_json(audit_file(run_dir)) if audit_file(run_dir).is_file() else None
    typed = Summary.from_json(summary, str(run_dir / "summary.json"), partial=True)
    facts = RunFacts.read(run_dir, typed, summary.get("privacy"), config, metrics)
    read = dict(path=run_dir, config=config, summary=summary, metrics=metrics, facts=facts, labels=labels,
                probs=probs, time=time, risk=risk, counts=counts, predictions=arrays)
    if not private:
        return RunFiles(**read, audit=shareable_audit(audit))
    images = _read_arrays(inversion_file(run_dir)) if _get(audit, "inversion") else {}
    return RunFiles(**read, audit=audit, inversion_images=images, private=True)


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz file ({} when it is missing); RunDirError when it cannot be read."""
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            return {key: z[key] for key in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise RunDirError(f"{path}: cannot read ({e})") from None


def _read_counts(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Each model's test counts from test_counts.npz ({} without it); RunDirError naming the file
    when it cannot be read."""
    return evaluation_counts.load_counts(path) if path.is_file() else {}


def _predictions(
    path: Path, arrays: dict[str, np.ndarray],
) -> tuple[np.ndarray | None, dict[str, np.ndarray], np.ndarray | None, dict[str, np.ndarray]]:
    """(labels, probs per model, survival time, risk per model) from predictions.npz's `arrays`,
    checked against each other; RunDirError naming `path` where they disagree."""
    labels = arrays.get("labels")
    if labels is not None and labels.dtype == np.bool_:
        labels = labels.astype(np.int64)
    if labels is None or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise RunDirError(f"{path}: missing an integer 1-D array 'labels'")
    n = len(labels)
    probs, risk = {}, {}
    for key, arr in arrays.items():
        if key.startswith("probs:"):
            if arr.ndim != 2 or arr.shape[0] != n or arr.shape[1] < 2:
                raise RunDirError(f"{path}: {key} has shape {arr.shape}, expected ({n}, K) with K >= 2")
            probs[key.removeprefix("probs:")] = arr.astype(np.float64)
        elif key.startswith("risk:"):
            if arr.ndim == 2 and arr.shape[1] == 1:
                arr = arr[:, 0]
            if arr.shape != (n,):
                raise RunDirError(f"{path}: {key} has shape {arr.shape}, expected ({n},)")
            risk[key.removeprefix("risk:")] = arr.astype(np.float64)
    k = max((p.shape[1] for p in probs.values()), default=0)
    if probs and n and (labels.min() < 0 or labels.max() >= k):
        raise RunDirError(f"{path}: labels outside 0..{k - 1}")
    time = arrays.get("time")
    if time is not None:
        if time.shape != (n,) or not np.issubdtype(time.dtype, np.number):
            raise RunDirError(f"{path}: 'time' has shape {time.shape}, expected ({n},) numbers")
        time = time.astype(np.float64)
    if risk and n and (labels.min() < 0 or labels.max() > 1):
        raise RunDirError(f"{path}: a survival run's labels are event indicators, 0 or 1")
    return labels, probs, time, risk


def site_names(run: RunFiles) -> list[str]:
    """Sites in summary order, then any that only the metrics name."""
    names = list(_dict(run.summary.get("sites")))
    if not names:
        names = [str(n) for n in (_get(run.config, "sites", "names") or [])]
    for row in run.metrics:
        for part in ("sites", "train_loss"):
            names += [n for n in _dict(row.get(part)) if n not in names]
    return names


def _best_round(summary: Summary, metrics: list[dict]) -> int | None:
    """The selected round: the summary's, else the last metrics row's (a run still going)."""
    best = summary.best_round
    if best is None and metrics:
        best = metrics[-1].get("best_round")
    return best if isinstance(best, int) and not isinstance(best, bool) else None

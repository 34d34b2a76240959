"""Reading a run directory for the report: the only module of the report that opens the run's
files (summary.json, config.yaml, metrics.jsonl, predictions.npz, test_counts.npz and, under
private/, audit.json and audit_inversion.npz). What it reads comes back as one RunFiles; every
error is a RunDirError naming the file."""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from privmed.errors import RunDirError
from privmed.report.private import audit_file, inversion_file, shareable_audit
from privmed.report.readers import read_json as _read_json
from privmed.report.readers import read_jsonl as _read_jsonl
from privmed.report.readers import read_yaml as _read_yaml
from privmed.report.words import as_dict as _dict
from privmed.report.words import get as _get
from privmed.tasks import counts as evaluation_counts


REQUIRED_FILES = ("summary.json", "config.yaml", "metrics.jsonl")


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
    summary = _read_json(run_dir / "summary.json")
    config = _read_yaml(run_dir / "config.yaml")
    metrics = _read_jsonl(run_dir / "metrics.jsonl")
    predictions_file = run_dir / "predictions.npz"
    arrays = _read_arrays(predictions_file)
    labels, probs, time, risk = (_predictions(predictions_file, arrays) if predictions_file.is_file()
                                 else (None, {}, None, {}))
    counts = _read_counts(run_dir / "test_counts.npz")
    audit = _read_json(audit_file(run_dir)) if audit_file(run_dir).is_file() else None
    read = dict(path=run_dir, config=config, summary=summary, metrics=metrics, labels=labels, probs=probs,
                time=time, risk=risk, counts=counts, predictions=arrays)
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


def best_round(run: RunFiles) -> int | None:
    best = run.summary.get("best_round")
    if best is None and run.metrics:
        best = run.metrics[-1].get("best_round")
    return best if isinstance(best, int) and not isinstance(best, bool) else None

"""Turn a finished (or stopped) run directory into one self-contained report.html.

Reading, figure making and rendering are separate steps: `read_run` loads the files the runner
wrote, `make_figures` draws them (pure), `render` fills the template (pure), and `write_report` is
the only function that writes (plots/<name>.png and report.html, atomically).

The report follows the run's task: "classification" (images), "tabular-classification" (a feature
table: the same scores, nothing about images) and "survival" (concordance index, Kaplan-Meier curves
of the predicted risk groups instead of ROC and calibration).

Two reports (privmed.report.private): RUN_DIR/report.html may be shared: of an audit it says when
it ran, which attacks and what each attacker assumes, never a result. With `private=True` the
report also shows the audit's results and figures (computed from patients outside the DP mechanism,
training images among them) and goes to RUN_DIR/private/report.html, its figures to private/plots/.
"""

from __future__ import annotations

import base64
import functools
import math
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import yaml

from privmed import catalog
from privmed.errors import RunDirError
from privmed.io import write_bytes, write_text
from privmed.report import plots, words
from privmed.report.private import PRIVATE_DIR, PRIVATE_NOTE, audit_file, inversion_file, shareable_audit
from privmed.report.released import released_inversion_of_run
from privmed.tasks.names import metric_label
from privmed.report.readers import read_json as _read_json
from privmed.report.readers import read_jsonl as _read_jsonl
from privmed.report.readers import read_yaml as _read_yaml
from privmed.report.words import (
    ACCOUNTANTS,
    NA,
    fmt_bound,
    fmt_lower_bound,
    fmt_epsilon,
    fmt_number,
    fmt_seconds,
    privacy_section,
    unit_words,
)
from privmed.report.words import as_dict as _dict
from privmed.report.words import as_int as _int
from privmed.report.words import ci_text as _ci
from privmed.report.words import get as _get
from privmed.report.words import num as _num
from privmed.report.words import privacy_epsilon as _privacy_epsilon
from privmed.report.words import privacy_status as _privacy_status
from privmed.tasks import counts as evaluation_counts

REQUIRED_FILES = ("summary.json", "config.yaml", "metrics.jsonl")
CLASSIFICATION_ROWS = (  # (key, label) of the metrics shown in the headline table, in order
    ("auc", "AUC"),
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("ece", "ECE (calibration error)"),
    ("loss", "Loss (cross-entropy)"),
    ("n", None),  # None: the count of what the task scores ("Images", "Patients")
)
SURVIVAL_ROWS = (
    ("c_index", "C-index (concordance)"),
    ("loss", "Loss (Cox partial likelihood)"),
    ("events", "Events"),
    ("n", None),
)
DENSE_ROWS = {
    "segmentation": (
        ("dice", "Dice (mean over classes, per volume)"),
        ("dice_foreground", "Dice, all foreground classes together"),
        ("hd95", "HD95"),
        ("loss", "Loss (pixel cross-entropy)"),
        ("volumes", "Volumes (patients)"),
        ("n", None),
    ),
    "reconstruction": (
        ("psnr", "PSNR (dB)"),
        ("ssim", "SSIM"),
        ("nmse", "NMSE"),
        ("psnr_zero_filled", "PSNR of zero-filling (dB)"),
        ("ssim_zero_filled", "SSIM of zero-filling"),
        ("nmse_zero_filled", "NMSE of zero-filling"),
        ("loss", "Loss (L1)"),
        ("volumes", "Volumes (patients)"),
        ("n", None),
    ),
}
# the report's privacy wording lives in privmed.report.words (shared with the privacy statement);
# these are the names older callers import from here
UNITS, UNIT_COUNTS, PRIVATE_MODES, fmt_budget = words.UNITS, words.UNIT_COUNTS, words.PRIVATE_MODES, words.fmt_budget
COUNTS = ("n", "events", "volumes")  # metrics that are counts: integers, summed (not averaged) over sites
PERSONALISED = tuple(s.name for s in catalog.STRATEGIES if s.personalised)  # strategies that keep one model per site
INVERSION_IMAGES = "audit_inversion.npz"  # under private/: privmed.report.private.INVERSION_FILE


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


@dataclass(frozen=True)
class TaskView:
    """What the report needs to know about the run's task to word and draw it."""

    task: str  # "classification", "tabular-classification", "survival", "segmentation", "reconstruction"
    tabular: bool  # a feature table, not images
    personalised: bool  # one model per site (local, fedbn), no shared model
    class_names: tuple[str, ...] = ()  # segmentation: the classes, background first
    spacing_mm: float | None = None  # segmentation: the pixel side (HD95 in mm), when known

    @property
    def survival(self) -> bool:
        return self.task == "survival"

    @property
    def dense(self) -> bool:
        """A target image per item (segmentation, reconstruction): no ROC, no calibration."""
        return self.task in DENSE_ROWS

    @property
    def metric(self) -> str:
        """The headline metric's key in the score dicts."""
        return {"survival": "c_index", "segmentation": "dice", "reconstruction": "psnr"}.get(self.task, "auc")

    @property
    def metric_label(self) -> str:
        return metric_label(self.metric)

    @property
    def items(self) -> str:
        """What one test item is, plural: what the report counts."""
        return "patients" if self.tabular else "slices" if self.dense else "images"

    @property
    def metric_rows(self) -> tuple[tuple[str, str], ...]:
        rows = SURVIVAL_ROWS if self.survival else DENSE_ROWS.get(self.task, CLASSIFICATION_ROWS)
        if self.task == "segmentation":
            hd = "mm" if self.spacing_mm else "pixels"
            per_class = [(f"dice_{c}", f"Dice, {c}") for c in self.class_names[1:]]
            per_class += [(f"hd95_{c}", f"HD95 ({hd}), {c}") for c in self.class_names[1:]]
            rows = rows[:2] + tuple(per_class) + rows[2:]
            rows = tuple((k, f"HD95 ({hd}, 95% Hausdorff, mean over classes)" if k == "hd95" else v)
                         for k, v in rows)
        return tuple((key, label or self.items.capitalize()) for key, label in rows)

    def site_columns(self) -> tuple[list, dict]:
        """The sites table's validation columns, and its columns per scored part."""
        m, label = self.metric, self.metric_label
        second = {"survival": None, "segmentation": ("hd95", "HD95"), "reconstruction": ("ssim", "SSIM")}.get(
            self.task, ("accuracy", "accuracy"))
        names = {"test": "Own-test", "test_pooled": "Pooled-test", "test_finetuned": "Own-test"}
        after = {"test_finetuned": " after fine-tuning"}
        val = [(f"val.{m}", f"Validation {label}")] + ([(f"val.{second[0]}", f"Validation {second[1]}")]
                                                        if second else [])
        per_part = {}
        for part, name in names.items():
            cols = [(f"{part}.{m}", f"{name} {label}{after.get(part, '')}")]
            if second:
                cols.append((f"{part}.{second[0]}", f"{name} {second[1]}{after.get(part, '')}"))
            elif part == "test":
                cols.append(("test.events", "Own-test events"))
            per_part[part] = cols
        return val, per_part


@dataclass(frozen=True)
class FigureOut:
    """One figure slot of the report: PNG bytes, or a note saying why it is missing."""

    name: str
    title: str
    caption: str
    png: bytes | None = None
    note: str | None = None


def write_report(run_dir: Path, private: bool = False) -> Path:
    """Write `run_dir/report.html` (and each figure as `run_dir/plots/<name>.png`), which may be
    shared; with `private`, the report with the audit's results to `run_dir/private/report.html`
    (figures under private/plots/). Returns its path.

    Raises RunDirError when `run_dir` is not a privmed run directory or one of its files is corrupt.
    """
    run = read_run(Path(run_dir), private=private)
    figures = make_figures(run)
    if private:
        from privmed.report.private import private_dir

        home = private_dir(run.path)
    else:
        home = run.path
    for fig in figures:
        if fig.png is not None:
            write_bytes(home / "plots" / f"{fig.name}.png", fig.png)
    out = home / "report.html"
    write_text(out, render(run, figures))
    return out


def task_view(run: RunFiles) -> TaskView:
    s = run.summary
    data = _dict(s.get("data"))
    task = str(s.get("task") or _get(run.config, "task") or "classification")
    tabular = data.get("tabular")
    if not isinstance(tabular, bool):
        shape = data.get("image_shape")
        tabular = task != "classification" or (isinstance(shape, list) and len(shape) == 1)
    strategy = s.get("strategy") or _get(run.config, "federation", "strategy")
    personalised = strategy in PERSONALISED or any(
        isinstance(_dict(v).get("test_pooled"), dict) for v in _dict(s.get("sites")).values())
    names = data.get("class_names") if task == "segmentation" else None
    spacing = _num(data.get("spacing_mm"))
    return TaskView(task, tabular, personalised, tuple(str(n) for n in names or ()), spacing)


# ---------------------------------------------------------------------------------------- reading


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
    labels, probs, time, risk = _read_predictions(run_dir / "predictions.npz")
    counts = _read_counts(run_dir / "test_counts.npz")
    audit = _read_json(audit_file(run_dir)) if audit_file(run_dir).is_file() else None
    if not private:
        return RunFiles(run_dir, config, summary, metrics, labels, probs, time, risk, counts,
                        shareable_audit(audit))
    images = _read_arrays(inversion_file(run_dir)) if _get(audit, "inversion") else {}
    return RunFiles(run_dir, config, summary, metrics, labels, probs, time, risk, counts, audit, images,
                    private=True)


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


def _read_predictions(
    path: Path,
) -> tuple[np.ndarray | None, dict[str, np.ndarray], np.ndarray | None, dict[str, np.ndarray]]:
    """(labels, probs per model, survival time, risk per model) from predictions.npz."""
    if not path.is_file():
        return None, {}, None, {}
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {key: z[key] for key in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # truncated: zip errors
        raise RunDirError(f"{path}: cannot read ({e})") from None
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


# ---------------------------------------------------------------------------------------- figures


def make_figures(run: RunFiles) -> list[FigureOut]:
    view = task_view(run)
    privacy = _privacy_figure(run)
    if view.dense:
        predictions = _dense_figures(run, view)
    else:
        predictions = _survival_figures(run) if view.survival else _prediction_figures(run, view)
    audits = []
    if run.private:  # drawn from the audit's results: never in a shareable report
        audits = [f for f in (_audit_figure(run, view), _inversion_figure(run)) if f is not None]
    return [_learning_curves(run, view), *([privacy] if privacy else []), *predictions, *audits]


def _inversion_figure(run: RunFiles) -> FigureOut | None:
    """Originals and their gradient-inversion reconstructions, per attacked setting (audit.json and
    audit_inversion.npz), or None when no inversion audit ran."""
    settings = _dict(_get(run.audit, "inversion", "settings"))
    rows = []
    for key, r in settings.items():
        o, rec, p = (run.inversion_images.get(f"{key}__{part}") for part in ("originals", "reconstructions", "psnr"))
        if o is None or rec is None or p is None or o.ndim != 4 or o.shape[1:] != rec.shape[1:] or p.shape != rec.shape[:1]:
            continue
        rows.append((_inversion_label(key, _dict(r)), o, rec, p))
    if not rows:
        return None
    caption = (
        "Gradient inversion (privmed audit --attack inversion): for each update attacked, the "
        "training images of the first batch attacked (top: the sites' own images, the reason this "
        "report is private) and what the attacker rebuilt from the update alone (below), with each "
        "reconstruction's PSNR against its original. Above about 18 dB an image is recognisable; "
        "the table in the Audit section gives the means over all batches attacked, and which update "
        "this run released."
    )
    return FigureOut("audit_inversion", "Audit: gradient inversion", caption, png=plots.inversion_examples(rows))


def _inversion_label(key: str, r: dict) -> str:
    """A setting in words, short enough to label a row of images."""
    view = {"site": "one site", "site-dp": "one site, DP-SGD", "secure-sum": "secure sum"}.get(r.get("view"), key)
    if r.get("epsilon") is not None:
        view += f" ε {fmt_epsilon(_num(r.get('epsilon')))}"
    batch = _int(r.get("batch"))
    work = "1 step" if r.get("local") == "step" else f"1 epoch ({_int(r.get('local_steps'))} steps)"
    if r.get("view") != "secure-sum":
        return f"{view}\nbatch {batch}, {work}"
    rebuilt = "as one image" if r.get("rebuilt_as") == "one image" else "as all sites' images"
    return f"{view}\n{batch} per site, {work}\nrebuilt {rebuilt}"


def _audit_figure(run: RunFiles, view: TaskView | None = None) -> FigureOut | None:
    """The membership attacks' ROC curves on log axes (audit.json), or None when not audited."""
    attacks = _dict(_get(run.audit, "attacks"))
    curves, n_out = {}, 0
    for name, r in attacks.items():
        r = _dict(r)
        fpr, tpr, auc = r.get("roc_fpr"), r.get("roc_tpr"), _num(r.get("roc_auc"))
        if isinstance(fpr, list) and isinstance(tpr, list) and auc is not None and len(fpr) == len(tpr) > 1:
            curves[name] = (np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float), auc)
            n_out = max(n_out, int(_num(r.get("n_nonmembers")) or 0))
    if not curves:
        return None
    units = _audit_units(run, view)
    caption = (
        "Membership inference against the selected model (privmed audit): for each attack, the share "
        f"of training {units} it finds (true positive rate) against the share of other {units} it "
        f"wrongly calls members (false positive rate), on log axes, where the {units} an attacker can "
        "name with confidence show. The dashed line is guessing."
    )
    return FigureOut("audit_membership", "Audit: membership inference", caption,
                     png=plots.membership_roc(curves, n_out))


def _learning_curves(run: RunFiles, view: TaskView | None = None) -> FigureOut:
    view = view or task_view(run)
    metric, label = view.metric, view.metric_label
    rows = run.metrics
    title = f"Learning curves: {label} over rounds" if view.survival else "Learning curves"
    has_val = any(_dict(row.get("val")) for row in rows) or not rows
    own = "own test" if not view.personalised else "own test (each site's own model)"
    if not has_val:  # data.val_fraction 0: no validation scores; show the sites' test scores instead
        part, ylabel = "test", f"test {label}"
        val_label, test_label = "pooled validation", "pooled test"
        caption = (
            f"Top: test {label} per round of the model on each site's own test data, on all sites' "
            "test data pooled and, where the sites have test data of their own, their unweighted "
            "mean. The run had no validation data, so the result is the last round's model and "
            "these scores played no part in choosing it. The dotted red line marks the selected round."
        )
    else:
        part, ylabel = "val", f"validation {label}"
        if view.personalised:
            scored = "each site's own model on that site's validation data"
            val_label, test_label = "mean of site models, validation", "mean of site models, test"
            choice = f"the mean over the site models' validation {label} (used to choose the round)"
        else:
            scored = "the shared model on each site's validation data"
            val_label, test_label = "pooled validation", "pooled test"
            choice = "all sites' validation data pooled (used to choose the round)"
        caption = (
            f"Top: validation {label} per round of {scored}; of {choice}; and of the test data, for "
            "information only (it plays no part in the choice). The dotted red line marks the "
            "selected round."
        )
    caption += " Bottom: mean training loss of each site's local training in that round."
    if _dict(run.summary.get("privacy")).get("mode") == "dp-sgd":
        units = words.unit_nouns(_get(run.summary, "privacy", "unit"), tabular=view.tabular)
        caption += (" Under DP-SGD the sites do not report their training loss (it is computed from "
                    f"training {units} outside the privacy mechanism), so that panel is empty.")
    if not rows:
        return FigureOut("learning_curves", title, caption, note="No completed rounds: nothing to plot.")
    sites = _site_names(run)
    mean_test = [_get(row, "test_mean_over_sites", metric) for row in rows]
    has_mean = any(_num(x) is not None for x in mean_test)
    if has_mean and has_val:
        caption += (f" The dash-dotted line is the unweighted mean over sites of each site's {own} "
                    f"{label}, also for information only.")
    png = plots.learning_curves(
        rounds=[row["round"] for row in rows],
        val_auc_by_site={s: [_get(row, "sites", s, part, metric) for row in rows] for s in sites},
        train_loss_by_site={s: [_get(row, "train_loss", s) for row in rows] for s in sites},
        pooled_val_auc=[_get(row, "val", metric) for row in rows],
        pooled_test_auc=[_get(row, "test", metric) for row in rows],
        best_round=_best_round(run),
        val_label=val_label,
        test_label=test_label,
        metric_label=ylabel,
        mean_test_auc=mean_test if has_mean else None,
        mean_test_label=f"{own}, mean over sites",
        title=title,
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


ROC_TITLE = "ROC curve"
CAL_TITLE = "Calibration"


def _roc_caption() -> str:
    return ("Sensitivity against 1 − specificity of the selected model(s) on the pooled test set as "
            "the decision threshold varies. The dashed diagonal is a model that guesses; the closer a "
            "curve runs to the top-left corner, the better the model separates the classes.")


def _cal_caption(items: str) -> str:
    return (f"Top: for test {items} grouped by the model's confidence in its prediction, the share it "
            "got right. A calibrated model lies on the diagonal: of the predictions made with 80% "
            "confidence, 80% are right. Below the diagonal the model is over-confident. Bottom: how "
            f"many test {items} fall in each confidence bin.")


def _not_drawn(why: str, items: str) -> list[FigureOut]:
    return [FigureOut("roc", ROC_TITLE, _roc_caption(), note=why),
            FigureOut("calibration", CAL_TITLE, _cal_caption(items), note=why)]


def _prediction_figures(run: RunFiles, view: TaskView | None = None) -> list[FigureOut]:
    items = (view or task_view(run)).items
    roc_title, roc_caption = ROC_TITLE, _roc_caption()
    cal_title, cal_caption = CAL_TITLE, _cal_caption(items)
    if run.labels is None or not run.probs:
        counts = {m: c for m, c in run.counts.items() if "score_hist" in c}
        if counts:
            return _count_figures(run, counts, items)
        return _not_drawn("Not drawn: the run directory has no predictions.npz (or it holds no "
                          "probabilities).", items)
    if len(run.labels) == 0:
        return _not_drawn("Not drawn: the test set is empty.", items)
    probs, skipped = _finite_models(run.probs, lambda p: bool(np.isfinite(p).all()))
    if not probs:
        return _not_drawn(NO_FINITE, items)
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
    cal_png = plots.calibration(probs, run.labels, items=items)
    return [roc_out, FigureOut("calibration", cal_title, cal_caption + skipped, png=cal_png)]


NO_FINITE = "Not drawn: no model has finite test probabilities (training diverged?)."
EXAMPLES_TITLE = "Examples from the test set: input, prediction and target"


def _dense_figures(run: RunFiles, view: TaskView) -> list[FigureOut]:
    """Input, each model's prediction and the target, side by side, for the few test slices the
    run kept (predictions.npz: example_input, example_target, example_index and the models'
    predictions of every test slice)."""
    arrays = _read_arrays(run.path / "predictions.npz")
    inputs, targets, index = (arrays.get(k) for k in ("example_input", "example_target", "example_index"))
    prefix = "mask:" if view.task == "segmentation" else "image:"
    preds = {k.removeprefix(prefix): v[index] for k, v in arrays.items()
             if k.startswith(prefix) and index is not None and v.ndim >= 3 and len(v) > int(index.max(initial=0))}
    if view.task == "segmentation":
        item = ("one test patch, drawn by its slice where the reference mask covers most (the middle "
                "one where it has none)" if targets is not None and targets.ndim == 4 else "one test slice")
        caption = (f"Each row is {item} (of a different patient where the test set has several): "
                   "the image, then each model's predicted classes, then the reference mask. Colours: "
                   + ", ".join(f"{c}" for c in view.class_names[1:]) + " over the image.")
    else:
        caption = ("Each row is one test slice: the zero-filled reconstruction from the undersampled "
                   "k-space (what the scanner's measurement gives without a model), then each model's "
                   "reconstruction, then the fully sampled image. PSNR against the fully sampled image "
                   "is in each panel's title.")
    if inputs is None or targets is None or index is None or not preds:
        return [FigureOut("examples", EXAMPLES_TITLE, caption, note=(
            "Not drawn: the run kept no test examples (a run whose test data is held by the sites: "
            "no slice leaves a site)."))]
    png = plots.dense_examples(inputs, preds, targets, view.task, list(view.class_names))
    return [FigureOut("examples", EXAMPLES_TITLE, caption, png=png)]


def _finite_models(by_model: dict, finite) -> tuple[dict, str]:
    """The models whose test predictions (or counts) are finite by `finite`, and the caption's note
    naming those left out ('' when none)."""
    kept = {m: v for m, v in by_model.items() if finite(v)}
    dropped = [m for m in by_model if m not in kept]
    return kept, (f" Left out, their probabilities are not finite: {', '.join(dropped)}." if dropped else "")


def _count_figures(run: RunFiles, counts: dict[str, dict], items: str) -> list[FigureOut]:
    """ROC and calibration from the sites' classification counts (no predictions.npz): the ROC of
    the scores rounded to the counts' grid, the reliability bins exactly as from predictions."""
    if all(int(c["n"]) == 0 for c in counts.values()):
        return _not_drawn("Not drawn: the test set is empty.", items)
    finite, skipped = _finite_models(counts, lambda c: int(c["nonfinite"]) == 0)
    if not finite:
        return _not_drawn(NO_FINITE, items)
    shapes = {c["score_hist"].shape for c in finite.values()}
    if len(shapes) > 1:
        return _not_drawn("Not drawn: the models' test counts disagree on the number of classes or "
                          f"score bins ({', '.join(map(str, sorted(shapes)))}).", items)
    k, _, n_bins = shapes.pop()
    sent = (f" Computed from counts the sites reported, no patient's prediction left a site: per "
            f"class, how many test {items} have a score in each of {n_bins:,} bins of the logit "
            "scale, so each score is rounded to that grid")
    present = np.flatnonzero(next(iter(finite.values()))["confusion"].sum(axis=1) > 0)
    roc_caption = _roc_caption()
    if len(present) < 2:
        roc_out = FigureOut("roc", ROC_TITLE, roc_caption,
                            note="Not drawn: the test labels hold a single class, so ROC is undefined.")
    elif k > 2 and len(finite) > 1:
        roc_out = FigureOut("roc", ROC_TITLE, roc_caption, note=(
            f"Not drawn: with {k} classes the one-vs-rest curves are drawn for a single model, and "
            f"this run has {len(finite)}; see each site's AUC in the table above."))
    else:
        names = _class_names(run, k)
        if k == 2:
            curves = {m: (*evaluation_counts.roc_from_counts(c, 1),
                          evaluation_counts.one_vs_rest_auc(c, 1)) for m, c in finite.items()}
            title = f"ROC, test set (positive class: {names[1]})"
        else:
            [(model, c)] = finite.items()
            curves = {names[i]: (*evaluation_counts.roc_from_counts(c, i),
                                 evaluation_counts.one_vs_rest_auc(c, i)) for i in present}
            title = f"ROC, test set, one class vs rest ({model})"
            roc_caption += " With more than two classes, each curve is one class against the rest."
        if len(finite) > 1:
            roc_caption += " One curve per site's own model, all on the same pooled test set."
        classes = [1] if k == 2 else present
        bound = max(evaluation_counts.auc_rounding_bound(c, int(i))
                    for c in finite.values() for i in classes)
        if _dict(run.summary.get("privacy")).get("scoring"):
            roc_caption += (f"{sent}, each count with Gaussian noise added at the site (the scoring "
                            "mechanism of the privacy section): the curve and AUC are those of the noisy "
                            f"counts, clipped at zero.{skipped}")
        else:
            roc_caption += (f"{sent}; the rounding moves an AUC by at most {bound:.2g} from that of the "
                            f"unrounded scores.{skipped}")
        roc_out = FigureOut("roc", ROC_TITLE, roc_caption, png=plots.roc_curves(curves, title))
    bins = {m: evaluation_counts.reliability_from_counts(c) for m, c in finite.items()}
    ece = {m: evaluation_counts.classification_metrics_from_counts(c)["ece"] for m, c in finite.items()}
    cal_caption = (_cal_caption(items) + " Computed from counts the sites reported, no patient's "
                   f"prediction left a site: per confidence bin, how many test {items} fall there, "
                   f"their summed confidence and how many the model got right.{skipped}")
    cal_png = plots.calibration_bins(bins, ece, k, items=items)
    return [roc_out, FigureOut("calibration", CAL_TITLE, cal_caption, png=cal_png)]


def _survival_figures(run: RunFiles) -> list[FigureOut]:
    """Kaplan-Meier curves of the pooled test patients split at the median predicted risk of the
    selected model (one panel per site's model for a personalised strategy), with a log-rank test."""
    title = "Kaplan-Meier curves by predicted risk group"
    caption = (
        "The pooled test patients split at the median risk the selected model predicts: the half "
        "with the lower predicted risk and the half with the higher. Each line is that group's "
        "Kaplan-Meier estimate of the share of patients still free of the event over time; a tick "
        "marks a patient censored then (event-free when last seen). The further apart the two "
        "curves, the better the model ranks patients by risk. The legend gives each group's "
        "patients (n) and events."
    )

    def missing(why: str) -> list[FigureOut]:
        return [FigureOut("kaplan_meier", title, caption, note=why)]

    if (run.labels is None or run.time is None or not run.risk) and any(
            "concordant" in c for c in run.counts.values()):
        return missing("Not drawn: the sites keep their patients' predicted risks and reported only "
                       "evaluation counts (test_counts.npz); splitting the pooled test patients at "
                       "the median risk would need a second round of counts (the pooled median "
                       "first, then each site's patients above and below it), which this run did "
                       "not do.")
    if run.labels is None or run.time is None or not run.risk:
        return missing("Not drawn: the run directory has no predictions.npz (or it holds no survival "
                       "times and predicted risks).")
    if len(run.labels) == 0:
        return missing("Not drawn: the test set is empty.")
    models = ["global"] if "global" in run.risk else list(run.risk)
    time, event = run.time, run.labels.astype(bool)
    if not np.isfinite(time).all():
        return missing("Not drawn: some test survival times are not finite.")
    finite = [m for m in models if np.isfinite(run.risk[m]).all()]
    dropped = [m for m in models if m not in finite]
    if not finite:
        return missing("Not drawn: no model has finite predicted risks (training diverged?).")
    if len(time) < 2:
        return missing("Not drawn: the test set holds a single patient, too few for two risk groups.")
    panels, tests, single = {}, [], []
    for model in finite:
        groups = _risk_groups(run.risk[model])
        curves = []
        for g, name in ((0, "lower risk"), (1, "higher risk")):
            mask = groups == g
            if not mask.any():
                continue
            t, e = time[mask], event[mask]
            steps_t, steps_s = _kaplan_meier(t, e)
            censored = np.sort(t[~e])
            curves.append({
                "label": f"{name} (n = {int(mask.sum())}, {int(e.sum())} events)",
                "times": steps_t, "survival": steps_s,
                "censored_times": censored, "censored_survival": _step_at(steps_t, steps_s, censored),
            })
        if len(curves) < 2:
            single.append(model)
        p = _logrank_p(time, event, groups)
        tests.append((model, p))
        panel = f"{model}: log-rank {fmt_p(p)}" if len(finite) > 1 else f"Test set, log-rank {fmt_p(p)}"
        panels[panel] = curves
    if len(tests) == 1:
        caption += (" Log-rank test of the difference between the two groups' survival: "
                    f"{fmt_p(tests[0][1])} (small values: the groups' survival differs by more than "
                    "chance would make it).")
    else:
        caption += (" One panel per site's own model, all on the same pooled test patients; the "
                    "log-rank test of the difference between each panel's two groups: "
                    + "; ".join(f"{m}: {fmt_p(p)}" for m, p in tests) + ".")
    if single:
        caption += (f" {', '.join(single)}: every patient got the same predicted risk, so they form "
                    "a single group and the log-rank test is undefined.")
    if dropped:
        caption += f" Left out, their predicted risks are not finite: {', '.join(dropped)}."
    png = plots.kaplan_meier(panels, time_label=_time_label(run))
    return [FigureOut("kaplan_meier", title, caption, png=png)]


def _survival_helpers():
    """(kaplan_meier, risk_groups) from privmed.tasks.survival when it has them, else None."""
    try:
        from privmed.tasks import survival
    except ImportError:
        return None
    km, groups = getattr(survival, "kaplan_meier", None), getattr(survival, "risk_groups", None)
    return (km, groups) if callable(km) and callable(groups) else None


def _kaplan_meier(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Kaplan-Meier estimate as a right-continuous step function: (times, survival after each)."""
    helpers = _survival_helpers()
    if helpers is not None:
        times, surv = helpers[0](time, event)
    else:
        from lifelines import KaplanMeierFitter

        sf = KaplanMeierFitter().fit(time, event_observed=event).survival_function_
        times, surv = sf.index.to_numpy(), sf.iloc[:, 0].to_numpy()
    times, surv = np.asarray(times, dtype=np.float64), np.asarray(surv, dtype=np.float64)
    if not len(times) or times[0] > 0:  # start every curve at time 0 with everyone event-free
        times, surv = np.concatenate([[0.0], times]), np.concatenate([[1.0], surv])
    return times, surv


def _risk_groups(risk: np.ndarray) -> np.ndarray:
    """Group of each patient: 1 (higher risk) above the median predicted risk, else 0."""
    helpers = _survival_helpers()
    if helpers is not None:
        return np.asarray(helpers[1](risk, n_groups=2), dtype=np.int64)
    return (risk > np.median(risk)).astype(np.int64)


def _step_at(times: np.ndarray, surv: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The step function (times, surv) evaluated at `at` (1 before its first step)."""
    i = np.searchsorted(times, at, side="right") - 1
    return np.where(i >= 0, surv[np.clip(i, 0, None)], 1.0)


def _logrank_p(time: np.ndarray, event: np.ndarray, groups: np.ndarray) -> float | None:
    """The log-rank test's p-value for groups 0 and 1; None when it is undefined (no events)."""
    from lifelines.statistics import logrank_test

    a, b = groups == 0, groups == 1
    if not a.any() or not b.any() or not event.any():
        return None
    result = logrank_test(time[a], time[b], event_observed_A=event[a], event_observed_B=event[b])
    return _num(result.p_value)


def _time_label(run: RunFiles) -> str:
    unit = _get(run.summary, "data", "time_unit")
    return f"time ({unit})" if isinstance(unit, str) and unit else "time"


# ---------------------------------------------------------------------------------------- rendering


def render(run: RunFiles, figures: list[FigureOut]) -> str:
    """The report page as one HTML string, figures embedded as data URIs."""
    return _template().render(**context(run, figures))


def context(run: RunFiles, figures: list[FigureOut]) -> dict:
    s = run.summary
    view = task_view(run)
    data = _dict(s.get("data"))
    features = data.get("feature_names")
    headline = _headline(run, view)
    return {
        "name": str(s.get("name") or run.path.name),
        "private": run.private,
        "private_note": PRIVATE_NOTE,
        "shareable_report": str(run.path / "report.html"),
        "synthetic": data.get("synthetic") is True,
        "synthetic_what": "records" if view.tabular else "phantom images",
        "task": view.task,
        "survival": view.survival,
        "items": view.items,
        "metric_label": view.metric_label,
        "overview": _overview(run),
        "no_rounds": not run.metrics and not s.get("rounds_completed"),
        "key_figures": _key_figures(run, view),
        "headline": headline,
        "selected_last": "last round" in str(s.get("selection") or ""),
        "run_rows": _run_rows(run),
        "sites": _sites_table(run, view),
        "figures": [_figure_context(f) for f in figures],
        "privacy": _privacy(s.get("privacy"), view),
        "audit": _audit(run, view),
        "data_description": data.get("description"),
        "data_citation": data.get("citation"),
        "class_names": data.get("class_names") if not view.survival else None,
        "feature_names": [str(f) for f in features] if view.tabular and isinstance(features, list) else [],
        "config_yaml": yaml.safe_dump(run.config, sort_keys=False, default_flow_style=False,
                                      allow_unicode=True),
        "version": s.get("privmed_version") or NA,
    }


def _audit(run: RunFiles, view: TaskView | None = None) -> dict | None:
    """The Audit section from private/audit.json: the epsilon the run claims and, in a private
    report, the membership attacks, one row per attack (what it sees, ROC-AUC and TPR at low FPR
    with their 95% intervals), when they ran; and gradient inversion, one row per update attacked
    (PSNR and SSIM, the one this run released marked), when it ran. In a shareable report, which
    attacks ran and what each attacker sees, and where the results are; none of them."""
    a = run.audit
    if not a:
        return None
    units = _audit_units(run, view)
    claimed = _dict(a.get("claimed"))
    eps = _num(claimed.get("epsilon"))
    bound = _num(claimed.get("max_roc_auc"))
    membership = "attacks" in a
    if eps is None:
        claim = "The run claims no differential-privacy guarantee: nothing bounds what these attacks find."
    else:
        unit = _unit_words(_get(run.summary, "privacy", "unit"), view)[1]
        claim = f"The run claims epsilon {fmt_epsilon(eps)} at delta {claimed.get('delta')}"
        claim += f"; its unit of privacy is {unit}." if unit else "."
        if claimed.get("mode") == "central":
            claim += " Central DP protects a whole site, so it bounds a site's membership, not a patient's."
        if bound is not None and membership:
            # Rounded up: a bound printed below its value would claim more than the epsilon backs.
            claim += (f" Whatever the attacker, that bounds a membership attack's ROC-AUC by "
                      f"{fmt_bound(bound)}; an audit finds what a given attacker "
                      "reaches, a lower bound on the leak.")
    if a.get("withheld"):
        return {"claim": claim, "created": a.get("created") or NA, "withheld": _withheld(run, a, units),
                "a_unit": ("an " if units[0] in "aeiou" else "a ") + units[:-1],
                "rows": None, "inversion": None, "canaries": None, "input_canaries": None,
                "attribute": None, "setting": None}
    rows = _membership_rows(a) if membership else None
    setting = None
    if rows is not None:
        cand, sh = _dict(a.get("candidates")), _dict(a.get("shadows"))
        setting = (f"{_int(cand.get('members'))} training {units} and {_int(cand.get('non_members'))} "
                   f"{units} no site trained on ({cand.get('drawn_from', '')}); seed {a.get('seed')}")
        if sh:
            setting += f"; {_int(sh.get('trained'))} shadow runs ({fmt_seconds(sh.get('seconds'))})"
    return {"rows": rows, "claim": claim, "setting": setting, "created": a.get("created", NA), "withheld": None,
            "a_unit": ("an " if units[0] in "aeiou" else "a ") + units[:-1],
            "inversion": _inversion(_dict(a.get("inversion")), run.summary),
            "canaries": _canaries(_dict(a.get("canaries")), units),
            "input_canaries": _input_canaries(_dict(a.get("input-canaries")), units),
            "attribute": _attribute(_dict(a.get("attribute")), units)}


def _withheld(run: RunFiles, a: dict, units: str) -> dict:
    """What a shareable report says of an audit whose results it does not show: the attacks that
    ran, each with what its attacker sees, and where the results are."""
    ran = [{"title": str(r.get("title") or n), "sees": str(r.get("sees") or NA)}
           for n, r in _dict(a.get("attacks")).items()]
    for key in ("inversion", "canaries", "input-canaries", "attribute"):
        r = _dict(a.get(key))
        if r:
            sees = r.get("sees") or "; ".join(dict.fromkeys(
                str(_dict(x).get("sees")) for x in _dict(r.get("settings")).values() if _dict(x).get("sees")))
            ran.append({"title": str(r.get("title") or key), "sees": str(sees or NA)})
    return {"ran": ran, "units": units, "file": f"{PRIVATE_DIR}/audit.json",
            "command": f"privmed report {run.path} --private",
            "report": f"{PRIVATE_DIR}/report.html"}


def _audit_units(run: RunFiles, view: TaskView | None = None) -> str:
    """What the audit asked about, plural: patients, or the data's items where its unit is one
    record (audit.json's unit; the run's unit of privacy before audits recorded theirs)."""
    view = view or task_view(run)
    unit = _get(run.audit, "unit")
    if unit not in ("patient", "record"):
        unit = _get(run.summary, "privacy", "unit")
    return words.unit_nouns(unit, tabular=view.tabular)


def _canaries(c: dict, units: str = "patients") -> str | None:
    """The gradient-canary audit in a sentence: the lower bound beside the site's claimed epsilon."""
    if not c:
        return None
    claimed = _num(c.get("claimed_epsilon"))
    lower = _num(c.get("epsilon_lower"))
    text = (f"{_int(c.get('canaries'))} canary {units} joined site {c.get('site')} "
            f"({_int(c.get('included'))} of them trained), each a gradient of norm {c.get('clip')} on one "
            f"coordinate; the attacker ({c.get('sees')}) guessed {_int(c.get('correct'))} of "
            f"{_int(c.get('guesses'))} right. Epsilon is at least {fmt_lower_bound(lower)} at "
            f"{100 * _num(c.get('confidence')):.0f}% confidence")
    return text + _canary_verdict(lower, claimed)


def _input_canaries(c: dict, units: str = "patients") -> str | None:
    """The input-canary audit (black box) in a sentence: the lower bound beside the site's claim."""
    if not c:
        return None
    auc = _num(c.get("roc_auc"))
    separation = "" if auc is None else f" (which separate the trained canaries at ROC-AUC {auc:.3f})"
    text = (f"{_int(c.get('canaries'))} canary {units} joined site {c.get('site')} "
            f"({_int(c.get('included'))} of them trained), each a real image no site trains on with a "
            f"wrong label; the attacker ({c.get('sees')}) guessed {_int(c.get('correct'))} of "
            f"{_int(c.get('guesses'))} right from the model's log-odds of those labels{separation}. Epsilon "
            f"is at least {fmt_lower_bound(_num(c.get('epsilon_lower')))} at "
            f"{100 * _num(c.get('confidence')):.0f}% confidence")
    return text + _canary_verdict(_num(c.get("epsilon_lower")), _num(c.get("claimed_epsilon")))


def _canary_verdict(lower: float | None, claimed: float | None) -> str:
    """How a canary audit's lower bound stands against the site's claimed epsilon, as the end of
    its sentence."""
    if claimed is None:
        return ": the run claims no guarantee, and this is what one run's canaries prove leaks."
    if lower is None:
        return f"; the site claims epsilon {fmt_epsilon(claimed)}."
    if lower <= claimed:
        return (f", within the site's claimed epsilon {fmt_epsilon(claimed)} (a lower bound from one run: it "
                "shows the claim is not contradicted, not that it is tight).")
    return f", ABOVE the site's claimed epsilon {fmt_epsilon(claimed)}: the claim does not hold."


def _attribute(a: dict, units: str = "patients") -> dict | None:
    """Attribute inference: per group, the attack's and the population's accuracy (95% CI)."""
    if not a:
        return None

    def pct(r: dict) -> str:
        r = _dict(r)
        if r.get("accuracy") is None:
            return NA
        return f"{100 * _num(r['accuracy']):.1f}%" + _ci(r.get("ci"), percent=True)

    rows = [{"group": label, "n": _int(_dict(_dict(a.get(key)).get("attack")).get("n")),
             "attack": pct(_dict(a.get(key)).get("attack")), "baseline": pct(_dict(a.get(key)).get("baseline"))}
            for key, label in (("members", f"training {units}"), ("non_members", f"test {units}"))]
    return {"rows": rows, "attribute": a.get("attribute"), "title": a.get("title"), "assumes": a.get("assumes"),
            "share": _num(a.get("population_share"))}


def _membership_rows(a: dict) -> list[dict]:
    rows = []
    for name, r in _dict(a.get("attacks")).items():
        r = _dict(r)
        if "skipped" in r:
            rows.append({"name": name, "title": r.get("title", name), "sees": r.get("sees", NA),
                         "cells": [f"not run: {r['skipped']}", "", "", ""]})
            continue
        tpr, tpr_ci = _dict(r.get("tpr_at_fpr")), _dict(r.get("tpr_at_fpr_ci"))

        def rate(key: str) -> str:
            v = _num(tpr.get(key))
            if v is None:
                return f"not resolvable ({_int(r.get('n_nonmembers'))} non-members)"
            return f"{100 * v:.1f}%" + _ci(tpr_ci.get(key), percent=True)

        rows.append({"name": name, "title": r.get("title", name), "sees": r.get("sees", NA), "cells": [
            f"{_num(r.get('roc_auc')):.3f}" + _ci(r.get("roc_auc_ci")),
            rate("0.001"), rate("0.01"), f"{_num(r.get('balanced_accuracy')):.3f}",
        ]})
    return rows


def _inversion(inv: dict, summary: dict | None = None) -> dict | None:
    """The gradient-inversion table: per update attacked, what the attacker saw, the local work,
    PSNR and SSIM (mean ± sd, best PSNR) and the PSNR of the data's mean image beside them; the
    row that stands for what this run released marked (privmed.report.released), and a sentence
    saying what that was."""
    if not inv:
        return None
    released = released_inversion_of_run(inv, summary)
    if released.key is None:
        sent = (f"This run released {released.words}; the audit attacked no such update, so every row "
                "below is an update this run never sent, shown for comparison only.")
    else:
        sent = (f"This run released {released.words}: the row marked “released” stands for it. The "
                "other rows are updates this run never sent, shown for comparison only.")
    rows = []
    for key, r in _dict(inv.get("settings")).items():
        r = _dict(r)
        label = _inversion_label(key, r).replace("\n", ", ")
        mark = "released" if key == released.key else "not sent"
        if "skipped" in r:
            rows.append({"setting": label, "sees": r.get("sees", NA), "released": mark,
                         "cells": [f"not run: {r['skipped']}", "", "", "", ""]})
            continue
        p, q = _dict(r.get("psnr")), _dict(r.get("ssim"))
        labels = "inferred" if str(r.get("labels", "")).startswith("inferred") else "known"
        if r.get("label_accuracy") is not None:
            labels += f", {100 * _num(r.get('label_accuracy')):.0f}% right"
        rows.append({"setting": label, "sees": r.get("sees", NA), "released": mark, "cells": [
            f"{_num(p.get('mean')):.1f} ± {_num(p.get('std')):.1f} (best {_num(p.get('max')):.1f})",
            f"{_num(q.get('mean')):.3f} ± {_num(q.get('std')):.3f}",
            f"{_num(r.get('psnr_mean_image')):.1f} / {_num(r.get('ssim_mean_image')):.3f}",
            f"{_int(p.get('n'))} ({_int(r.get('trials'))} batches)",
            labels,
        ]})
    search = _dict(inv.get("search"))
    how = (f"{inv.get('assumes', '')}. Model sent: {inv.get('weights_meaning', NA)}. Search: "
           f"{_int(search.get('iterations'))} iterations from each of {_int(search.get('restarts'))} "
           f"random start(s) and one at the data's brightness, total-variation weight "
           f"{search.get('tv_weight')}. {inv.get('metrics', '')}. Seed {inv.get('seed')}; audited "
           f"{inv.get('created', NA)}.")
    return {"rows": rows, "how": how, "released": sent}


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
    strategy = str(s.get("strategy") or _get(cfg, "federation", "strategy") or NA)
    rule = _get(cfg, "federation", "aggregator")
    if rule and rule != "mean":
        strategy += f", aggregated by {rule}"
        if rule not in ("median", "norm-clip"):
            strategy += f" (withstands {_get(cfg, 'federation', 'byzantine')} malicious sites)"
    rows = [
        ("Task", str(s.get("task") or _get(cfg, "task") or NA)),
        ("Strategy", strategy),
        ("Sites", str(len(_site_names(run)))),
        ("Rounds completed", rounds),
        ("Model", model_text),
        ("Data", f"{source or NA}" + (f" / {name}" if name else "")),
        ("Privacy", _privacy_overview(s.get("privacy"), task_view(run))),
    ]
    attack = _dict(_get(cfg, "attack"))
    if attack.get("kind", "none") != "none":
        who = attack.get("sites")
        who = f"{who} site{'s' if who != 1 else ''}" if isinstance(who, int) else ", ".join(map(str, who or []))
        scale = f" ×{fmt_number(attack.get('scale'))}" if attack["kind"] in ("sign-flip", "scaling", "gaussian") else ""
        rows.append(("Simulated attack", f"{attack['kind']}{scale} by {who} (a robustness test: "
                     "these sites were made malicious on purpose)"))
    return rows


def _finetune_steps(run: RunFiles) -> str:
    steps = _num(_get(run.config, "federation", "finetune_steps"))
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
    noisy = bool(_dict(s.get("privacy")).get("scoring"))
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
    if not run.metrics and not s.get("rounds_completed"):
        return False
    sites = [_dict(v) for v in _dict(s.get("sites")).values()]
    site_vals = [v.get("val") for v in sites if "val" in v]
    return s.get("val") == {} and all(v == {} for v in site_vals)


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
    names = _site_names(run)
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
    unit = _unit_words(privacy.get("unit"), view)[0]
    return f"DP {unit + ', ' if unit else ''}ε ≤ {fmt_epsilon(_privacy_epsilon(privacy))}"


def _unit_words(unit: Any, view: TaskView | None = None) -> tuple[str | None, str | None, str]:
    """privmed.report.words.unit_words for the run's task (images or records)."""
    return unit_words(unit, tabular=bool(view and view.tabular))


def _privacy(privacy: Any, view: TaskView | None = None) -> dict:
    """The Privacy section (privmed.report.words.privacy_section) for the run's task."""
    return privacy_section(privacy, tabular=bool(view and view.tabular))


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
    """AUC, C-index, ECE and loss to 3 decimals, accuracies as a percentage, counts as integers;
    "n/a" for a missing or non-finite value."""
    x = _num(value)
    if x is None:
        return NA
    if name in ("accuracy", "balanced_accuracy"):
        return f"{100 * x:.1f}%"
    if name in COUNTS:
        return _int(x)
    if name.startswith(("hd95", "psnr")):
        return f"{x:.2f}"
    if name.startswith("nmse"):
        return f"{x:.4f}"
    return f"{x:.3f}"


def fmt_p(value: Any) -> str:
    """A p-value as "p = 0.031" (2 significant digits), "p < 0.0001", or "p n/a" when undefined."""
    x = _num(value)
    if x is None:
        return f"p {NA}"
    if x < 1e-4:
        return "p < 0.0001"
    return f"p = {x:.2g}"


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

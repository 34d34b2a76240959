"""The run's task as the report words and draws it (TaskView): which metric leads, what one test
item is, the rows of the headline table and the sites table's columns, from summary.json (the
config where an older summary is silent)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from privmed import catalog
from privmed.report import words
from privmed.report.run_files import RunFiles
from privmed.report.words import as_dict as _dict
from privmed.report.words import get as _get
from privmed.report.words import unit_words
from privmed.tasks.names import metric_label


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


PERSONALISED = tuple(s.name for s in catalog.STRATEGIES if s.personalised)  # strategies that keep one model per site


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
    def entry(self) -> catalog.Task:
        """The task's catalog entry; a task the catalog does not name (never written by privmed) is
        worded as a classification, as the report always has."""
        known = catalog.names(catalog.TASKS)
        return catalog.task(self.task if self.task in known else "classification")

    @property
    def dense(self) -> bool:
        """A target image per item (segmentation, reconstruction): no ROC, no calibration."""
        return self.entry.dense

    @property
    def metric(self) -> str:
        """The headline metric's key in the score dicts: the catalog's (privmed.catalog.Task.headline)."""
        return self.entry.headline

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


def task_view(run: RunFiles) -> TaskView:
    """The run's task as the report words it, from the run's typed facts (run.facts); a
    personalised run is one whose strategy keeps a model per site, or whose sites scored the
    pooled test set with their own models."""
    f = run.facts
    task = f.task or "classification"
    tabular = f.data.tabular
    if tabular is None:  # an older summary: a table's items have one dimension
        shape = f.data.image_shape
        tabular = task != "classification" or (shape is not None and len(shape) == 1)
    personalised = f.strategy in PERSONALISED or any(
        isinstance(_dict(v).get("test_pooled"), dict) for v in _dict(run.summary.get("sites")).values())
    names = f.data.class_names if task == "segmentation" else None
    return TaskView(task, tabular, personalised, names or (), f.data.spacing_mm)


def audit_units(run: RunFiles, view: TaskView | None = None) -> str:
    """What the audit asked about, plural: patients, or the data's items where its unit is one
    record (audit.json's unit; the run's unit of privacy before audits recorded theirs)."""
    view = view or task_view(run)
    unit = _get(run.audit, "unit")
    if unit not in ("patient", "record"):
        unit = run.facts.privacy_unit
    return words.unit_nouns(unit, tabular=view.tabular)


def view_unit_words(unit: Any, view: TaskView | None = None) -> tuple[str | None, str | None, str]:
    """privmed.report.words.unit_words for the run's task (images or records)."""
    return unit_words(unit, tabular=bool(view and view.tabular))

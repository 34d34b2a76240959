"""The audit's figures, only in a private report: the membership attacks' ROC curves and the
gradient inversion's originals beside their reconstructions (private/audit.json and
private/audit_inversion.npz)."""

from __future__ import annotations

import numpy as np

from privmed.report import plots
from privmed.report.figure import FigureOut
from privmed.report.run_files import RunFiles
from privmed.report.task_view import TaskView, audit_units
from privmed.report.words import as_dict as _dict
from privmed.report.words import as_int as _int
from privmed.report.words import fmt_epsilon
from privmed.report.words import get as _get
from privmed.report.words import num as _num


def inversion_figure(run: RunFiles) -> FigureOut | None:
    """Originals and their gradient-inversion reconstructions, per attacked setting (audit.json and
    audit_inversion.npz), or None when no inversion audit ran."""
    settings = _dict(_get(run.audit, "inversion", "settings"))
    rows = []
    for key, r in settings.items():
        o, rec, p = (run.inversion_images.get(f"{key}__{part}") for part in ("originals", "reconstructions", "psnr"))
        if o is None or rec is None or p is None or o.ndim != 4 or o.shape[1:] != rec.shape[1:] or p.shape != rec.shape[:1]:
            continue
        rows.append((inversion_label(key, _dict(r)), o, rec, p))
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


def inversion_label(key: str, r: dict) -> str:
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


def audit_figure(run: RunFiles, view: TaskView | None = None) -> FigureOut | None:
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
    units = audit_units(run, view)
    caption = (
        "Membership inference against the selected model (privmed audit): for each attack, the share "
        f"of training {units} it finds (true positive rate) against the share of other {units} it "
        f"wrongly calls members (false positive rate), on log axes, where the {units} an attacker can "
        "name with confidence show. The dashed line is guessing."
    )
    return FigureOut("audit_membership", "Audit: membership inference", caption,
                     png=plots.membership_roc(curves, n_out))

"""The report's Audit section (private/audit.json): in a private report the attacks' results, in
a shareable one which attacks ran and where their results are."""

from __future__ import annotations

from privmed.catalog import PrivacyMode
from privmed.report.figures_audit import inversion_label
from privmed.report.private import PRIVATE_DIR
from privmed.report.released import released_inversion_of_run
from privmed.report.run_files import RunFiles
from privmed.report.task_view import TaskView, audit_units, view_unit_words
from privmed.report.words import NA, fmt_bound, fmt_epsilon, fmt_lower_bound, fmt_seconds
from privmed.report.words import as_dict as _dict
from privmed.report.words import as_int as _int
from privmed.report.words import ci_text as _ci
from privmed.report.words import num as _num


def audit_section(run: RunFiles, view: TaskView | None = None) -> dict | None:
    """The Audit section from private/audit.json: the epsilon the run claims and, in a private
    report, the membership attacks, one row per attack (what it sees, ROC-AUC and TPR at low FPR
    with their 95% intervals), when they ran; and gradient inversion, one row per update attacked
    (PSNR and SSIM, the one this run released marked), when it ran. In a shareable report, which
    attacks ran and what each attacker sees, and where the results are; none of them."""
    a = run.audit
    if not a:
        return None
    units = audit_units(run, view)
    claimed = _dict(a.get("claimed"))
    eps = _num(claimed.get("epsilon"))
    bound = _num(claimed.get("max_roc_auc"))
    membership = "attacks" in a
    if eps is None:
        claim = "The run claims no differential-privacy guarantee: nothing bounds what these attacks find."
    else:
        unit = view_unit_words(run.facts.privacy_unit, view)[1]
        claim = f"The run claims epsilon {fmt_epsilon(eps)} at delta {claimed.get('delta')}"
        claim += f"; its unit of privacy is {unit}." if unit else "."
        if claimed.get("mode") == PrivacyMode.CENTRAL:
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
        label = inversion_label(key, r).replace("\n", ", ")
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

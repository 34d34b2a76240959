"""A site's statement's audit section: what the run's epsilon bounds, each attack with what its
attacker assumes and, on a private page, what each found (decided from the files read)."""

from __future__ import annotations

import os

from privmed.catalog import PrivacyMode
from privmed.report.private import PRIVATE_DIR
from privmed.report.released import released_inversion_of_run
from privmed.report.statement_files import AUDIT_FILE, StatementFiles, default_name
from privmed.report.words import (
    NA,
    as_dict,
    as_int,
    ci_text,
    fmt_bound,
    fmt_clock,
    fmt_day,
    fmt_epsilon,
    fmt_lower_bound,
    fmt_number,
    get,
    num,
    utc_time,
)


def audit_section(f: StatementFiles, g: dict, units: str = "patients") -> dict:
    """The audit section: what the run's epsilon bounds, each attack with what its attacker
    assumes, and (on a private page) what each found; on a shareable page, where those results are
    instead of them."""
    a = f.audit
    if a is None:
        return {"run": False, "command": f"privmed audit {f.path}"}
    attacks = {n: as_dict(r) for n, r in as_dict(a.get("attacks")).items()}
    sees = {str(r.get("sees")) for r in attacks.values() if r.get("sees")}
    shared, sharing = _shared_assumption({str(r.get("title") or n): str(r.get("assumes") or "")
                                          for n, r in attacks.items()})
    rows = [_attack_row(name, r, common=len(sees) == 1, shared=shared) for name, r in attacks.items()]
    claimed = as_dict(a.get("claimed"))
    bound = num(claimed.get("max_roc_auc"))
    if num(claimed.get("epsilon")) is None:
        claim = "The run claims no differential-privacy guarantee: nothing bounds what these attacks find."
    elif bound is not None:
        claim = (f"The guarantee (epsilon {fmt_epsilon(claimed.get('epsilon'))}, the largest any site "
                 f"spent) bounds any such attack's ROC-AUC by {fmt_bound(bound)}, whatever the attacker"
                 + (" (at this epsilon, no limit in practice)." if fmt_bound(bound) == "1.000" else "."))
    else:
        claim = (f"The run claims epsilon {fmt_epsilon(claimed.get('epsilon'))}"
                 + (f" for each site as a whole: it bounds a site's membership, not a {units[:-1]}'s."
                    if claimed.get("mode") == PrivacyMode.CENTRAL else "."))
    created = utc_time(a.get("created"))
    last = max((t for t in (utc_time(r.get("finished")) for r in f.metrics) if t is not None), default=None)
    stale = created is not None and last is not None and created < last
    out = {"run": True, "rows": rows, "sees": sees.pop() if len(sees) == 1 else None, "claim": claim,
           "shared": shared, "sharing": sharing, "setting": None, "withheld": None,
           "created": f"{fmt_day(created)} {fmt_clock(created)} UTC" if created else NA, "stale": stale}
    if a.get("withheld"):
        return {**out, "others": [f"{t}: ran" for t in _other_titles(a)], "withheld": {
            "file": AUDIT_FILE, "command": f"privmed statement {f.path} --site {f.site} --private",
            "page": f"{PRIVATE_DIR}/{default_name(f.site)}"}}
    cand, shadows = as_dict(a.get("candidates")), as_dict(a.get("shadows"))
    setting = (f"Asked about {as_int(cand.get('members'))} training {units} of all sites (not only "
               f"{f.site}'s) and {as_int(cand.get('non_members'))} {units} no site trained on")
    if shadows:
        setting += f"; {as_int(shadows.get('trained'))} shadow runs trained"
    return {**out, "setting": setting, "others": _other_findings(f, a, units)}


def _other_titles(a: dict) -> list[str]:
    """The titles of the attacks beyond membership that audit.json records."""
    return [str(as_dict(a.get(k)).get("title") or k) for k in ("canaries", "input-canaries", "inversion", "attribute")
            if as_dict(a.get(k))]


def _other_findings(f: StatementFiles, a: dict, units: str = "patients") -> list[str]:
    """One plain sentence for each attack beyond membership that audit.json holds: gradient
    canaries and input canaries (lower bounds on epsilon, white box and black box), gradient
    inversion (images rebuilt from the update this run released), attribute inference."""
    out = []
    kinds = (("canaries", f"Canary {units} added {{where}}, scored from its updates (white box: a test "
                          "of the guarantee itself)"),
             ("input-canaries", f"Mislabelled canary {units} added {{where}}, scored from the final model alone "
                                "(black box, weaker than white box)"))
    for key, words in kinds:
        c = as_dict(a.get(key))
        if c:
            out.append(_canary_finding(c, f.site, words))
    inversion = as_dict(a.get("inversion"))
    if inversion:
        out.append(_inversion_finding(f, inversion))
    at = as_dict(a.get("attribute"))
    if at:
        m = as_dict(as_dict(at.get("members")).get("attack")), as_dict(as_dict(at.get("members")).get("baseline"))
        if num(m[0].get("accuracy")) is not None:
            out.append(f"Guessing each training {units[:-1]}'s {at.get('attribute')} from the model: right for "
                       f"{100 * num(m[0]['accuracy']):.1f}%, against {100 * num(m[1].get('accuracy')):.1f}% "
                       "by guessing the commoner value.")
    return out


def _inversion_finding(f: StatementFiles, inversion: dict) -> str:
    """Gradient inversion in one sentence, of the update this run released (privmed.report.released):
    the DP-SGD update under DP-SGD, the secure sum under secure aggregation, else the plain update."""
    released = released_inversion_of_run(inversion, f.summary, f.config)
    head = f"Images rebuilt by the coordinator from what this run released, {released.words}"
    if released.key is None:
        return (f"{head}: the audit attacked no such update (its other settings are updates this run "
                "never sent); run privmed audit --attack inversion again to attack it.")
    r = released.setting
    return (f"{head} (gradient inversion; attacked as {_setting_words(r)}): PSNR "
            f"{num(get(r, 'psnr', 'mean')):.1f} dB, SSIM {num(get(r, 'ssim', 'mean')):.2f}, where the "
            f"data's mean image scores {num(r.get('psnr_mean_image')):.1f} dB.")


def _setting_words(r: dict) -> str:
    """An attacked setting in a few words: the batch, the local work, the noise."""
    batch = as_int(r.get("batch"))
    work = "one local step" if r.get("local") == "step" else f"one local epoch ({as_int(r.get('local_steps'))} steps)"
    text = (f"{batch} per site, {work}, rebuilt as {r.get('rebuilt_as', NA)}" if r.get("view") == "secure-sum"
            else f"a batch of {batch}, {work}")
    if num(r.get("noise_multiplier")) is not None:
        text += f", noise multiplier {fmt_number(r.get('noise_multiplier'))}"
    return text


def _canary_finding(c: dict, site: str, words: str) -> str:
    """A canary audit's lower bound on epsilon in one sentence that opens with `words` ({where}: at
    this site, or at site X), beside the epsilon the site claims."""
    lower, claimed = num(c.get("epsilon_lower")), num(c.get("claimed_epsilon"))
    where = "at this site" if c.get("site") == site else f"at site {c.get('site')}"
    text = (words.format(where=where) + f": epsilon is at least {fmt_lower_bound(lower)} at "
            f"{100 * num(c.get('confidence')):.0f}% confidence")
    if claimed is None:
        return text + "; the run claims no guarantee."
    if lower is not None and lower > claimed:
        return text + f", ABOVE the claimed {fmt_epsilon(claimed)}: the claim does not hold."
    return text + f", consistent with the claimed {fmt_epsilon(claimed)}."


def _shared_assumption(assumes: dict[str, str]) -> tuple[str, list[str]]:
    """The longest opening, ending at a word, that the assumptions of two or more attacks share
    (the shadow-model attacks' common ground, said once on the page), and the titles of the
    attacks that share it; ('', []) when none shares 40 characters or more."""
    best = ""
    texts = [t for t in assumes.values() if t]
    for i, a in enumerate(texts):
        for b in texts[i + 1:]:
            common = os.path.commonprefix([a, b])
            if common not in (a, b):  # cut back to the last whole word
                common = common[: common.rfind(" ")] if " " in common else ""
            common = common.rstrip(" ;,(")
            if len(common) > len(best):
                best = common
    if len(best) < 40:
        return "", []
    return best, [title for title, text in assumes.items() if text.startswith(best)]


def _attack_row(name: str, r: dict, common: bool, shared: str = "") -> dict:
    title = str(r.get("title") or name)
    assumes = str(r.get("assumes") or NA)
    if shared and assumes.startswith(shared):
        rest = assumes[len(shared):].lstrip(" ;,")
        assumes = "as above" + (f"; {rest}" if rest and not rest.startswith("(") else f" {rest}" if rest else "")
    if not common and r.get("sees"):
        assumes = f"sees {r['sees']}; {assumes}"
    if "roc_auc" not in r and "skipped" not in r:  # a shareable page: the results stay private
        return {"title": title, "assumes": assumes, "auc": "", "found": ""}
    if "skipped" in r:
        return {"title": title, "assumes": assumes, "auc": f"not run: {r['skipped']}", "found": ""}
    auc = num(r.get("roc_auc"))
    auc_text = NA if auc is None else f"{auc:.3f}{ci_text(r.get('roc_auc_ci'))}"
    tpr = num(get(r, "tpr_at_fpr", "0.01"))
    if tpr is None:
        found = f"not measurable with {as_int(r.get('n_nonmembers'))} non-members"
    else:
        found = f"{100 * tpr:.1f}%{ci_text(get(r, 'tpr_at_fpr_ci', '0.01'), percent=True)}"
    return {"title": title, "assumes": assumes, "auc": auc_text, "found": found}

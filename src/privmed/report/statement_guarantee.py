"""What a site's statement says of its guarantee (decided from the files read, nothing here reads
a file): the epsilon it spent against its budget, where that figure comes from, its scoring of
validation and test patients, its own ledger, and what the guarantee does not cover."""

from __future__ import annotations

import math

from privmed.catalog import PrivacyMode
from privmed.privacy.figures import format_epsilon
from privmed.privacy.ledger import LEDGER_FILE
from privmed.report.statement_files import StatementFiles
from privmed.report.statement_read import shown
from privmed.report.words import (
    NA,
    as_dict,
    as_int,
    fmt_budget,
    fmt_epsilon,
    fmt_number,
    get,
    num,
    privacy_section,
    unit_words,
)


def guarantee_of(f: StatementFiles, tabular: bool) -> dict:
    """The guarantee for this site: status 'private' (with its figures), 'none' or 'unknown'."""
    privacy = get(f.summary, "privacy")
    if privacy is None and f.ledger is not None:  # an unfinished run: the ledger says what it can
        privacy = {"mode": get(f.config, "privacy", "mode"), "unit": f.ledger.unit,
                   "mechanism": f.ledger.mechanism, "delta": f.ledger.delta,
                   "accountant": f.ledger.accountant, "budget_epsilon": f.ledger.budget_epsilon,
                   "max_grad_norm": get(f.config, "privacy", "max_grad_norm")}
    if privacy is None and f.mode == PrivacyMode.NONE:
        privacy = {"mode": "none"}
    if privacy is None and f.summary is None:
        return {"status": "unknown", "notice": (
            f"Not stated: the run was configured with privacy.mode {f.mode}, but neither "
            f"summary.json nor {LEDGER_FILE} is in the run directory to say what was spent.")}
    section = privacy_section(privacy, tabular)
    if section["status"] != "private":
        return {"status": section["status"], "notice": section["notice"]}
    per_unit, unit_text, _ = unit_words(privacy.get("unit"), tabular)
    eps, eps_from = _site_epsilon(f, privacy)
    budget = f.ledger.budget_epsilon if f.ledger is not None else num(privacy.get("budget_epsilon"))
    eps_text = fmt_epsilon(eps)
    out = {
        "status": "private", "mode": privacy.get("mode"), "unit": privacy.get("unit"),
        "per_unit": per_unit or "", "unit_text": unit_text or str(privacy.get("unit") or NA),
        "epsilon": eps_text, "epsilon_from": eps_from, "delta": fmt_number(privacy.get("delta")),
        "budget": fmt_budget(budget), "share": _share(eps, budget),
        "odds": _odds(eps_text),
        # the report's terms (mechanism, accountant, clipping norm); unit, delta and budget are above
        "terms": [row for row in section["rows"] if row[0] not in ("Unit of privacy", "Budget", "Delta")
                  and not row[0].startswith(("Validation and test", "Against a coordinator"))],
        "own": _own_ledger(f),
        "scoring": _scoring(f, privacy, tabular),
        "honest": None if privacy.get("honest_secure_epsilon") is None else {
            "epsilon": fmt_epsilon(privacy.get("honest_secure_epsilon")),
            "min_sites": as_int(privacy.get("honest_min_sites"))},
    }
    return out


def _scoring(f: StatementFiles, privacy: dict, tabular: bool) -> dict | None:
    """The second line: the site's validation and test patients, from the noisy counts of every
    scoring it released; None for a run whose scores went without noise."""
    plan = as_dict(privacy.get("scoring"))
    if not plan:
        return None
    splits = {"val": "validation", "test": "test"}
    if f.ledger is not None and f.ledger.scorings(f.site):
        eps = {sp: f.ledger.scoring_epsilon(f.site, sp) for sp in splits}
        made = {sp: len(f.ledger.scorings(f.site, sp)) for sp in splits}
        source = f"{LEDGER_FILE}, recomputed from {sum(made.values())} scoring{'s' if sum(made.values()) != 1 else ''}"
    else:
        eps = {sp: num(get(plan, "sites", f.site, sp)) for sp in splits}
        made = {}
        source = f"summary.json ({LEDGER_FILE} records no scoring of this site)"
    known = [e for e in eps.values() if e is not None]
    own = f.site_ledger
    return {
        "epsilon": fmt_epsilon(max(known)) if known else NA,
        "splits": "; ".join(f"{name}: epsilon {fmt_epsilon(eps[sp])}"
                            + (f" over {made[sp]} scoring{'s' if made[sp] != 1 else ''}" if sp in made else "")
                            for sp, name in splits.items() if eps[sp] is not None),
        "from": source,
        "unit": unit_words(plan.get("unit") or "patient", tabular)[1],
        "own": None if own is None else fmt_epsilon(max(own.scoring_epsilon(sp) for sp in splits)),
    }


def _site_epsilon(f: StatementFiles, privacy: dict) -> tuple[float | None, str]:
    """The site's epsilon for this run and where it comes from: the ledger's releases, recomputed
    (as `privmed privacy spent` does); summary.json's figure only when the ledger is missing."""
    if f.ledger is not None and f.site in f.ledger.sites:
        n = len(f.ledger.releases(f.site))
        return f.ledger.epsilon(f.site), f"{LEDGER_FILE}, recomputed from {n} release{'s' if n != 1 else ''}"
    eps = num(get(privacy, "sites", f.site))
    if eps is not None:
        return eps, f"summary.json ({LEDGER_FILE} is missing, so it could not be checked)"
    return None, f"not recorded: neither {LEDGER_FILE} nor summary.json gives it"


def _share(eps: float | None, budget: float | None) -> str:
    """The share of the budget spent, in percent rounded up ("99.4%"); '' when undefined."""
    if eps is None or budget is None or not math.isfinite(budget) or budget <= 0:
        return ""
    return f"{math.ceil(1000 * eps / budget - 1e-9) / 10:.1f}%"


def _odds(eps_text: str) -> str:
    """e^epsilon of the epsilon as shown, rounded up to 2 significant digits, in plain digits."""
    try:
        x = math.exp(float(eps_text))
    except (ValueError, OverflowError):
        return ""
    up = float(format_epsilon(x, 2))
    return f"{up:,.0f}" if up >= 100 else f"{up:g}"


def _own_ledger(f: StatementFiles) -> dict | None:
    """The site's own ledger: its epsilon over every release it made (any run) against its own
    budget, and whether it agrees with the coordinator's ledger on this run."""
    own = f.site_ledger
    if own is None:
        return None
    runs = {r.run for r in own.releases}
    agrees = None
    if f.run_id is not None and f.ledger is not None and f.site in f.ledger.sites:
        agrees = own.releases_of(f.run_id) == f.ledger.releases(f.site)
    where = NA if f.site_ledger_file is None else shown(f.site_ledger_file, f.path)
    return {"epsilon": fmt_epsilon(own.epsilon), "budget": fmt_budget(own.budget_epsilon)
            if math.isfinite(own.budget_epsilon) else "no limit set",
            "share": _share(own.epsilon, own.budget_epsilon), "releases": len(own.releases),
            "runs": len(runs), "file": where, "agrees": agrees}


def not_covered(f: StatementFiles, g: dict, items: str, units: str = "patients") -> list[str]:
    """What the guarantee does not cover, for this site, in plain words."""
    if g["status"] == "none":
        return ["Everything: without differential privacy there is no formal guarantee, and what "
                "left the site (above) may reveal its patients."]
    if g["status"] != "private":
        return ["Nothing can be stated as covered: the files that record the guarantee are missing."]
    site = as_dict(get(f.summary, "sites", f.site))
    out = []
    if g["unit"] == "record":
        out.append(f"A patient with several {items}: the unit is one {items[:-1]}, so k {items} of one "
                   "patient have only k × epsilon (and k × e^((k−1) × epsilon) × delta).")
    if g["unit"] in ("patient", "record"):
        out.append("A patient treated at several participating hospitals: each hospital's guarantee "
                   "holds on its own; together they add up.")
    if g.get("scoring") is None:
        held_out = (f"Its validation and test patients ({as_int(site.get('n_val'))} and {as_int(site.get('n_test'))} "
                    f"{items})" if units == "patients" else
                    f"Its {as_int(site.get('n_val'))} validation and {as_int(site.get('n_test'))} test {units}")
        out.append(f"{held_out}: their scores and counts went without noise (each one's rounded score "
                   "and class, not who they are).")
    out.append("Its public facts: its counts, the data's shape and classes, and when its replies arrived.")
    rule = get(f.summary, "selection_rule") or get(f.config, "federation", "model_selection")
    if rule == "best-validation":
        out.append("The choice of the final model, made on those validation scores.")
    elif rule != "last":
        out.append(f"The choice of the final model, if validation scores made it (summary.json: "
                   f"{get(f.summary, 'selection') or NA}).")
    out.append("Settings tuned on this hospital's data outside this run (the run's ledger counts "
               "this run only" + ("; its own ledger, every run)." if g["own"] else ")."))
    out.append(f"{units.capitalize()} the model is later used on or fine-tuned with (using the model "
               f"reveals nothing more about the training {units}).")
    if f.simulated and g["mode"] == PrivacyMode.DP_SGD:
        out.append(f"Anyone holding the run directory's private/ folder: it holds {f.site}'s secret "
                   "key, from which its noise derives. Never share it.")
    return out

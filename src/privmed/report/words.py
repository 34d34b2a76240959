"""Numbers, times and privacy in words, shared by the run report (report.html) and the privacy
statement (statement-SITE.html): every epsilon rounded UP (never below what the ledger backs), the
unit of privacy in plain words, times in UTC to the minute, and the tolerant accessors both read run
files with (a missing or non-finite value reads "n/a", never a traceback)."""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any

import numpy as np

from privmed.catalog import PrivacyMode
from privmed.privacy.figures import format_budget, format_epsilon

NA = "n/a"
ACCOUNTANTS = {  # summary['privacy']['accountant'] -> what the report calls it
    "prv": "PRV (privacy random variables, Gopi et al. 2021, via Opacus)",
    "rdp": "RDP (Rényi DP, via Opacus)",
    "pld": "PLD (privacy loss distributions, via Google's dp-accounting)",
}
PRIVATE_MODES = (PrivacyMode.DP_SGD, PrivacyMode.CENTRAL)
UNITS = {  # summary['privacy']['unit'] -> (guarantee wording, unit of privacy; {item}/{items}: the noun)
    "patient": ("per patient", "one patient, with all of their {items}"),
    # Group privacy: (eps, delta) per record gives (k eps, k e^((k-1) eps) delta) for k records.
    "record": ("per {item}", "one {item}, not one patient: the data names no patient ids, so each {item} "
               "counts as its own patient, and a patient with k {items} has only the group guarantee "
               "(k × epsilon, k × e^((k−1) × epsilon) × delta)"),
    "site": ("per site", "one whole site, all of its patients together"),
}
UNIT_COUNTS = {"patient": "Patients", "record": "{Items}", "site": "Patients"}  # the plan's n_patients


def privacy_status(privacy: Any) -> str:
    """"private", "none" (trained without differential privacy) or "unknown" (not recorded)."""
    if not isinstance(privacy, dict):
        return "unknown"
    if privacy.get("mode") == PrivacyMode.NONE:
        return "none"
    if privacy.get("mode") in PRIVATE_MODES or num(privacy.get("epsilon")) is not None:
        return "private"
    return "unknown"


def privacy_epsilon(privacy: dict) -> float | None:
    """The run's epsilon: the largest any site spent."""
    eps = num(privacy.get("epsilon"))
    if eps is None:
        eps = max((x for x in map(num, as_dict(privacy.get("sites")).values()) if x is not None),
                  default=None)
    return eps


def unit_words(unit: Any, tabular: bool = False) -> tuple[str | None, str | None, str]:
    """(guarantee wording, unit of privacy in words, heading of the plan's unit count) for the
    summary's unit; None, None for a unit this report does not know. `tabular`: the data is a
    table (its items are records), else images."""
    item, items = ("record", "records") if tabular else ("image", "images")
    words, text = UNITS.get(unit, (None, None)) if isinstance(unit, str) else (None, None)
    count = UNIT_COUNTS.get(unit, "Patients") if isinstance(unit, str) else "Patients"
    fill = {"item": item, "items": items, "Items": items.capitalize()}
    return (
        None if words is None else words.format(**fill),
        None if text is None else text.format(**fill),
        count.format(**fill),
    )


def unit_nouns(unit: Any, tabular: bool = False) -> str:
    """What one unit of privacy is, plural, as a page counts and names them: 'patients' for the
    unit 'patient'; the data's items ('images', or 'records' for a table) for 'record', where each
    item counts as its own patient; 'patients' otherwise (a site's patients; no unit recorded)."""
    if unit == "record":
        return "records" if tabular else "images"
    return "patients"


def privacy_section(privacy: Any, tabular: bool = False) -> dict:
    """The Privacy section: the guarantee in a sentence, its terms, each site's spend and plan, and
    what the guarantee covers (the runner's statement, verbatim)."""
    status = privacy_status(privacy)
    privacy = as_dict(privacy)
    statement = privacy.get("statement")
    statement = str(statement) if statement else None
    if status == "none":
        if statement is None:
            statement = "the model and its updates may reveal the patients they were trained on."
        if not statement.lower().startswith("no differential privacy"):
            statement = "No differential privacy: " + statement
        return {"status": status, "notice": statement}
    if status == "unknown":
        return {"status": status, "notice": (
            "Privacy: not recorded. This run's summary.json has no privacy entry (it was written "
            "before privmed reported privacy), so this report cannot state a differential-privacy "
            "guarantee for the model.")}
    per_unit, unit_text, unit_count = unit_words(privacy.get("unit"), tabular)
    delta = fmt_number(privacy.get("delta"))
    budget = num(privacy.get("budget_epsilon"))
    guarantee = (
        f"Differential privacy{' ' + per_unit if per_unit else ''}: epsilon ≤ "
        f"{fmt_epsilon(privacy_epsilon(privacy))} at delta = {delta} for every site."
    )
    accountant = privacy.get("accountant")
    rows = [
        ("Mechanism", str(privacy.get("mechanism") or NA)),
        ("Unit of privacy", unit_text or str(privacy.get("unit") or NA)),
        ("Delta", delta),
        ("Accountant", ACCOUNTANTS.get(accountant, str(accountant or NA))),
        ("Budget", NA if budget is None else f"epsilon ≤ {fmt_budget(budget)} per site"),
        ("Clipping norm", fmt_number(privacy.get("max_grad_norm"))),
    ]
    scoring = as_dict(privacy.get("scoring"))
    if scoring:
        releases, noise = as_dict(scoring.get("releases")), as_dict(scoring.get("noise_multiplier"))
        names = {"val": "validation", "test": "test"}
        how = "; ".join(f"{names.get(sp, sp)}: {as_int(n)} scoring{'s' if n != 1 else ''} per site, noise "
                        f"{fmt_number(noise.get(sp))}" for sp, n in releases.items())
        scored = "records" if scoring.get("unit") == "record" else "patients"
        rows.append((f"Validation and test {scored}",
                     f"epsilon ≤ {fmt_epsilon(scoring.get('epsilon'))} at delta = {delta}, from the noisy "
                     f"counts of every scoring ({how})"))
    honest = privacy.get("honest_secure_epsilon")
    if honest is not None:
        rows.append(("Against a coordinator that follows SecAgg+",
                     f"epsilon ≤ {fmt_epsilon(honest)} per site (the sum of at least "
                     f"{as_int(privacy.get('honest_min_sites'))} sites' noise shares)"))
    spent, plan = as_dict(privacy.get("sites")), as_dict(privacy.get("plan"))
    sites = []
    for name in dict.fromkeys([*plan, *spent]):
        p = as_dict(plan.get(name))
        sites.append({"name": str(name), "cells": [
            as_int(p.get("n_patients")), fmt_epsilon(spent.get(name)), fmt_budget(budget),
            fmt_number(p.get("noise_multiplier")), fmt_number(p.get("sample_rate")),
            as_int(p.get("steps")), as_int(p.get("turns")),
        ]})
    return {"status": status, "guarantee": guarantee, "rows": rows, "sites": sites,
            "unit_count": unit_count, "statement": statement}


# ---------------------------------------------------------------------------------------- formatting


def fmt_number(value: Any) -> str:
    """An integer as one ("1,000"), else 4 significant digits; "n/a" for a missing value."""
    x = num(value)
    if x is None:
        return NA
    if float(x).is_integer() and abs(x) < 1e15:
        return as_int(x)
    return f"{x:.4g}"


def fmt_epsilon(value: Any) -> str:
    """Epsilon rounded UP to 3 significant digits (never below the ledger's figure); "n/a" for a
    missing or non-finite value."""
    x = num(value)
    return NA if x is None or x < 0 else format_epsilon(x)


def fmt_budget(value: Any) -> str:
    """A budget epsilon as the run's config gave it ("8"); a computed one (fixed noise) rounded up."""
    x = num(value)
    return NA if x is None or x <= 0 else format_budget(x)


def fmt_lower_bound(value: Any, decimals: int = 3) -> str:
    """A lower bound (the canaries' epsilon) rounded DOWN to `decimals` decimals: printed above its
    value it would claim a larger leak than the audit proved."""
    x = num(value)
    if x is None:
        return NA
    scale = 10**decimals
    return f"{math.floor(x * scale + 1e-9) / scale:.{decimals}f}"


def fmt_bound(value: Any, decimals: int = 3) -> str:
    """An upper bound (an attack's highest possible ROC-AUC) rounded UP to `decimals` decimals
    ("0.982"): printed below its value it would claim more than the epsilon backs."""
    x = num(value)
    if x is None:
        return NA
    scale = 10**decimals
    return f"{math.ceil(x * scale - 1e-9) / scale:.{decimals}f}"


def fmt_seconds(value: Any) -> str:
    """A duration: "12.3 s", "4 min 05 s" or "2 h 03 min"."""
    x = num(value)
    if x is None:
        return NA
    if x < 60:
        return f"{x:.1f} s"
    minutes, seconds = divmod(round(x), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def ci_text(ci: Any, percent: bool = False) -> str:
    """' (lo–hi)' of an interval [lo, hi] (as percentages with `percent`); '' without one."""
    if not isinstance(ci, list) or len(ci) != 2 or any(num(c) is None for c in ci):
        return ""
    lo, hi = (num(c) for c in ci)
    return f" ({100 * lo:.1f}–{100 * hi:.1f}%)" if percent else f" ({lo:.3f}–{hi:.3f})"


def as_int(value: Any) -> str:
    """A count with thousands separators ("1,570"); "n/a" for a missing or non-finite value."""
    x = num(value)
    return NA if x is None else f"{int(round(x)):,}"


def num(value: Any) -> float | None:
    """A finite number, or None for None, NaN, infinities, booleans and non-numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return None
    x = float(value)
    return x if math.isfinite(x) else None


def get(obj: Any, *keys: str) -> Any:
    """obj[k1][k2]...; None where a level is missing or not a dict."""
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def as_dict(obj: Any) -> dict:
    return obj if isinstance(obj, dict) else {}


# ---------------------------------------------------------------------------------------- times


def utc_time(value: Any) -> _dt.datetime | None:
    """An ISO 8601 time (as run files record them) in UTC; None when missing or unreadable."""
    if not isinstance(value, str):
        return None
    try:
        t = _dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return t.astimezone(_dt.timezone.utc) if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


def fmt_day(t: _dt.datetime) -> str:
    """'2025-11-28'."""
    return t.strftime("%Y-%m-%d")


def fmt_clock(t: _dt.datetime) -> str:
    """'16:51' (to the minute)."""
    return t.strftime("%H:%M")


def fmt_span(times: list[_dt.datetime]) -> str:
    """'2025-11-28 16:51 UTC', '2025-11-28 16:51–17:02 UTC' or '2025-11-28 16:51 to 2025-11-29 09:10 UTC'."""
    a, b = min(times), max(times)
    if fmt_clock(a) == fmt_clock(b) and a.date() == b.date():
        return f"{fmt_day(a)} {fmt_clock(a)} UTC"
    if a.date() == b.date():
        return f"{fmt_day(a)} {fmt_clock(a)}–{fmt_clock(b)} UTC"
    return f"{fmt_day(a)} {fmt_clock(a)} to {fmt_day(b)} {fmt_clock(b)} UTC"

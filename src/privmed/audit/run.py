"""`privmed audit RUN_DIR`: attack a finished run's model (membership) or the updates its sites
send (gradient inversion) and write what leaked to RUN_DIR/private/audit.json.

The attacks run with the sites' patients in hand, so their results are computed from patients
outside the DP mechanism: they stay in the run directory's owner-only private/ folder, with the
report that shows them beside the epsilon the run claims (private/report.html). The shareable
report.html only says that the audit ran, which attacks, and what each attacker assumes
(privmed.report.private)."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from privmed import io
from privmed.catalog import PrivacyMode
from privmed.audit import mia
from privmed.audit.attacks import ATTACKS, UPDATE_ATTACKS, AttackData
from privmed.audit.attribute import attribute_audit
from privmed.audit.canaries import canary_audit, canary_site
from privmed.audit.input_canaries import input_canary_audit
from privmed.audit.inversion import InversionSettings
from privmed.audit.inversion_audit import default_settings, run_inversion, write_images
from privmed.audit.membership import Target, draw_candidates, load_target, logits_of, train_shadows
from privmed.audit.updates import Setting
from privmed.catalog import PrivacyMode
from privmed.errors import ConfigError
from privmed.report.private import AUDIT_FILE  # noqa: F401 (older callers import it from here)
from privmed.report.private import audit_file, move_legacy, private_dir
from privmed.report.released import released_inversion_of_run
from privmed.report.words import unit_nouns
from privmed.tasks.base import get_task

UNITS = {  # the unit of membership: what one candidate is
    "patient": "patient: a patient's items are included or left out together, and a patient's score "
               "is that of its first item",
    "record": "record: the data names no patients, so each item counts as its own patient, as in "
              "the run's guarantee",
}
# The one-run audits of epsilon (white box, black box): each trains the run again with m canaries.
_CANARY_AUDITS = {
    "canaries": (canary_audit, "gradient canaries"),
    "input-canaries": (input_canary_audit, "input canaries (mislabelled images)"),
}
CANARY_ATTACKS = tuple(_CANARY_AUDITS)


def audit(
    run_dir: Path, attacks: list[str] | None = None, *, shadows: int = 8, candidates: int = 500,
    budget_s: float | None = None, seed: int = 0, progress: Callable[[str], None] | None = None,
    inversion: InversionOptions | None = None, canaries: int = 1000, site: str | None = None,
    attribute: str | None = None, non_members: str = "test",
) -> dict:
    """Run `attacks` (default: all the membership attacks; 'inversion' when named) against the run
    in `run_dir` and write RUN_DIR/private/audit.json (what an earlier audit found for the kind of
    attack not run this time is kept), the inversion's images to private/audit_inversion.npz and,
    when the run has a report, private/report.html with the results and report.html without them.
    Files an older privmed wrote outside private/ are moved there first (said through `progress`). `shadows`: shadow runs for the attacks that need them (fewer when
    `budget_s` runs out); `candidates`: member and non-member patients asked about (each);
    `inversion`: the gradient-inversion settings; `canaries`, `site`: how many canaries (gradient
    canaries, white box; input canaries, black box), at which site (default: the first);
    `attribute`: the feature attribute inference guesses (default: sex, or the first binary one);
    `non_members`: where membership's non-members come from ('test' or 'validation', see
    draw_candidates). Returns what was written."""
    names = list(attacks or ATTACKS)
    membership = _membership_attacks(names, shadows)
    say = progress or (lambda _msg: None)
    run_dir = Path(run_dir)
    target = _target(run_dir, say)
    previous = _previous(run_dir)
    if any(n in CANARY_ATTACKS for n in names):  # refused before any attack trains
        canary_site(target, canaries, site)
    out = {"run": run_dir.name, "claimed": _claimed(target), "unit": _unit(target),
           "unit_meaning": UNITS[_unit(target)]}
    if membership:
        out.update(_membership(target, membership, shadows, candidates, budget_s, seed, say, non_members,
                               _nouns(target, out["unit"])))
    else:
        out.update({k: v for k, v in previous.items()
                    if k not in ("run", "claimed", "unit", "unit_meaning", *UPDATE_ATTACKS)})
    _canaries_and_attribute(out, previous, names, target, canaries=canaries, seed=seed, site=site,
                            attribute=attribute, say=say)
    _inversion(out, previous, names, target, run_dir, inversion, seed, say)
    if out["unit"] != "patient":
        out = _in_units(out, _nouns(target, out["unit"])[:-1])
    _write(run_dir, out)
    return out


def _membership_attacks(names: list[str], shadows: int) -> list[str]:
    """The membership attacks among `names`; ConfigError for an unknown name, or too few shadows."""
    unknown = [n for n in names if n not in ATTACKS and n not in UPDATE_ATTACKS]
    if unknown:
        allowed = ", ".join([*ATTACKS, *UPDATE_ATTACKS])
        raise ConfigError(f"--attack: unknown attack '{unknown[0]}' (allowed: {allowed})")
    membership = [n for n in names if n in ATTACKS]
    if shadows < 1 and any(ATTACKS[n].needs_shadows for n in membership):
        raise ConfigError(f"--shadows: {shadows}; attacks {', '.join(n for n in membership if ATTACKS[n].needs_shadows)} need at least 1")
    return membership


def _target(run_dir: Path, say: Callable[[str], None]) -> Target:
    """The run's target, after moving an older privmed's files into private/; ConfigError for a
    dense task, which no attack audits yet."""
    target = load_target(run_dir)
    for line in move_legacy(run_dir):
        say(line)
    if get_task(target.config.task).dense:
        raise ConfigError(f"{run_dir}: task '{target.config.task}' is not audited yet: privmed's attacks "
                          "score class labels (membership, canaries, attribute) or invert classifiers' updates")
    return target


def _canaries_and_attribute(
    out: dict, previous: dict, names: list[str], target: Target, *, canaries: int, seed: int,
    site: str | None, attribute: str | None, say: Callable[[str], None],
) -> None:
    """Into `out`: each canary audit and the attribute audit named in `names`, else what the
    previous audit.json held for it."""
    for name, (run_audit, what) in _CANARY_AUDITS.items():
        if name in names:
            say(f"training the run again with {canaries} {what}")
            out[name] = run_audit(target, m=canaries, seed=seed, site=site)
            say(f"{name.replace('-', ' ')}: epsilon >= {out[name]['epsilon_lower']:.3f} at 95% confidence")
        elif name in previous:
            out[name] = previous[name]
    if "attribute" in names:
        out["attribute"] = attribute_audit(target, attribute)
    elif "attribute" in previous:
        out["attribute"] = previous["attribute"]


def _inversion(
    out: dict, previous: dict, names: list[str], target: Target, run_dir: Path,
    inversion: InversionOptions | None, seed: int, say: Callable[[str], None],
) -> None:
    """Into `out`: the gradient inversion when `names` holds it (its images written to private/),
    else the previous one; either with what the run's released figures say of it."""
    if "inversion" in names:
        opts = inversion or InversionOptions()
        settings = opts.settings(target)
        out["inversion"], images = run_inversion(target, settings, trials=opts.trials, attack=opts.search,
                                                 weights=opts.weights, seed=seed, progress=say)
        write_images(run_dir, images)
    elif "inversion" in previous:
        out["inversion"] = previous["inversion"]
    if "inversion" in out:
        out["inversion"]["released"] = _released_inversion(target, out["inversion"]).to_dict()


def _write(run_dir: Path, out: dict) -> None:
    """private/audit.json, owner-only; then, when the run has a report, the private report that
    shows it and the shareable one that names the attacks."""
    private_dir(run_dir)
    io.write_json(audit_file(run_dir), out)
    os.chmod(audit_file(run_dir), 0o600)  # its folder already is the owner's alone
    if (run_dir / "report.html").exists():
        from privmed.report import write_report

        write_report(run_dir)
        write_report(run_dir, private=True)


_DESCRIBED = ("sees", "assumes", "drawn_from")  # the audit's words about who or what is attacked
_PATIENT = re.compile(r"\bpatient(s?)\b")


def _in_units(entry, one: str):
    """`entry` (audit.json, or part of it) with its descriptions of what is attacked speaking of
    `one` (image, record) where they speak of a patient: the unit, where the data names no patients."""
    if isinstance(entry, dict):
        return {k: _PATIENT.sub(lambda m: one + m.group(1), v) if k in _DESCRIBED and isinstance(v, str)
                else _in_units(v, one) for k, v in entry.items()}
    return entry


def _nouns(target: Target, unit: str) -> str:
    """What one candidate is, plural: patients, or the data's items (images, records)."""
    return unit_nouns(unit, tabular=(target.summary.get("data") or {}).get("tabular") is True)


def _unit(target: Target) -> str:
    """The unit of membership: the run's unit of privacy ('patient' or 'record'); for a run whose
    unit is not one of these (central DP: the site, or none), 'patient' when every site's training
    data names its patients, else 'record', as a DP-SGD run of the same data would have it."""
    unit = (target.summary.get("privacy") or {}).get("unit")
    if unit in UNITS:
        return unit
    return "patient" if all(sd.train.patient is not None for sd in target.site_data) else "record"


def _released_inversion(target: Target, entry: dict):
    """Which attacked setting stands for what this run released (privmed.report.released)."""
    return released_inversion_of_run(entry, target.summary, target.config.to_dict())


@dataclass(frozen=True)
class InversionOptions:
    """What the gradient-inversion audit attacks: one site's update with `batches` patients (one
    local step each, and a local epoch at the largest), the same under DP-SGD at each of `epsilons`
    (None: the run's own epsilon when it ran DP-SGD, else 8), and the secure sum of all sites'
    updates; `trials` batches each; `weights` the model sent ('initial' or 'final'). `only`: these
    settings instead (a benchmark's choice)."""

    batches: tuple[int, ...] = (1, 4, 8)
    epsilons: tuple[float, ...] | None = None
    trials: int = 2
    weights: str = "initial"
    search: InversionSettings = field(default_factory=InversionSettings)
    only: tuple[Setting, ...] | None = None

    def settings(self, target: Target) -> list[Setting]:
        if self.only is not None:
            return list(self.only)
        p = target.config.privacy
        eps = self.epsilons
        if eps is None:
            eps = (p.epsilon,) if p.mode == PrivacyMode.DP_SGD and p.epsilon is not None else (8.0,)
        bad = [e for e in eps if not (0 < e <= 1000)]
        if bad:
            raise ConfigError(f"--epsilon: {bad[0]:g}; allowed: above 0, up to 1000")
        return default_settings(sorted(set(self.batches)), list(dict.fromkeys(eps)))


def _previous(run_dir: Path) -> dict:
    """The private/audit.json an earlier audit left ({} when there is none, or it cannot be read)."""
    try:
        old = json.loads(audit_file(run_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return old if isinstance(old, dict) and old.get("run") == run_dir.name else {}


def _claimed(target: Target) -> dict:
    summary_privacy = target.summary.get("privacy") or {}
    claimed = {"mode": target.config.privacy.mode, "epsilon": summary_privacy.get("epsilon"),
               "delta": summary_privacy.get("delta"),
               "secure_aggregation": bool(target.summary.get("secure_aggregation"))}
    if target.config.privacy.mode == PrivacyMode.DP_SGD and claimed["epsilon"] is not None:
        # per patient at each site; the bound any membership attack on one patient obeys
        # (rounded up: never below what the claim allows)
        claimed["max_roc_auc"] = math.ceil(dp_roc_auc_bound(claimed["epsilon"], claimed["delta"] or 0.0) * 1e4) / 1e4
    return claimed


def _membership(
    target: Target, names: list[str], shadows: int, candidates: int, budget_s: float | None, seed: int,
    say: Callable[[str], None], non_members: str = "test", units: str = "patients",
) -> dict:
    """The membership attacks' part of audit.json; `units`: what one candidate is, plural."""
    start = time.perf_counter()
    if target.config.task == "survival":
        raise ConfigError(f"{target.run_dir}: task 'survival' has no class labels; the membership audit needs them")
    cand = draw_candidates(target, candidates, seed, non_members=non_members)
    data = AttackData(logits_of(target.model, cand.all_images()), cand.all_labels(), len(cand))
    shadow_info = None
    if any(ATTACKS[n].needs_shadows for n in names):
        left = None if budget_s is None else max(0.0, budget_s - (time.perf_counter() - start))
        sh = train_shadows(target, cand, shadows, seed, left,
                           progress=lambda i, k: say(f"shadow run {i} of {k} trained"))
        data = AttackData(data.target_logits, data.labels, data.n_candidates, sh.logits, sh.included)
        shadow_info = {"asked": sh.asked, "trained": len(sh.logits), "seconds": round(sh.seconds, 1)}
    results = {}
    for n in names:
        a = ATTACKS[n]
        entry = {"title": a.title, "sees": a.sees, "assumes": a.assumes}
        if a.needs_population and len(cand.population_labels) == 0:
            results[n] = {**entry, "skipped": "no population sample: the run's sites hold no validation data"}
            continue
        scores = a.score(data)
        entry.update(mia.membership_metrics(scores, cand.members, seed=seed))
        results[n] = entry
        say(f"{n}: ROC-AUC {entry['roc_auc']:.3f}")
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "candidates": {
            "members": int(cand.members.sum()), "non_members": int((~cand.members).sum()),
            "population": int(len(cand.population_labels)),
            "drawn_from": (
                f"non-members: the pooled test {units}; members: the sites' training {units}, as "
                "many of each label; population: the sites' validation items" if non_members == "test"
                else f"non-members: half of the sites' validation {units} (the training split's "
                f"distribution); members: the sites' training {units}, as many of each label; "
                f"population: the other half of the validation {units}"),
        },
        "shadows": shadow_info,
        "attacks": results,
        "seconds": round(time.perf_counter() - start, 1),
        "machine": f"{platform.machine()}, torch {torch.__version__}",
    }


def dp_roc_auc_bound(epsilon: float, delta: float = 0.0) -> float:
    """The highest ROC-AUC any membership test can reach against an (epsilon, delta)-DP mechanism:
    the area under TPR <= min(1, e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR)) (the hypothesis
    testing view of DP, Kairouz et al. 2015). The region is convex, so attacks that mix patients stay
    inside it too. 0.731 at epsilon 1, delta 0."""
    fpr = np.linspace(0.0, 1.0, 200_001)
    e = math.exp(epsilon)
    tpr = np.minimum.reduce([np.ones_like(fpr), e * fpr + delta, 1.0 - (1.0 - delta - fpr) / e])
    return float(np.clip(np.trapezoid(np.clip(tpr, 0.0, 1.0), fpr), 0.5, 1.0))


def strongest(audit_result: dict) -> tuple[str, dict] | None:
    """The attack with the highest ROC-AUC (None when none ran)."""
    ran = [(n, r) for n, r in audit_result.get("attacks", {}).items() if "roc_auc" in r]
    return max(ran, key=lambda nr: nr[1]["roc_auc"]) if ran else None


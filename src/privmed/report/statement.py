"""A privacy statement for one hospital: `privmed statement RUN_DIR --site NAME` writes one printable
A4 page for the hospital's data-protection officer: which run; what left the site, to whom and when;
the guarantee and its unit; the epsilon spent against the budget; what the guarantee does not
cover; and the audit's attacks with what each attacker assumed, in plain words.

Every figure on the page is read from the run directory (config.yaml, run.json, summary.json,
metrics.jsonl, privacy_ledger.json, the site's own ledger where the run keeps it) and its
private/audit.json; a file that is missing is named on the page, never filled in. Epsilons are the
ledger's, recomputed from its recorded releases and rounded UP, in the report's words
(privmed.report.words). The page speaks of one unit throughout, the run's (patients, or its items
where each counts as its own patient: privmed.report.words.unit_nouns).

The statement may be shared, so of an audit it says which attacks ran and what each attacker
assumes, and where their results are; the results are computed from patients outside the DP
mechanism (privmed.report.private). `private=True` writes the page with them, under private/.

    files = read_statement(run_dir, site)        reading: RunDirError / PrivmedError naming the input
    html = render_statement(files)               pure (what left the site: privmed.report.released)
    path = write_statement(run_dir, site)        the only writer: RUN_DIR/statement-NAME.html, atomic
                                                 (private=True: RUN_DIR/private/statement-NAME.html)
"""

from __future__ import annotations

import functools
import math
import os
import re
from pathlib import Path

import jinja2

from privmed import catalog
from privmed._version import __version__
from privmed.errors import PrivmedError, RunDirError, unknown_name
from privmed.io import write_text
from privmed.privacy.figures import format_epsilon
from privmed.privacy.ledger import LEDGER_FILE, PrivacyLedger
from privmed.privacy.site_ledger import SITE_LEDGER_FILE, SiteLedger
from privmed.report.private import PRIVATE_DIR, PRIVATE_NOTE, audit_file, shareable_audit
from privmed.report.readers import read_json, read_jsonl, read_yaml
from privmed.report.released import released_inversion_of_run, released_rows
from privmed.report.statement_files import StatementFiles
from privmed.report.words import (
    NA,
    as_dict,
    as_int,
    ci_text,
    fmt_bound,
    fmt_lower_bound,
    fmt_budget,
    fmt_clock,
    fmt_day,
    fmt_epsilon,
    fmt_number,
    fmt_span,
    get,
    num,
    privacy_section,
    unit_nouns,
    unit_words,
    utc_time,
)

AUDIT_FILE = f"{PRIVATE_DIR}/audit.json"  # privmed.report.private.audit_file, as the page names it
PREDICTIONS_FILE = "predictions.npz"  # written only when the coordinator scored a public test set
# what each strategy does with a site's update, in words ({items}: images or records): its title and
# words in privmed.catalog
STRATEGIES = {s.name: (s.title, s.how) for s in catalog.STRATEGIES}
PRIVATE_SITE_DIR = ("private", "sites")  # where a simulation keeps each site's own state


class StatementError(PrivmedError):
    """The statement cannot be made: no such site, no such state directory, nothing to say."""


# ---------------------------------------------------------------------------------------- reading


def read_statement(run_dir: Path, site: str, state_dir: Path | None = None, private: bool = False) -> StatementFiles:
    """The files for `site`'s statement. RunDirError when `run_dir` holds no privmed run or a
    file is corrupt; StatementError for a site the run does not name (listing those it does), or a
    `state_dir` that holds no ledger of that site. The audit comes whole only when `private`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is not a directory" if run_dir.exists() else "does not exist"
        raise RunDirError(f"RUN_DIR: {run_dir} {what}; give a run directory that `privmed run` wrote")
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"RUN_DIR: {run_dir} is not a privmed run directory (it has no config.yaml)")
    config = read_yaml(run_dir / "config.yaml")
    summary = _optional(run_dir / "summary.json", read_json)
    metrics = _optional(run_dir / "metrics.jsonl", read_jsonl) or []
    ledger = _optional(run_dir / LEDGER_FILE, PrivacyLedger.load)
    _check_site(run_dir, site, _site_names(config, summary, metrics, ledger))
    run_id = get(_optional(run_dir / "run.json", read_json), "run_id")
    own_dir = run_dir.joinpath(*PRIVATE_SITE_DIR, site)
    site_ledger, site_ledger_file = _site_ledger(site, state_dir, own_dir)
    mode = get(summary, "privacy", "mode") or get(config, "privacy", "mode") or "none"
    wanted = ["summary.json", "metrics.jsonl"] + ([LEDGER_FILE] if mode != "none" else [])
    missing = tuple(name for name in wanted if not (run_dir / name).is_file())
    read = ["config.yaml", "run.json", "summary.json", "metrics.jsonl", LEDGER_FILE, AUDIT_FILE]
    sources = [name for name in read if (run_dir / name).is_file()]
    if site_ledger_file is not None:
        sources.append(_shown(site_ledger_file, run_dir))
    audit = _optional(audit_file(run_dir), read_json)
    return StatementFiles(
        run_dir, site, config, summary, metrics, None if run_id is None else str(run_id), ledger,
        site_ledger, site_ledger_file, audit if private else shareable_audit(audit), own_dir.is_dir(),
        (run_dir / PREDICTIONS_FILE).is_file(), missing, tuple(sources), private,
    )


def _shown(path: Path, run_dir: Path) -> str:
    """`path` as the page names it: relative to the run directory when inside it."""
    return str(path.relative_to(run_dir)) if path.is_relative_to(run_dir) else str(path)


def _optional(path: Path, read):
    return read(path) if path.is_file() else None


def _site_names(config: dict, summary: dict | None, metrics: list[dict],
                ledger: PrivacyLedger | None) -> list[str]:
    """Every site the run's files name, in the order they first do."""
    names = list(as_dict(get(summary, "sites")))
    names += list(ledger.sites) if ledger is not None else []
    for row in metrics:
        names += [*as_dict(row.get("sites")), *as_dict(row.get("train_loss"))]
    configured = get(config, "sites", "names")
    names += [str(n) for n in configured] if isinstance(configured, list) else []
    return list(dict.fromkeys(str(n) for n in names))


def _check_site(run_dir: Path, site: str, known: list[str]) -> None:
    if not known:
        raise StatementError(f"RUN_DIR: {run_dir} names no site yet (no summary.json, metrics.jsonl "
                             "or privacy ledger): no round has started")
    if site not in known:
        raise StatementError(unknown_name("--site", "site", site, known))


def _site_ledger(site: str, state_dir: Path | None, own_dir: Path) -> tuple[SiteLedger | None, Path | None]:
    """The site's own ledger: from `state_dir` (StatementError when it holds none of this site),
    else from where a simulation keeps it, else None (a hospital keeps it at home)."""
    path = (state_dir if state_dir is not None else own_dir) / SITE_LEDGER_FILE
    if not path.is_file():
        if state_dir is not None:
            raise StatementError(f"--state: {state_dir} holds no {SITE_LEDGER_FILE}; give the hospital's "
                                 "state directory (privmed join --state)")
        return None, None
    ledger = SiteLedger.load(path)
    if ledger.site != site:
        raise StatementError(f"--state: {path} is the ledger of site '{ledger.site}', not of '{site}'")
    return ledger, path


# ---------------------------------------------------------------------------------------- writing


def write_statement(run_dir: Path, site: str, out: Path | None = None, state_dir: Path | None = None,
                    private: bool = False) -> Path:
    """Write `site`'s statement to `out` (default RUN_DIR/statement-SITE.html), atomically and only
    once it is complete; return its path. `private`: the page with the audit's results, by default
    to RUN_DIR/private/statement-SITE.html; StatementError for an `out` in the run directory
    outside private/ (a page computed from patients outside the DP mechanism stays out of what
    may be shared)."""
    files = read_statement(run_dir, site, state_dir, private)
    run_dir = Path(run_dir)
    if private:
        home = run_dir / PRIVATE_DIR
        if out is not None and Path(out).resolve().is_relative_to(run_dir.resolve()) \
                and not Path(out).resolve().is_relative_to(home.resolve()):
            raise StatementError(f"--out: {out} is in the run directory outside {PRIVATE_DIR}/; a --private "
                                 f"statement shows results computed from patients outside the DP mechanism: "
                                 f"write it under {home} (the default) or outside the run directory")
        if out is None:
            from privmed.report.private import private_dir

            out = private_dir(run_dir) / default_name(site)
    out = Path(out) if out is not None else run_dir / default_name(site)
    if out.is_dir():
        raise StatementError(f"--out: {out} is a directory; give a file name such as {out / default_name(site)}")
    write_text(out, render_statement(files))
    return out


def default_name(site: str) -> str:
    """statement-SITE.html, the site's name made safe for a file name."""
    return f"statement-{re.sub(r'[^A-Za-z0-9._-]', '_', site)}.html"


def render_statement(files: StatementFiles) -> str:
    return _template().render(**statement_context(files))


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent), autoescape=True,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
    )
    return env.get_template("statement.html.j2")


# ---------------------------------------------------------------------------------------- the page


def statement_context(f: StatementFiles) -> dict:
    """Everything the template shows, as text; nothing here reads a file."""
    tabular = get(f.summary, "data", "tabular") is True
    items = "records" if tabular else "images"
    units = page_units(f, tabular)
    guarantee = _guarantee(f, tabular)
    return {
        "site": f.site,
        "name": str(get(f.summary, "name") or f.config.get("name") or f.path.name),
        "synthetic": get(f.summary, "data", "synthetic") is True,
        "items": items,
        "units": units,
        "unit_one": units[:-1],
        "a_unit": ("an " if units[0] in "aeiou" else "a ") + units[:-1],
        "private": f.private,
        "private_note": PRIVATE_NOTE,
        "shareable_statement": str(f.path / default_name(f.site)),
        "missing": list(f.missing),
        "run_rows": _run_rows(f, items),
        "released": released_rows(f, items, units),
        "guarantee": guarantee,
        # a list of guarantees (training patients today; a line for validation and test patients
        # fits beside it), each shown in full; then what none of them covers
        "not_covered": _not_covered(f, guarantee, items, units),
        "audit": _audit(f, guarantee, units),
        "sources": list(f.sources),
        "version": __version__,
    }


def page_units(f: StatementFiles, tabular: bool) -> str:
    """The one unit the page speaks of, plural: the run's unit of privacy (summary.json, else its
    ledger), else the audit's (a run without privacy), in words (privmed.report.words.unit_nouns)."""
    unit = get(f.summary, "privacy", "unit") or (f.ledger.unit if f.ledger is not None else None)
    return unit_nouns(unit or get(f.audit, "unit"), tabular)


def _run_rows(f: StatementFiles, items: str) -> list[list[tuple[str, str]]]:
    """The run (which, when, who coordinated it, how, with what model and data): rows of one or
    two (label, text) pairs."""
    s, strategy = f.summary, f.strategy
    title, how = STRATEGIES.get(strategy, (strategy, ""))
    sites = _site_names(f.config, s, f.metrics, f.ledger)
    planned = get(s, "rounds_planned") or get(f.config, "federation", "rounds")
    done = len(f.metrics) if s is None else get(s, "rounds_completed")
    status = f"{as_int(done)} of {as_int(planned)} rounds completed"
    if s is None:
        status += " (no summary.json: the run stopped early or is still running)"
    coordinator = "whoever ran privmed run and holds this run directory"
    if f.simulated:
        coordinator += (f"; a simulation: every site ran in the coordinator's process, and {f.site}'s "
                        f"own state is in the run directory, under private/sites/{f.site}")
    model = get(s, "model", "name") or get(f.config, "model", "name") or NA
    params = get(s, "model", "parameters")
    return [
        [("Run", f.path.name + (f" (id {f.run_id})" if f.run_id else "")),
         ("Model", f"{model}" + (f", {as_int(params)} parameters" if num(params) else ""))],
        [("When", f"{_dates(f.metrics)}; {status}")],
        [("Coordinator", coordinator)],
        [("Strategy", f"{title}, {len(sites)} sites ({', '.join(sites)})" + (f": {how.format(items=items)}" if how else ""))],
        [("Data", str(get(s, "data", "description") or get(f.config, "data", "source") or NA))],
    ]


def _dates(metrics: list[dict]) -> str:
    times = [t for t in (utc_time(row.get("finished")) for row in metrics) if t is not None]
    if not metrics:
        return "no round completed"
    if not times:
        return "not recorded (metrics.jsonl predates privmed's round times)"
    return f"rounds finished {fmt_span(times)}"


# ---------------------------------------------------------------------------------------- guarantee


def _guarantee(f: StatementFiles, tabular: bool) -> dict:
    """The guarantee for this site: status 'private' (with its figures), 'none' or 'unknown'."""
    privacy = get(f.summary, "privacy")
    if privacy is None and f.ledger is not None:  # an unfinished run: the ledger says what it can
        privacy = {"mode": get(f.config, "privacy", "mode"), "unit": f.ledger.unit,
                   "mechanism": f.ledger.mechanism, "delta": f.ledger.delta,
                   "accountant": f.ledger.accountant, "budget_epsilon": f.ledger.budget_epsilon,
                   "max_grad_norm": get(f.config, "privacy", "max_grad_norm")}
    if privacy is None and f.mode == "none":
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
    where = NA if f.site_ledger_file is None else _shown(f.site_ledger_file, f.path)
    return {"epsilon": fmt_epsilon(own.epsilon), "budget": fmt_budget(own.budget_epsilon)
            if math.isfinite(own.budget_epsilon) else "no limit set",
            "share": _share(own.epsilon, own.budget_epsilon), "releases": len(own.releases),
            "runs": len(runs), "file": where, "agrees": agrees}


# ---------------------------------------------------------------------------------------- not covered


def _not_covered(f: StatementFiles, g: dict, items: str, units: str = "patients") -> list[str]:
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
    if f.simulated and g["mode"] == "dp-sgd":
        out.append(f"Anyone holding the run directory's private/ folder: it holds {f.site}'s secret "
                   "key, from which its noise derives. Never share it.")
    return out


# ---------------------------------------------------------------------------------------- audit


def _audit(f: StatementFiles, g: dict, units: str = "patients") -> dict:
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
                    if claimed.get("mode") == "central" else "."))
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

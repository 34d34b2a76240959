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

    files = read_statement(run_dir, site)        reading (statement_read): RunDirError / PrivmedError
                                                 naming the input
    html = render_statement(files)               pure: the guarantee (statement_guarantee), what
                                                 left the site (released), the audit (statement_audit)
    path = write_statement(run_dir, site)        the only writer: RUN_DIR/statement-NAME.html, atomic
                                                 (private=True: RUN_DIR/private/statement-NAME.html)
"""

from __future__ import annotations

import functools
from pathlib import Path

import jinja2

from privmed import catalog
from privmed._version import __version__
from privmed.io import write_text
from privmed.report.private import PRIVATE_DIR, PRIVATE_NOTE
from privmed.report.released import released_rows
from privmed.report.statement_audit import audit_section
from privmed.report.statement_files import AUDIT_FILE, StatementFiles, default_name
from privmed.report.statement_guarantee import guarantee_of, not_covered
from privmed.report.statement_read import StatementError, read_statement, site_names
from privmed.report.words import NA, as_int, fmt_span, get, num, unit_nouns, utc_time

__all__ = ["AUDIT_FILE", "STRATEGIES", "StatementError", "default_name", "read_statement", "render_statement",
           "statement_context", "write_statement"]


# what each strategy does with a site's update, in words ({items}: images or records): its title and
# words in privmed.catalog
STRATEGIES = {s.name: (s.title, s.how) for s in catalog.STRATEGIES}


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


def render_statement(files: StatementFiles) -> str:
    return _template().render(**statement_context(files))


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent), autoescape=True,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
    )
    return env.get_template("statement.html.j2")


def statement_context(f: StatementFiles) -> dict:
    """Everything the template shows, as text; nothing here reads a file."""
    tabular = get(f.summary, "data", "tabular") is True
    items = "records" if tabular else "images"
    units = page_units(f, tabular)
    guarantee = guarantee_of(f, tabular)
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
        "not_covered": not_covered(f, guarantee, items, units),
        "audit": audit_section(f, guarantee, units),
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
    sites = site_names(f.config, s, f.metrics, f.ledger)
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

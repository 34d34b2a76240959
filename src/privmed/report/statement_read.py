"""Reading a run directory for a site's privacy statement (read_statement): the only step of the
statement that opens files (config.yaml, run.json, summary.json, metrics.jsonl, privacy_ledger.json,
the site's own ledger, private/audit.json). What it reads comes back as one StatementFiles."""

from __future__ import annotations

from pathlib import Path

from privmed.catalog import PrivacyMode
from privmed.errors import PrivmedError, RunDirError, unknown_name
from privmed.federation.records import SUMMARY_FILE, read_metrics_json, read_summary_json
from privmed.privacy.ledger import LEDGER_FILE, PrivacyLedger
from privmed.privacy.site_ledger import SITE_LEDGER_FILE, SiteLedger
from privmed.report.private import audit_file, shareable_audit
from privmed.report.readers import read_json, read_yaml
from privmed.report.statement_files import AUDIT_FILE, StatementFiles
from privmed.report.words import as_dict, get


PREDICTIONS_FILE = "predictions.npz"  # written only when the coordinator scored a public test set


PRIVATE_SITE_DIR = ("private", "sites")  # where a simulation keeps each site's own state


class StatementError(PrivmedError):
    """The statement cannot be made: no such site, no such state directory, nothing to say."""


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
    summary = read_summary_json(run_dir) if (run_dir / SUMMARY_FILE).is_file() else None
    metrics = read_metrics_json(run_dir)
    ledger = _optional(run_dir / LEDGER_FILE, PrivacyLedger.load)
    _check_site(run_dir, site, site_names(config, summary, metrics, ledger))
    run_id = get(_optional(run_dir / "run.json", read_json), "run_id")
    own_dir = run_dir.joinpath(*PRIVATE_SITE_DIR, site)
    site_ledger, site_ledger_file = _site_ledger(site, state_dir, own_dir)
    mode = get(summary, "privacy", "mode") or get(config, "privacy", "mode") or PrivacyMode.NONE
    wanted = ["summary.json", "metrics.jsonl"] + ([LEDGER_FILE] if mode != PrivacyMode.NONE else [])
    missing = tuple(name for name in wanted if not (run_dir / name).is_file())
    read = ["config.yaml", "run.json", "summary.json", "metrics.jsonl", LEDGER_FILE, AUDIT_FILE]
    sources = [name for name in read if (run_dir / name).is_file()]
    if site_ledger_file is not None:
        sources.append(shown(site_ledger_file, run_dir))
    audit = _optional(audit_file(run_dir), read_json)
    return StatementFiles(
        run_dir, site, config, summary, metrics, None if run_id is None else str(run_id), ledger,
        site_ledger, site_ledger_file, audit if private else shareable_audit(audit), own_dir.is_dir(),
        (run_dir / PREDICTIONS_FILE).is_file(), missing, tuple(sources), private,
    )


def shown(path: Path, run_dir: Path) -> str:
    """`path` as the page names it: relative to the run directory when inside it."""
    return str(path.relative_to(run_dir)) if path.is_relative_to(run_dir) else str(path)


def _optional(path: Path, read):
    return read(path) if path.is_file() else None


def site_names(config: dict, summary: dict | None, metrics: list[dict],
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

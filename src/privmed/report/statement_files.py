"""What a site's privacy statement reads from a run directory (StatementFiles): made by
privmed.report.statement's `read_statement`, read by the statement and by its table of what left
the site (privmed.report.released), which both import it from here."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from privmed.catalog import PrivacyMode
from privmed.report.private import PRIVATE_DIR
from privmed.report.words import NA, get

if TYPE_CHECKING:
    from privmed.privacy.ledger import PrivacyLedger
    from privmed.privacy.site_ledger import SiteLedger

AUDIT_FILE = f"{PRIVATE_DIR}/audit.json"  # privmed.report.private.audit_file, as the page names it


def default_name(site: str) -> str:
    """statement-SITE.html, the site's name made safe for a file name."""
    return f"statement-{re.sub(r'[^A-Za-z0-9._-]', '_', site)}.html"


@dataclass(frozen=True)
class StatementFiles:
    """What the statement reads: the run's files (None or [] where missing) and, where the run
    keeps it or `--state` names it, the site's own ledger (every release it made, in any run)."""

    path: Path
    site: str
    config: dict
    summary: dict | None
    metrics: list[dict]
    run_id: str | None
    ledger: PrivacyLedger | None
    site_ledger: SiteLedger | None
    site_ledger_file: Path | None
    audit: dict | None  # private/audit.json; privmed.report.private.shareable_audit's view unless `private`
    simulated: bool  # the site's own state (secret key, ledger) lives in this run directory
    public_test: bool  # the coordinator scored a public test set itself (predictions.npz)
    missing: tuple[str, ...]  # files the statement draws on that the run directory lacks
    sources: tuple[str, ...]  # the files it read, as the page lists them
    private: bool = False  # the page that shows the audit's results (never shared)

    @property
    def mode(self) -> str:
        """The run's privacy.mode: 'dp-sgd', 'central' or 'none'."""
        return str(get(self.summary, "privacy", "mode") or get(self.config, "privacy", "mode") or PrivacyMode.NONE)

    @property
    def strategy(self) -> str:
        return str(get(self.summary, "strategy") or get(self.config, "federation", "strategy") or NA)

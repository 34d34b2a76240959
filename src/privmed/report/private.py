"""What of a run directory may be shared, and what stays in its private/ folder.

Shareable (the run directory itself): what the coordinator holds. The config; what the sites
released to it (their DP-SGD updates, averaged into the model; their scores and counts; their
public counts); the ledger; predictions on a public test set; and report.html and
statement-SITE.html, which show only these.

Private (RUN_DIR/private/, owner-only, never shared): what is computed from the sites' patients
outside the differential-privacy mechanism. An audit runs where the data is and attacks the run
with its patients in hand: the membership scores of training and test patients, images rebuilt
from updates and compared with the real ones, canaries made of real test images, attributes read
off training records. Its results are the patients' data seen through an attack, not a release
of the mechanism, so:

    private/audit.json             every attack's results (privmed audit)
    private/audit_inversion.npz    the training images the inversion attacked, and their reconstructions
    private/report.html, plots/    privmed report --private: the report with the audit's results
    private/statement-SITE.html    privmed statement --private: the statement with them

The shareable report and statement say when an audit ran, which attacks, what each attacker sees
and assumes, and the bound the run's epsilon sets (`shareable_audit`); none of the results.
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_DIR = "private"  # privmed.federation.rundir.PRIVATE_DIR (not imported here: it loads torch)
AUDIT_FILE = "audit.json"
INVERSION_FILE = "audit_inversion.npz"
AUDIT_FIGURES = ("audit_membership", "audit_inversion")  # the report's figures drawn from audit results
# what privmed wrote outside private/ before it kept audits private (relative to the run directory)
LEGACY = (AUDIT_FILE, INVERSION_FILE, *(f"plots/{name}.png" for name in AUDIT_FIGURES))
LEGACY_DIR = "legacy"  # private/legacy/: an old file whose name a newer audit already holds
PRIVATE_NOTE = (
    "PRIVATE, NEVER SHARE: it shows results computed from the sites' patients outside the "
    "differential-privacy mechanism"
)


def audit_file(run_dir: Path) -> Path:
    """RUN_DIR/private/audit.json: every attack's results."""
    return Path(run_dir) / PRIVATE_DIR / AUDIT_FILE


def inversion_file(run_dir: Path) -> Path:
    """RUN_DIR/private/audit_inversion.npz: the attacked training images and their reconstructions."""
    return Path(run_dir) / PRIVATE_DIR / INVERSION_FILE


def private_dir(run_dir: Path) -> Path:
    """RUN_DIR/private, made owner-only with its never-share note by the run directory's own
    accessor (privmed.federation.rundir.RunDir.private)."""
    from privmed.federation.rundir import RunDir

    return RunDir(Path(run_dir)).private()


def move_legacy(run_dir: Path) -> list[str]:
    """Move what an older privmed wrote outside private/ (audit.json, audit_inversion.npz, the audit
    figures under plots/) into RUN_DIR/private/ (private/legacy/ when a newer audit holds the name).
    Returns one line per file moved, naming where it went; [] when there is nothing to move."""
    run_dir = Path(run_dir)
    found = [rel for rel in LEGACY if (run_dir / rel).is_file()]
    if not found:
        return []
    home = private_dir(run_dir)
    said = []
    for rel in found:
        target = home / rel
        if target.exists():
            target = home / LEGACY_DIR / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(run_dir / rel, target)
        os.chmod(target, 0o600)
        said.append(f"moved {run_dir / rel} to {target}: it holds results computed from patients outside "
                    "the DP mechanism (written by an older privmed outside private/)")
    return said


def shareable_audit(audit: dict | None) -> dict | None:
    """What a shareable page may say of `audit` (private/audit.json): when it ran, its unit, which
    attacks ran with what each attacker sees and assumes, the inversion's settings, and what the
    run claims (the epsilon the ledger backs, and the ROC-AUC bound it sets); no result. Built by
    copying those fields only, so a result added to audit.json later stays private. None for None."""
    if not audit:
        return None
    described = ("title", "sees", "assumes", "view", "site", "attribute")
    out: dict = {"withheld": True, "created": audit.get("created"), "unit": audit.get("unit"),
                 "claimed": _copy(audit.get("claimed"), ("mode", "epsilon", "delta", "max_roc_auc",
                                                         "secure_aggregation"))}
    if isinstance(audit.get("attacks"), dict):
        out["attacks"] = {str(n): _copy(r, described) for n, r in audit["attacks"].items()}
    for key in ("canaries", "input-canaries", "attribute"):
        if isinstance(audit.get(key), dict):
            out[key] = _copy(audit[key], described)
    inversion = audit.get("inversion")
    if isinstance(inversion, dict):
        setting = ("view", "sees", "batch", "local", "local_steps", "epsilon", "rebuilt_as", "site")
        out["inversion"] = {**_copy(inversion, ("title", "assumes", "created", "weights_meaning")),
                            "settings": {str(k): _copy(r, setting)
                                         for k, r in (inversion.get("settings") or {}).items()}}
    return out


def _copy(obj, keys: tuple[str, ...]) -> dict:
    if not isinstance(obj, dict):
        return {}
    return {k: obj[k] for k in keys if k in obj}

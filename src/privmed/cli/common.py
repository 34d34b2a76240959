"""What several commands share: their Flower and dashboard flags, running a config and printing its
summary. Light at import: what running needs is imported inside the functions."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from privmed.catalog import PrivacyMode


def flower_args(p: argparse.ArgumentParser, server: bool) -> None:
    if server:
        p.add_argument("--server", metavar="HOST:PORT", help="the coordinator's address")
    p.add_argument("--certs", type=Path, help="directory holding ca.crt (from the coordinator)")
    p.add_argument("--home", type=Path, help="Flower's state directory (default ~/.privmed/flower)")
    p.add_argument("--insecure", action="store_true", help="no TLS, no node authentication: local tests only")


def dashboard_arg(p: argparse.ArgumentParser, what: str) -> None:
    from privmed.dashboard import DEFAULT

    p.add_argument(
        "--dashboard", nargs="?", const=DEFAULT, metavar="HOST:PORT",
        help=f"serve a live page of {what} at HOST:PORT (default: loopback, a free port; the URL is "
        "printed): rounds, stage, scores, each hospital's epsilon against its budget. No patient data",
    )


def run_experiment(cfg_source, out: Path, resume: bool, quiet: bool,  # noqa: ANN001
                   hospitals: list[Path] | None = None, dashboard: str | None = None) -> int:
    """Run in this process (privmed.api.run), then print the summary. The data is loaded first,
    before the heavy imports, so that a data error is reported at once."""
    from privmed.config import SitesConfig, load_site_config
    from privmed.data import preload

    own = [load_site_config(h) for h in hospitals or []]
    if not quiet and (own or cfg_source.data.source != "sites"):
        print("loading data ...", file=sys.stderr, flush=True)
    for h in own:  # as privmed.federation.experiment.load_own_site loads them
        preload(h.data, SitesConfig(count=1), h.seed)
    if not own and cfg_source.data.source != "sites":  # as simulated_sites loads it
        preload(cfg_source.data, cfg_source.sites, cfg_source.seed, cfg_source.task)
    from privmed.api import run

    if dashboard is None:
        result = run(cfg_source, out, resume=resume, progress=not quiet, hospitals=own or None)
        return print_summary(result.summary, out)
    from privmed.dashboard import live_dashboard

    with live_dashboard(dashboard) as live:
        result = run(cfg_source, out, resume=resume, progress=not quiet, hospitals=own or None, live=live)
    return print_summary(result.summary, out)


def print_summary(s: dict, out: Path) -> int:
    test = s["test"]
    if s["data"]["synthetic"]:
        print("note: SYNTHETIC data (generated phantom images, not patient data)")
    print(
        f"{s['strategy']}: {s['rounds_completed']} rounds, test {scores(test)}"
        f" (model of round {s['best_round'] or 'per site'}: {s['selection']})"
    )
    for w in s.get("warnings") or []:
        print(f"WARNING: {w['message']}")
    by_site = s.get("test_mean_over_sites") or {}
    if by_site:
        print(f"mean over sites of each site's test: {scores(by_site)}")
    if s.get("test_finetuned_mean_over_sites"):
        print(f"after local fine-tuning, mean over sites: {scores(s['test_finetuned_mean_over_sites'])}")
    privacy = s.get("privacy") or {}
    if privacy.get("mode") in (PrivacyMode.DP_SGD, PrivacyMode.CENTRAL):
        _print_privacy(privacy, out)
    else:
        print("privacy: none (privacy.mode none): the model may reveal its training patients")
    print(f"report: {(out / 'report.html').resolve()}")
    return 0


def _print_privacy(privacy: dict, out: Path) -> None:
    from privmed.privacy.figures import format_budget, format_epsilon, unit_note

    # Epsilon rounded up: the line must never claim less than the ledger backs.
    print(
        f"privacy: ({format_epsilon(privacy['epsilon'])}, {privacy['delta']:g})-differential privacy "
        f"per {privacy['unit']} at every site (largest epsilon spent; budget "
        f"{format_budget(privacy['budget_epsilon'])}); ledger: {(out / 'privacy_ledger.json').resolve()}"
    )
    if unit_note(privacy["unit"]):
        print(f"  unit: {unit_note(privacy['unit'])}")
    scoring = privacy.get("scoring") or {}
    if scoring:
        print(f"  validation and test {scoring.get('unit', 'patient')}s: ({format_epsilon(scoring['epsilon'])}, "
              f"{privacy['delta']:g})-differential privacy at every site, from their noisy scores")
    if privacy.get("honest_secure_epsilon") is not None:
        print(f"  against a coordinator that follows the secure-aggregation protocol: epsilon "
              f"{format_epsilon(privacy['honest_secure_epsilon'])}")


def scores(m: dict) -> str:
    """'AUC 0.912, accuracy 0.850, balanced accuracy 0.801', 'C-index 0.781', 'Dice ...' from a metrics dict."""
    from privmed.tasks.names import scores_text

    return scores_text(m)

"""`privmed statement`: one hospital's privacy statement, a printable one-page HTML."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

DESCRIPTION = textwrap.fill(
    "Write a one-page privacy statement for one site (hospital) of the run in RUN_DIR, for "
    "its data-protection officer: which run and when; what left the site each round, to whom "
    "(model updates, or only their sum under secure aggregation; evaluation scores and "
    "counts; its public counts); the guarantee (epsilon, rounded up, at delta), its unit of "
    "privacy and the epsilon spent against the budget, or plainly that there is none; what "
    "it does not cover; and the audit's attacks (privmed audit), each with what its attacker "
    "assumes. Every figure is read from the run directory; a missing file is named on the "
    "page. The statement may be shared: the audit's results (computed from patients outside "
    "the DP mechanism) are not on it unless --private, which writes the page with them to "
    "RUN_DIR/private/. Prints as one A4 page; needs no scripts.", 88)


def add_parser(sub) -> None:  # noqa: ANN001
    stm = sub.add_parser(
        "statement", help="one hospital's privacy statement: a printable, one-page HTML",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  privmed statement runs/x --site site-1                writes runs/x/statement-site-1.html\n"
        "  privmed statement runs/x --site site-1 --private      writes runs/x/private/statement-site-1.html\n"
        "  privmed statement runs/x --site hospital-a --state ~/.privmed/sites/hospital-a --out a.html",
    )
    stm.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    stm.add_argument("--site", required=True, metavar="NAME", help="the site the statement is for")
    stm.add_argument("--out", type=Path, metavar="FILE",
                     help="where to write it (default: RUN_DIR/statement-NAME.html)")
    stm.add_argument(
        "--state", type=Path, metavar="DIR",
        help="the hospital's own state directory (privmed join --state): adds its own ledger, every "
        "release it made in any run, against its own budget (default: RUN_DIR/private/sites/NAME, "
        "where a simulation keeps it, when there)",
    )
    stm.add_argument(
        "--private", action="store_true",
        help="show the audit's results too (computed from patients outside the DP mechanism; never "
        "share): writes RUN_DIR/private/statement-NAME.html (--out: a file outside the run directory "
        "or under its private/)",
    )


def run(args: argparse.Namespace) -> int:
    from privmed.report.private import move_legacy
    from privmed.report.statement import write_statement

    for line in move_legacy(args.run_dir) if (args.run_dir / "config.yaml").is_file() else []:
        print(line)
    path = write_statement(args.run_dir, args.site, args.out, args.state, private=args.private)
    print(f"statement{' (private, never share)' if args.private else ''}: {path.resolve()}")
    return 0

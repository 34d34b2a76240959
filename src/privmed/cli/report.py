"""`privmed report`: a run directory's report.html written again."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:  # noqa: ANN001
    rep = sub.add_parser(
        "report", help="(re)write a run directory's report.html",
        description="Write RUN_DIR/report.html (and plots/) again from the run's files. It may be "
        "shared: of an audit it says which attacks ran, not what they found.",
    )
    rep.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    rep.add_argument(
        "--private", action="store_true",
        help="the report with the audit's results and figures (computed from patients outside the DP "
        "mechanism, training images among them; never share): RUN_DIR/private/report.html and "
        "private/plots/",
    )


def run(args: argparse.Namespace) -> int:
    from privmed.report import write_report
    from privmed.report.private import move_legacy

    for line in move_legacy(args.run_dir) if (args.run_dir / "config.yaml").is_file() else []:
        print(line)
    path = write_report(args.run_dir, private=args.private)
    print(f"report{' (private, never share)' if args.private else ''}: {path.resolve()}")
    return 0

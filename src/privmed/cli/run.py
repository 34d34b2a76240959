"""`privmed run`: the experiment a YAML config describes, in this process or on Flower's hospitals."""

from __future__ import annotations

import argparse
from pathlib import Path

from privmed.cli.common import dashboard_arg, flower_args, print_summary, run_experiment
from privmed.errors import PrivmedError


def add_parser(sub) -> None:  # noqa: ANN001
    run = sub.add_parser(
        "run", help="run the experiment a YAML config describes",
        description="Run the experiment described by CONFIG (YAML) and write its run directory: "
        "config.yaml, metrics.jsonl, checkpoints/, summary.json, test_counts.npz, predictions.npz "
        "(when the coordinator holds a public test set), model.pt and report.html.",
    )
    run.add_argument("config", type=Path, metavar="CONFIG", help="YAML config file")
    run.add_argument("--out", type=Path, help="run directory (default: runs/<name>)")
    run.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override a config value, e.g. --set federation.rounds=5 (repeatable; value read as YAML)",
    )
    run.add_argument(
        "--resume", action="store_true",
        help="continue the run in --out from its last completed round (same config required; "
        "federation.rounds may be raised to extend it)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    dashboard_arg(run, "the run (in-process runner; a Flower run's is `privmed serve --dashboard`)")
    run.add_argument(
        "--hospital", dest="hospitals", action="append", default=[], type=Path, metavar="SITE_CONFIG",
        help="simulate the hospital this site config describes (its own data, split and budget, as "
        "`privmed join SITE_CONFIG` loads them) instead of partitioning data.source (repeatable: one "
        "per site)",
    )
    run.add_argument(
        "--runner", choices=("in-process", "flower"), default="in-process",
        help="in-process (default): every site in this process; flower: on the hospitals that "
        "joined the coordinator at --server (run this on the coordinator's machine)",
    )
    flower_args(run, server=True)


def run(args: argparse.Namespace) -> int:
    from privmed.config import load_config

    cfg = load_config(args.config, args.overrides)
    out = args.out or Path("runs") / cfg.name
    if args.runner != "flower" and (args.server or args.certs or args.insecure):
        raise PrivmedError("privmed run: --server, --certs and --insecure need --runner flower")
    if args.runner == "flower":
        if args.hospitals:
            raise PrivmedError("privmed run: --hospital simulates hospitals here; with --runner flower "
                               "each hospital joins with its own site config")
        if args.dashboard is not None:
            raise PrivmedError("privmed run: --dashboard shows an in-process run; a Flower run's "
                               "dashboard is the coordinator's (privmed serve --dashboard)")
        from privmed.cli.flower import submit

        return print_summary(submit(cfg, out, args), out)
    return run_experiment(cfg, out, resume=args.resume, quiet=args.quiet, hospitals=args.hospitals,
                          dashboard=args.dashboard)

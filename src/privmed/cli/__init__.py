"""The `privmed` command. Bad input ends with one line on stderr and exit code 2.

One module per command (or group of commands: `flower` holds certs, keys, serve and join), each with
`add_parser(subparsers)` and `run(args)`; COMMANDS maps a command's name to its module. A command's
module imports at its top only what building the parser needs: what the command runs on (torch,
opacus, the federation) is imported inside `run`, so `privmed --help` and `privmed privacy plan`
load none of what they do not use.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from privmed import __version__
from privmed.errors import PrivmedError

EXIT_BAD_INPUT = 2

DESCRIPTION = """\
privmed trains one medical-imaging model across several hospitals ("sites") without any patient
data leaving a site: each site trains on its own data, and a strategy (FedAvg, cyclic clinic-to-
clinic training, ...) combines the results. Every run writes a run directory with the config,
per-round metrics, checkpoints, a summary and an HTML report.
"""

EPILOG = """\
examples:
  privmed demo                                  3 simulated hospitals, synthetic data, ~1 minute
  privmed demo --dp                             the same with differential privacy at every hospital
  privmed demo --task segmentation              brain tissue and ventricles in phantom volumes (also: reconstruction)
  privmed run configs/pneumonia-fedavg.yaml     an experiment described by a YAML config
  privmed run cfg.yaml --set federation.rounds=5 --set sites.alpha=0.1
  privmed run cfg.yaml --out runs/x --resume    continue a run that was stopped
  privmed report runs/x                         write runs/x/report.html again
  privmed privacy plan --epsilon 8 --patients 1500 --batch-size 256 --epochs 30
  privmed privacy plan configs/pneumonia-dp.yaml  the noise each site of a config will get
  privmed privacy spent runs/x                  the run's privacy ledger as a table
  privmed tune cfg.yaml --trials 20             search the training settings on validation data
  privmed audit runs/x                          attack the run's model: what leaks (kept in runs/x/private/)
  privmed statement runs/x --site site-1        one hospital's privacy statement, one printable page
  privmed report runs/x --private               the report with the audit's results, in runs/x/private/

across machines (Flower; see the README):
  privmed certs certs/ --name coordinator.example.org     TLS for the coordinator
  privmed keys keys/ --name site-1                          a hospital's key pair
  privmed serve --certs certs/ --keys keys/                 the coordinator
  privmed join hospital-a.yaml --server HOST:9092 --certs certs/ --key keys/hospital-a
  privmed run coordinator.yaml --runner flower --server 127.0.0.1:9092 --certs certs/
  privmed run coordinator.yaml --hospital hospital-a.yaml --hospital ...   the same, simulated here
"""

# command -> module of privmed.cli; the order of first appearance is the order of `privmed --help`
COMMANDS: dict[str, str] = {
    "demo": "demo",
    "run": "run",
    "tune": "tune",
    "privacy": "privacy",
    "certs": "flower",
    "keys": "flower",
    "serve": "flower",
    "join": "flower",
    "audit": "audit",
    "statement": "statement",
    "report": "report",
}


def _module(command: str):  # noqa: ANN202
    return importlib.import_module(f"privmed.cli.{COMMANDS[command]}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="privmed", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"privmed {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in dict.fromkeys(COMMANDS.values()):
        importlib.import_module(f"privmed.cli.{name}").add_parser(sub)
    return p


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return EXIT_BAD_INPUT
    return _module(args.command).run(args)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except PrivmedError as e:
        print(f"privmed: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("privmed: interrupted; continue with `privmed run CONFIG --out DIR --resume`", file=sys.stderr)
        return 130

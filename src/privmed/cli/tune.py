"""`privmed tune`: Optuna's search of a config's training settings, on validation data only."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:  # noqa: ANN001
    tune = sub.add_parser(
        "tune", help="search the training settings of a config (Optuna), on validation data only",
        description="Run --trials runs of CONFIG with Optuna's TPE sampler proposing the learning rate, "
        "momentum, batch size, local work and logit adjustment (trial 0: CONFIG as written), each "
        "scored by the validation AUC (C-index) of the model it selected. Writes OUT/best.yaml, "
        "OUT/tuning.html, tuning.md, tuning.json and trials.png, and runs the best settings into "
        "OUT/best. Refuses a private config: tuning spends privacy the ledger does not count.",
    )
    tune.add_argument("config", type=Path, metavar="CONFIG")
    tune.add_argument("--trials", type=int, default=20, help="number of trials (default 20)")
    tune.add_argument("--out", type=Path, help="directory to write (default: runs/<name>-tune)")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    tune.add_argument("--quiet", action="store_true", help="no per-trial lines or progress bar")


def run(args: argparse.Namespace) -> int:
    from privmed.config import load_config
    from privmed.tune import STATEMENT, tune

    cfg = load_config(args.config, args.overrides)
    out = args.out or Path("runs") / f"{cfg.name}-tune"
    r = tune(cfg, args.trials, out, progress=not args.quiet)
    label = "C-index" if cfg.task == "survival" else "AUC"
    first = r.trials[0]["score"]
    print(f"{len(r.trials)} trials; best: trial {r.best['trial']}, validation {label} "
          f"{r.best['score']:.4f} (the config as written: {'n/a' if first is None else f'{first:.4f}'})")
    print(f"best settings: {(out / 'best.yaml').resolve()}; their run: {(out / 'best').resolve()}")
    print(f"tuning: {(out / 'tuning.html').resolve()}")
    print(f"privacy: {STATEMENT}")
    return 0

"""`privmed demo`: a run of a packaged demo config on synthetic data."""

from __future__ import annotations

import argparse
from pathlib import Path

from privmed.cli.common import dashboard_arg, run_experiment
from privmed.errors import PrivmedError


def add_parser(sub) -> None:  # noqa: ANN001
    demo = sub.add_parser(
        "demo", help="federated training on 3 simulated hospitals (synthetic data, no download)",
        description="Train a 'lesion present' classifier with FedAvg across 3 simulated hospitals, "
        "each with its own scanner, on SYNTHETIC phantom images. Needs no data and no network; "
        "takes about a minute on 2 CPU cores. Prints the path of the report.",
    )
    demo.add_argument("--out", type=Path, help="run directory (default: runs/demo, or runs/demo-N if taken)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.add_argument(
        "--dp", action="store_true",
        help="train with DP-SGD at every hospital: (8, 1e-5)-differential privacy per patient (~1 minute)",
    )
    demo.add_argument(
        "--task", choices=("classification", "segmentation", "reconstruction"), default="classification",
        help="classification (default): lesion or not; segmentation: brain tissue and ventricles in "
        "phantom head volumes; reconstruction: MRI slices from 4x undersampled k-space (each under "
        "2 minutes on 2 cores)",
    )
    dashboard_arg(demo, "the run")


def _demo_out(name: str, base: Path = Path("runs")) -> Path:
    out, i = base / name, 2
    while out.exists():
        out, i = base / f"{name}-{i}", i + 1
    return out


def run(args: argparse.Namespace) -> int:
    from importlib.resources import files

    from privmed.config import read_yaml, validate_config

    name = "demo" if args.task == "classification" else f"demo-{args.task}"
    name += "-dp" if args.dp else ""
    if not (files("privmed") / "configs" / f"{name}.yaml").is_file():
        raise PrivmedError(f"privmed demo: --dp with --task {args.task} has no demo; run "
                           f"privmed demo --task {args.task}, then add privacy to its config")
    demo_file = files("privmed") / "configs" / f"{name}.yaml"
    cfg = validate_config(read_yaml(Path(str(demo_file))), source=f"{name} config")
    return run_experiment(cfg, args.out or _demo_out(name), resume=False, quiet=args.quiet,
                          dashboard=args.dashboard)

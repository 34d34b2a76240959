"""Benchmark: what the defaults give the first config a user writes.

    .venv/bin/python benchmarks/defaults_pneumonia.py [--seeds 0 1 2]

The config names only the data (PneumoniaMNIST, 28 px), the sites (3, Dirichlet 0.5) and the
strategy (fedavg, 20 rounds of one local epoch); everything else is privmed's default. Beside it,
the same config with one default changed at a time (logit adjustment off: privmed's defaults before
it; a larger plain-SGD step; no augmentation), and the local models (each site alone) that fedavg
must beat. Writes benchmarks/results/defaults_pneumonia.md: test AUC and accuracy per seed and
their mean.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import privmed
from privmed import io

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> the keys it sets on top of the contract config
    "defaults": {},
    "training.logit_adjustment: off (the defaults before it)": {"training": {"logit_adjustment": "off"}},
    "training.lr: 0.05, momentum: 0": {"training": {"lr": 0.05, "momentum": 0.0}},
    "training.augment: false": {"training": {"augment": False}},
}


def contract(seed: int, data_root: Path, extra: dict | None = None, strategy: str = "fedavg") -> dict:
    cfg = {
        "seed": seed,
        "data": {"source": "medmnist", "name": "pneumoniamnist", "root": str(data_root), "size": 28,
                 "download": False},
        "sites": {"count": 3, "partition": "dirichlet", "alpha": 0.5},
        "federation": {"strategy": strategy, "rounds": 20},
    }
    for section, values in (extra or {}).items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "medmnist")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    rows: dict[str, list[tuple[float, float]]] = {}
    local: dict[int, dict[str, float]] = {}
    started = time.time()
    for seed in args.seeds:
        for name, extra in VARIANTS.items():
            s = privmed.run(contract(seed, args.data_root, extra)).summary
            rows.setdefault(name, []).append((s["test"]["auc"], s["test"]["accuracy"]))
            print(json.dumps({"variant": name, "seed": seed, "auc": s["test"]["auc"]}), flush=True)
        s = privmed.run(contract(seed, args.data_root, strategy="local")).summary
        local[seed] = {site: row["test_pooled"]["auc"] for site, row in s["sites"].items()}
    lines = [
        "# The defaults on the first config a user writes",
        "",
        "PneumoniaMNIST (28 px), 3 sites, Dirichlet 0.5, fedavg, 20 rounds x 1 local epoch; every other",
        "key privmed's default, or as the row says. Test AUC (accuracy) on the official test set, the",
        "model of the best validation round.",
        "",
        "| setting | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean AUC | mean accuracy |",
        "|---|" + "---:|" * (len(args.seeds) + 2),
    ]
    for name, vals in rows.items():
        cells = [f"{a:.3f} ({c:.3f})" for a, c in vals]
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {statistics.mean(a for a, _ in vals):.3f} | {statistics.mean(c for _, c in vals):.3f} |")
    best_local = {seed: max(v.values()) for seed, v in local.items()}
    fedavg = dict(zip(args.seeds, (a for a, _ in rows["defaults"])))
    lines += [
        "",
        "| seed | fedavg (defaults) | best local model (each site alone, defaults) | fedavg beats every local model |",
        "|---:|---:|---:|---|",
        *[f"| {s} | {fedavg[s]:.3f} | {best_local[s]:.3f} | {'yes' if fedavg[s] > best_local[s] else 'no'} |"
          for s in args.seeds],
        "",
        f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{(time.time() - started) / 60:.0f} min in all.",
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    io.write_text(args.out / "defaults_pneumonia.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

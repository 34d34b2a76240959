"""Benchmark: 3D classification from the defaults at a hospital's size, and how still the model is.

    .venv/bin/python benchmarks/small_volumes.py [--per-site 100] [--seeds 0 1 2] [--threads 1]

VesselMNIST3D (28^3 volumes) subsampled by seed to PER_SITE training volumes a site for 3 iid sites
(and the official validation volumes in the same proportion; the test set is the official 382
volumes), written to a MedMNIST file of its own. Each run names only the file and the sites (and
the strategy: fedavg, and pooled, which trains the same epochs on the same volumes in one place);
everything else is privmed's default. Writes benchmarks/results/small_volumes.md: the selected
model's test AUC, fedavg's gap to pooled on the same volumes, and how far the test AUC moves over
the last 5 rounds (max - min), per seed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

import privmed

ROOT = Path(__file__).resolve().parents[1]
CHOSEN = ("rounds", "local_epochs", "batch_size", "lr", "lr_schedule", "model_selection")  # shown from config.yaml


def subsample(src: Path, dst: Path, per_site: int, seed: int) -> dict:
    z = np.load(src)
    rng = np.random.default_rng(seed)
    n_train = 3 * per_site
    keep = {"train": rng.permutation(len(z["train_labels"]))[:n_train]}
    n_val = round(len(z["val_labels"]) * n_train / len(z["train_labels"]))
    keep["val"] = rng.permutation(len(z["val_labels"]))[:n_val]
    arrays = {}
    for split in ("train", "val", "test"):
        idx = keep.get(split, np.arange(len(z[f"{split}_labels"])))
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = z[f"{split}_images"][idx], z[f"{split}_labels"][idx]
    dst.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(dst / "vesselmnist3d.npz", **arrays)
    return {s: int(len(arrays[f"{s}_labels"])) for s in ("train", "val", "test")} | {
        "train_positive": int(arrays["train_labels"].sum())}


def one_run(root: Path, seed: int, strategy: str, extra: dict) -> dict:
    cfg = {"seed": seed, "data": {"source": "medmnist", "name": "vesselmnist3d", "root": str(root), "download": False},
           "sites": {"count": 3}, "federation": {"strategy": strategy}}
    for section, values in extra.items():
        cfg.setdefault(section, {}).update(values)
    started = time.time()
    with tempfile.TemporaryDirectory() as out:
        result = privmed.run(cfg, Path(out) / "run", report=False)
        rows = [json.loads(line) for line in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]
        saved = (Path(out) / "run" / "config.yaml").read_text()
    s = result.summary
    last5 = [r["test"]["auc"] for r in rows[-5:]]
    return {"auc": s["test"]["auc"], "balanced_accuracy": s["test"].get("balanced_accuracy"),
            "best_round": s["best_round"], "last5_move": max(last5) - min(last5),
            "seconds": time.time() - started,
            "config": [f"{key}: {section[key]}" for section in yaml.safe_load(saved).values()
                       if isinstance(section, dict) for key in CHOSEN if key in section]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-site", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", dest="extra", type=json.loads, default={},
                    help='config keys to set on every run, as JSON, e.g. {"federation": {"rounds": 40}}')
    ap.add_argument("--strategies", nargs="+", default=["fedavg", "pooled"], choices=["fedavg", "pooled"],
                    help="run only these (the table then leaves the other's columns blank)")
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "medmnist")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "small_volumes.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    results: dict[int, dict] = {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            counts = subsample(args.data_root / "vesselmnist3d.npz", Path(tmp), args.per_site, seed)
            results[seed] = {"counts": counts, **{st: one_run(Path(tmp), seed, st, args.extra) for st in args.strategies}}
        print(seed, json.dumps(results[seed]), flush=True)
    lines = [
        f"# 3D classification at {args.per_site} training volumes a site",
        "",
        f"VesselMNIST3D subsampled by seed to {3 * args.per_site} training volumes (3 iid sites of "
        f"{args.per_site}) and the official validation volumes in proportion; test: the official 382 "
        "volumes. A config naming only the file, the sites and the strategy"
        + (f" (and {json.dumps(args.extra)})" if args.extra else "") + ": every other key privmed's "
        "default. Test AUC of the selected model; last-5 move: max - min of the test AUC over the last "
        "5 rounds.",
        "",
        "| seed | training volumes (aneurysms) | fedavg AUC | pooled AUC | fedavg - pooled | fedavg last-5 move "
        "| pooled last-5 move | fedavg balanced acc. | s (fedavg / pooled) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    nan = float("nan")
    blank = {"auc": nan, "last5_move": nan, "balanced_accuracy": nan, "seconds": nan}
    cell = lambda x, fmt: "" if x != x else format(x, fmt)  # noqa: E731  (blank for a strategy not run)
    for seed, r in results.items():
        f, p = r.get("fedavg", blank), r.get("pooled", blank)
        lines.append(f"| {seed} | {r['counts']['train']} ({r['counts']['train_positive']}) | {cell(f['auc'], '.3f')} | "
                     f"{cell(p['auc'], '.3f')} | {cell(f['auc'] - p['auc'], '+.3f')} | {cell(f['last5_move'], '.3f')} | "
                     f"{cell(p['last5_move'], '.3f')} | {cell(f['balanced_accuracy'], '.3f')} | "
                     f"{cell(f['seconds'], '.0f')} / {cell(p['seconds'], '.0f')} |")
    mean = lambda st, k: statistics.mean(r.get(st, blank)[k] for r in results.values())  # noqa: E731
    lines.append(f"| mean | | {cell(mean('fedavg', 'auc'), '.3f')} | {cell(mean('pooled', 'auc'), '.3f')} | "
                 f"{cell(mean('fedavg', 'auc') - mean('pooled', 'auc'), '+.3f')} | {cell(mean('fedavg', 'last5_move'), '.3f')} | "
                 f"{cell(mean('pooled', 'last5_move'), '.3f')} | {cell(mean('fedavg', 'balanced_accuracy'), '.3f')} | |")
    first = next(iter(results.values()))
    lines += ["", f"Chosen from the data ({args.strategies[0]}'s config.yaml): "
              + ", ".join(first[args.strategies[0]]["config"]) + ".",
              "", f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), on a machine "
              f"shared with another benchmark; {(time.time() - started) / 60:.0f} min in all."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Benchmark: privmed's defaults at a hospital's size, on data they were not tuned on.

    .venv/bin/python benchmarks/small_sites.py [--sizes 50 200 1500] [--seeds 0 1 2]
        [--datasets pneumoniamnist retinamnist] [--variants defaults fixed-2026-12]

Each MedMNIST file in ../shared/data/medmnist is subsampled (by seed) to three hospitals holding
SIZE, 3/4 SIZE and 1/2 SIZE training images (after each hospital's own 15 % validation split),
written to each hospital's own image folder in the Kermany layout (train/<class>/*.png, and
test/<class>/*.png: a third of the official test split each, so that the pooled test set is the
official one and the published baselines apply). Every run is `privmed run COORDINATOR --hospital
...` with a coordinator config that names only the strategy and the sites: everything else is
privmed's default, or as the variant says. Writes benchmarks/results/small_sites.md: pooled test
AUC and balanced accuracy of the selected model, per seed, with their mean.
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
from PIL import Image

import privmed
from privmed.config import SiteConfig

ROOT = Path(__file__).resolve().parents[1]

# published centralised baselines (MedMNIST v2, Yang et al. 2023, Table 3: ResNet-18 at 28 px, AUC)
PUBLISHED_AUC = {"pneumoniamnist": 0.944, "retinamnist": 0.717, "breastmnist": 0.901}

# the most a site can hold with 3/4 and 1/2 of it at the other two (and their validation shares)
LARGEST = {"pneumoniamnist": 1500, "retinamnist": 400}

VARIANTS: dict[str, dict] = {  # name -> the keys it sets on the coordinator config
    "defaults": {},
    # privmed's defaults before they followed the data (what a config that names them gets)
    "fixed": {
        "federation": {"rounds": 20, "local_epochs": 1, "model_selection": "best-validation"},
        "training": {"batch_size": 64, "lr": 0.01, "lr_schedule": "constant"},
    },
}


def write_hospitals(npz: Path, size: int, seed: int, root: Path) -> list[SiteConfig]:
    """Three hospitals' own folders from one MedMNIST file; their SiteConfigs."""
    z = np.load(npz)
    rng = np.random.default_rng(seed)
    x, y = z["train_images"], z["train_labels"].ravel()
    xt, yt = z["test_images"], z["test_labels"].ravel()
    order, test_order = rng.permutation(len(x)), rng.permutation(len(xt))
    sizes = [size, size * 3 // 4, size // 2]
    # each hospital's folder holds its training images plus its own validation share (15 %)
    held = [round(n / 0.85) for n in sizes]
    if sum(held) > len(x):
        raise SystemExit(f"{npz.name}: {sum(held)} training images asked, {len(x)} in the file")
    starts = np.cumsum([0] + held)
    test_parts = np.array_split(test_order, 3)
    classes = [f"class-{k}" for k in range(int(max(y.max(), yt.max())) + 1)]
    hospitals = []
    for h in range(3):
        home = root / f"hospital-{h + 1}"
        for split, idx, xs, ys in (("train", order[starts[h]:starts[h + 1]], x, y), ("test", test_parts[h], xt, yt)):
            for k in classes:
                (home / split / k).mkdir(parents=True, exist_ok=True)
            for i in idx:
                Image.fromarray(xs[i]).save(home / split / classes[ys[i]] / f"{split}-{i}.png")
        hospitals.append(SiteConfig.model_validate({
            "site": f"hospital-{h + 1}", "seed": seed,
            "data": {"source": "image-folder", "root": str(home), "channels": 3 if x.ndim == 4 else 1,
                     "class_names": classes},
            "privacy": {"require_dp": False, "max_epsilon": None},
            "state": str(root / "state" / f"hospital-{h + 1}"),
        }))
    return hospitals


def coordinator(seed: int, extra: dict) -> dict:
    cfg: dict = {"seed": seed, "data": {"source": "sites"},
                 "sites": {"names": ["hospital-1", "hospital-2", "hospital-3"]},
                 "federation": {"strategy": "fedavg"}}
    for section, values in extra.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def one_run(dataset: str, size: int, seed: int, extra: dict, data_root: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        hospitals = write_hospitals(data_root / f"{dataset}.npz", size, seed, Path(tmp))
        started = time.time()
        result = privmed.run(coordinator(seed, extra), hospitals=hospitals, report=False)
        s = result.summary
        return {"auc": s["test"]["auc"], "balanced_accuracy": s["test"].get("balanced_accuracy"),
                "accuracy": s["test"]["accuracy"], "seconds": time.time() - started,
                "rounds": s["rounds_completed"], "best_round": s.get("best_round"),
                "warnings": [w["kind"] for w in s.get("warnings") or []]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=None,
                    help="training images at the largest site (default: 50, 200 and the most the file holds)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--datasets", nargs="+", default=["pneumoniamnist", "retinamnist"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), help="names from VARIANTS, or JSON dicts")
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "medmnist")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "small_sites.md")
    args = ap.parse_args()
    variants = {v: VARIANTS[v] if v in VARIANTS else json.loads(v) for v in args.variants}
    started = time.time()
    rows = []
    for dataset in args.datasets:
        for size in args.sizes or [50, 200, LARGEST.get(dataset, 400)]:
            for name, extra in variants.items():
                runs = [one_run(dataset, size, seed, extra, args.data_root) for seed in args.seeds]
                rows.append((dataset, size, name, runs))
                print(dataset, size, name, json.dumps(runs), flush=True)
    lines = [
        "# Defaults at a hospital's size",
        "",
        "Three hospitals with their own image folders (SIZE, 3/4 SIZE and 1/2 SIZE training images, "
        "subsampled from the MedMNIST file by seed; each a third of the official test split), "
        "`privmed run COORDINATOR --hospital ...`, fedavg; every other key privmed's default, or as "
        "the row says (fixed: privmed's defaults before they followed the data, 20 rounds x 1 local "
        "epoch, batch 64, constant lr 0.01, the best validation round's model). Pooled test AUC / "
        "balanced accuracy of the selected model per seed. "
        "Published: MedMNIST v2's centralised ResNet-18 (28 px) on all training images.",
        "",
        "| data | training images per site | setting | " + " | ".join(f"seed {s}" for s in args.seeds)
        + " | mean AUC | mean balanced acc. | published AUC | s per run |",
        "|---|---|---|" + "---:|" * (len(args.seeds) + 4),
    ]
    for dataset, size, name, runs in rows:
        cells = [f"{r['auc']:.3f} / {r['balanced_accuracy']:.3f}" for r in runs]
        lines.append(
            f"| {dataset} | {size}, {size * 3 // 4}, {size // 2} | {name} | " + " | ".join(cells)
            + f" | {statistics.mean(r['auc'] for r in runs):.3f}"
            + f" | {statistics.mean(r['balanced_accuracy'] for r in runs):.3f}"
            + f" | {PUBLISHED_AUC.get(dataset, float('nan')):.3f}"
            + f" | {statistics.mean(r['seconds'] for r in runs):.0f} |"
        )
    lines += ["", f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"{(time.time() - started) / 60:.0f} min in all (seconds per run are indicative only when "
              "the machine is shared)."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

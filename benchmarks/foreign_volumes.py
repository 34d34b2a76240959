"""Benchmark: segmentation of a hospital's own NIfTI volumes (the `nifti` source) from the defaults.

    .venv/bin/python benchmarks/foreign_volumes.py [--seeds 0 1] [--spacing 4] [--rounds 20]
        [--variants defaults '{"federation": {"local_epochs": 8}}']

The 10 IXI T1 volumes in ../shared/data/ixi-t1, written as a hospital would hold them: each image
with a binary mask of the lateral, third and fourth ventricles (MUSE labels 4, 11, 49, 50, 51, 52),
listed in a CSV that gives 3 hospitals 4, 3 and 3 subjects, the last of each marked `test` (its
own test volume, scored at the hospital). The config names only the source, the CSV, the voxel
size (`data.spacing`, mm), no validation split (`data.val_fraction: 0`: at 2-3 training volumes a
hospital the default 0.15, drawn by patient, is refused as leaving one side empty) and the sites;
everything else is privmed's default, or as the variant
says. Writes benchmarks/results/foreign_volumes.md: the test Dice of the ventricles (pooled from
the hospitals' counts) of the selected model.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml

import privmed

ROOT = Path(__file__).resolve().parents[1]
VENTRICLES = (4, 11, 49, 50, 51, 52)
SITES = ("hospital-a",) * 4 + ("hospital-b",) * 3 + ("hospital-c",) * 3


def write_hospital_files(ixi: Path, dst: Path) -> Path:
    """Images and binary ventricle masks, and the index CSV; returns the CSV's path."""
    images = sorted((ixi / "images").glob("*.nii.gz"))
    if len(images) != len(SITES):
        raise SystemExit(f"{ixi}: expected {len(SITES)} volumes in images/, found {len(images)}")
    lines = ["file,mask,site,patient,split"]
    for i, (img, site) in enumerate(zip(images, SITES)):
        subject = img.name.split("-T1")[0]
        lab = nib.load(str(ixi / "labels" / img.name.replace(".nii.gz", "_DLMUSE.nii.gz")))
        mask = np.isin(np.rint(np.asarray(lab.dataobj)).astype(np.int64), VENTRICLES).astype(np.uint8)
        nib.save(nib.Nifti1Image(mask, lab.affine), str(dst / f"{subject}_mask.nii.gz"))
        (dst / img.name).symlink_to(img)
        last = i == len(SITES) - 1 or SITES[i + 1] != site
        lines.append(f"{img.name},{subject}_mask.nii.gz,{site},{subject},{'test' if last else 'train'}")
    (dst / "index.csv").write_text("\n".join(lines) + "\n")
    return dst / "index.csv"


def one_run(csv: Path, seed: int, spacing: float, rounds: int, extra: dict) -> dict:
    cfg: dict = {"seed": seed, "task": "segmentation",
                 "data": {"source": "nifti", "csv": str(csv), "spacing": [spacing] * 3,
                          "class_names": ["background", "ventricles"], "val_fraction": 0},
                 "sites": {"count": 3, "partition": "natural"}, "federation": {"rounds": rounds}}
    for section, values in extra.items():
        cfg.setdefault(section, {}).update(values)
    started = time.time()
    with tempfile.TemporaryDirectory() as out:
        result = privmed.run(cfg, Path(out) / "run", report=False)
        saved = (Path(out) / "run" / "config.yaml").read_text()
    s = result.summary
    chosen = yaml.safe_load(saved)
    return {"dice": s["test"].get("dice"), "volumes": s["test"].get("volumes"),
            "local_epochs": chosen["federation"]["local_epochs"], "batch_size": chosen["training"]["batch_size"],
            "size": chosen["data"].get("size"), "seconds": time.time() - started,
            "warnings": [w["kind"] for w in s.get("warnings") or []]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--spacing", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--variants", nargs="+", default=["defaults"], help="'defaults', or JSON dicts of config keys")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ixi", type=Path, default=ROOT.parent / "shared" / "data" / "ixi-t1")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "foreign_volumes.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        csv = write_hospital_files(args.ixi, Path(tmp))
        for variant in args.variants:
            extra = {} if variant == "defaults" else json.loads(variant)
            runs = [one_run(csv, seed, args.spacing, args.rounds, extra) for seed in args.seeds]
            print(variant, json.dumps(runs), flush=True)
            rows.append((variant, runs))
    lines = [
        "# Segmentation of a hospital's own NIfTI volumes, from the defaults", "",
        f"IXI T1 (10 subjects), binary ventricle masks, resampled to {args.spacing:g} mm; 3 hospitals "
        "of 4, 3 and 3 subjects, each with its last subject as its own test volume; "
        f"{args.rounds} rounds, fedavg; every other key privmed's default, or as the row says. Test Dice "
        "of the ventricles from the hospitals' counts, per seed.", "",
        "| setting | local epochs | batch | slice side | " + " | ".join(f"seed {s}" for s in args.seeds)
        + " | s per run |",
        "|---|---:|---:|---:|" + "---:|" * len(args.seeds) + "---:|",
    ]
    for variant, runs in rows:
        r0 = runs[0]
        lines.append(f"| {variant} | {r0['local_epochs']} | {r0['batch_size']} | {r0['size'] or 'auto'} | "
                     + " | ".join(f"{r['dice']:.3f}" for r in runs)
                     + f" | {sum(r['seconds'] for r in runs) / len(runs):.0f} |")
    lines += ["", f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); "
              f"{(time.time() - started) / 60:.0f} min in all."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

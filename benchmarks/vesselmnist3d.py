"""Benchmark: VesselMNIST3D (28^3 volumes), 3 iid sites -- fedavg from the defaults, and pooled.

    .venv/bin/python benchmarks/vesselmnist3d.py [--seeds 0 1 2] [--rounds R]
    .venv/bin/python benchmarks/vesselmnist3d.py --merge A.json B.json ...

Each run is configs/vesselmnist3d-fedavg.yaml as it is (a config that names only the file and the
sites; everything else is privmed's default for a 3D MedMNIST set), with only the seed and the
strategy set. The runs go one after another in this process; each seed's results are saved to
benchmarks/results/vesselmnist3d/seedS.json as soon as both of its runs are done, and `--merge`
writes the table from such files (seeds run in separate invocations) without training anything.

Writes benchmarks/results/vesselmnist3d.md: test AUC and accuracy (mean ± sd over seeds) on the
official 382 test volumes beside the published MedMNIST v2 3D ResNet-18 (28), and the wall seconds of
each run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import torch

from _tables import mean_sd

import privmed
from privmed import io
from privmed.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "vesselmnist3d-fedavg.yaml"
STRATEGIES = ("fedavg", "pooled")
# MedMNIST v2 (Yang et al., Scientific Data 2023), VesselMNIST3D test AUC / ACC, centralised training,
# as ../shared/DATA.md gives it
PUBLISHED = [("ResNet-18 + 3D (28)", 0.874, 0.877)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=None, help="override federation.rounds")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "medmnist")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                    help="only write the table from these saved per-seed results files")
    ap.add_argument("--note", default="", help="a line about the machine's load, for the record")
    args = ap.parse_args()
    overrides = [f"data.root={args.data_root}"]
    if args.rounds:
        overrides.append(f"federation.rounds={args.rounds}")
    if not args.merge:
        torch.set_num_threads(args.threads)
        for seed in args.seeds:
            runs = {}
            for strategy in STRATEGIES:
                cfg = load_config(CONFIG, overrides + [f"seed={seed}", f"federation.strategy={strategy}"])
                s = privmed.run(cfg).summary
                runs[strategy] = {"seed": seed, "test": s["test"], "wall_seconds": s["wall_seconds"],
                                  "rounds": cfg.federation.rounds, "model": s["model"],
                                  "sample_gradient_steps": s["sample_gradient_steps"],
                                  "threads": args.threads, "note": args.note}
                print(f"seed {seed} {strategy:7s} test AUC {s['test']['auc']:.3f} "
                      f"acc {s['test']['accuracy']:.3f}  {s['wall_seconds']:.0f} s", flush=True)
            io.write_json(args.out / "vesselmnist3d" / f"seed{seed}.json", runs)
        files = [args.out / "vesselmnist3d" / f"seed{s}.json" for s in args.seeds]
    else:
        files = args.merge
    results: dict[str, list[dict]] = {s: [] for s in STRATEGIES}
    for f in files:
        for strategy, row in json.loads(Path(f).read_text()).items():
            results[strategy].append(row)
    io.write_text(args.out / "vesselmnist3d.md", _table(results, load_config(CONFIG, overrides)))
    print((args.out / "vesselmnist3d.md").read_text())


def _table(results: dict[str, list[dict]], cfg) -> str:
    seeds = [r["seed"] for r in results["fedavg"]]
    fed, t = cfg.federation, cfg.training
    lines = [
        "### VesselMNIST3D, 3 iid sites, from the defaults",
        "",
        f"`configs/vesselmnist3d-fedavg.yaml` as it is: model `{cfg.model.name}` "
        f"({results['fedavg'][0]['model']['parameters']:,} parameters), {fed.rounds} rounds x "
        f"{fed.local_epochs} local epoch(s), batch {t.batch_size}, {t.optimizer} lr {t.lr} momentum "
        f"{t.momentum}, augmentation {'on' if t.augment else 'off'}; pooled trains the same epochs "
        f"on all sites' data in one place. Seeds {', '.join(map(str, seeds))}; mean ± sd over seeds. "
        "Test set: the official 382 volumes (43 aneurysms); model chosen on the sites' validation "
        "data (the official 191 validation volumes, split among the sites as the training volumes "
        "are).",
        "",
        "| strategy | test AUC | test accuracy | test balanced accuracy | wall s per run |",
        "|---|---|---|---|---|",
    ]
    for s in STRATEGIES:
        rs = results[s]
        if not rs:
            continue
        lines.append(
            f"| {s} | {mean_sd([r['test']['auc'] for r in rs])} | "
            f"{mean_sd([r['test']['accuracy'] for r in rs])} | "
            f"{mean_sd([r['test']['balanced_accuracy'] for r in rs])} | "
            f"{', '.join(str(round(r['wall_seconds'])) for r in rs)} |"
        )
    for name, auc, acc in PUBLISHED:
        lines.append(f"| MedMNIST v2: {name}, centralised (published) | {auc:.3f} | {acc:.3f} | | |")
    fedavg = [r["test"]["auc"] for r in results["fedavg"]]
    notes = sorted({r["note"] for rs in results.values() for r in rs if r.get("note")})
    threads = sorted({r["threads"] for rs in results.values() for r in rs})
    lines += [
        "",
        f"- fedavg reaches the published 3D ResNet-18 test AUC (0.874): "
        f"**{'yes' if statistics.mean(fedavg) >= PUBLISHED[0][1] else 'no'}** "
        f"(per seed {', '.join(f'{x:.3f}' for x in fedavg)})",
        "- accuracy is at the argmax; 88.7% of the test volumes are healthy vessels, so a model "
        "that never says 'aneurysm' scores 0.887 (balanced accuracy 0.5)",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores shared with other work, "
        f"{', '.join(map(str, threads))} torch thread(s); torch {torch.__version__}, privmed "
        f"{privmed.__version__}" + (f"; {'; '.join(notes)}" if notes else ""),
        "",
        "Run (each seed in its own process, then the table from their results):",
        "",
        "```bash",
        "for s in 0 1 2; do .venv/bin/python benchmarks/vesselmnist3d.py --seeds $s --threads 1 & done; wait",
        ".venv/bin/python benchmarks/vesselmnist3d.py --merge benchmarks/results/vesselmnist3d/seed*.json",
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

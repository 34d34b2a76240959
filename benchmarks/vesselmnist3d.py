"""Benchmark: VesselMNIST3D (28^3 volumes), 3 iid sites -- fedavg from the defaults, and pooled.

    .venv/bin/python benchmarks/vesselmnist3d.py [--seeds 0 1 2] [--rounds R] [--width W]
    .venv/bin/python benchmarks/vesselmnist3d.py --merge A.json B.json ...

Each run is configs/vesselmnist3d-fedavg.yaml as it is (a config that names only the file and the
sites; everything else is privmed's default for a 3D MedMNIST set), with only the seed and the
strategy set (and with `--width`, model.width, to compare another width: results then go to
vesselmnist3d/widthW/). The runs go one after another in this process; each seed's results are saved
to benchmarks/results/vesselmnist3d/seedS.json as soon as both of its runs are done, and `--merge`
writes the table from such files (seeds run in separate invocations) without training anything: one
row per strategy and model.

Writes benchmarks/results/vesselmnist3d.md: test AUC and accuracy (mean ± sd over seeds) on the
official 382 test volumes beside the published MedMNIST v2 3D ResNet-18 (28), and the wall seconds of
each run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
    ap.add_argument("--width", type=int, default=None, help="override model.width")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "medmnist")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                    help="only write the table from these saved per-seed results files")
    ap.add_argument("--note", default="", help="a line about the machine's load, for the record "
                    "(with --merge: a last line for the table's notes)")
    args = ap.parse_args()
    overrides = [f"data.root={args.data_root}"]
    if args.rounds:
        overrides.append(f"federation.rounds={args.rounds}")
    folder = args.out / "vesselmnist3d"
    if args.width:
        overrides.append(f"model.width={args.width}")
        folder = folder / f"width{args.width}"
    if not args.merge:
        torch.set_num_threads(args.threads)
        for seed in args.seeds:
            runs = {}
            for strategy in STRATEGIES:
                cfg = load_config(CONFIG, overrides + [f"seed={seed}", f"federation.strategy={strategy}"])
                s = privmed.run(cfg).summary
                runs[strategy] = {"seed": seed, "test": s["test"], "wall_seconds": s["wall_seconds"],
                                  "rounds": cfg.federation.rounds,
                                  "model": {**s["model"], "width": cfg.model.width},
                                  "sample_gradient_steps": s["sample_gradient_steps"],
                                  "threads": args.threads, "note": args.note}
                print(f"seed {seed} {strategy:7s} test AUC {s['test']['auc']:.3f} "
                      f"acc {s['test']['accuracy']:.3f}  {s['wall_seconds']:.0f} s", flush=True)
            io.write_json(folder / f"seed{seed}.json", runs)
        files = [folder / f"seed{s}.json" for s in args.seeds]
    else:
        files = args.merge
    results: dict[tuple[str, str], list[dict]] = {}
    for f in files:
        for strategy, row in json.loads(Path(f).read_text()).items():
            results.setdefault((strategy, _model(row)), []).append(row)
    extra = args.note if args.merge else ""
    io.write_text(args.out / "vesselmnist3d.md", _table(results, load_config(CONFIG, overrides), extra))
    print((args.out / "vesselmnist3d.md").read_text())


def _model(row: dict) -> str:
    """'cnn3d, width 8 (109,562 parameters)': the width from the parameter count when not recorded."""
    m = row["model"]
    width = m.get("width") or {109_562: 8, 436_850: 16}.get(m["parameters"], "default")
    return f"{m['name']}, width {width} ({m['parameters']:,} parameters)"


def _table(results: dict[tuple[str, str], list[dict]], cfg, extra: str = "") -> str:
    """Markdown: one row per (strategy, model) over its seeds, the published figure, the notes."""
    fed, t = cfg.federation, cfg.training
    lines = [
        "### VesselMNIST3D, 3 iid sites, from the defaults",
        "",
        f"`configs/vesselmnist3d-fedavg.yaml` as it is: model `{cfg.model.name}` (width 8 unless the "
        f"row says otherwise), {fed.rounds} rounds x {fed.local_epochs} local epoch(s), batch "
        f"{t.batch_size}, {t.optimizer} lr {t.lr} momentum {t.momentum}, random shifts "
        f"{'on' if t.augment else 'off'}; pooled trains the same epochs on all sites' data in one "
        "place. Mean ± sd over seeds. Test set: the official 382 volumes (43 aneurysms); model chosen "
        "on the sites' validation data (the official 191 validation volumes, split among the sites as "
        "the training volumes are).",
        "",
        "| strategy | model | seeds | test AUC | test accuracy | test balanced accuracy | wall s per run |",
        "|---|---|---|---|---|---|---|",
    ]
    def order(key: tuple[str, str]) -> tuple[int, int]:  # the default (smallest) model first
        return results[key][0]["model"]["parameters"], STRATEGIES.index(key[0])

    for (strategy, model), rs in sorted(results.items(), key=lambda kv: order(kv[0])):
        rs = sorted(rs, key=lambda r: r["seed"])
        lines.append(
            f"| {strategy} | {model} | {', '.join(str(r['seed']) for r in rs)} | "
            f"{mean_sd([r['test']['auc'] for r in rs])} | "
            f"{mean_sd([r['test']['accuracy'] for r in rs])} | "
            f"{mean_sd([r['test']['balanced_accuracy'] for r in rs])} | "
            f"{', '.join(str(round(r['wall_seconds'])) for r in rs)} |"
        )
    for name, auc, acc in PUBLISHED:
        lines.append(f"| MedMNIST v2: {name}, centralised (published) | | | {auc:.3f} | {acc:.3f} | | |")
    lines.append("")
    for (strategy, model), rs in sorted(results.items(), key=lambda kv: order(kv[0])):
        if strategy == "fedavg":
            aucs = [r["test"]["auc"] for r in sorted(rs, key=lambda r: r["seed"])]
            reached = sum(a >= PUBLISHED[0][1] for a in aucs)
            lines.append(f"- fedavg, {model}: the published 3D ResNet-18 test AUC (0.874) reached on "
                         f"**{reached} of {len(aucs)} seeds** (per seed {', '.join(f'{a:.3f}' for a in aucs)})")
    notes = sorted({r["note"] for rs in results.values() for r in rs if r.get("note")})
    threads = sorted({r["threads"] for rs in results.values() for r in rs})
    lines += [
        "- accuracy is at the argmax; 88.7% of the test volumes are healthy vessels, so a model "
        "that never says 'aneurysm' scores 0.887 (balanced accuracy 0.5)",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores shared with other work, "
        f"{', '.join(map(str, threads))} torch thread(s) per run; torch {torch.__version__}, privmed "
        f"{privmed.__version__}" + (f"; {'; '.join(notes)}" if notes else ""),
        *([f"- {extra}"] if extra else []),
        "",
        "Run (each seed in its own process, then the table from their results; `--width 16` for the "
        "width-16 rows; with `--merge`, `--note TEXT` adds the last line of the notes):",
        "",
        "```bash",
        "for s in 0 1 2; do .venv/bin/python benchmarks/vesselmnist3d.py --seeds $s --threads 1 & done; wait",
        ".venv/bin/python benchmarks/vesselmnist3d.py --merge benchmarks/results/vesselmnist3d/seed*.json \\",
        "    benchmarks/results/vesselmnist3d/width16/seed*.json",
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Benchmark: PneumoniaMNIST, 3 sites, Dirichlet 0.5 -- pooled, local, fedavg and cyclic, 3 seeds.

    .venv/bin/python benchmarks/federated_pneumonia.py [--seeds 0 1 2] [--rounds R] [--workers 2]

`--workers N` runs N seeds at once, each in its own process with N-th of the cores; within a seed
the four strategies run one after another in one process, so the fedavg / pooled time ratio is
measured under the same conditions. `--merge A.json B.json ...` writes the table from the saved
results of several invocations (e.g. seeds run on different machines) without training anything.

Writes benchmarks/results/federated_pneumonia.md: test AUC and accuracy (mean and spread over seeds)
beside the published MedMNIST v2 numbers, whether fedavg beats every local model, and the wall-time
ratio fedavg / pooled measured in the same process at equal sample-gradient steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import torch

from _tables import mean_sd

import privmed
from privmed import io
from privmed.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "pneumonia-fedavg.yaml"
STRATEGIES = ("pooled", "local", "fedavg", "cyclic")
PUBLISHED = [  # MedMNIST v2 (Yang et al. 2023), PneumoniaMNIST test AUC / ACC, centralised training
    ("ResNet-18 (28)", 0.944, 0.854),
    ("ResNet-18 (224)", 0.956, 0.864),
    ("ResNet-50 (224)", 0.962, 0.884),
    ("auto-sklearn", 0.942, 0.855),
    ("AutoKeras", 0.947, 0.878),
    ("Google AutoML Vision", 0.991, 0.946),
]



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=None, help="override federation.rounds")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--workers", type=int, default=1, help="seeds run at once (processes)")
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "medmnist")
    ap.add_argument("--threads", type=int, help="torch threads per worker (default: cores / workers)")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                    help="only write the table from these saved results files")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        results = {s: [] for s in STRATEGIES}
        for f in args.merge:
            for s, rows in json.loads(f.read_text()).items():
                results[s] += rows
        cfg = load_config(CONFIG)
        note = f"merged from {len(args.merge)} invocations"
        io.write_text(args.out / "federated_pneumonia.md", _table(results, cfg, note))
        print((args.out / "federated_pneumonia.md").read_text())
        return

    overrides = [f"data.root={args.data_root}"]
    if args.rounds:
        overrides.append(f"federation.rounds={args.rounds}")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    with ProcessPoolExecutor(args.workers) as pool:
        per_seed = list(pool.map(partial(_one_seed, overrides=overrides, threads=threads), args.seeds))
    results = {s: [r[s] for r in per_seed] for s in STRATEGIES}
    cfg = load_config(CONFIG, overrides)

    io.write_json(args.out / "federated_pneumonia.json", results)
    note = f"seeds run {args.workers} at a time, {threads} torch thread(s) each"
    io.write_text(args.out / "federated_pneumonia.md", _table(results, cfg, note))
    print((args.out / "federated_pneumonia.md").read_text())


def _one_seed(seed: int, overrides: list[str], threads: int) -> dict[str, dict]:
    torch.set_num_threads(threads)
    out = {}
    for strategy in STRATEGIES:
        cfg = load_config(CONFIG, overrides + [f"seed={seed}", f"federation.strategy={strategy}"])
        summary = privmed.run(cfg).summary
        out[strategy] = summary
        print(f"seed {seed} {strategy:7s} test AUC {summary['test']['auc']:.3f} "
              f"acc {summary['test']['accuracy']:.3f}  {summary['wall_seconds']:.0f} s", flush=True)
    return out


def _table(results: dict[str, list[dict]], cfg, note: str) -> str:
    seeds = [r["seed"] for r in results["fedavg"]]
    lines = [
        "### PneumoniaMNIST, 3 sites, Dirichlet 0.5",
        "",
        f"Model `{cfg.model.name}`, {cfg.federation.rounds} rounds x "
        + (f"{cfg.federation.local_steps} local steps per site (pooled: the sites' steps together)"
           if cfg.federation.local_steps else f"{cfg.federation.local_epochs} local epoch(s)")
        + f", batch {cfg.training.batch_size}, {cfg.training.optimizer} lr {cfg.training.lr} "
        f"momentum {cfg.training.momentum}; "
        f"seeds {', '.join(map(str, seeds))}; mean ± sd over seeds. Test set: the official 624 images, "
        "pooled; model chosen on validation data. Local: each site's own model, averaged over sites.",
        "",
        "| strategy | test AUC | test accuracy | sample-gradient steps | wall s (mean) |",
        "|---|---|---|---|---|",
    ]
    for s in STRATEGIES:
        rs = results[s]
        lines.append(
            f"| {s} | {mean_sd([r['test']['auc'] for r in rs])} | "
            f"{mean_sd([r['test']['accuracy'] for r in rs])} | {rs[0]['sample_gradient_steps']:,} | "
            f"{statistics.mean(r['wall_seconds'] for r in rs):.0f} |"
        )
    for name, auc, acc in PUBLISHED:
        lines.append(f"| MedMNIST v2: {name}, centralised (published) | {auc:.3f} | {acc:.3f} | | |")
    best_local = [max(v["test_pooled"]["auc"] for v in r["sites"].values()) for r in results["local"]]
    fedavg = [r["test"]["auc"] for r in results["fedavg"]]
    beats = all(f > b for f, b in zip(fedavg, best_local))
    ratios = [f["wall_seconds"] / p["wall_seconds"] for f, p in zip(results["fedavg"], results["pooled"])]
    steps_equal = all(f["sample_gradient_steps"] == p["sample_gradient_steps"]
                      for f, p in zip(results["fedavg"], results["pooled"]))
    lines += [
        "",
        f"- fedavg beats every local model (test AUC, each seed): **{'yes' if beats else 'no'}** "
        f"(fedavg {', '.join(f'{x:.3f}' for x in fedavg)}; best local model "
        f"{', '.join(f'{x:.3f}' for x in best_local)})",
        f"- wall-time ratio fedavg / pooled, same seed, same process: **{statistics.mean(ratios):.3f}** "
        f"(per seed {', '.join(f'{x:.3f}' for x in ratios)}); equal sample-gradient steps: "
        f"{'yes' if steps_equal else 'NO'}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores; {note}; "
        f"torch {torch.__version__}, privmed {privmed.__version__}",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

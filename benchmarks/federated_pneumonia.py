"""Benchmark: PneumoniaMNIST, 3 sites, Dirichlet 0.5 -- pooled, local, fedavg and cyclic, 3 seeds.

    .venv/bin/python benchmarks/federated_pneumonia.py [--seeds 0 1 2] [--rounds 20] [--out benchmarks/results]

Writes benchmarks/results/federated_pneumonia.md: test AUC and accuracy (mean and spread over seeds)
beside the published MedMNIST v2 numbers, whether fedavg beats every local model, and the wall-time
ratio fedavg / pooled measured in the same process at equal sample-gradient steps.
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


def _mean_sd(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=None, help="override federation.rounds")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "medmnist")
    args = ap.parse_args()

    overrides = [f"data.root={args.data_root}"]
    if args.rounds:
        overrides.append(f"federation.rounds={args.rounds}")
    results: dict[str, list[dict]] = {s: [] for s in STRATEGIES}
    for seed in args.seeds:
        for strategy in STRATEGIES:
            cfg = load_config(CONFIG, overrides + [f"seed={seed}", f"federation.strategy={strategy}"])
            t0 = time.perf_counter()
            summary = privmed.run(cfg).summary
            summary["bench_wall_seconds"] = time.perf_counter() - t0
            results[strategy].append(summary)
            print(f"seed {seed} {strategy:7s} test AUC {summary['test']['auc']:.3f} "
                  f"acc {summary['test']['accuracy']:.3f}  {summary['bench_wall_seconds']:.0f} s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    io.write_json(args.out / "federated_pneumonia.json", results)
    io.write_text(args.out / "federated_pneumonia.md", _table(results, cfg, args.seeds))
    print((args.out / "federated_pneumonia.md").read_text())


def _table(results: dict[str, list[dict]], cfg, seeds: list[int]) -> str:
    lines = [
        "### PneumoniaMNIST, 3 sites, Dirichlet 0.5",
        "",
        f"Model `{cfg.model.name}`, {cfg.federation.rounds} rounds x {cfg.federation.local_epochs} local "
        f"epoch, batch {cfg.training.batch_size}, {cfg.training.optimizer} lr {cfg.training.lr}; "
        f"seeds {', '.join(map(str, seeds))}; mean ± sd over seeds. Test set: the official 624 images, "
        "pooled; model chosen on validation data. Local: each site's own model, averaged over sites.",
        "",
        "| strategy | test AUC | test accuracy | sample-gradient steps | wall s (mean) |",
        "|---|---|---|---|---|",
    ]
    for s in STRATEGIES:
        rs = results[s]
        lines.append(
            f"| {s} | {_mean_sd([r['test']['auc'] for r in rs])} | "
            f"{_mean_sd([r['test']['accuracy'] for r in rs])} | {rs[0]['sample_gradient_steps']:,} | "
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
        f"- machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, privmed {privmed.__version__}",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

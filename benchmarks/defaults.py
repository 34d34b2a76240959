"""Benchmark: where privmed's defaults stand, on every kind of source it reads.

    .venv/bin/python benchmarks/defaults.py [--datasets ...] [--seeds 0 1 2] [--workers 2] [--fresh] [--merge]

Each config names only the data, the sites and the strategy (images: 3 sites, 20 rounds of one local
epoch, the README's contract; tables: their hospitals, privmed's rounds); everything else is the
default. For each dataset and split, over 3 seeds:
- defaults: fedavg from the defaults;
- local: each site trains alone from the same defaults (the best site's model, and whether fedavg
  beats every one of them on each seed);
- pooled: all sites' training data in one place, same defaults (the usual ceiling);
- tuned: privmed's tuned settings where it has them (RetinaMNIST: the best of `privmed tune
  configs/retina-fedavg.yaml --trials 20`; the tables: benchmarks/flamby.py's TUNED fedavg);
- published: the reference numbers of ../shared/DATA.md (centrally trained, for MedMNIST).

Splits: iid and Dirichlet 0.5 for the MedMNIST files; the phantom's sites are its simulated scanners
(each its own intensity, blur, noise and prevalence: scanner shift); the tables' sites are their
hospitals. Scores: images, test AUC (accuracy) on the pooled test set (MedMNIST's official one);
tables, FLamby's unweighted mean over hospitals of each one's test score. Every finished run is
saved to benchmarks/results/defaults/<key>.json, so an interrupted benchmark continues where it
stopped; `--merge` only writes benchmarks/results/defaults.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from _tables import mean_sd

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "data"


def _medmnist(name: str) -> dict:
    return {"source": "medmnist", "name": name, "root": str(DATA / "medmnist"), "size": 28, "download": False}


IID = {"count": 3, "partition": "iid"}
DIRICHLET = {"count": 3, "partition": "dirichlet", "alpha": 0.5}
# dataset -> its data section, its splits (name -> sites section), the metric, the rounds, the
# tuned overrides (None: none; "flamby": benchmarks/flamby.py's tuned fedavg), the published reference numbers (name -> (score, accuracy or None))
DATASETS: dict[str, dict] = {
    "pneumoniamnist": {
        "data": _medmnist("pneumoniamnist"), "splits": {"iid": IID, "dirichlet 0.5": DIRICHLET},
        "metric": "auc", "rounds": 20, "tuned": None,
        "published": {"ResNet-18 (28), central": (.944, .854), "ResNet-50 (224), central": (.962, .884)},
    },
    "retinamnist": {
        "data": _medmnist("retinamnist"), "splits": {"iid": IID, "dirichlet 0.5": DIRICHLET},
        "metric": "auc", "rounds": 20,
        # trial 5 of `privmed tune configs/retina-fedavg.yaml --trials 20` (seed 0, validation AUC)
        "tuned": {"training": {"lr": 0.006, "momentum": 0.5, "batch_size": 16, "logit_adjustment": "off"},
                  "federation": {"local_epochs": 2}},
        "published": {"ResNet-18 (28), central (about)": (.717, .524)},
    },
    "phantom": {
        "data": {"source": "phantom"}, "splits": {"3 scanners": {"count": 3}},
        "metric": "auc", "rounds": 20, "tuned": None, "published": {},
    },
    "heart-disease": {
        "data": {"source": "heart-disease", "root": str(DATA / "uci-heart-disease")},
        "splits": {"4 hospitals": {}}, "metric": "accuracy", "rounds": None,
        "tuned": "flamby",  # benchmarks/flamby.py's tuned fedavg (FLamby's protocol, lr 0.01)
        "published": {"FLamby pooled": (.735, None), "FLamby fedavg": (.685, None),
                      "FLamby best strategy (fedadagrad, fedyogi)": (.731, None)},
    },
    "tcga-brca": {
        "data": {"source": "tcga-brca", "root": str(DATA / "tcga-brca")},
        "splits": {"6 regions": {}}, "metric": "c_index", "rounds": None,
        "tuned": "flamby",  # benchmarks/flamby.py's tuned fedavg (FLamby's protocol, per-site scaling)
        "published": {"FLamby pooled": (.676, None), "FLamby fedavg": (.732, None),
                      "FLamby best strategy (fedyogi, fedadam)": (.815, None)},
    },
}
ROWS = ("defaults", "local", "pooled", "tuned")
# the tables are quick: every other strategy from the defaults too, and fedavg with DP-SGD at
# epsilon 1, delta 1e-3 (FLamby's DP setting) where the task allows it (not survival)
OTHER_STRATEGIES = ("fedprox", "scaffold", "cyclic", "fedadam", "fedyogi", "fedadagrad")
DP = {"mode": "dp-sgd", "epsilon": 1.0, "delta": 1e-3}


def rows_of(dataset: str) -> list[str]:
    d = DATASETS[dataset]
    rows = [r for r in ROWS if r != "tuned" or d["tuned"] is not None]
    if d["metric"] != "auc":
        rows += list(OTHER_STRATEGIES) + (["dp"] if d["metric"] == "accuracy" else [])
    return rows


def config(dataset: str, split: str, row: str, seed: int) -> dict:
    d = DATASETS[dataset]
    if row == "tuned" and d["tuned"] == "flamby":
        import flamby

        tuned = flamby._merge(flamby.flamby_config(dataset, "fedavg", seed, DATA), flamby.TUNED[dataset]["fedavg"])
        return {**tuned, "name": f"{dataset}-{row}"}
    strategy = {"defaults": "fedavg", "tuned": "fedavg", "dp": "fedavg"}.get(row, row)
    cfg = {"name": f"{dataset}-{row}", "seed": seed, "data": dict(d["data"]), "sites": dict(d["splits"][split]),
           "federation": {"strategy": strategy}}
    if d["rounds"]:
        cfg["federation"]["rounds"] = d["rounds"]
    for section, values in (d["tuned"] if row == "tuned" else {}).items():
        cfg.setdefault(section, {}).update(values)
    if row == "dp":
        cfg["privacy"] = dict(DP)
    return cfg


def _key(dataset: str, split: str, row: str, seed: int) -> str:
    return f"{dataset}-{split.replace(' ', '')}-{row}-seed{seed}"


def _one(job: tuple) -> dict:
    dataset, split, row, seed, out_dir = job
    torch.set_num_threads(1)
    import privmed
    from privmed import io

    cfg = config(dataset, split, row, seed)
    metric = DATASETS[dataset]["metric"]
    tabular = metric != "auc"
    start = time.perf_counter()
    s = privmed.run(cfg, report=False).summary
    test = s["test_mean_over_sites"] if tabular else s["test"]
    result = {
        "dataset": dataset, "split": split, "row": row, "seed": seed,
        "score": test.get(metric), "accuracy": None if tabular else test.get("accuracy"),
        "epsilon": s["privacy"].get("epsilon"),
        "wall_seconds": time.perf_counter() - start, "config": cfg,
    }
    if row == "local" and not tabular:  # each site's own model on the pooled test set
        result["sites"] = {k: v["test_pooled"][metric] for k, v in s["sites"].items()}
    io.write_json(out_dir / f"{_key(dataset, split, row, seed)}.json", result)
    print(f"{_key(dataset, split, row, seed)}: {result['score']:.3f} ({result['wall_seconds']:.0f} s)", flush=True)
    return result


def table(results: list[dict]) -> str:
    from privmed.privacy.figures import format_epsilon  # rounded up: never below what the ledger holds

    lines = [
        "# Where the defaults stand",
        "",
        "Each config names only the data, the sites and the strategy; everything else is privmed's "
        "default (images: 3 sites, fedavg, 20 rounds x 1 local epoch). Mean ± sd over the seeds "
        "named. Images: test AUC (accuracy) on the pooled test set (MedMNIST's "
        "official one). Tables: FLamby's unweighted mean over hospitals of each one's test accuracy "
        "(heart disease) or C-index (TCGA-BRCA). `benchmarks/defaults.py` holds every setting.",
        "",
        "| dataset | sites | fedavg, defaults | local models | fedavg beats every local model | "
        "pooled, defaults | fedavg, tuned | published | seeds |",
        "|---|---|---:|---:|---|---:|---:|---|---|",
    ]
    for dataset, d in DATASETS.items():
        for split in d["splits"]:
            sel = {row: sorted((r for r in results if (r["dataset"], r["split"], r["row"]) == (dataset, split, row)),
                               key=lambda r: r["seed"]) for row in ROWS}
            if not sel["defaults"]:
                continue

            def cell(rows: list[dict]) -> str:
                if not rows:
                    return "-"
                text = mean_sd([r["score"] for r in rows])
                if rows[0]["accuracy"] is not None:
                    text += f" ({statistics.mean(r['accuracy'] for r in rows):.3f})"
                return text

            if sel["local"] and "sites" in sel["local"][0]:
                best = {r["seed"]: max(r["sites"].values()) for r in sel["local"]}
                local = mean_sd(list(best.values())) + " (best site)"
                fed = {r["seed"]: r["score"] for r in sel["defaults"]}
                wins = [s for s in best if s in fed and fed[s] > best[s]]
                beats = f"{len(wins)} of {len(best)} seeds"
            else:
                local = cell(sel["local"]) + " (mean over hospitals)" if sel["local"] else "-"
                beats = "-"
            published = "; ".join(f"{name} {a:.3f}" + (f" ({b:.3f})" if b is not None else "")
                                  for name, (a, b) in d["published"].items()) or "-"
            seeds = ", ".join(str(r["seed"]) for r in sel["defaults"])
            lines.append(f"| {dataset} | {split} | {cell(sel['defaults'])} | {local} | {beats} | "
                         f"{cell(sel['pooled'])} | {cell(sel['tuned'])} | {published} | {seeds} |")
    lines += ["", "The tables from the defaults, strategy by strategy (FLamby's mean over hospitals; "
              "dp: fedavg with DP-SGD at epsilon 1, delta 1e-3, each hospital's own accountant):", "",
              "| dataset | " + " | ".join(("fedavg",) + OTHER_STRATEGIES + ("pooled", "dp (epsilon spent)")) + " |",
              "|---|" + "---:|" * (len(OTHER_STRATEGIES) + 3)]
    for dataset, d in DATASETS.items():
        if d["metric"] == "auc":
            continue
        by = {row: [r for r in results if r["dataset"] == dataset and r["row"] == row] for row in rows_of(dataset)}
        if not by["defaults"]:
            continue
        cells = [mean_sd([r["score"] for r in by[row]]) if by.get(row) else "-"
                 for row in ("defaults",) + OTHER_STRATEGIES + ("pooled",)]
        dp = by.get("dp") or []
        cells.append(f"{mean_sd([r['score'] for r in dp])} ({format_epsilon(max(r['epsilon'] for r in dp), 4)})" if dp else "-")
        lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
    wall = sum(r["wall_seconds"] for r in results)
    lines += ["", f"{len(results)} runs, {wall / 60:.0f} min of run time; {platform.machine()}, "
              f"torch {torch.__version__}, one thread per run.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the images' seeds")
    ap.add_argument("--table-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                    help="the tables' seeds (FLamby reports 5)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="run again what benchmarks/results/defaults holds")
    ap.add_argument("--merge", action="store_true", help="only write the table from the saved runs")
    args = ap.parse_args()
    from privmed import io

    out_dir = RESULTS / "defaults"
    out_dir.mkdir(parents=True, exist_ok=True)
    def seeds(ds: str) -> list[int]:
        return args.seeds if DATASETS[ds]["metric"] == "auc" else args.table_seeds

    jobs = [(ds, split, row, seed, out_dir)
            for ds in args.datasets for split in DATASETS[ds]["splits"] for seed in seeds(ds)
            for row in rows_of(ds)]
    if not args.merge:
        todo = [j for j in jobs if args.fresh or not (out_dir / f"{_key(*j[:4])}.json").exists()]
        print(f"{len(todo)} of {len(jobs)} runs to do", flush=True)
        with ProcessPoolExecutor(args.workers) as ex:
            list(ex.map(_one, todo))
    results = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json"))]
    results = [r for r in results if r["dataset"] in args.datasets and r["seed"] in seeds(r["dataset"])]
    text = table(results)
    io.write_text(RESULTS / "defaults.md", text)
    print(text)


if __name__ == "__main__":
    main()

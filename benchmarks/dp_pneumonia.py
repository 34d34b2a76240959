"""Benchmark: privacy against utility. PneumoniaMNIST, 3 sites, Dirichlet 0.5, fedavg and cyclic, DP-SGD
at epsilon 1, 3 and 8 (delta 1e-5) and without DP, 3 seeds.

    .venv/bin/python benchmarks/dp_pneumonia.py [--seeds 0 1 2] [--epsilons 1 3 8] [--workers 2]
        [--strategies fedavg cyclic] [--set KEY=VALUE ...] [--merge A.json ...]

Every run is configs/pneumonia-dp.yaml with privmed's DP-SGD defaults (config.DP_SGD_DEFAULTS), the
strategy and epsilon set; the "no DP" runs use exactly the same resolved settings with
privacy.mode none. Every run keeps its last round's model (the DP default), so the rows differ only
in the privacy. `--workers N` runs N runs at once, one torch thread each; each finished run is saved
to benchmarks/results/dp_pneumonia/<strategy>-<eps>-seed<N>.json, so an interrupted benchmark
continues where it stopped (`--fresh` ignores saved runs); `--merge` only writes the table.

Writes benchmarks/results/dp_pneumonia.md: test AUC and accuracy (mean ± sd over seeds), the largest
epsilon any site spent (from the run's privacy ledger), and the training time of DP runs relative to
the no-DP runs of the same seed.
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

from privmed.privacy.figures import format_epsilon

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "pneumonia-dp.yaml"
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = {8.0: 0.92, 1.0: 0.85}  # the bar for fedavg: test AUC at these epsilons


def _key(strategy: str, eps: float | None, seed: int) -> str:
    return f"{strategy}-{'none' if eps is None else f'eps{eps:g}'}-seed{seed}"


def _config(strategy: str, eps: float | None, seed: int, data_root: Path, sets: list[str]):
    from privmed.config import load_config, validate_config

    over = [f"data.root={data_root}", f"seed={seed}", f"federation.strategy={strategy}", *sets]
    cfg = load_config(CONFIG, over)
    if eps is None:
        raw = cfg.to_dict()
        raw["privacy"] = {"mode": "none"}
        raw["federation"]["model_selection"] = "last"
        return validate_config(raw)
    return load_config(CONFIG, [*over, f"privacy.epsilon={eps}"])


def _one(job: tuple) -> dict:
    strategy, eps, seed, data_root, sets, out_dir = job
    torch.set_num_threads(1)
    import privmed

    cfg = _config(strategy, eps, seed, data_root, sets)
    start = time.perf_counter()
    s = privmed.run(cfg).summary
    row = {
        "strategy": strategy, "epsilon_target": eps, "seed": seed,
        "test_auc": s["test"]["auc"], "test_accuracy": s["test"]["accuracy"],
        "epsilon_spent": s["privacy"]["epsilon"],
        "unit": s["privacy"].get("unit"),
        # since issue 12 every site draws its DP noise and batches from a secret key of its own
        "dp_randomness": "secret site keys",
        "epsilon_by_site": s["privacy"].get("sites"),
        "noise_multipliers": {k: v["noise_multiplier"] for k, v in s["privacy"].get("plan", {}).items()},
        "train_seconds": s["train_seconds"], "wall_seconds": time.perf_counter() - start,
        "rounds": s["rounds_completed"], "config": cfg.to_dict(),
    }
    from privmed import io

    io.write_json(out_dir / f"{_key(strategy, eps, seed)}.json", row)
    print(f"{_key(strategy, eps, seed)}: test AUC {row['test_auc']:.3f}, epsilon {row['epsilon_spent']}, "
          f"{row['wall_seconds']:.0f} s", flush=True)
    return row



def _unit(rows: list[dict]) -> str:
    """The unit of privacy the runs' guarantees cover, as the runs that recorded it say (PneumoniaMNIST
    names no patients: one image; runs saved before the unit was recorded claimed 'patient')."""
    units = {r["unit"] for r in rows if r["epsilon_target"] is not None and r.get("unit")}
    return ", ".join(sorted(units)) or "not recorded"


def table(rows: list[dict], note: str) -> str:
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    targets = sorted({r["epsilon_target"] for r in rows if r["epsilon_target"] is not None}, reverse=True)
    base = {(r["strategy"], r["seed"]): r for r in rows if r["epsilon_target"] is None}
    cfg = next((r for r in rows if r["epsilon_target"] is not None), rows[0])["config"]
    fed, tr, model = cfg["federation"], cfg["training"], cfg["model"]
    lines = [
        "# Privacy against utility: PneumoniaMNIST, 3 sites, Dirichlet 0.5",
        "",
        f"DP-SGD at every site (unit: {_unit(rows)}, delta {cfg['privacy'].get('delta', 1e-5):g}, "
        f"{cfg['privacy'].get('accountant', 'prv')} accountant), `{model['name']}`, {fed['rounds']} rounds x "
        f"{fed['local_steps']} local step(s), expected batch {tr['batch_size']}, SGD lr {tr['lr']:g}, "
        f"clip {cfg['privacy'].get('max_grad_norm', 1.0):g}; the last round's model; test AUC on the official "
        f"test set (624 images). No DP: the same settings without clipping or noise. {note}",
        "",
        "| strategy | epsilon (target) | epsilon spent (max over sites) | test AUC | test accuracy "
        "| train time / no DP | seeds |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for strategy in strategies:
        for eps in [None, *targets]:
            sel = sorted((r for r in rows if r["strategy"] == strategy and r["epsilon_target"] == eps),
                         key=lambda r: r["seed"])
            if not sel:
                continue
            spent = "-" if eps is None else format_epsilon(max(r["epsilon_spent"] for r in sel), 4)
            ratios = [r["train_seconds"] / base[(strategy, r["seed"])]["train_seconds"]
                      for r in sel if (strategy, r["seed"]) in base and eps is not None]
            ratio = f"{statistics.mean(ratios):.2f}" if ratios else "-"
            lines.append(
                f"| {strategy} | {'no DP' if eps is None else f'{eps:g}'} | {spent} | "
                f"{mean_sd([r['test_auc'] for r in sel])} | {mean_sd([r['test_accuracy'] for r in sel])} | "
                f"{ratio} | {', '.join(str(r['seed']) for r in sel)} |"
            )
    dp_rows = [r for r in rows if r["epsilon_target"] is not None]
    keyed = sum(r.get("dp_randomness") == "secret site keys" for r in dp_rows)
    lines += ["", f"DP noise and batches drawn from each site's secret key in {keyed} of {len(dp_rows)} DP "
              "runs (the others, saved earlier, drew them from the run's public seed: the same "
              "distribution, but replayable by anyone holding the seed)."]
    lines += ["", "Done-when bars (fedavg, every seed):"]
    for eps, bar in TARGETS.items():
        sel = [r for r in rows if r["strategy"] == "fedavg" and r["epsilon_target"] == eps]
        if sel:
            aucs = ", ".join(f"{r['test_auc']:.3f}" for r in sorted(sel, key=lambda r: r["seed"]))
            ok = all(r["test_auc"] >= bar for r in sel) and all(r["epsilon_spent"] <= eps for r in sel)
            lines.append(f"- epsilon {eps:g}: test AUC >= {bar} and within budget: "
                         f"{'yes' if ok else 'NO'} ({aucs})")
    lines += [
        "",
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, one thread per run. "
        "'train time / no DP' is train_seconds against the no-DP run of the same seed; runs share the "
        "machine, so it is only indicative (benchmarks/dp_grad_sample_modes.py measures the DP cost).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 3.0, 1.0])
    ap.add_argument("--strategies", nargs="+", default=["fedavg", "cyclic"])
    ap.add_argument("--no-baseline", action="store_true", help="skip the no-DP runs")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run (repeatable)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "medmnist")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--fresh", action="store_true", help="rerun runs that have saved results")
    ap.add_argument("--merge", action="store_true", help="only write the table from the saved runs")
    args = ap.parse_args()
    runs_dir = args.out / "dp_pneumonia"
    runs_dir.mkdir(parents=True, exist_ok=True)
    eps_list = ([] if args.no_baseline else [None]) + list(args.epsilons)
    wanted = [(s, e, seed) for s in args.strategies for e in eps_list for seed in args.seeds]
    if not args.merge:
        jobs = [(s, e, seed, args.data_root, args.sets, runs_dir) for s, e, seed in wanted
                if args.fresh or not (runs_dir / f"{_key(s, e, seed)}.json").exists()]
        print(f"{len(jobs)} runs to do, {len(wanted) - len(jobs)} saved", flush=True)
        with ProcessPoolExecutor(args.workers) as pool:
            list(pool.map(_one, jobs))
    rows = [json.loads((runs_dir / f"{_key(s, e, seed)}.json").read_text()) for s, e, seed in wanted
            if (runs_dir / f"{_key(s, e, seed)}.json").exists()]
    from privmed import io

    note = f"{len(rows)} of {len(wanted)} runs."
    io.write_text(args.out / "dp_pneumonia.md", table(rows, note))
    print((args.out / "dp_pneumonia.md").read_text())


if __name__ == "__main__":
    main()

"""Benchmark: membership inference against PneumoniaMNIST models, with and without DP-SGD.

    .venv/bin/python benchmarks/audit_pneumonia.py [--shadows 6] [--candidates 500] [--workers 2] [--reuse-runs]
        [--non-members test|validation] [--targets "epsilon 1" ...]

Three runs of the same federation (PneumoniaMNIST 28 px, 3 sites, Dirichlet 0.5, fedavg): the
defaults without privacy (20 rounds x 1 local epoch: the first config a user writes), and DP-SGD at
epsilon 1 and 8 (delta 1e-5, the DP defaults: dpcnn, 200 rounds x 1 step of expected batch 256).
Each is then attacked by `privmed audit` (every attack; --shadows shadow runs of its own config;
--candidates training patients and as many test patients). The run directories (with the report)
go to runs/audit-benchmark/ (their private/ folders hold the sites' secret keys and the audits'
results: not for the repository); each private/audit.json, computed from a public data set, is
copied to benchmarks/results/audit/, and the table to benchmarks/results/audit_pneumonia.md.
"""

from __future__ import annotations

import argparse
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "data" / "medmnist"
TARGETS = {"no DP": None, "epsilon 8": 8.0, "epsilon 1": 1.0}


def config(epsilon: float | None) -> dict:
    cfg = {
        "name": "audit-pneumonia-" + ("nodp" if epsilon is None else f"eps{epsilon:g}"), "seed": 0,
        "data": {"source": "medmnist", "name": "pneumoniamnist", "root": str(DATA), "size": 28, "download": False},
        "sites": {"count": 3, "partition": "dirichlet", "alpha": 0.5},
        "federation": {"strategy": "fedavg"},
    }
    if epsilon is None:
        cfg["federation"]["rounds"] = 20
    else:
        cfg["privacy"] = {"mode": "dp-sgd", "epsilon": epsilon, "delta": 1e-5}
    return cfg


def _one(job: tuple) -> tuple[str, dict, float]:
    label, epsilon, shadows, candidates, out_root, reuse, non_members = job
    torch.set_num_threads(1)
    import shutil

    import privmed
    from privmed.audit.run import audit

    start = time.perf_counter()
    cfg = config(epsilon)
    out = ROOT / "runs" / "audit-benchmark" / cfg["name"]
    if not (reuse and (out / "summary.json").is_file()):  # else audit the run made before
        if out.exists():
            shutil.rmtree(out)
        privmed.run(cfg, out)
    result = audit(out, shadows=shadows, candidates=candidates, seed=0, non_members=non_members,
                   progress=lambda msg: print(f"{label}: {msg}", flush=True))
    suffix = "" if non_members == "test" else f"-{non_members}"
    # a benchmark on public data (PneumoniaMNIST): its results may be published
    shutil.copyfile(out / "private" / "audit.json", out_root / f"{cfg['name']}{suffix}.json")
    return label, result, time.perf_counter() - start


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def table(results: dict[str, dict], minutes: float) -> str:
    from privmed.privacy.figures import format_epsilon  # rounded up: never below what the ledger holds

    lines = [
        "# Membership inference: PneumoniaMNIST, 3 sites, Dirichlet 0.5, fedavg",
        "",
        "`privmed audit` against each run's selected model. "
        + next(iter(results.values()))["candidates"]["drawn_from"].capitalize() + ". ROC-AUC and the share of members "
        "found at 0.1% and 1% false positives, with 95% bootstrap intervals; 'bound': the highest "
        "ROC-AUC any attack can reach against the claimed epsilon.",
        "",
        "| run | epsilon spent (bound) | attack | ROC-AUC (95% CI) | TPR at 0.1% FPR (95% CI) | TPR at 1% FPR (95% CI) |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        c = r["claimed"]
        eps = "none" if c["epsilon"] is None else f"{format_epsilon(c['epsilon'], 4)} ({c['max_roc_auc']:.3f})"
        for name, a in r["attacks"].items():
            if "skipped" in a:
                continue
            lo, hi = a["roc_auc_ci"]
            t, tci = a["tpr_at_fpr"], a["tpr_at_fpr_ci"]

            def cell(k: str) -> str:
                ci = tci.get(k)
                return _pct(t.get(k)) + ("" if not ci or ci[0] is None else f" ({_pct(ci[0])}–{_pct(ci[1])})")

            lines.append(f"| {label} | {eps} | {name} | {a['roc_auc']:.3f} ({lo:.3f}–{hi:.3f}) | "
                         f"{cell('0.001')} | {cell('0.01')} |")
    any_r = next(iter(results.values()))
    lines += [
        "",
        f"{any_r['candidates']['members']} members, {any_r['candidates']['non_members']} non-members, "
        f"{any_r['shadows']['trained']} shadow runs per target; {minutes:.0f} min in all; "
        f"{platform.machine()}, torch {torch.__version__}, one thread per run.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shadows", type=int, default=6)
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--non-members", choices=("test", "validation"), default="test",
                    help="non-members from the official test set, or from half the sites' validation patients")
    ap.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    ap.add_argument("--reuse-runs", action="store_true",
                    help="audit the runs a previous call left in runs/audit-benchmark (same configs)")
    args = ap.parse_args()
    from privmed import io

    out_root = RESULTS / "audit"
    out_root.mkdir(parents=True, exist_ok=True)
    start = time.time()
    jobs = [(label, TARGETS[label], args.shadows, args.candidates, out_root, args.reuse_runs, args.non_members)
            for label in args.targets]
    with ProcessPoolExecutor(args.workers) as ex:
        done = {label: result for label, result, _ in ex.map(_one, jobs)}
    text = table({label: done[label] for label in args.targets}, (time.time() - start) / 60)
    suffix = "" if args.non_members == "test" else f"_{args.non_members}"
    io.write_text(RESULTS / f"audit_pneumonia{suffix}.md", text)
    print(text)


if __name__ == "__main__":
    main()

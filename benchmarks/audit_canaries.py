"""Benchmark: an empirical epsilon from gradient canaries (one run), PneumoniaMNIST, 3 sites.

    .venv/bin/python benchmarks/audit_canaries.py [--canaries 1000] [--workers 2]

The three runs of benchmarks/audit_pneumonia.py (no DP: 20 rounds x 1 local epoch; DP-SGD at
epsilon 8 and 1, delta 1e-5: the DP defaults), each re-trained once by `privmed audit --attack
canaries` with --canaries Dirac canaries at the first site (privmed.audit.canaries). It needs the
runs in runs/audit-benchmark/ (made by audit_pneumonia.py; made here when missing). Writes
benchmarks/results/audit_canaries.md.
"""

from __future__ import annotations

import argparse
import platform
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from audit_pneumonia import ROOT, TARGETS, config

RESULTS = ROOT / "benchmarks" / "results"


def _one(job: tuple) -> tuple[str, dict, dict]:
    label, epsilon, m = job
    torch.set_num_threads(1)
    import privmed
    from privmed.audit.canaries import canary_audit
    from privmed.audit.membership import load_target

    cfg = config(epsilon)
    out = ROOT / "runs" / "audit-benchmark" / cfg["name"]
    if not (out / "summary.json").is_file():
        privmed.run(cfg, out)
    target = load_target(out)
    return label, canary_audit(target, m=m, seed=0), target.summary.get("privacy") or {}


def main() -> None:
    from privmed.privacy.figures import format_epsilon  # rounded up: never below what the ledger holds

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--canaries", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    from privmed import io

    start = time.time()
    with ProcessPoolExecutor(args.workers) as ex:
        done = {label: (r, p) for label, r, p in ex.map(_one, [(k, e, args.canaries) for k, e in TARGETS.items()])}
    lines = [
        "# Empirical epsilon from gradient canaries: PneumoniaMNIST, 3 sites, Dirichlet 0.5, fedavg",
        "",
        "`privmed audit RUN_DIR --attack canaries`: the run's config trained again with "
        f"{args.canaries} Dirac canaries at the first site (each a patient whose gradient is the clipping "
        "norm C on one coordinate, included with probability 1/2); the coordinator scores each from the "
        "site's updates. Lower bound on epsilon at 95% confidence (Steinke, Nasr and Jagielski 2023); "
        "it must never pass the claimed epsilon.",
        "",
        "| run | claimed epsilon (delta) | lower bound | correct guesses | seconds |",
        "|---|---|---:|---:|---:|",
    ]
    for label, (r, p) in done.items():
        claimed = "none" if p.get("epsilon") is None else f"{format_epsilon(p['epsilon'], 4)} ({p['delta']:g})"
        lines.append(f"| {label} | {claimed} | {r['epsilon_lower']:.3f} | {r['correct']} of {r['guesses']} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", f"{(time.time() - start) / 60:.0f} min; {platform.machine()}, torch {torch.__version__}, "
              "one thread per run. Made by `.venv/bin/python benchmarks/audit_canaries.py`.", ""]
    text = "\n".join(lines)
    io.write_text(RESULTS / "audit_canaries.md", text)
    print(text)


if __name__ == "__main__":
    main()

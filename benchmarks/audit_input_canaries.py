"""Benchmark: an empirical epsilon from input canaries (one run, black box), PneumoniaMNIST, 3 sites.

    .venv/bin/python benchmarks/audit_input_canaries.py [--canaries 1000] [--workers 2] [--reuse]
        [--targets "no DP" ...]

The three runs of benchmarks/audit_pneumonia.py (no DP: 20 rounds x 1 local epoch; DP-SGD at
epsilon 8 and 1, delta 1e-5: the DP defaults) and a non-private run made to memorise (MEMORISING:
3 local epochs a round, no augmentation), each trained once more by `privmed audit --attack
input-canaries` with --canaries mislabelled images at the first site (privmed.audit.input_canaries),
scored from the final model alone; the memorising run also with the canaries at its largest site.
The runs go to runs/audit-benchmark/ (made when missing; the first three are those of
audit_pneumonia.py and audit_canaries.py). Each audit's result goes to
benchmarks/results/audit/input-canaries-RUN-SITE.json (--reuse keeps one of the same number of
canaries), the table to benchmarks/results/audit_input_canaries.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from audit_pneumonia import ROOT, config

RESULTS = ROOT / "benchmarks" / "results"
MEMORISING = {"federation": {"local_epochs": 3}, "training": {"augment": False}}
# label: (epsilon, config changes, site); site-2 holds 2,969 of the 4,708 training images, site-1 508
TARGETS = {
    "no DP": (None, None, "site-1"), "epsilon 8": (8.0, None, "site-1"), "epsilon 1": (1.0, None, "site-1"),
    "no DP, memorising": (None, MEMORISING, "site-1"), "no DP, memorising, at site-2": (None, MEMORISING, "site-2"),
}


def target_config(epsilon: float | None, extra: dict | None) -> dict:
    cfg = config(epsilon)
    if extra:
        cfg["name"] += "-memorising"
        for key, values in extra.items():
            cfg.setdefault(key, {}).update(values)
    return cfg


def _one(job: tuple) -> tuple[str, dict, dict]:
    label, epsilon, extra, site, m, reuse = job
    torch.set_num_threads(1)
    import privmed
    from privmed import io
    from privmed.audit.run import audit

    cfg = target_config(epsilon, extra)
    out = ROOT / "runs" / "audit-benchmark" / cfg["name"]
    if not (out / "summary.json").is_file():
        privmed.run(cfg, out)
    summary = json.loads((out / "summary.json").read_text())
    saved = RESULTS / "audit" / f"input-canaries-{cfg['name']}-{site}.json"
    result = json.loads(saved.read_text()) if reuse and saved.is_file() else None
    if not (result and result.get("canaries") == m):
        result = audit(out, ["input-canaries"], canaries=m, site=site, seed=0,
                       progress=lambda msg: print(f"{label}: {msg}", flush=True))["input-canaries"]
        io.write_json(saved, result)
    return label, result, summary


def main() -> None:
    from privmed.privacy.figures import format_epsilon  # rounded up: never below what the ledger holds

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--canaries", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="keep the results of earlier audits")
    ap.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    args = ap.parse_args()
    from privmed import io

    start = time.time()
    jobs = [(k, *TARGETS[k], args.canaries, args.reuse) for k in args.targets]
    with ProcessPoolExecutor(args.workers) as ex:
        done = {label: (r, s) for label, r, s in ex.map(_one, jobs)}
    lines = [
        "# Empirical epsilon from input canaries (black box): PneumoniaMNIST, 3 sites, Dirichlet 0.5, fedavg",
        "",
        "`privmed audit RUN_DIR --attack input-canaries`: the run's config trained again with "
        f"{args.canaries} canary patients at one site, each a real image no site trains on (the official "
        "test split, then the sites' validation images) with the other label, included with probability "
        "1/2; the attacker sees only the final model and scores each canary by the log-odds the model "
        "gives its wrong label. Lower bound on epsilon at 95% confidence (Steinke, Nasr and Jagielski "
        "2023); it must never pass the claimed epsilon. 'ROC-AUC': how far those scores separate the "
        "trained canaries from the others (95% bootstrap interval; descriptive, not part of the bound). "
        "The white-box gradient canaries on the first three runs are in audit_canaries.md.",
        "",
        "| run | canaries at | claimed epsilon (delta) | lower bound | correct guesses | ROC-AUC (95% CI) "
        "| run's test AUC | audit seconds |",
        "|---|---|---|---:|---:|---|---:|---:|",
    ]
    for label, (r, s) in done.items():
        p = s.get("privacy") or {}
        claimed = "none" if p.get("epsilon") is None else f"{format_epsilon(p['epsilon'], 4)} ({p['delta']:g})"
        lo, hi = r["roc_auc_ci"]
        lines.append(f"| {label} | {r['site']} ({r['included']} trained) | {claimed} | {r['epsilon_lower']:.3f} | "
                     f"{r['correct']} of {r['guesses']} | {r['roc_auc']:.3f} ({lo:.3f}–{hi:.3f}) | "
                     f"{s['test']['auc']:.3f} | {r['seconds']:.0f} |")
    compute = sum(r["seconds"] for r, _ in done.values())
    compute += sum({s["name"]: s.get("wall_seconds", 0.0) for _, s in done.values()}.values())
    memo = target_config(*TARGETS["no DP, memorising"][:2])
    lines += ["", f"'memorising': the no-DP run with {memo['federation']['local_epochs']} local epochs a "
              "round and no augmentation. Site-1 holds 508 of the 4,708 training images (all pneumonia: "
              "Dirichlet 0.5), site-2 2,969. 'run's test AUC': the audited run's own model, without "
              "canaries.",
              "", f"Compute: {compute / 60:.0f} min of one thread for the runs and their audits, on a machine "
              "shared with other work (this invocation: "
              f"{(time.time() - start) / 60:.0f} min{', reusing earlier audits' if args.reuse else ''}); "
              f"{platform.machine()}, torch {torch.__version__}, one thread per run. Made by `.venv/bin/python "
              "benchmarks/audit_input_canaries.py`.", ""]
    text = "\n".join(lines)
    io.write_text(RESULTS / "audit_input_canaries.md", text)
    print(text)


if __name__ == "__main__":
    main()

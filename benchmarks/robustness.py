"""Benchmark: malicious hospitals against robust aggregation, PneumoniaMNIST over 5 sites.

    .venv/bin/python benchmarks/robustness.py [--workers 2] [--rounds 20] [--seeds 0]

The federation is the first config a user writes (fedavg, 20 rounds x 1 local epoch, the defaults),
over 5 iid sites. Every aggregator (federation.aggregator) is run
- with every site honest, over iid sites and over Dirichlet 0.5 label skew (what a defence costs
  when the sites simply differ);
- with 1 of the 5 sites malicious (the last one), for each attack: sign-flip x10, gaussian x10,
  label-flip, little-is-enough (privmed.federation.adversary); with 2, for sign-flip x10 and
  little-is-enough. (scaling x10 is left out: on CPU the grid already takes hours.)
Each rule is told to withstand the number of malicious sites (federation.byzantine) where it can
with 5 sites, else the most it can (krum and multi-krum: 1; bulyan needs 7 sites for one and is
refused). Test AUC on the official test set, mean over --seeds, written to
benchmarks/results/robustness.md. Each finished run's AUC is kept in benchmarks/results/robustness.json,
so that a call that was stopped goes on where it stopped (delete the file to start over).
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "data" / "medmnist"
SITES = 5
RULES = ("mean", "median", "trimmed-mean", "krum", "multi-krum", "norm-clip", "bulyan")
ATTACKS = {1: ("sign-flip", "gaussian", "label-flip", "little-is-enough"), 2: ("sign-flip", "little-is-enough")}
CACHE = RESULTS / "robustness.json"


def byzantine_for(rule: str, malicious: int) -> int | None:
    """What the rule is told to withstand: the malicious count when 5 sites allow it, else the
    most they allow (at least 1); None when even 1 is beyond the rule with 5 sites."""
    from privmed.config import aggregator_min_sites

    for f in range(max(1, malicious), 0, -1):
        if aggregator_min_sites(rule, f) <= SITES:
            return f
    return None


def config(rule: str, attack: str, malicious: int, partition: str, rounds: int, seed: int) -> dict:
    cfg = {
        "name": f"robust-{rule}-{attack}-{malicious}-{partition}-s{seed}", "seed": seed,
        "data": {"source": "medmnist", "name": "pneumoniamnist", "root": str(DATA), "size": 28, "download": False},
        "sites": {"count": SITES, "partition": partition, "alpha": 0.5},
        "federation": {"strategy": "fedavg", "rounds": rounds, "aggregator": rule,
                       "byzantine": byzantine_for(rule, malicious) or 1},
    }
    if attack != "none":
        cfg["attack"] = {"kind": attack, "sites": malicious, "scale": 10}
    return cfg


def _one(job: tuple) -> tuple[tuple, float | str, float]:
    key, cfg = job
    torch.set_num_threads(1)
    import privmed
    from privmed.errors import PrivmedError, TrainingDiverged

    start = time.perf_counter()
    try:
        auc = privmed.run(cfg, None).summary["test"]["auc"]
    except TrainingDiverged as e:  # the attack blew the model up
        auc = f"diverged: {e}"
    except PrivmedError as e:  # a combination the config refuses: the table says why
        auc = str(e).split(": ", 1)[-1]
    return key, auc, time.perf_counter() - start


def _cell(values: list) -> str:
    if isinstance(values[0], str):
        return "diverged" if values[0].startswith("diverged") else "refused"
    return f"{statistics.mean(values):.3f}"


def table(results: dict, rounds: int, seeds: list[int], minutes: float) -> str:
    def row(label: str, key_of) -> str:  # noqa: ANN001
        return f"| {label} | " + " | ".join(_cell(results[key_of(r)]) for r in RULES) + " |"

    head = "| | " + " | ".join(RULES) + " |"
    rule = "|---|" + "---:|" * len(RULES)
    lines = [
        f"# Malicious hospitals: PneumoniaMNIST, {SITES} sites, fedavg, {rounds} rounds x 1 local epoch",
        "",
        "Test AUC of the selected model on the official test set"
        + (f", mean over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f", seed {seeds[0]}")
        + ". Columns: `federation.aggregator`. Malicious sites are the last ones; each rule is told to "
        "withstand that many (`federation.byzantine`) where 5 sites allow it, else 1 (krum, "
        "multi-krum: 2 would need 7 sites). Bulyan needs 7 sites to withstand one and is refused.",
        "",
        "## Every hospital honest", "", head, rule,
        row("iid sites", lambda r: (r, "none", 0, "iid")),
        row("label skew (Dirichlet 0.5)", lambda r: (r, "none", 0, "dirichlet")),
        "",
    ]
    for m in (1, 2):
        lines += [f"## {m} of {SITES} hospitals malicious (iid sites)", "", head, rule]
        lines += [row(a + (" x10" if a in ("sign-flip", "scaling", "gaussian") else ""),
                      lambda r, a=a: (r, a, m, "iid")) for a in ATTACKS[m]]
        lines.append("")
    lines += [
        f"{len(results) * len(seeds)} runs, the last {minutes:.0f} min of them in this call; {platform.machine()}, torch "
        f"{torch.__version__}, one thread per run. Made by `.venv/bin/python benchmarks/robustness.py"
        f" --rounds {rounds} --seeds {' '.join(map(str, seeds))}`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args()
    from privmed import io

    keys = [(r, "none", 0, p) for r in RULES for p in ("iid", "dirichlet")]
    keys += [(r, a, m, "iid") for m in (1, 2) for a in ATTACKS[m] for r in RULES]
    cache = json.loads(CACHE.read_text()) if CACHE.is_file() else {}
    name = lambda k, s: f"{'|'.join(map(str, k))}|seed {s}|{args.rounds} rounds"  # noqa: E731
    jobs = [((k, s), config(*k, args.rounds, s)) for k in keys for s in args.seeds if name(k, s) not in cache]
    start = time.time()
    with ProcessPoolExecutor(args.workers) as ex:
        for (k, s), auc, seconds in ex.map(_one, jobs):
            cache[name(k, s)] = auc
            io.write_json(CACHE, cache)
            print(k, auc if isinstance(auc, str) else f"{auc:.3f}", f"{seconds:.0f}s", flush=True)
    results = {k: [cache[name(k, s)] for s in args.seeds] for k in keys}
    text = table(results, args.rounds, args.seeds, (time.time() - start) / 60)
    io.write_text(RESULTS / "robustness.md", text)
    print(text)


if __name__ == "__main__":
    main()

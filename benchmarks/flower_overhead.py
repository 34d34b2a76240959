"""What running on Flower costs: per-round time of the Flower runner over the in-process runner
(same config, same seed), and of SecAgg+ over plain aggregation at 3 and 10 sites.

    .venv/bin/python benchmarks/flower_overhead.py [--rounds 4] [--out benchmarks/results/flower.md]

Flower deployments run on loopback with TLS and node authentication (privmed serve / join / run
--runner flower), all processes on this machine. Per-round time is the `seconds` column of
metrics.jsonl (the round loop's own clock: training, aggregation, evaluation, checkpoint); the
first round is left out (it includes start-up). Ratios are of means measured in one run of this
script. The model is small (the phantom task, a cnn of width 8), so the figures show the overhead
of the machinery, not of training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

import privmed
from privmed.config import validate_config
from privmed.federation.experiment import prepare_experiment
from privmed.federation.flower.deploy import free_port, stop_process
from privmed.federation.flower.secagg import quantization_bound


def config(sites: int, rounds: int, secure: bool) -> dict:
    return {
        "name": f"bench-{sites}-{'secagg' if secure else 'plain'}",
        "seed": 0,
        "data": {"source": "phantom", "size": 16, "samples_per_site": 80},
        "sites": {"count": sites, "partition": "natural"},
        "model": {"name": "cnn", "width": 8},
        "federation": {"strategy": "fedavg", "rounds": rounds, "secure_aggregation": secure},
        "training": {"batch_size": 32, "lr": 0.003, "optimizer": "adam"},
    }


def per_round(rows: list[dict]) -> float:
    return statistics.mean(r["seconds"] for r in rows[1:])


def in_process(cfg: dict, tmp: Path) -> tuple[float, list[np.ndarray], float]:
    """Seconds per round, the final weights, and the test AUC."""
    out = Path(tempfile.mkdtemp(prefix=f"inproc-{cfg['name']}-", dir=tmp)) / "run"
    result = privmed.run(validate_config(cfg), out, report=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    weights = [v.numpy() for v in result.model.state_dict().values()]
    return per_round(rows), weights, result.summary["test"]["auc"]


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def one_round_error(cfg: dict) -> tuple[float, float]:
    """After one round from the same start: max |SecAgg+ - plain| over the weights, and the
    quantisation bound for these sites' weights (plus float32 rounding of the model)."""
    one = {**cfg, "federation": {**cfg["federation"], "rounds": 1}}
    got = {}
    for secure in (False, True):
        c = validate_config({**one, "federation": {**one["federation"], "secure_aggregation": secure}})
        got[secure] = [v.numpy() for v in privmed.run(c).model.state_dict().values()]
    exp = prepare_experiment(c)
    fed = c.federation
    bound = quantization_bound([s.n_train for s in exp.trainers.values()], fed.secagg_clipping_range,
                               fed.secagg_quantization_bits)
    return max_diff(got[False], got[True]), bound


def credentials(cfg: dict, root: Path) -> tuple[list[str], list[str], str]:
    """Write `cfg`, the certificates and each site's key under `root`: (the privmed command, the
    site names, a free loopback address for the coordinator)."""
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    pm = [sys.executable, "-m", "privmed"]
    subprocess.run(pm + ["certs", str(root / "certs")], check=True, capture_output=True)
    sites = [f"site-{i + 1}" for i in range(cfg["sites"]["count"])]
    for s in sites:
        subprocess.run(pm + ["keys", str(root / "keys"), "--name", s], check=True, capture_output=True)
    return pm, sites, f"127.0.0.1:{free_port()}"


def on_flower(cfg: dict, tmp: Path) -> tuple[float, dict]:
    root = tmp / f"flower-{cfg['name']}"
    root.mkdir()
    pm, sites, address = credentials(cfg, root)
    procs = []

    def start(args: list[str], log: str) -> subprocess.Popen:
        p = subprocess.Popen(pm + args, stdout=open(root / log, "wb"), stderr=subprocess.STDOUT,
                             start_new_session=True)
        procs.append(p)
        return p

    try:
        start(["serve", "--certs", str(root / "certs"), "--keys", str(root / "keys"), "--address",
               address, "--home", str(root / "home")], "coordinator.log")
        while "coordinator listening" not in (root / "coordinator.log").read_text():
            time.sleep(0.2)
        for s in sites:
            start(["join", str(root / "cfg.yaml"), "--site", s, "--server", address, "--certs",
                   str(root / "certs"), "--key", str(root / "keys" / s), "--home", str(root / f"home-{s}")],
                  f"{s}.log")
        subprocess.run(pm + ["run", str(root / "cfg.yaml"), "--runner", "flower", "--server", address,
                             "--certs", str(root / "certs"), "--home", str(root / "home"), "--out",
                             str(root / "run"), "--quiet"], check=True, capture_output=True)
    finally:
        for p in procs:
            stop_process(p, grace=5)
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return per_round(rows), json.loads((root / "run" / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/flower.md"))
    args = ap.parse_args()
    lines = [
        "# Flower runner and SecAgg+ overhead",
        "",
        f"`{' '.join(['python', *sys.argv])}`; phantom task, cnn width 8, {args.rounds} rounds, "
        "seconds per round excluding round 1, one run. Flower: loopback, TLS and node "
        "authentication on, every process on this 2-core machine.",
        "",
    ]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows = []
        for secure in (False, True):
            cfg = config(3, args.rounds, secure)
            local, _, _ = in_process(cfg, tmp)
            flower, summary = on_flower(cfg, tmp)
            rows.append((secure, local, flower, summary["test"]["auc"]))
            print(rows[-1], flush=True)
        lines += [
            "## Flower runner over the in-process runner (3 sites)",
            "",
            "| aggregation | in-process s/round | Flower s/round | ratio | test AUC (Flower) |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {'SecAgg+' if s else 'plain'} | {a:.2f} | {b:.2f} | {b / a:.1f}x | {auc:.3f} |"
            for s, a, b, auc in rows
        ]
        lines += [
            "",
            "## SecAgg+ over plain aggregation, in one process",
            "",
            "| sites | plain s/round | SecAgg+ s/round | ratio | max abs weight error, 1 round (bound) "
            f"| after {args.rounds} rounds | test AUC plain / SecAgg+ |",
            "|---|---|---|---|---|---|---|",
        ]
        for n in (3, 10):
            plain, wp, auc_p = in_process(config(n, args.rounds, False), tmp)
            secure, ws, auc_s = in_process(config(n, args.rounds, True), tmp)
            err, bound = one_round_error(config(n, args.rounds, True))
            lines.append(f"| {n} | {plain:.2f} | {secure:.2f} | {secure / plain:.2f}x | {err:.1e} ({bound:.1e}) "
                         f"| {max_diff(wp, ws):.1e} | {auc_p:.3f} / {auc_s:.3f} |")
            print(lines[-1], flush=True)
        lines += [
            "",
            "The first round's error is SecAgg+'s stochastic rounding, within its bound; later rounds "
            "train from slightly different models, and training (Adam at the sites) carries the "
            "difference on.",
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()

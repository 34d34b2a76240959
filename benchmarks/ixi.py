"""Benchmark: segmentation and reconstruction on IXI T1 (../shared/data/ixi-t1), pooled against
federated (fedavg, cyclic) against each hospital alone, with and without DP-SGD.

    .venv/bin/python benchmarks/ixi.py --task segmentation [--rounds 30] [--workers 2]
    .venv/bin/python benchmarks/ixi.py --task reconstruction [--rounds 30] [--workers 2]

The 10 subjects: 3 held out for test (by subject, drawn by the seed), 7 dealt to 3 sites in turn
(3, 2 and 2 subjects; data.val_fraction 0, so each run's result is its last round's model). A row
does `--rounds` rounds of one local epoch per site (pooled: one epoch over all the training slices
per round) unless its name says more epochs (fedavg with 3 local epochs makes as many passes over
the data as pooled with 3 epochs a round). DP-SGD at epsilon 8 (delta 1e-3) is per patient: a
volume is the unit, and DP-SGD samples volumes, each bringing one of its slices per step
(privacy.dpsgd.patient_batches).
Written to benchmarks/results/ixi_<task>.md; each finished run is kept in
benchmarks/results/ixi_<task>.json, so that a stopped call goes on where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import shlex
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from privmed import io
from privmed.privacy.figures import format_epsilon

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "data" / "ixi-t1"
ROWS = {
    "pooled": {"federation": {"strategy": "pooled"}},
    # pooled with the same passes over the data as fedavg with more local epochs
    "pooled, 2 epochs a round": {"federation": {"strategy": "pooled", "local_epochs": 2}},
    "pooled, 3 epochs a round": {"federation": {"strategy": "pooled", "local_epochs": 3}},
    "fedavg": {"federation": {"strategy": "fedavg"}},
    # the same rounds with more local work: communication is what federation pays for
    "fedavg, 2 local epochs": {"federation": {"strategy": "fedavg", "local_epochs": 2}},
    "fedavg, 3 local epochs": {"federation": {"strategy": "fedavg", "local_epochs": 3}},
    "fedprox": {"federation": {"strategy": "fedprox", "prox_mu": 0.01}},
    "cyclic": {"federation": {"strategy": "cyclic"}},
    "local": {"federation": {"strategy": "local"}},
    "fedavg, DP-SGD epsilon 8": {"federation": {"strategy": "fedavg"},
                                 "privacy": {"mode": "dp-sgd", "epsilon": 8, "delta": 1e-3}},
}
# Published figures on IXI (FLamby's Fed-IXI, IXI-Tiny whole-brain masks, 3 scanner sites; Dice).
PUBLISHED = {"segmentation": "FLamby Fed-IXI (IXI-Tiny, whole brain): pooled 0.987, FedAvg 0.773",
             "reconstruction": "Schlemper et al. 2017 (cardiac, not IXI): D5-C5 at 6x beats zero-filling by about 10 dB"}


def config(task: str, row: str, rounds: int, seed: int, extra: dict, data: Path = DATA) -> dict:
    over = ROWS[row]
    slug = re.sub(r"[^a-z0-9]+", "-", row.lower()).strip("-")
    cfg = {"name": f"ixi-{task}-{slug}-s{seed}", "seed": seed, "task": task,
           "data": {"source": "ixi", "root": str(data), "val_fraction": 0.0},
           "sites": {"count": 3, "partition": "natural"},
           "federation": {"rounds": rounds, "local_epochs": 1, **over["federation"]}}
    if "privacy" in over:
        cfg["privacy"] = over["privacy"]
    for section, values in extra.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def _one(job: tuple) -> tuple[str, dict, float]:
    key, cfg = job
    torch.set_num_threads(1)
    import privmed

    start = time.perf_counter()
    # one folder per cached result (row, rounds, seed, settings): a rerun with other settings starts afresh
    out_dir = ROOT / "runs" / "ixi-benchmark" / f"{cfg['name']}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    s = privmed.run(cfg, out_dir).summary
    out = {"test": s["test"], "epsilon": (s.get("privacy") or {}).get("epsilon"), "machine": _machine()}
    return key, out, time.perf_counter() - start


def _machine() -> str:
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{platform.machine()}, torch {torch.__version__}{gpu}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=("segmentation", "reconstruction"), required=True)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rows", nargs="*", default=list(ROWS), help="which rows (default: all)")
    ap.add_argument("--data", type=Path, default=DATA, help="the IXI folder (default: ../shared/data/ixi-t1)")
    ap.add_argument("--out", type=Path, default=None,
                    help="the table's file (default: benchmarks/results/ixi_<task>.md)")
    ap.add_argument("--note", action="append", default=[], metavar="TEXT",
                    help="a paragraph to add under the table (how the runs shared the machine, ...)")
    ap.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                    help="config keys for every run, e.g. model.width=8 training.device=cuda")
    args = ap.parse_args()
    extra: dict = {}
    for item in args.set:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value  # a word: auto, cuda, ...
        extra.setdefault(section, {})[name] = parsed
    cache_file = RESULTS / f"ixi_{args.task}.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    jobs = [(f"{row}|{args.rounds}|{args.seed}|{json.dumps(extra, sort_keys=True)}",
             config(args.task, row, args.rounds, args.seed, extra, args.data)) for row in args.rows]
    todo = [j for j in jobs if j[0] not in cache]
    import multiprocessing

    # spawn: a forked child cannot use CUDA that its parent touched
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for key, out, seconds in pool.map(_one, todo):
            # re-read first: another call (another task's rows, run beside this one) may have added its own
            cache = {**(json.loads(cache_file.read_text()) if cache_file.is_file() else {}),
                     key: {**out, "seconds": round(seconds)}}
            io.write_json(cache_file, cache)
            print(key, json.dumps(out["test"]), f"{seconds:.0f}s", flush=True)
    write_table(args.task, [(row, cache[key]) for (key, _), row in zip(jobs, args.rows)], args)


def write_table(task: str, rows: list[tuple[str, dict]], args: argparse.Namespace) -> None:
    if task == "segmentation":
        head = "| run | Dice, whole brain | Dice, ventricles | Dice, tissue | HD95 (mm) | epsilon | minutes |\n|---|---:|---:|---:|---:|---:|---:|\n"
        keys = ("dice_foreground", "dice_ventricles", "dice_tissue", "hd95")
    else:
        head = ("| run | PSNR (dB) | SSIM | NMSE | zero-filled PSNR (dB) | gain (dB) | epsilon | minutes |\n"
                "|---|---:|---:|---:|---:|---:|---:|---:|\n")
        keys = ("psnr", "ssim", "nmse", "psnr_zero_filled")
    lines = []
    for row, r in rows:
        t = r["test"]
        cells = [f"{t[k]:.3f}" if k not in ("hd95", "psnr", "psnr_zero_filled", "nmse") else
                 (f"{t[k]:.4f}" if k == "nmse" else f"{t[k]:.2f}") for k in keys]
        if task == "reconstruction":
            cells.append(f"{t['psnr'] - t['psnr_zero_filled']:+.2f}")
        eps = r.get("epsilon")
        cells += ["-" if eps is None else format_epsilon(eps), f"{r['seconds'] / 60:.1f}"]  # rounded up
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    extra = " ".join(args.set)
    named = " ".join(shlex.quote(row) for row, _ in rows)
    text = (f"# IXI {task}\n\n`.venv/bin/python benchmarks/ixi.py --task {task} --rounds {args.rounds} --seed {args.seed}"
            f" --rows {named}{' --set ' + extra if extra else ''}`\n\n"
            "10 IXI T1 subjects (2 mm): 3 held out for test, 7 dealt to 3 sites (3, 2, 2 subjects); "
            f"{args.rounds} rounds of 1 local epoch unless the row says more (pooled: 1 epoch over every "
            "site's slices a round); the last round's model; "
            "test figures per held-out volume, averaged.\n\n" + head + "\n".join(lines) +
            f"\n\nPublished: {PUBLISHED[task]}.\n\n"
            f"Machine: {'; '.join(sorted({r.get('machine') or 'not recorded' for _, r in rows}))}; one CPU "
            "thread per run.\n" + "".join(f"\n{note}\n" for note in args.note))
    io.write_text(args.out or RESULTS / f"ixi_{task}.md", text)
    print(text)


if __name__ == "__main__":
    main()

"""Benchmark: gradient inversion of the updates PneumoniaMNIST sites send, with and without DP-SGD
and under secure aggregation.

    .venv/bin/python benchmarks/audit_inversion.py [--iterations 500] [--restarts 1] [--trials 3] [--reuse-run]

The target run: PneumoniaMNIST 28 px, 3 sites, Dirichlet 0.5, fedavg, 20 rounds of privmed's
defaults (cnn, SGD; the "no DP" run of benchmarks/audit_pneumonia.py), trained to
runs/inversion-benchmark/ (its private/ folder holds the sites' keys: not for the repository).
`privmed audit --attack inversion` then attacks the updates its sites send from the run's initial
weights (round 1): one site's update with 1, 4 and 8 patients in one local SGD step, and 8 patients
over a local epoch (mini-batches of 2); the same site's DP-SGD step on 1 patient with the noise
privmed calibrates for this run at epsilon 8 and at epsilon 1; and the secure-aggregation mean of the
3 sites' steps (1 and 4 patients per site), rebuilt as all the sites' images, and as one image.
Each setting is attacked on --trials batches, each with --restarts random starts of --iterations
Adam steps (plus one start at the data's brightness). Writes benchmarks/results/audit_inversion.md
(the table, with the command) and benchmarks/results/audit_inversion.png (originals beside
reconstructions, the first batch of each setting).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "data" / "medmnist"
RUN = ROOT / "runs" / "inversion-benchmark" / "inversion-pneumonia"


def config() -> dict:
    return {
        "name": "inversion-pneumonia", "seed": 0,
        "data": {"source": "medmnist", "name": "pneumoniamnist", "root": str(DATA), "size": 28, "download": False},
        "sites": {"count": 3, "partition": "dirichlet", "alpha": 0.5},
        "federation": {"strategy": "fedavg", "rounds": 20},
    }


def settings() -> tuple:
    from privmed.audit.updates import Setting

    return (
        Setting("site", 1), Setting("site", 4), Setting("site", 8), Setting("site", 8, "epoch"),
        Setting("site-dp", 1, epsilon=8.0), Setting("site-dp", 1, epsilon=1.0),
        Setting("secure-sum", 1), Setting("secure-sum", 1, as_one=True), Setting("secure-sum", 4),
    )


def describe(r: dict) -> str:
    if r["view"] == "site":
        who = "one site, no DP"
    elif r["view"] == "site-dp":
        who = f"one site, DP-SGD ε={r['epsilon']:g} (σ={r['noise_multiplier']:.2f})"
    else:
        who = f"secure sum of {r['sites']} sites" + (", rebuilt as one image" if r["rebuilt_as"] == "one image" else "")
    per = " per site" if r["view"] == "secure-sum" else ""
    work = "1 step" if r["local"] == "step" else f"1 epoch ({r['local_steps']} steps of {r['local_batch']})"
    return f"{who} | {r['batch']}{per} | {work}"


def table(result: dict, command: str, minutes: float) -> str:
    inv = result["inversion"]
    lines = [
        "# Gradient inversion: PneumoniaMNIST, 3 sites, Dirichlet 0.5, fedavg (cnn)",
        "",
        f"`{command}` ({minutes:.0f} min; {platform.machine()}, torch {torch.__version__}, one thread).",
        "",
        "`privmed audit --attack inversion` (Geiping et al. 2020: cosine matching with a total-variation "
        "prior) against the updates the run's sites send from its initial weights. The attacker is the "
        f"coordinator: {inv['assumes']}. PSNR and SSIM (MONAI) of each reconstruction against its "
        "original, mean ± sd over all reconstructions (best PSNR in brackets); 'mean image': the PSNR and "
        "SSIM of the data's mean image against the same originals, what an attacker who learnt nothing "
        "from the update would show.",
        "",
        "| attacker sees | patients | local training | PSNR dB | SSIM | mean image: PSNR / SSIM | reconstructions | labels |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in inv["settings"].values():
        if "skipped" in r:
            continue
        p, q = r["psnr"], r["ssim"]
        labels = r["labels"].split(" (")[0].replace("inferred from the update", "iDLG")
        if r["label_accuracy"] is not None:
            labels += f", {100 * r['label_accuracy']:.0f}% right"
        lines.append(
            f"| {describe(r)} | {p['mean']:.1f} ± {p['std']:.1f} ({p['max']:.1f}) | {q['mean']:.3f} ± {q['std']:.3f} | "
            f"{r['psnr_mean_image']:.1f} / {r['ssim_mean_image']:.3f} | {p['n']} ({r['trials']} batches) | {labels} |"
        )
    s = inv["search"]
    lines += [
        "",
        f"Search: {s['iterations']} Adam iterations per start, {s['restarts']} random start(s) plus one at the "
        f"data's brightness, lr {s['lr']}, TV weight {s['tv_weight']}; seed {inv['seed']}. Geiping et al. "
        "run 24,000 iterations: fewer here to fit the benchmark in about 15 minutes on one thread.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=500)
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--reuse-run", action="store_true",
                    help="attack the run a previous call left in runs/inversion-benchmark (same config)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import privmed
    from privmed import io
    from privmed.audit.inversion import InversionSettings
    from privmed.audit.run import InversionOptions, audit

    start = time.time()
    if not (args.reuse_run and (RUN / "summary.json").is_file()):
        if RUN.exists():
            shutil.rmtree(RUN)
        privmed.run(config(), RUN)
        print(f"target run trained in {time.time() - start:.0f} s", flush=True)
    opts = InversionOptions(trials=args.trials, only=settings(),
                            search=InversionSettings(iterations=args.iterations, restarts=args.restarts))
    result = audit(RUN, ["inversion"], inversion=opts, seed=0, progress=lambda m: print(m, flush=True))
    command = "python " + " ".join(["benchmarks/audit_inversion.py", *sys.argv[1:]])
    text = table(result, command, (time.time() - start) / 60)
    io.write_text(RESULTS / "audit_inversion.md", text)
    # PneumoniaMNIST is a public data set: this private figure of its images may be published here
    io.write_bytes(RESULTS / "audit_inversion.png", (RUN / "private" / "plots" / "audit_inversion.png").read_bytes())
    print(text)


if __name__ == "__main__":
    main()

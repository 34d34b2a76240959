"""Pilot: does the deep cascade beat zero-filling on real IXI T1 slices, on a CPU, in minutes?

    .venv/bin/python benchmarks/recon_pilot.py [--accelerations 4 8] [--mask random] [--noise 0]
        [--width 16] [--cascades 10] [--convs 3] [--epochs 12] [--batch 4] [--lr 2e-3]
        [--schedule cosine] [--loss l1] [--step 2] [--seed 0] [--threads 1] [--device cpu]
        [--out DIR] [--name recon_pilot]

Plain torch, not privmed's runner (which does not know the task yet). The 10 IXI T1 volumes of
../shared/data/ixi-t1 (CC BY-SA 3.0), split by subject 7 train / 3 test (a seeded permutation);
every `--step`-th slice through the brain (axial, 112 x 80, as privmed.data.ixi serves them; the
results files before this loader used 120 x 90 head slices); one scanner (mask kind,
acceleration, noise) for all, masks drawn once per slice. For each acceleration the cascade trains
pooled (Adam, `--loss`, learning rate decayed to 0 along a cosine over the steps, or constant) for
`--epochs` and is scored on the held-out subjects after every epoch; the table gives the last
epoch's figures (mean ± sd over held-out slices) next to zero-filling's, and the training seconds.
One thread by default: on two cores shared with other work, two threads ran 3-5x slower.

Writes OUT/NAME.md (default benchmarks/results/recon_pilot.md) and OUT/NAME.json.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
import platform
import time
from pathlib import Path

import numpy as np
import torch

from privmed import io
from privmed.data.ixi import load_subject, subjects_in
from privmed.data.recon import ScannerProfile, acquire
from privmed.models.cascade import cascade
from privmed.kspace import zero_filled
from privmed.tasks.recon_metrics import ReconLoss, nmse, psnr, ssim

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ixi-t1"
N_TRAIN = 7


def scores(pred: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    return {"psnr": psnr(pred, target), "ssim": ssim(pred, target), "nmse": nmse(pred, target)}


def predict(model: torch.nn.Module, inputs: np.ndarray, device: str, batch: int = 16) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        out = [model(torch.from_numpy(inputs[i : i + batch]).to(device)).cpu() for i in range(0, len(inputs), batch)]
    model.train()
    return torch.cat(out).numpy()


@dataclass(frozen=True)
class Acquired:
    inputs: np.ndarray  # (N, 3, H, W) [k_re, k_im, mask]
    targets: np.ndarray  # (N, 1, H, W) in [0, 1]
    patient: np.ndarray  # (N,) subject ids

    def __len__(self) -> int:
        return len(self.targets)


def load(root: Path, step: int) -> dict[str, np.ndarray]:
    """{subject id: its slices (S, 1, H, W)}: every `step`-th slice through the brain."""
    return {sid: load_subject(image, label, step)[0] for sid, image, label in subjects_in(root)}


def acquired(volumes: dict[str, np.ndarray], profile: ScannerProfile, gen: torch.Generator) -> Acquired:
    targets = np.concatenate(list(volumes.values()))
    patient = np.concatenate([np.full(len(v), sid) for sid, v in volumes.items()])
    return Acquired(acquire(targets, profile, gen), targets, patient)


def split(volumes: dict, seed: int) -> tuple[dict, dict]:
    """(train, test) volumes by subject: N_TRAIN subjects drawn by `seed`, the rest held out."""
    ids = list(volumes)
    order = np.random.default_rng(seed).permutation(len(ids))
    train_ids = sorted(ids[i] for i in order[:N_TRAIN])
    return {s: volumes[s] for s in train_ids}, {s: v for s, v in volumes.items() if s not in train_ids}


def run_one(args, acceleration: float, train_vols: dict, test_vols: dict) -> dict:
    profile = ScannerProfile(args.mask, acceleration=acceleration, noise_std=args.noise)
    gen = lambda stream: torch.Generator().manual_seed(args.seed * 1000 + stream)  # noqa: E731
    tr = acquired(train_vols, profile, gen(1))
    te = acquired(test_vols, profile, gen(2))
    zf = zero_filled(torch.from_numpy(te.inputs[:, :2])).numpy()
    baseline = scores(zf, te.targets)

    with torch.random.fork_rng():  # initialisation from the seed, global state left as it was
        torch.manual_seed(args.seed)
        model = cascade(3, 1, 0, width=args.width, n_cascades=args.cascades, n_convs=args.convs)
    model = model.to(args.device).train()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    x_all, y_all = torch.from_numpy(tr.inputs), torch.from_numpy(tr.targets)
    steps_per_epoch = -(-len(x_all) // args.batch)
    total = args.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)) if args.schedule == "cosine" else 1.0
    )
    criterion = ReconLoss(args.loss)
    order_gen = gen(3)
    curve, trained_s = [], 0.0
    for epoch in range(1, args.epochs + 1):
        t0, losses = time.perf_counter(), []
        for idx in torch.randperm(len(x_all), generator=order_gen).split(args.batch):
            x, y = x_all[idx].to(args.device), y_all[idx].to(args.device)
            opt.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(loss.item())
        trained_s += time.perf_counter() - t0
        held_out = scores(predict(model, te.inputs, args.device), te.targets)
        curve.append({"epoch": epoch, "seconds": round(trained_s, 1), "train_loss": float(np.mean(losses)),
                      **{k: float(v.mean()) for k, v in held_out.items()}})
        print(f"{acceleration}x epoch {epoch} {trained_s:.0f}s loss {curve[-1]['train_loss']:.4f} "
              f"PSNR {curve[-1]['psnr']:.2f} (zero-filled {baseline['psnr'].mean():.2f})", flush=True)
    return {
        "acceleration": acceleration,
        "n_train": len(tr), "n_test": len(te),
        "train_subjects": sorted(set(tr.patient)), "test_subjects": sorted(set(te.patient)),
        "lines": float(te.inputs[:, 2, 0].sum(1).mean()), "width": te.inputs.shape[3],
        "zero_filled": {k: [float(v.mean()), float(v.std())] for k, v in baseline.items()},
        "cascade": {k: [float(v.mean()), float(v.std())] for k, v in held_out.items()},
        "gain_db_per_subject": per_subject_gain(held_out["psnr"], baseline["psnr"], te.patient),
        "epochs": epoch, "train_seconds": round(trained_s, 1), "curve": curve,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def per_subject_gain(cascade_psnr: np.ndarray, zf_psnr: np.ndarray, patient: np.ndarray) -> dict[str, float]:
    return {s: float((cascade_psnr - zf_psnr)[patient == s].mean()) for s in sorted(set(patient))}


def fmt(pair: list[float], digits: int) -> str:
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def table(args, results: list[dict], command: str) -> str:
    r0 = results[0]
    lines = [
        "# Reconstruction pilot: deep cascade vs zero-filling on IXI T1 (held-out subjects)",
        "",
        f"IXI T1 (CC BY-SA 3.0), 10 subjects split by subject: train {', '.join(r0['train_subjects'])}; "
        f"test {', '.join(r0['test_subjects'])}. Axial slices through the brain, 112 x 80 (one in {args.step}): "
        f"{r0['n_train']} train, {r0['n_test']} test. Single-coil k-space simulated from the magnitude "
        f"(privmed.kspace), {args.mask} mask with fastMRI's centre (0.32 / acceleration), "
        f"noise std {args.noise} per k-space entry, one mask per slice drawn once.",
        f"Cascade: {args.cascades} cascades x {args.convs} convs, width {args.width} "
        f"({r0['parameters']:,} parameters), noiseless DC; Adam lr {args.lr} ({args.schedule}), batch {args.batch}, "
        f"loss {args.loss}, {args.epochs} epochs per acceleration. {platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} thread(s), device {args.device}. Seed {args.seed}.",
        f"Command: `{command}`",
        "",
        "PSNR (dB) and SSIM with data range 1 (each volume scaled so its 99.5th percentile is 1); "
        "SSIM 7x7 uniform window (MONAI); NMSE = ||x - y||^2 / ||y||^2. Mean ± sd over held-out slices.",
        "",
        "| acceleration | lines / width | method | PSNR | SSIM | NMSE | gain (dB) per test subject | epochs | train s |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in results:
        lw = f"{r['lines']:.1f} / {r['width']}"
        zf, cc = r["zero_filled"], r["cascade"]
        gains = ", ".join(f"{g:+.2f}" for g in r["gain_db_per_subject"].values())
        lines.append(f"| {r['acceleration']:g}x | {lw} | zero-filled | {fmt(zf['psnr'], 2)} | {fmt(zf['ssim'], 3)} | "
                     f"{fmt(zf['nmse'], 4)} | | | |")
        lines.append(f"| {r['acceleration']:g}x | {lw} | cascade | {fmt(cc['psnr'], 2)} | {fmt(cc['ssim'], 3)} | "
                     f"{fmt(cc['nmse'], 4)} | {gains} | {r['epochs']} | {r['train_seconds']:.0f} |")
    lines += ["", "Held-out PSNR after each epoch (dB; training seconds so far):", ""]
    for r in results:
        curve = ", ".join(f"{c['psnr']:.2f} ({c['seconds']:.0f} s)" for c in r["curve"])
        lines.append(f"- {r['acceleration']:g}x: zero-filled {r['zero_filled']['psnr'][0]:.2f}; cascade {curve}")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--accelerations", type=float, nargs="+", default=[4, 8])
    p.add_argument("--mask", default="random", choices=["random", "equispaced"])
    p.add_argument("--noise", type=float, default=0.0)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--cascades", type=int, default=10)
    p.add_argument("--convs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--loss", default="l1", choices=["l1", "ssim", "ssim_l1"])
    p.add_argument("--step", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="recon_pilot")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    command = "benchmarks/recon_pilot.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k not in ("data", "out", "name")
    )
    train_vols, test_vols = split(load(args.data, args.step), args.seed)
    results = [run_one(args, a, train_vols, test_vols) for a in args.accelerations]
    io.write_json(args.out / f"{args.name}.json", {"args": {k: str(v) for k, v in vars(args).items()}, "results": results})
    io.write_text(args.out / f"{args.name}.md", table(args, results, command))
    print(table(args, results, command))


if __name__ == "__main__":
    main()

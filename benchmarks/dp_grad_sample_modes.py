"""Benchmark: time per epoch with DP-SGD / without, for each Opacus grad-sample mode, on privmed's models.

    .venv/bin/python benchmarks/dp_grad_sample_modes.py [--batch B] [--repeats R] [--resnet-steps S]
        [--models dpcnn cnn resnet18] [--modes hooks ew ...] [--threads T] [--out DIR]

Synthetic tensors of PneumoniaMNIST's training size (4708 x 1 x 28 x 28, 2 classes), same model, data
and batch size with and without DP. An epoch is N / batch steps (default batch 256, the DP default:
19 steps): DP-SGD with Poisson batches of that expected size (sigma 1, C 1) in each mode in {hooks,
functorch, ew, ghost}, and plain SGD on batches of that size (the site's non-private loop). Each is
timed `--repeats` times (default 3), interleaved, and the median kept; the ratio is of medians measured
in the same run. `resnet18` runs `--resnet-steps` steps (default 2) and is scaled to an epoch. Every mode
is also checked: one noiseless DP step on 8 items, with C the median of their gradient norms, against
a loop of single-sample backward passes clipped by hand.

Writes benchmarks/results/dp_grad_sample_modes.md: seconds per epoch, and the DP / non-DP ratio.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from privmed import io
from privmed.models import build_model
from privmed.privacy.dpsgd import CLIP_MARGIN, DEFAULT_GRAD_SAMPLE_MODE, GRAD_SAMPLE_MODES, DPSGD, dp_train

ROOT = Path(__file__).resolve().parents[1]
N, SIZE, CLASSES = 4708, 28, 2


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, in_channels=1, num_classes=CLASSES, image_size=SIZE)


def time_plain(name: str, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int) -> float:
    """Seconds per step of the non-private loop (fixed batches of `batch`, mean loss, SGD)."""
    model = _model(name).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, len(x), (batch,), generator=gen) for _ in range(steps + 1)]
    for i, idx in enumerate(batches):
        if i == 1:  # the first step warms up
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def time_dp(name: str, mode: str, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int) -> float:
    """Seconds per step of `dp_train` (Poisson batches of expected size `batch`, sigma 1, C 1)."""
    model = _model(name)
    kwargs = dict(sample_rate=batch / len(x), noise_multiplier=1.0, max_grad_norm=1.0, lr=0.01,
                  grad_sample_mode=mode)
    dp_train(model, x, y, steps=1, generator=torch.Generator().manual_seed(2), **kwargs)  # warm-up
    start = time.perf_counter()
    dp_train(model, x, y, steps=steps, generator=torch.Generator().manual_seed(3), **kwargs)
    return (time.perf_counter() - start) / steps


def check_mode(name: str, mode: str, x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest relative difference between one noiseless DP step on 8 items and the same step from
    per-item backward passes clipped by hand. (A huge learning rate, divided out again, keeps the
    float32 rounding of the weights out of the comparison.)"""
    xb, yb = x[:8], y[:8]
    ref_model = _model(name).train()
    grads = []
    for i in range(len(xb)):
        ref_model.zero_grad()
        F.cross_entropy(ref_model(xb[i : i + 1]), yb[i : i + 1]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in ref_model.parameters()]))
    g = torch.stack(grads).double()
    norms = g.pow(2).sum(1, keepdim=True).sqrt()  # float64: torch's float32 norm() runs low on big models
    c = norms.median().item()  # clips about half of them
    c_eff = c * (1 - CLIP_MARGIN)  # float32 models are clipped a hair below C (see DPSGD)
    clipped = g * (c_eff / (norms + 1e-6)).clamp(max=1.0)
    expected = -clipped.sum(0) / len(xb)
    lr = 1e4 / expected.abs().max().item()
    model = _model(name)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    with DPSGD(model, torch.optim.SGD(model.parameters(), lr=lr), noise_multiplier=0.0,
               max_grad_norm=c, expected_batch_size=len(xb), generator=torch.Generator(),
               grad_sample_mode=mode) as dp:
        dp.step(xb, yb)
    delta = (torch.cat([p.detach().flatten() for p in model.parameters()]) - before).double() / lr
    return ((delta - expected).abs().max() / expected.abs().max()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256, help="(expected) batch size")
    ap.add_argument("--repeats", type=int, default=3, help="timings per entry (median kept)")
    ap.add_argument("--resnet-steps", type=int, default=2, help="resnet18 steps (scaled to an epoch)")
    ap.add_argument("--models", nargs="+", default=["dpcnn", "cnn"], choices=["dpcnn", "cnn", "resnet18"])
    ap.add_argument("--modes", nargs="+", default=list(GRAD_SAMPLE_MODES), choices=GRAD_SAMPLE_MODES)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    epoch = math.ceil(N / args.batch)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 1, SIZE, SIZE, generator=gen)
    y = torch.randint(0, CLASSES, (N,), generator=gen)

    rows = []
    for name in args.models:
        steps = args.resnet_steps if name == "resnet18" else epoch
        checks, times = {}, {m: [] for m in ["non-private", *args.modes]}
        for mode in args.modes:
            try:
                checks[mode] = f"{check_mode(name, mode, x, y):.1e}"
            except Exception as e:  # a mode that fails is a result too
                checks[mode] = f"failed: {type(e).__name__}: {e}"[:120]
                print(f"{name:9s} {mode:11s} failed: {e}", flush=True)
        for _ in range(args.repeats):  # interleaved, so that a slow spell of the machine hits all
            times["non-private"].append(time_plain(name, x, y, steps, args.batch))
            for mode in args.modes:
                if not checks[mode].startswith("failed"):
                    times[mode].append(time_dp(name, mode, x, y, steps, args.batch))
        plain = statistics.median(times["non-private"]) * epoch
        rows.append((name, "non-private", steps, plain, 1.0, "-"))
        print(f"{name:9s} non-private {plain:8.2f} s/epoch", flush=True)
        for mode in args.modes:
            if checks[mode].startswith("failed"):
                rows.append((name, mode, steps, math.nan, math.nan, checks[mode]))
                continue
            per_epoch = statistics.median(times[mode]) * epoch
            rows.append((name, mode, steps, per_epoch, per_epoch / plain, checks[mode]))
            print(f"{name:9s} {mode:11s} {per_epoch:8.2f} s/epoch  x{per_epoch / plain:5.2f}  "
                  f"rel. error vs loop {checks[mode]}", flush=True)
    io.write_text(args.out / "dp_grad_sample_modes.md", _table(rows, args.batch, epoch, args.repeats))
    print(f"wrote {args.out / 'dp_grad_sample_modes.md'}")


def _table(rows: list[tuple], batch: int, epoch: int, repeats: int) -> str:
    lines = [
        "# Time per epoch: DP-SGD (each Opacus grad-sample mode) / non-private",
        "",
        f"Synthetic {N} x 1 x {SIZE} x {SIZE}, 2 classes; an epoch is {epoch} steps of (expected) batch "
        f"{batch}. DP: Poisson batches, sigma 1, C 1, SGD; non-private: SGD on batches of {batch}. "
        f"Median of {repeats} interleaved timings; ratios of medians from the same run. "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s). Default mode: `{DEFAULT_GRAD_SAMPLE_MODE}`. "
        "Command: `.venv/bin/python benchmarks/dp_grad_sample_modes.py --threads 1`.",
        "'check' is the largest relative error of one noiseless DP step on 8 items against per-item "
        "backward passes clipped by hand (float32).",
        "",
        "| model | mode | steps timed | s / epoch | DP / non-DP | check |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, mode, steps, per_epoch, ratio, check in rows:
        sec = "-" if math.isnan(per_epoch) else f"{per_epoch:.2f}"
        r = "-" if math.isnan(ratio) else f"{ratio:.2f}"
        lines.append(f"| {name} | {mode} | {steps} | {sec} | {r} | {check} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

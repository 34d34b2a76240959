"""Benchmark: does a site's DP-SGD reply time follow the batch size it drew (issue 25, item 6)?

    .venv/bin/python benchmarks/dp_timing.py [--sites 300 700 1500] [--modes ew ghost] [--turns 30]
        [--steps 30] [--local-steps 1] [--repeats 5] [--out DIR]

privmed's default DP model (dpcnn, 28 px, 1 channel, 2 classes) at sites of `--sites` patients,
expected batch 256 as configs/pneumonia-dp.yaml (q = min(1, 256 / n)), sigma 1, C 1, SGD lr 0.5, the
site's random shifts. Synthetic images: the time does not depend on pixel values. One torch thread.

- per turn: `--turns` calls of dp_train as Site.train makes them (`--local-steps` steps, default
  privmed's 1), each timed whole; the drawn batch size is its sample_gradient_steps;
- per step: `--steps` DPSGD steps on Poisson batches, each timed;
each with constant_work off (the drawn batch as it is) and on (DPSGD's fixed physical batch P),
interleaved turn by turn with the same generator seed, so both see the same batch sizes and the
same load; and the work itself: the fastest of `--repeats` steps at each of 7 batch sizes (mean - 3
sd .. mean + 3 sd), which filters out most of the load. Reported: Pearson's r between batch size and seconds, the slope (ms per patient), and
the cost: seconds per epoch (n / 256 steps) with and without the fixed batch, against Opacus' own
DP step as before issue 25 (float32 clipping and noise, no padding) and a plain SGD step of 256.
The machine is shared: the load average before and after is in the table.

Writes benchmarks/results/dp_timing.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from opacus.grad_sample import prepare_module
from opacus.optimizers import DPOptimizer

from privmed import io
from privmed.federation.site import random_shift
from privmed.models import build_model
from privmed.privacy.dpsgd import DPSGD, dp_train, physical_batch_size, poisson_batches

ROOT = Path(__file__).resolve().parents[1]
SIZE, EXPECTED = 28, 256
SIGMA, C, LR = 1.0, 1.0, 0.5
SHIFT = max(1, SIZE // 14)  # the site's random shift for 28 px images


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("dpcnn", in_channels=1, num_classes=2, image_size=SIZE)


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    return torch.rand(n, 1, SIZE, SIZE, generator=gen), torch.randint(0, 2, (n,), generator=gen)


def _augment(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return random_shift(xb, SHIFT, gen)


def turn_times(n: int, mode: str, turns: int, local_steps: int) -> dict[bool, list[tuple[int, float]]]:
    """{constant_work: [(patients drawn in the turn, seconds of the dp_train call)]}."""
    x, y = _data(n)
    q = min(1.0, EXPECTED / n)
    model = _model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    out: dict[bool, list[tuple[int, float]]] = {False: [], True: []}
    for turn in range(-1, turns):  # turn -1 warms up
        for constant in (False, True):
            model.load_state_dict(start)
            gen = torch.Generator().manual_seed(1000 + turn)
            t = time.perf_counter()
            m = dp_train(model, x, y, steps=local_steps, sample_rate=q, noise_multiplier=SIGMA,
                         max_grad_norm=C, lr=LR, generator=gen, grad_sample_mode=mode,
                         augment=_augment, constant_work=constant)
            if turn >= 0:
                out[constant].append((m["sample_gradient_steps"], time.perf_counter() - t))
    return out


def step_times(n: int, mode: str, steps: int) -> dict[bool, list[tuple[int, float]]]:
    """{constant_work: [(patients drawn, seconds of the DPSGD step)]}, the same batches for both."""
    x, y = _data(n)
    q = min(1.0, EXPECTED / n)
    physical = physical_batch_size(n, q)
    batches = list(poisson_batches(n, q, steps + 1, torch.Generator().manual_seed(7)))
    out: dict[bool, list[tuple[int, float]]] = {}
    sessions = {}
    for constant in (False, True):
        model = _model()
        sessions[constant] = DPSGD(model, torch.optim.SGD(model.parameters(), lr=LR),
                                   noise_multiplier=SIGMA, max_grad_norm=C, expected_batch_size=q * n,
                                   generator=torch.Generator().manual_seed(0), grad_sample_mode=mode,
                                   physical_batch=physical if constant else None)
        out[constant] = []
    gen = torch.Generator().manual_seed(3)
    for k, idx in enumerate(batches):
        xb = _augment(x[idx], gen) if len(idx) else x[idx]
        for constant in (False, True):
            t = time.perf_counter()
            sessions[constant].step(xb, y[idx])
            if k > 0:  # step 0 warms up
                out[constant].append((len(idx), time.perf_counter() - t))
    for s in sessions.values():
        s.close()
    return out


def min_step_seconds(n: int, mode: str, repeats: int) -> dict[bool, list[tuple[int, float]]]:
    """{constant_work: [(batch size B, fastest of `repeats` DPSGD steps on B patients)]} for B from
    the mean - 3 sd to the mean + 3 sd of a Poisson batch: the fastest of several timings is what the
    work costs, without most of what other processes on a shared machine add."""
    x, y = _data(n)
    q = min(1.0, EXPECTED / n)
    physical = physical_batch_size(n, q)
    mean, sd = q * n, (q * n * (1 - q)) ** 0.5
    sizes = sorted({min(n, max(1, round(mean + k * sd))) for k in (-3, -2, -1, 0, 1, 2, 3)})
    out: dict[bool, list[tuple[int, float]]] = {}
    for constant in (False, True):
        model = _model()
        dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=LR), noise_multiplier=SIGMA,
                   max_grad_norm=C, expected_batch_size=q * n, generator=torch.Generator().manual_seed(0),
                   grad_sample_mode=mode, physical_batch=physical if constant else None)
        dp.step(x[:sizes[-1]], y[:sizes[-1]])  # warm-up
        fastest = {b: float("inf") for b in sizes}
        for _ in range(repeats):
            for b in sizes:
                t = time.perf_counter()
                dp.step(x[:b], y[:b])
                fastest[b] = min(fastest[b], time.perf_counter() - t)
        dp.close()
        out[constant] = sorted(fastest.items())
    return out


def opacus_step_seconds(n: int, steps: int) -> float:
    """Median seconds of a DP step as before issue 25: Opacus' DPOptimizer ("ew"), its float32
    clipping and noise, the drawn batch as it is."""
    x, y = _data(n)
    q = min(1.0, EXPECTED / n)
    model = _model().train()
    gsm = prepare_module(model, "ew", loss_reduction="mean")
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=LR), noise_multiplier=SIGMA,
                      max_grad_norm=C, expected_batch_size=q * n, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(3)
    times = []
    for k, idx in enumerate(poisson_batches(n, q, steps + 1, torch.Generator().manual_seed(7))):
        t = time.perf_counter()
        F.cross_entropy(gsm(_augment(x[idx], gen)), y[idx]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if k > 0:
            times.append(time.perf_counter() - t)
    gsm.to_standard_module()
    return statistics.median(times)


def plain_step_seconds(n: int, steps: int) -> float:
    """Median seconds of the non-private step: a batch of 256, mean loss, SGD."""
    x, y = _data(n)
    model = _model().train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(3)
    times = []
    for k in range(steps + 1):
        idx = torch.randint(0, n, (min(EXPECTED, n),), generator=gen)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(_augment(x[idx], gen)), y[idx]).backward()
        opt.step()
        if k > 0:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _r(pairs: list[tuple[int, float]]) -> tuple[float, float]:
    """Pearson's r between batch size and seconds, and the least-squares slope in ms per patient."""
    b = np.array([p[0] for p in pairs], dtype=float)
    s = np.array([p[1] for p in pairs], dtype=float)
    if b.std() == 0 or s.std() == 0:
        return float("nan"), float("nan")
    return float(np.corrcoef(b, s)[0, 1]), float(np.polyfit(b, s, 1)[0] * 1000)


def _row(n: int, mode: str, unit: str, constant: bool, pairs: list[tuple[int, float]], physical: int) -> str:
    b = [p[0] for p in pairs]
    s = [p[1] for p in pairs]
    r, slope = _r(pairs)
    return (f"| {n} | {mode} | {unit} | {'P = ' + str(physical) if constant else 'off'} | {len(pairs)} | "
            f"{statistics.mean(b):.1f} ± {statistics.stdev(b):.1f} | {statistics.median(s):.3f} | "
            f"{statistics.stdev(s):.3f} | {r:+.2f} | {slope:+.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites", type=int, nargs="+", default=[300, 700, 1500])
    ap.add_argument("--modes", nargs="+", default=["ew", "ghost"])
    ap.add_argument("--turns", type=int, default=30)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--local-steps", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5, help="timings per batch size in the controlled test")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    rows, cost, controlled = [], [], []
    started = time.perf_counter()
    for n in args.sites:
        physical = physical_batch_size(n, min(1.0, EXPECTED / n))
        for mode in args.modes:
            turns = turn_times(n, mode, args.turns, args.local_steps)
            steps = step_times(n, mode, args.steps)
            for constant in (False, True):
                rows.append(_row(n, mode, "turn", constant, turns[constant], physical))
                rows.append(_row(n, mode, "step", constant, steps[constant], physical))
            fastest = min_step_seconds(n, mode, args.repeats)
            for constant in (False, True):
                pairs = fastest[constant]
                r, slope = _r(pairs)
                spread = f"{pairs[0][1]:.3f} .. {pairs[-1][1]:.3f}"
                controlled.append(f"| {n} | {mode} | {'P = ' + str(physical) if constant else 'off'} | "
                                  f"{pairs[0][0]} .. {pairs[-1][0]} | {spread} | {r:+.2f} | {slope:+.3f} |")
            per_step = {c: statistics.median(s for _, s in steps[c]) for c in (False, True)}
            cost.append((n, mode, per_step))
            print(rows[-4:], flush=True)
    n = max(args.sites)
    opacus = opacus_step_seconds(n, max(5, args.steps // 3))
    plain = plain_step_seconds(n, max(5, args.steps // 3))
    load_after = os.getloadavg()
    epoch = {n_: n_ / EXPECTED for n_ in args.sites}  # steps per epoch at q = 256 / n
    lines = [
        "# DP-SGD reply time against the drawn batch size (issue 25, item 6)",
        "",
        f"`python benchmarks/dp_timing.py --sites {' '.join(map(str, args.sites))} --modes "
        f"{' '.join(args.modes)} --turns {args.turns} --steps {args.steps} --local-steps {args.local_steps} "
        f"--repeats {args.repeats}`: "
        f"dpcnn ({sum(p.numel() for p in _model().parameters())} parameters), 28 px, expected batch "
        f"{EXPECTED}, sigma {SIGMA}, C {C}, random shifts, 1 torch thread, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}. Load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/"
        f"{load_before[2]:.2f}, after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} on "
        f"{os.cpu_count()} cores (a shared machine: other sessions' work is in every figure); "
        f"{time.perf_counter() - started:.0f} s in all.",
        "",
        "A turn is one dp_train call as Site.train makes it (privmed's DP default: 1 local step a round); "
        "a step is one DPSGD step. Constant work off: the drawn batch as it is; on: every batch padded "
        "to the fixed physical batch P = physical_batch_size(n, q) (P(B > P) <= 1e-9 per step), the "
        "padding masked before clipping. r: Pearson's correlation of the drawn batch size B with the "
        "seconds; slope: ms per patient drawn.",
        "",
        "| patients n | mode | unit | constant work | samples | B (mean ± sd) | median s | sd s | r(B, s) | slope ms/patient |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"## The work itself: the fastest of {args.repeats} steps at each batch size from mean - 3 sd to mean + 3 sd",
        "",
        "The fastest of several timings filters out most of what other processes add on a shared "
        "machine: what is left is what the step costs at that batch size. r and slope over the 7 sizes.",
        "",
        "| patients n | mode | constant work | B | fastest s | r(B, s) | slope ms/patient |",
        "|---|---|---|---|---|---|---|",
        *controlled,
        "",
        f"## Cost (median seconds per DP step; an epoch is n / {EXPECTED} steps)",
        "",
        "| patients n | mode | s/step off | s/step constant | constant / off | s/epoch off | s/epoch constant |",
        "|---|---|---|---|---|---|---|",
    ]
    for n_, mode, per_step in cost:
        lines.append(f"| {n_} | {mode} | {per_step[False]:.3f} | {per_step[True]:.3f} | "
                     f"{per_step[True] / per_step[False]:.2f} | {per_step[False] * epoch[n_]:.2f} | "
                     f"{per_step[True] * epoch[n_]:.2f} |")
    ew = {c: dict(((n_, m), s) for n_, m, s in cost).get((n, "ew"), {}).get(c) for c in (False, True)}
    lines += [
        "",
        f"At n = {n}: Opacus' own DP step as before issue 25 (ew, float32 clipping and noise, no padding) "
        f"{opacus:.3f} s; a plain SGD step of {EXPECTED} {plain:.3f} s."
        + (f" DP / non-DP: {ew[False] / plain:.2f} without the fixed batch, {ew[True] / plain:.2f} with it, "
           f"{opacus / plain:.2f} before issue 25." if ew[False] else ""),
    ]
    path = args.out / "dp_timing.md"
    io.write_text(path, "\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Benchmark: does a site's DP-SGD reply time follow the batch size it drew (issue 25, item 6)?

    .venv/bin/python benchmarks/dp_timing.py [--sites 300 1500] [--modes ew ghost hooks functorch]
        [--turns 40] [--steps 40] [--repeats 7] [--local-steps 1] [--out DIR]

privmed's default DP model (dpcnn, 28 px, 1 channel, 2 classes) at sites of `--sites` patients,
expected batch 256 as configs/pneumonia-dp.yaml (q = min(1, 256 / n)), sigma 1, C 1, SGD lr 0.5, the
site's random shifts. Synthetic images: the time does not depend on pixel values. One torch thread.
Every comparison is interleaved (one of each setting in turn), so that the settings share the load
of a shared machine.

1. Drawn batches: `--turns` dp_train calls as Site.train makes them (`--local-steps` steps, privmed's
   default 1), each timed whole, and `--steps` DPSGD steps on Poisson batches, each timed; with
   constant work off (the drawn batch as it is) and on (DPSGD's fixed physical batch P). Pearson's r
   between the drawn batch size and the seconds, and the slope.
2. The work itself: at 7 batch sizes from the mean - 3 sd to the mean + 3 sd, `--repeats` steps each
   (sizes in a shuffled order each round), off, on, and Opacus' own DP step as before issue 25
   (float32 clipping and noise, no padding); the fastest of the repeats, which filters out most of
   the load, is what the step costs at that size.
3. Cost: the medians at the mean batch size of (2), and a plain SGD step on the same batch, in
   the same rounds: seconds per step and per epoch (n / 256 steps), DP / non-DP.

Writes benchmarks/results/dp_timing.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from opacus.grad_sample import prepare_module
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

from privmed import io
from privmed.federation.site import random_shift
from privmed.models import build_model
from privmed.privacy.dpsgd import CLIP_MARGIN, DPSGD, dp_train, physical_batch_size, poisson_batches
from privmed.tasks.base import ClassificationLoss

ROOT = Path(__file__).resolve().parents[1]
SIZE, EXPECTED = 28, 256
SIGMA, C, LR = 1.0, 1.0, 0.5
SHIFT = max(1, SIZE // 14)  # the site's random shift for 28 px images
SETTINGS = ("off", "constant", "before", "plain")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("dpcnn", in_channels=1, num_classes=2, image_size=SIZE)


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    return torch.rand(n, 1, SIZE, SIZE, generator=gen), torch.randint(0, 2, (n,), generator=gen)


def _augment(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return random_shift(xb, SHIFT, gen)


def _timed(step, x: torch.Tensor, y: torch.Tensor) -> float:
    t = time.perf_counter()
    step(x, y)
    return time.perf_counter() - t


class _Before:
    """One DP step as privmed ran it before issue 25: Opacus' DPOptimizer (ghost: its
    fast-gradient-clipping optimizer and loss), float32 clipping and noise, the batch as it is."""

    def __init__(self, mode: str, expected: float):
        self.model = _model().train()
        clip = C * (1 - CLIP_MARGIN)
        self.gsm = prepare_module(self.model, mode, loss_reduction="mean",
                                  **({"max_grad_norm": clip} if mode == "ghost" else {}))
        cls = DPOptimizerFastGradientClipping if mode == "ghost" else DPOptimizer
        self.opt = cls(torch.optim.SGD(self.model.parameters(), lr=LR), noise_multiplier=SIGMA / (1 - CLIP_MARGIN),
                       max_grad_norm=clip, expected_batch_size=expected, generator=torch.Generator().manual_seed(0))
        self.loss = DPLossFastGradientClipping(self.gsm, self.opt, ClassificationLoss(), "mean") if mode == "ghost" else None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        out = self.gsm(x)
        (self.loss(out, y) if self.loss else F.cross_entropy(out, y)).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class _Plain:
    """The non-private step: mean loss over the batch, SGD."""

    def __init__(self):
        self.model = _model().train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(x), y).backward()
        self.opt.step()


def _dpsgd(mode: str, n: int, constant: bool) -> DPSGD:
    q = min(1.0, EXPECTED / n)
    model = _model()
    return DPSGD(model, torch.optim.SGD(model.parameters(), lr=LR), noise_multiplier=SIGMA, max_grad_norm=C,
                 expected_batch_size=q * n, generator=torch.Generator().manual_seed(0), grad_sample_mode=mode,
                 criterion=ClassificationLoss(), physical_batch=physical_batch_size(n, q) if constant else None)


def turn_times(n: int, mode: str, turns: int, local_steps: int) -> dict[bool, list[tuple[int, float]]]:
    """{constant_work: [(patients drawn in the turn, seconds of the dp_train call)]}: the same
    generator seed for both, so the same batches."""
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
                         augment=_augment, criterion=ClassificationLoss(), constant_work=constant)
            if turn >= 0:
                out[constant].append((m["sample_gradient_steps"], time.perf_counter() - t))
    return out


def step_times(n: int, mode: str, steps: int) -> dict[bool, list[tuple[int, float]]]:
    """{constant_work: [(patients drawn, seconds of the DPSGD step)]} on the same Poisson batches."""
    x, y = _data(n)
    q = min(1.0, EXPECTED / n)
    sessions = {c: _dpsgd(mode, n, c) for c in (False, True)}
    out: dict[bool, list[tuple[int, float]]] = {False: [], True: []}
    gen = torch.Generator().manual_seed(3)
    for k, idx in enumerate(poisson_batches(n, q, steps + 1, torch.Generator().manual_seed(7))):
        xb = _augment(x[idx], gen) if len(idx) else x[idx]
        for constant, dp in sessions.items():
            seconds = _timed(dp.step, xb, y[idx])
            if k > 0:  # step 0 warms up
                out[constant].append((len(idx), seconds))
    for dp in sessions.values():
        dp.close()
    return out


def work_times(n: int, mode: str, repeats: int) -> tuple[list[int], dict[str, dict[int, list[float]]]]:
    """The 7 batch sizes (mean - 3 sd .. mean + 3 sd) and {setting: {size: [seconds]}}: in each of
    `repeats` rounds, every size (in a shuffled order) by every setting in turn."""
    x, y = _data(n)
    q = min(1.0, EXPECTED / n)
    mean, sd = q * n, (q * n * (1 - q)) ** 0.5
    sizes = sorted({min(n, max(1, round(mean + k * sd))) for k in (-3, -2, -1, 0, 1, 2, 3)})
    steps = {"off": _dpsgd(mode, n, False).step, "constant": _dpsgd(mode, n, True).step,
             "before": _Before(mode, mean), "plain": _Plain()}
    times: dict[str, dict[int, list[float]]] = {s: {b: [] for b in sizes} for s in SETTINGS}
    order = random.Random(0)
    for step in steps.values():  # warm-up
        step(x[: sizes[-1]], y[: sizes[-1]])
    for _ in range(repeats):
        for b in order.sample(sizes, len(sizes)):
            for setting, step in steps.items():
                times[setting][b].append(_timed(step, x[:b], y[:b]))
    return sizes, times


def _r(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """Pearson's r between batch size and seconds, and the least-squares slope in ms per patient."""
    b = np.array([p[0] for p in pairs], dtype=float)
    s = np.array([p[1] for p in pairs], dtype=float)
    if b.std() == 0 or s.std() == 0:
        return float("nan"), float("nan")
    return float(np.corrcoef(b, s)[0, 1]), float(np.polyfit(b, s, 1)[0] * 1000)


def _label(constant: bool, physical: int) -> str:
    return f"P = {physical}" if constant else "off"


def drawn_row(n: int, mode: str, unit: str, constant: bool, pairs: list[tuple[int, float]], physical: int) -> str:
    b, s = [p[0] for p in pairs], [p[1] for p in pairs]
    r, slope = _r(pairs)
    return (f"| {n} | {mode} | {unit} | {_label(constant, physical)} | {len(pairs)} | "
            f"{statistics.mean(b):.1f} ± {statistics.stdev(b):.1f} | {statistics.median(s):.3f} | "
            f"{statistics.stdev(s):.3f} | {r:+.2f} | {slope:+.2f} |")


def work_rows(n: int, mode: str, sizes: list[int], times: dict, physical: int) -> list[str]:
    rows = []
    for setting, label in (("off", "off"), ("constant", f"P = {physical}"), ("before", "before issue 25")):
        fastest = [(b, min(times[setting][b])) for b in sizes]
        r, slope = _r(fastest)
        rows.append(f"| {n} | {mode} | {label} | {sizes[0]} .. {sizes[-1]} | "
                    f"{' '.join(f'{s * 1000:.0f}' for _, s in fastest)} | {r:+.2f} | {slope:+.3f} |")
    return rows


def cost_row(n: int, mode: str, sizes: list[int], times: dict) -> str:
    b = sizes[len(sizes) // 2]
    med = {s: statistics.median(times[s][b]) for s in SETTINGS}
    epoch = n / EXPECTED
    return (f"| {n} | {mode} | {b} | {med['off']:.3f} | {med['constant']:.3f} | {med['before']:.3f} | "
            f"{med['plain']:.3f} | {med['constant'] / med['off']:.2f} | {med['off'] * epoch:.2f} | "
            f"{med['constant'] * epoch:.2f} | {med['off'] / med['plain']:.2f} | "
            f"{med['constant'] / med['plain']:.2f} | {med['before'] / med['plain']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites", type=int, nargs="+", default=[300, 1500])
    ap.add_argument("--modes", nargs="+", default=["ew", "ghost", "hooks", "functorch"])
    ap.add_argument("--turns", type=int, default=40)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--local-steps", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    load_before = os.getloadavg()
    drawn, work, cost = [], [], []
    started = time.perf_counter()
    for n in args.sites:
        physical = physical_batch_size(n, min(1.0, EXPECTED / n))
        for mode in args.modes:
            turns = turn_times(n, mode, args.turns, args.local_steps)
            steps = step_times(n, mode, args.steps)
            for constant in (False, True):
                drawn.append(drawn_row(n, mode, "turn", constant, turns[constant], physical))
                drawn.append(drawn_row(n, mode, "step", constant, steps[constant], physical))
            sizes, times = work_times(n, mode, args.repeats)
            work += work_rows(n, mode, sizes, times, physical)
            cost.append(cost_row(n, mode, sizes, times))
            print(*drawn[-4:], *work[-3:], cost[-1], sep="\n", flush=True)
    load_after = os.getloadavg()
    command = (f"python benchmarks/dp_timing.py --sites {' '.join(map(str, args.sites))} --modes "
               f"{' '.join(args.modes)} --turns {args.turns} --steps {args.steps} --repeats {args.repeats} "
               f"--local-steps {args.local_steps}")
    lines = [
        "# DP-SGD reply time against the drawn batch size (issue 25, item 6)",
        "",
        f"`{command}`: dpcnn ({sum(p.numel() for p in _model().parameters())} parameters), 28 px, "
        f"expected batch {EXPECTED}, sigma {SIGMA}, C {C}, random shifts, 1 torch thread, "
        f"{platform.machine()}, torch {torch.__version__}, {os.cpu_count()} cores shared with other "
        f"sessions: load average (1/5/15 min) {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f} "
        f"before, {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} after; "
        f"{time.perf_counter() - started:.0f} s in all. Constant work off: the drawn batch as it is; "
        "P: every batch padded to the fixed physical batch physical_batch_size(n, q) (P(B > P) <= 1e-9 "
        "a step), the padding masked before clipping.",
        "",
        "## 1. Drawn batches: reply time against the batch size B drawn",
        "",
        "A turn is one dp_train call as Site.train makes it; a step is one DPSGD step. r: Pearson's "
        "correlation of B with the seconds (its standard error is about 1/sqrt(samples) = 0.16); "
        "slope: ms per patient drawn. Other sessions' load adds most of the spread.",
        "",
        "| patients n | mode | unit | constant work | samples | B (mean ± sd) | median s | sd s | r(B, s) | slope ms/patient |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *drawn,
        "",
        f"## 2. The work itself: the fastest of {args.repeats} steps at each batch size",
        "",
        "Sizes from the mean - 3 sd to the mean + 3 sd of a Poisson batch; ms of the fastest step at "
        "each size, and r and slope over the 7 sizes.",
        "",
        "| patients n | mode | step | B | fastest ms at each B | r(B, s) | slope ms/patient |",
        "|---|---|---|---|---|---|---|",
        *work,
        "",
        "## 3. Cost: median seconds per step at the mean batch size, in the same rounds",
        "",
        f"An epoch is n / {EXPECTED} steps. Before: Opacus' own DP step as privmed ran it before issue 25 "
        "(float32 clipping and noise, no padding). Plain: a non-private SGD step on the same batch.",
        "",
        "| patients n | mode | B | s off | s constant | s before | s plain | constant / off | s/epoch off | "
        "s/epoch constant | DP/plain off | DP/plain constant | DP/plain before |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *cost,
    ]
    path = args.out / "dp_timing.md"
    io.write_text(path, "\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

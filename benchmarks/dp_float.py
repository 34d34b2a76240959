"""Benchmark: floating-point channels of a DP-SGD release, before and after issue 25 (item 1d).

    .venv/bin/python benchmarks/dp_float.py [--releases 200] [--draws 27] [--out DIR]

Every figure is of the noisy gradient as it reaches the optimizer (float32, after the noise and
the division by the expected batch size): what a step releases before post-processing.

1. Clipping at extreme scales: one patient's features scaled from 1e-40 to inf in a zero-weight
   linear model (its gradient scales with them): the largest ||gradient with it - without|| / C
   over the scales, in each grad-sample mode, with Opacus' own DP step (before) and DPSGD (after).
2. The share of CLIP_MARGIN a clipped gradient uses: one patient alone, noise-free, in float32
   models (dpcnn, cnn, resnet18 at 16 px), ||its gradient|| / C against the 1 - CLIP_MARGIN it is
   clipped to, per mode, before and after.
3. Jin et al. 2022's low-bits attack on noise added in float32: the attacker's zero weights, lr 1
   and expected batch 1 make the release minus the noisy sum; 1000 coordinates carry only the
   target's gradient. The attack says "absent" when a near-zero coordinate has a bit finer than a
   float subtraction with the target's gradient could leave. `--releases` releases with the target
   and as many without: true and false positive rates, before and after.
4. The noise sampler's support: torch's Box-Muller draws from one uniform of 24 bits (float32) or
   53 (float64), so |z| <= 5.768 or 8.57; a release beyond the support of the sum without a patient
   proves the patient. Empirical max |z| over 2^`--draws` draws of each sampler, and the chance per
   step, Phi(-(z_max - 1/sigma)), of such a release when the patient's gradient is all in one
   coordinate the others leave at 0.

Writes benchmarks/results/dp_float.md.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from opacus.grad_sample import prepare_module
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn

from privmed import io
from privmed.models import build_model
from privmed.privacy.dpsgd import CLIP_MARGIN, DPSGD, GRAD_SAMPLE_MODES, noised_sum, grid_spacing
from privmed.tasks.base import ClassificationLoss

ROOT = Path(__file__).resolve().parents[1]
SCALES = (1e-40, 1e-30, 1e-20, 1e-10, 1.0, 1e10, 1e18, 1e20, 1e30, 3e38, math.inf)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).double()


def step(model, x, y, *, mode, c, sigma=0.0, seed=0, before=False) -> torch.Tensor:
    """The noisy gradient of one DP step (float64, flat) as it reaches the optimizer, after the noise
    and the division by the expected batch size 1: what the step releases before post-processing.
    `before`: Opacus' own DPOptimizer and ghost loss as privmed ran them before issue 25. `model`
    is left as it was."""
    start = {k: v.clone() for k, v in model.state_dict().items()}
    loss = ClassificationLoss()
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    seen: list[torch.Tensor] = []

    def capture() -> None:
        seen.append(torch.cat([p.grad.detach().flatten() for p in params]).double())

    if before:
        clip = c * (1 - CLIP_MARGIN)
        gsm = prepare_module(model.train(), mode, loss_reduction="mean",
                             **({"max_grad_norm": clip} if mode == "ghost" else {}))
        cls = DPOptimizerFastGradientClipping if mode == "ghost" else DPOptimizer
        opt = cls(torch.optim.SGD(params, lr=1.0), noise_multiplier=sigma * c / clip,
                  max_grad_norm=clip, expected_batch_size=1, generator=gen)
        opt.attach_step_hook(lambda _opt: capture())
        if mode == "ghost":
            DPLossFastGradientClipping(gsm, opt, loss, "mean")(gsm(x), y).backward()
        else:
            loss(gsm(x), y).backward()
        opt.step()
        gsm.to_standard_module()
    else:
        with DPSGD(model, torch.optim.SGD(params, lr=1.0), noise_multiplier=sigma, max_grad_norm=c,
                   expected_batch_size=1, generator=gen, grad_sample_mode=mode, criterion=loss,
                   after_noise=capture) as dp:
            dp.step(x, y)
    model.load_state_dict(start)
    return seen[0]


def scales_table() -> list[str]:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 13, generator=gen), torch.tensor([0, 1, 0, 1, 1])
    model = nn.Sequential(nn.Linear(13, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    rows = ["| mode | C | before: max ||with - without|| / C | before: non-finite at scales | after: max ||with - without|| / C | after: non-finite |",
            "|---|---|---|---|---|---|"]
    for mode in GRAD_SAMPLE_MODES:
        for c in (1.0, 1e-3):
            out = {}
            for before in (True, False):
                worst, bad = 0.0, []
                for s in SCALES:
                    xs = x.clone()
                    xs[0] = xs[0] * s if math.isfinite(s) else math.inf
                    moved = step(model, xs, y, mode=mode, c=c, before=before) - step(
                        model, xs[1:], y[1:], mode=mode, c=c, before=before)
                    if torch.isfinite(moved).all():
                        worst = max(worst, moved.norm().item() / c)
                    else:
                        bad.append(f"{s:g}")
                out[before] = (worst, ", ".join(bad) or "none")
            rows.append(f"| {mode} | {c:g} | {out[True][0]:.7f} | {out[True][1]} | {out[False][0]:.7f} | {out[False][1]} |")
    return rows


def margin_table() -> list[str]:
    rows = ["| model | mode | before: max ||gradient|| / C | after: max ||gradient|| / C | clipped to |",
            "|---|---|---|---|---|"]
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 16, 16, generator=gen)
    y = torch.randint(0, 2, (4,), generator=gen)
    c = 1e-3  # below every gradient's norm: every patient is clipped
    for name in ("dpcnn", "cnn", "resnet18"):
        torch.manual_seed(0)
        model = build_model(name, in_channels=1, num_classes=2, image_size=16)
        for mode in GRAD_SAMPLE_MODES:
            worst = {}
            for before in (True, False):
                worst[before] = max(step(model, x[i:i + 1], y[i:i + 1], mode=mode, c=c, before=before).norm().item() / c
                                    for i in range(len(x)))
            rows.append(f"| {name} | {mode} | {worst[True]:.7f} | {worst[False]:.7f} | {1 - CLIP_MARGIN:.7f} |")
    return rows


def _low_bits_attack(released: torch.Tensor, contribution: torch.Tensor) -> bool:
    s = contribution.abs()
    near_zero = released.abs() < s / 2
    spacing = torch.ldexp(torch.ones_like(s), torch.frexp(s).exponent - 25)  # ulp(s) / 2
    return bool((near_zero & (torch.remainder(released.double(), spacing.double()) != 0)).any())


def attack_table(releases: int) -> list[str]:
    k = 1000
    model = nn.Sequential(nn.Linear(1 + k, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    gen = torch.Generator().manual_seed(5)
    x = torch.zeros(5, 1 + k)
    x[:, 0] = torch.randn(5, generator=gen)
    x[0, 1:] = (1 + torch.rand(k, generator=gen)) * 2.0**-6
    y = torch.tensor([0, 1, 0, 1, 0])
    contribution = 0.5 * x[0, 1:]
    rows = ["| noise | releases each | says absent, target absent (TPR) | says absent, target present (FPR) | advantage |",
            "|---|---|---|---|---|"]
    for before in (True, False):
        says = {}
        for present in (True, False):
            idx = slice(0, 5) if present else slice(1, 5)
            says[present] = sum(
                _low_bits_attack(step(model, x[idx], y[idx], mode="ew", c=1.0, sigma=1.0, seed=10_000 + r,
                                       before=before)[:k].float(), contribution)
                for r in range(releases))
        label = "float32, added in float32 (Opacus, before)" if before else "float64 x 2, on a grid, rounded once (after)"
        rows.append(f"| {label} | {releases} | {says[False] / releases:.3f} | {says[True] / releases:.3f} | "
                    f"{(says[False] - says[True]) / releases:.3f} |")
    return rows


def support_table(draws: int) -> list[str]:
    n = 2**draws
    chunk = min(n, 2**24)
    largest = {}
    gen = torch.Generator().manual_seed(0)
    for label, draw in (
        ("float32, one draw (torch; Opacus before)", lambda m: torch.normal(0.0, 1.0, (m,), generator=gen)),
        ("float64, one draw", lambda m: torch.normal(0.0, 1.0, (m,), dtype=torch.float64, generator=gen)),
        ("float64, two draws / sqrt 2 (after)", lambda m: noised_sum(torch.zeros(m), 1.0, 2.0**-40, gen)),
    ):
        largest[label] = max(draw(chunk).abs().max().item() for _ in range(n // chunk))
    bound = {"float32, one draw (torch; Opacus before)": math.sqrt(-2 * math.log(2.0**-24)),
             "float64, one draw": math.sqrt(-2 * math.log(2.0**-53)),
             "float64, two draws / sqrt 2 (after)": 2 * math.sqrt(-2 * math.log(2.0**-53)) / math.sqrt(2)}
    phi = lambda t: 0.5 * math.erfc(t / math.sqrt(2))  # noqa: E731
    rows = [f"| sampler | support bound (std) | max |z| in 2^{draws} draws | sigma 0.5 | sigma 1 | sigma 2 |",
            "|---|---|---|---|---|---|"]
    for label, b in bound.items():
        rows.append(f"| {label} | {b:.3f} | {largest[label]:.3f} | " +
                    " | ".join(f"{phi(b - 1 / s):.1e}" for s in (0.5, 1.0, 2.0)) + " |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--releases", type=int, default=200)
    ap.add_argument("--draws", type=int, default=27, help="log2 of the noise draws per sampler")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    # Opacus' hooks: the first layer's full backward hook fires with no input gradient (as in DPSGD)
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    started = time.perf_counter()
    lines = [
        "# Floating-point channels of a DP-SGD release (issue 25, item 1d)",
        "",
        f"`python benchmarks/dp_float.py --releases {args.releases} --draws {args.draws}`, torch "
        f"{torch.__version__}, 1 thread. Before: Opacus' own DPOptimizer (float32 norms, clipping, sum "
        "and noise) as privmed ran it before issue 25; after: privmed.privacy.dpsgd.DPSGD.",
        "",
        "## 1. One patient's contribution at every scale (1e-40 .. 3e38, inf; zero-weight linear model)",
        "",
        *scales_table(),
        "",
        "## 2. How much of CLIP_MARGIN a clipped gradient uses (one patient, float32 models, 16 px)",
        "",
        *margin_table(),
        "",
        "## 3. Jin et al.'s low-bits attack (sigma 1, C 1, 1000 coordinates only the target reaches)",
        "",
        *attack_table(args.releases),
        "",
        "## 4. The noise sampler's support, and the chance per step that a release proves a patient",
        "",
        "Per step in which the patient is drawn, with its whole clipped gradient in one coordinate "
        "that the other patients leave at 0: Phi(-(bound - 1/sigma)).",
        "",
        *support_table(args.draws),
        "",
        f"grid_spacing(1 - CLIP_MARGIN) = 2^{int(math.log2(grid_spacing(1 - CLIP_MARGIN)))}; "
        f"{time.perf_counter() - started:.0f} s in all.",
    ]
    path = args.out / "dp_float.md"
    io.write_text(path, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""What a DP-SGD plan leaves a site to learn with, said before the first release (issue 27).

    o = outlook(plan, rounds=cfg.federation.rounds)   # None unless the plan is DP-SGD's
    o.figure, o.verdict, o.message

One DP-SGD step at a site averages the clipped gradients of the patients it samples (about q x n of
its n, each of norm at most the clipping norm C) and adds Gaussian noise of std sigma x C to their
sum. Per coordinate of the averaged gradient that noise has std sigma / (q x n), in units of C: the
*noise per step* (`step_noise`), the ratio that DP-SGD's utility follows at a given model and number
of steps (De et al. 2022). It is a function of the plan alone (public counts), so saying it spends
nothing. At a site of a few hundred patients the default batch of 256 takes everyone (q = 1), so the
noise calibrated to a budget grows with the square root of the steps and the figure grows as the
site shrinks or the rounds grow: there, fewer rounds help.

Measured with the DP-SGD defaults (`dpcnn` on 28 px images, 1 step a round, batch 256, lr 0.5),
PneumoniaMNIST, three hospitals of n, 3n/4 and n/2 training images in their own folders, seed 0
(`benchmarks/small_sites.py`, README: DP-SGD at a hospital's size); the figure of the median site:

    n     epsilon  rounds  noise per step  test AUC
    ~1569       8     200          0.0063     0.942   (benchmarks/dp_pneumonia.py: Dirichlet sites,
    ~1569       1     200          0.0345     0.941    3 seeds, the figure at 1569 a site)
    200         8      50          0.0284     0.896
    200         8     200          0.0568     0.902
    50          8      50          0.1152     0.900
    200         1      50          0.1781     0.793
    50          8     200          0.2304     0.638   balanced accuracy near chance
    200         1     200          0.3562     0.584   near chance
    50          1      50          0.7220     0.332   below chance
    50          1     200          1.4439     0.546   near chance

So: up to LEARNED (0.116) every measured run learned (test AUC 0.896 or more); from HOPELESS (0.23) none
did; between them is the one run at 0.178 (AUC 0.79). The same runs on RetinaMNIST do not help to
place these: its 5-class test figures come from the sites' noisy counts on about 133 test images
a site, and swung from AUC 0.02 to 0.82 across them (README). These were measured on one model and one kind
of image: a larger model spreads the same noise over more coordinates, and the boundaries are where
these runs fell, not a law.
"""

from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass

from privmed.catalog import PrivacyMode
from privmed.privacy.calibration import noise_for_epsilon
from privmed.privacy.plan import PrivacyPlan

LEARNED = 0.116  # every measured run at or below this median-site noise per step learned (0.1152, up to
# the calibration's 1 % tolerance)
HOPELESS = 0.23  # no measured run at or above this learned anything

FEWEST_ROUNDS = 50  # the fewest rounds measured: fewer are not suggested (a model must still learn in them)

_noise_for = functools.lru_cache(maxsize=256)(noise_for_epsilon)  # sites of one size share a calibration


def step_noise(noise_multiplier: float, sample_rate: float, n_units: int) -> float:
    """The std of the noise on each coordinate of a site's averaged clipped gradient in one step,
    in units of the clipping norm: sigma / (q x n)."""
    return noise_multiplier / (sample_rate * n_units)


@dataclass(frozen=True)
class Outlook:
    figure: float  # the median site's noise per step
    per_site: dict[str, float]
    verdict: str  # "learned", "untested" or "hopeless": where measured runs at this figure fell
    message: str  # what that means, and (unless "learned") what to try
    fewer_rounds: tuple[int, float] | None = None  # (rounds, figure) that would bring it to LEARNED


def outlook(plan: PrivacyPlan | None, rounds: int) -> Outlook | None:
    """The plan's noise per step and what measured runs at that figure reached; None unless the
    plan is DP-SGD's. `rounds`: the run's federation.rounds (a smaller number is suggested where it
    brings the figure down to LEARNED, with the noise calibrated to the same budget)."""
    if plan is None or plan.mode != PrivacyMode.DP_SGD or not plan.sites:
        return None
    per_site = {s: step_noise(p.release.noise_multiplier, p.release.sample_rate, p.n_patients)
                for s, p in plan.sites.items()}
    figure = statistics.median(per_site.values())
    verdict = "learned" if figure <= LEARNED else "hopeless" if figure >= HOPELESS else "untested"
    fewer = _fewer_rounds(plan, rounds) if verdict != "learned" and plan.calibrated else None
    said = f"DP-SGD noise per step {figure:.3g} at the median site (sigma / expected batch, in clipping norms)"
    if verdict == "learned":
        message = (f"{said}: at or below {LEARNED}, where every measured run learned (PneumoniaMNIST, "
                   "test AUC 0.896-0.942 with the DP-SGD defaults)")
    else:
        where = (f"at or above {HOPELESS}, where no measured run learned anything (PneumoniaMNIST, test "
                 "AUC 0.33-0.64, balanced accuracy near chance)" if verdict == "hopeless" else
                 f"between {LEARNED}, where measured runs learned, and {HOPELESS}, where none did")
        how = (f"federation.rounds: {fewer[0]} gives {fewer[1]:.3g} within the same budget; or "
               if fewer else "")
        message = (f"{said}: {where}. The noise may drown the sites' signal: try {how}a larger privacy.epsilon, "
                   "or more patients a site")
    return Outlook(figure, per_site, verdict, message, fewer)


def _fewer_rounds(plan: PrivacyPlan, rounds: int) -> tuple[int, float] | None:
    """The largest of rounds/2, rounds/4, ... (down to FEWEST_ROUNDS) whose calibrated noise brings
    the median site's noise per step to LEARNED or below, and that figure; None if none does.
    Assumes every site trains each round (its turns scale with the rounds)."""
    candidate = rounds // 2
    while candidate >= FEWEST_ROUNDS:
        figures = []
        for p in plan.sites.values():
            turns = max(1, round(p.turns * candidate / rounds))
            sigma = _noise_for(plan.budget, plan.delta, p.release.sample_rate,
                                      p.release.steps * turns, plan.accountant)
            figures.append(step_noise(sigma, p.release.sample_rate, p.n_patients))
        figure = statistics.median(figures)
        if figure <= LEARNED:
            return candidate, figure
        candidate //= 2
    return None


def outlook_warnings(plan: PrivacyPlan | None, rounds: int) -> list[dict[str, str]]:
    """The plan's flag for summary.json's `warnings` (as privmed.tasks.usefulness writes them): one
    of kind "dp-noise" where the noise per step is past what measured runs learned at, else []."""
    o = outlook(plan, rounds)
    return [] if o is None or o.verdict == "learned" else [{"kind": "dp-noise", "message": o.message}]

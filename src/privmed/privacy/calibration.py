"""Calibration: the noise multiplier that meets a target epsilon, the epsilon curve of a plan, delta's bound.

`noise_for_epsilon` never overshoots: the epsilon of the sigma it returns, by the same accountant, is at
most the target. It is also tight: the accountant gave more than the target at a sigma within `tol` below.
"""

from __future__ import annotations

import math
from typing import Callable

from privmed.errors import ConfigError
from privmed.privacy.accountants import (
    Release,
    check_accountant_name,
    check_delta_range,
    check_epsilon_range,
    epsilon_spent,
)

DEFAULT_TOL = 0.01  # relative width of the final bracket on sigma
MAX_NOISE = 1e3  # beyond this a target is "impossible": training would be pure noise
MIN_NOISE = 0.1  # a target met even at this noise gets this noise: less is not worth computing


def noise_for_epsilon(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    tol: float = DEFAULT_TOL,
) -> float:
    """The smallest noise multiplier (to relative `tol`) whose epsilon after `steps` steps at
    `sample_rate` is <= `target_epsilon` at `delta`, by `accountant`.

    Searched by bisection in a bracket grown as needed (placed with the cheap RDP bound first when the
    accountant is PRV or PLD); ConfigError naming `privacy.epsilon` when the target is not > 0 or not
    reachable with noise multipliers up to MAX_NOISE."""
    check_accountant_name(accountant)
    check_delta_range(delta)
    check_epsilon_range(target_epsilon)
    if not 0.0 < tol < 0.5:
        raise ValueError(f"tol must be in (0, 0.5), got {tol!r}")
    Release(1.0, sample_rate, steps)  # validates them
    if sample_rate == 0.0 or steps == 0:
        raise ValueError(f"nothing to calibrate: sample_rate={sample_rate}, steps={steps} touch no data")

    def eps_at(sigma: float) -> float:
        return epsilon_spent([Release(sigma, sample_rate, steps)], delta, accountant)

    def rdp_at(sigma: float) -> float:
        return epsilon_spent([Release(sigma, sample_rate, steps)], delta, "rdp")

    # The moments accountant's rule of thumb, eps ~ q sqrt(2 T log(1/delta)) / sigma: a start within
    # a factor of two or so of the answer.
    start = sample_rate * math.sqrt(2 * steps * math.log(1 / delta)) / target_epsilon
    start = min(max(start, 0.5), MAX_NOISE)
    try:
        if accountant == "rdp":
            bracket = _bracket(eps_at, target_epsilon, start, 1.5)
        else:
            # RDP is looser than PRV/PLD, so its sigma, found with cheap evaluations, is an upper guess
            # close to the answer; bracketing down from there keeps the tight accountant away from tiny
            # sigmas, where its epsilon runs to the hundreds and takes seconds to compute.
            try:
                guess = _search(rdp_at, target_epsilon, *_bracket(rdp_at, target_epsilon, start, 1.5), tol)
            except _Unreachable:  # RDP's floor is higher; the tight accountant has the last word
                guess = MAX_NOISE
            bracket = _bracket(eps_at, target_epsilon, guess, 1.25, first_down=True)
    except _Unreachable as e:
        raise ConfigError(
            f"privacy.epsilon: {target_epsilon!r} cannot be reached with the {accountant} accountant at "
            f"delta {delta:g}, sample rate {sample_rate:g} and {steps} steps even with noise multiplier "
            f"{MAX_NOISE:g} (epsilon {e.epsilon:.4g}); allowed: a larger epsilon"
        ) from None
    return _search(eps_at, target_epsilon, *bracket, tol)


class _Unreachable(Exception):
    def __init__(self, epsilon: float) -> None:
        self.epsilon = epsilon


Bracket = tuple[float, float, float, float]  # lo, eps(lo) > target, hi, eps(hi) <= target


def _bracket(
    eps_at: Callable[[float], float], target: float, guess: float, factor: float, first_down: bool = False
) -> Bracket:
    """A bracket grown from `guess` by `factor`; lo is 0.0 when even MIN_NOISE meets the target.
    With `first_down`, the first step down is by the ratio of the target to the guess's epsilon
    (epsilon falls at least as fast as 1 / sigma), not by `factor`."""
    sigma, eps = guess, eps_at(guess)
    if eps <= target:
        step = min(max(target / eps, 1.02), factor) if first_down and eps > 0 else factor
        while sigma > MIN_NOISE:
            lo = max(sigma / step, MIN_NOISE)
            eps_lo = eps_at(lo)
            if eps_lo > target:
                return lo, eps_lo, sigma, eps
            sigma, eps, step = lo, eps_lo, factor
        return 0.0, math.inf, sigma, eps
    while sigma < MAX_NOISE:
        hi = min(sigma * factor, MAX_NOISE)
        eps_hi = eps_at(hi)
        if eps_hi <= target:
            return sigma, eps, hi, eps_hi
        sigma, eps = hi, eps_hi
    raise _Unreachable(eps)


def _search(
    eps_at: Callable[[float], float],
    target: float,
    lo: float,
    eps_lo: float,
    hi: float,
    eps_hi: float,
    tol: float,
) -> float:
    """Shrink the bracket until hi - lo <= tol * hi and return hi, the feasible end.

    Bisection, except that where log epsilon is nearly linear in log sigma (it is, over a narrow
    bracket) it probes just past the interpolated crossing, then just inside tol of it, so a good
    prediction closes the bracket in two evaluations; a probe that does not halve the bracket is
    followed by a plain midpoint, so it is never slower than bisection by more than a factor of two."""
    if lo == 0.0:
        return hi  # even MIN_NOISE meets the target
    bisect_next = False
    while hi - lo > tol * hi:
        width = hi - lo
        if bisect_next or not (0.0 < eps_hi <= target < eps_lo < math.inf):
            probe = 0.5 * (lo + hi)
        else:
            t = math.log(eps_lo / target) / math.log(eps_lo / eps_hi)  # 0 at lo, 1 at hi
            cross = lo * (hi / lo) ** t
            close_from_above = hi <= cross * (1 + tol / 2)  # hi is already next to the crossing
            probe = hi * (1 - 0.99 * tol) if close_from_above else cross * (1 + tol / 3)
            probe = min(max(probe, lo + 0.01 * width), hi - 0.01 * width)
        eps = eps_at(probe)
        if eps <= target:
            hi, eps_hi = probe, eps
        else:
            lo, eps_lo = probe, eps
        bisect_next = not bisect_next and (hi - lo) > 0.5 * width
    return hi


def epsilon_curve(
    noise_multiplier: float,
    sample_rate: float,
    steps_per_epoch: int,
    epochs: int,
    delta: float,
    accountant: str = "prv",
) -> list[tuple[int, float]]:
    """[(epoch, epsilon after that epoch)] for epochs 1..`epochs` of `steps_per_epoch` steps each."""
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    Release(noise_multiplier, sample_rate, steps_per_epoch)  # validates them
    return [
        (e, epsilon_spent([Release(noise_multiplier, sample_rate, e * steps_per_epoch)], delta, accountant))
        for e in range(1, epochs + 1)
    ]


def check_delta(delta: float, n_units: int, units: str = "patients at the smallest site") -> None:
    """Raise ConfigError unless 0 < delta < 1 / n_units (`units` says what was counted: patients at
    the smallest site for DP-SGD, sites for site-level DP). A larger delta allows a mechanism that
    publishes one unit's data outright."""
    n = n_units
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n_units must be an integer >= 1, got {n!r}")
    check_delta_range(delta)
    if delta >= 1.0 / n:
        raise ConfigError(
            f"privacy.delta: {delta:g} is too large: it must be below 1 / ({units}) "
            f"= 1/{n} = {1.0 / n:.3g}"
        )

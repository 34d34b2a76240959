"""Epsilon spent by a history of DP-SGD releases, by name: `prv`, `rdp` (Opacus) or `pld` (dp-accounting).

A release is `steps` steps of the Poisson-subsampled Gaussian mechanism (each patient is in a batch with
probability `sample_rate`, the summed clipped gradient gets Gaussian noise of std `noise_multiplier` x the
clipping norm), under add/remove-one-patient neighbouring. Every accountant returns an upper bound on
epsilon at the given delta; `independent_epsilon` recomputes it with dp-accounting alone, as a check.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from privmed import catalog
from privmed.errors import ConfigError, unknown_name

if TYPE_CHECKING:
    import dp_accounting

# opacus (which imports torch) and dp_accounting (scipy.signal) are imported where an accountant
# runs, not here: a ledger that is read, a release that is checked, `privmed --help` need neither.

# PRV adds this to its estimate to report a guaranteed upper bound, so no PRV epsilon is below it.
PRV_EPS_ERROR = 0.01
# Pessimistic PLD grid for the `pld` accountant: ~10x faster than dp-accounting's default 1e-4 and within
# 0.1% of it for epsilon >= 1 (always on the safe side).
PLD_DISCRETIZATION = 1e-3
REFERENCE_PLD_DISCRETIZATION = 1e-4
# Opacus' default orders (RDPAccountant.DEFAULT_ALPHAS) stop at 63, which is loose for epsilon above
# ~10; dp-accounting goes to 1024. `_rdp` uses Opacus' orders and these.
MORE_RDP_ORDERS = [128, 256, 512, 1024]


@dataclass(frozen=True)
class Release:
    """`steps` Poisson-subsampled Gaussian steps with this noise multiplier and sample rate."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        sigma, q, steps = self.noise_multiplier, self.sample_rate, self.steps
        if not _is_real(sigma) or not (0.0 <= sigma < math.inf):
            raise ValueError(f"Release.noise_multiplier must be a finite number >= 0, got {sigma!r}")
        if not _is_real(q) or not (0.0 <= q <= 1.0):
            raise ValueError(f"Release.sample_rate must be in [0, 1], got {q!r}")
        if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"Release.steps must be an integer >= 0, got {steps!r}")
        # Plain Python numbers, so that releases compare, hash and serialise the same from any source.
        object.__setattr__(self, "noise_multiplier", float(sigma))
        object.__setattr__(self, "sample_rate", float(q))
        object.__setattr__(self, "steps", int(steps))


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def accountant_names() -> list[str]:
    return sorted(_REGISTRY)


def check_accountant_name(name: str) -> None:
    if name not in _REGISTRY:
        raise ConfigError(unknown_name("privacy.accountant", "accountant", name, _REGISTRY))


def check_delta_range(delta: float) -> None:
    if not _is_real(delta) or not (0.0 < delta < 1.0):
        raise ConfigError(f"privacy.delta: {delta!r} is not allowed (a number with 0 < delta < 1)")


def check_epsilon_range(epsilon: float) -> None:
    if not _is_real(epsilon) or not (0.0 < epsilon < math.inf):
        raise ConfigError(f"privacy.epsilon: {epsilon!r} is not allowed (a finite number > 0)")


def epsilon_spent(releases: Sequence[Release], delta: float, accountant: str = "prv") -> float:
    """Epsilon at `delta` after all `releases` (composed in any order), by the named accountant.

    0.0 for no releases (or only releases of zero steps or zero sample rate); math.inf if any release
    touches data without noise (noise multiplier 0).
    """
    check_accountant_name(accountant)
    check_delta_range(delta)
    history = _merged(releases)
    if history is None:
        return math.inf
    if not history:
        return 0.0
    return _cached_epsilon(tuple(history), delta, accountant)


# Past this epsilon the RDP bound is returned as it is: no budget privmed accepts reaches it, and PRV
# and PLD discretise a privacy loss that wide into grids that take minutes or do not fit in memory
# (measured: PLD at noise multiplier 0.01 took 118 s, at 1e-4 it asked for 800 GB). A coordinator
# may send any release; answering it must stay cheap.
RDP_ONLY_ABOVE = 100.0


@functools.lru_cache(maxsize=1024)
def _cached_epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """One accountant call per distinct history: a site's own ledger and the coordinator's ledger
    ask the same question of the same releases (in a simulation, in the same process)."""
    if accountant != "rdp":
        rough = _rdp(list(history), delta)
        if rough > RDP_ONLY_ABOVE:
            return float(rough)
    try:
        return float(_REGISTRY[accountant](list(history), delta))
    except MemoryError:
        return float(_rdp(list(history), delta))


def independent_epsilon(releases: Sequence[Release], delta: float, method: str = "pld") -> float:
    """The same epsilon computed with dp-accounting only (`pld` on its fine default grid, or `rdp`)."""
    if method not in ("pld", "rdp"):
        raise ValueError(f"independent_epsilon: method must be 'pld' or 'rdp', got {method!r}")
    check_delta_range(delta)
    history = _merged(releases)
    if history is None:
        return math.inf
    if not history:
        return 0.0
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    if method == "pld":
        accountant = PLDAccountant(value_discretization_interval=REFERENCE_PLD_DISCRETIZATION)
    else:
        accountant = RdpAccountant()
    accountant.compose(_dp_event(history))
    return float(accountant.get_epsilon(delta))


History = list[tuple[float, float, int]]  # (noise_multiplier, sample_rate, steps), Opacus' layout


def _merged(releases: Sequence[Release]) -> History | None:
    """Releases with the same noise and sample rate summed into one entry (composition commutes, and
    each distinct entry costs a full discretisation); None when some release has no noise."""
    steps: dict[tuple[float, float], int] = {}
    for r in releases:
        if not isinstance(r, Release):
            raise TypeError(f"expected a Release, got {type(r).__name__}")
        if r.steps == 0 or r.sample_rate == 0.0:
            continue  # no patient's data was touched
        if r.noise_multiplier == 0.0:
            return None
        key = (r.noise_multiplier, r.sample_rate)
        steps[key] = steps.get(key, 0) + r.steps
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


def _prv(history: History, delta: float) -> float:
    # Far past any sane budget (epsilon in the hundreds) PRV's grid overflows or it gives up; the RDP
    # bound is still a valid upper bound there.
    try:
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"), _no_order_range_warning():
            eps = float(_prv_epsilon(history, delta, PRV_EPS_ERROR))
    except (RuntimeError, ValueError, MemoryError):
        eps = math.nan
    return eps if not math.isnan(eps) else _rdp(history, delta)


def _prv_epsilon(history: History, delta: float, eps_error: float) -> float:
    """Opacus' `PRVAccountant.get_epsilon(delta, eps_error=eps_error)` of `history`, the same steps on
    the same numbers (opacus 1.6: prv.py and analysis/prv/domain.py), except that the RDP bounds that
    size its grid come from `_rdp_epsilon`, which computes each order's RDP of one step once per noise
    and sample rate. Opacus recomputes them on every call, most of the time of a call; a calibration
    and an epsilon curve ask for the same noise and sample rate again and again.
    tests/test_privacy_accounting.py checks that the two agree exactly."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.prv import (
        Domain,
        PoissonSubsampledGaussianPRV,
        TruncatedPrivacyRandomVariable,
        compose_heterogeneous,
        discretize,
    )

    delta_error = delta / 1000
    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history]
    counts = [steps for _, _, steps in history]
    total = sum(counts)
    # compute_safe_domain_size: the RDP bound at delta_error / 4 of all the steps, and of each
    # mechanism's single step at delta_error / (8 x the steps)
    orders = RDPAccountant.DEFAULT_ALPHAS
    size = _rdp_epsilon(history, delta_error / 4, orders)
    for sigma, q, _ in history:
        size = max(size, _rdp_epsilon([(sigma, q, 1)], delta_error / (8 * total), orders))
    size = max(size, eps_error) + 3
    mesh_size = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
    domain = Domain.create_aligned(-size, size, mesh_size)
    dprvs = [discretize(TruncatedPrivacyRandomVariable(prv, domain.t_min, domain.t_max), domain) for prv in prvs]
    dprv = compose_heterogeneous(dprvs=dprvs, num_self_compositions=counts)
    _, _, eps_upper = dprv.compute_epsilon(delta, delta_error, eps_error)
    return eps_upper


def _rdp(history: History, delta: float) -> float:
    from opacus.accountants import RDPAccountant

    with _no_order_range_warning():
        return _rdp_epsilon(history, delta, [*RDPAccountant.DEFAULT_ALPHAS, *MORE_RDP_ORDERS])


def _rdp_epsilon(history: History, delta: float, orders: Sequence[float]) -> float:
    """Opacus' `RDPAccountant.get_epsilon(delta, alphas=orders)` of `history`, the same sum of the
    same arrays, with each order's RDP of one step memoised (`_rdp_of_one_step`)."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum([np.array([_rdp_of_one_step(q, sigma, a) for a in orders]) * steps for sigma, q, steps in history])
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=1 << 16)
def _rdp_of_one_step(q: float, sigma: float, order: float) -> float:
    from opacus.accountants.analysis.rdp import compute_rdp

    return float(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[order])[0])


@contextlib.contextmanager
def _no_order_range_warning() -> Iterator[None]:
    # Opacus' RDP warns when the best order is an end of its range, asking its caller to widen the
    # range. That caller is us (or PRV sizing its grid): the result is still a valid bound, and a user
    # can do nothing about it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        yield


def _pld(history: History, delta: float) -> float:
    from dp_accounting.pld import PLDAccountant

    accountant = PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    accountant.compose(_dp_event(history))
    return accountant.get_epsilon(delta)


def _dp_event(history: History) -> dp_accounting.DpEvent:
    import dp_accounting

    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
            )
            for sigma, q, steps in history
        ]
    )


# Every accountant the catalog lists (privmed.catalog.ACCOUNTANTS), by name: each names a function
# of this module.
_REGISTRY: dict[str, Callable[[History, float], float]] = {a.name: catalog.load(a.impl) for a in catalog.ACCOUNTANTS}

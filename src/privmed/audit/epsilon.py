"""The statistics of a one-run privacy audit: turn canary guesses into a lower bound on epsilon.

Method: T. Steinke, M. Nasr and M. Jagielski, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023 (arXiv:2305.08846).

What "one run" requires (the bound is only valid when all of these hold):

* m canaries, each included in training independently with probability 1/2 (S_i in {-1, +1}),
  drawn after the canaries were fixed and independently of everything else;
* one training run on the data with the included canaries; the auditor sees only its output;
* the guesses are a function of that output (scores computed without looking at inclusion), and
  the number of guesses r = k_plus + k_minus is fixed in advance (or chosen from a few options with
  a union bound, as `audit_from_scores` does).

What is implemented (Theorem 3.1 of the paper, the main result, in its (epsilon, delta) form):
if the training run is (epsilon, delta)-DP with respect to each canary, the number W of correct
guesses out of r satisfies, for every v,

    P[W >= v] <= f(v) + 2 m delta * max_{i = 1..m} (f(v - i) - f(v)) / i,
    f(x) := P[Binomial(r, e^eps / (1 + e^eps)) >= x].

For delta = 0 this is the binomial tail alone, which is exact in the worst case (randomized
response attains it). For delta > 0 the second term is the paper's *bound* on the effect of delta,
not an exact worst case: the p-value it gives is conservative. Only i <= v matter (for i > v the
numerator no longer grows), so the maximum is taken over i = 1..v. `epsilon_lower_bound` then
searches for the largest epsilon that this p-value still rejects at level beta, as the paper's
lower-bound procedure does.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from typing import Any

import numpy as np
from scipy import special, stats

from privmed.errors import PrivmedError

#: `epsilon_lower_bound` returns a multiple of this step (2^-20, about 9.5e-7): the largest one the
#: test rejects, so it is at most one step below the exact supremum.
EPSILON_RESOLUTION = 2.0**-20

#: Default options for `audit_from_scores`: the fraction of the m canaries guessed in total, split
#: evenly between "+1" guesses (highest scores) and "-1" guesses (lowest scores).
DEFAULT_GUESS_FRACTIONS = (0.02, 0.1, 0.2, 0.5, 1.0)

_EPSILON_MAX = 64.0  # p-values are 1 long before this: e^-64 is below double precision next to 1


class AuditInputError(PrivmedError, ValueError):
    """Bad input to the audit statistics (a `ValueError`, and a `PrivmedError` for the CLI)."""


# ------------------------------------------------------------------------------------- validation


def _count(name: str, value: Any) -> int:
    """`value` as a non-negative int (ints and numpy integers only; bools and floats refused)."""
    if isinstance(value, bool):
        raise AuditInputError(f"{name} must be a non-negative integer, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise AuditInputError(f"{name} must be a non-negative integer, got {value!r}") from None
    if n < 0:
        raise AuditInputError(f"{name} must be a non-negative integer, got {n}")
    return n


def _check_beta(beta: float) -> float:
    beta = float(beta)
    if not 0.0 < beta < 1.0:  # also refuses NaN
        raise AuditInputError(f"beta (1 - confidence) must be in (0, 1), got {beta}")
    return beta


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not 0.0 <= delta < 1.0:  # also refuses NaN
        raise AuditInputError(f"delta must be in [0, 1), got {delta}")
    return delta


def _check_guesses(r: Any, v: Any, m: Any | None) -> tuple[int, int, int | None]:
    r, v = _count("r (number of guesses)", r), _count("v (correct guesses)", v)
    if v > r:
        raise AuditInputError(f"v (correct guesses) = {v} exceeds r (number of guesses) = {r}")
    if m is None:
        return r, v, None
    m = _count("m (number of canaries)", m)
    if r > m:
        raise AuditInputError(f"r (number of guesses) = {r} exceeds m (number of canaries) = {m}")
    return r, v, m


# ----------------------------------------------------------------------------------------- bound


def p_value(r: int, v: int, epsilon: float, delta: float = 0.0, *, m: int | None = None) -> float:
    """Upper bound on P[>= v of r guesses correct] if training is (epsilon, delta)-DP.

    The right-hand side of Theorem 3.1 (see the module docstring), capped at 1. `m` is the number
    of canaries, abstentions included; it is required when delta > 0, since the delta term scales
    with 2 m delta (using r instead would understate it).
    """
    r, v, m = _check_guesses(r, v, m)
    delta = _check_delta(delta)
    epsilon = float(epsilon)
    if not epsilon >= 0.0:
        raise AuditInputError(f"epsilon must be >= 0, got {epsilon}")
    if delta > 0.0 and m is None:
        raise AuditInputError("m (number of canaries) is required when delta > 0")
    if v == 0:
        return 1.0
    # Work with the probability of a *wrong* guess, 1 / (1 + e^eps): it stays accurate for large
    # epsilon, where e^eps / (1 + e^eps) rounds to 1. X correct of r  <=>  r - X wrong.
    p_wrong = float(special.expit(-epsilon))
    tail = float(stats.binom.cdf(r - v, r, p_wrong))  # f(v) = P[X >= v]
    if delta == 0.0:
        return min(tail, 1.0)
    # window[i - 1] = P[v - i <= X <= v - 1] = f(v - i) - f(v), for i = 1..v
    correct = np.arange(v - 1, -1, -1)
    window = np.cumsum(stats.binom.pmf(r - correct, r, p_wrong))
    alpha = float(np.max(window / np.arange(1, v + 1)))
    return min(tail + 2.0 * m * delta * alpha, 1.0)


def epsilon_lower_bound(
    r: int, v: int, delta: float, beta: float = 0.05, *, m: int | None = None
) -> float:
    """Largest epsilon that v correct guesses out of r refute at confidence 1 - beta.

    That is, the largest epsilon (a multiple of `EPSILON_RESOLUTION`) at which `p_value` is
    <= beta. If the run is (epsilon, delta)-DP, the value returned exceeds epsilon with probability
    at most beta over the canaries' inclusion: a lower bound on epsilon at confidence 1 - beta.
    Returns 0.0 when even epsilon = 0 cannot be rejected (e.g. v at or near chance, r / 2).

    `m` (number of canaries, abstentions included) is required when delta > 0.

    Search: bisection over multiples of `EPSILON_RESOLUTION`, keeping the invariant that the test
    rejects at the lower end, so the value returned always has p-value <= beta (sound in every
    case). When 2 m delta <= 1 (always when delta = 0) the p-value is non-decreasing in epsilon and
    non-increasing in v (each term inside the theorem's max has derivative >= f'(v) (1 - 2 m delta
    / i) >= 0), so the result is the exact supremum rounded down to the step, non-decreasing in v
    and in beta. When 2 m delta > 1 it is still a valid lower bound but may not be the largest.
    """
    r, v, m = _check_guesses(r, v, m)
    delta, beta = _check_delta(delta), _check_beta(beta)
    if delta > 0.0 and m is None:
        raise AuditInputError("m (number of canaries) is required when delta > 0")

    def rejects(steps: int) -> bool:
        return p_value(r, v, steps * EPSILON_RESOLUTION, delta, m=m) <= beta

    if not rejects(0):
        return 0.0
    lo, hi = 0, round(1.0 / EPSILON_RESOLUTION)  # in steps; invariant: rejects(lo)
    while rejects(hi):
        lo, hi = hi, 2 * hi
        if hi * EPSILON_RESOLUTION > _EPSILON_MAX:  # unreachable: p-value is 1 there
            raise RuntimeError(f"no upper bracket below epsilon = {_EPSILON_MAX} (r={r}, v={v})")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if rejects(mid):
            lo = mid
        else:
            hi = mid
    return lo * EPSILON_RESOLUTION


# ----------------------------------------------------------------------------------------- audit


def _default_k_options(m: int) -> list[tuple[int, int]]:
    ks = (min(max(1, round(f * m / 2)), m // 2) for f in DEFAULT_GUESS_FRACTIONS)
    return [(k, k) for k in dict.fromkeys(ks) if k >= 1]


def _k_options(
    k_options: Iterable[int | tuple[int, int]] | None, m: int
) -> list[tuple[int, int]]:
    """Options as unique (k_plus, k_minus) pairs; an int k means (k, k)."""
    if k_options is None:
        options = _default_k_options(m)
        if not options:
            raise AuditInputError(f"need at least 2 canaries for the default guesses, got m={m}")
        return options
    options: list[tuple[int, int]] = []
    for option in k_options:
        if isinstance(option, tuple | list) and len(option) == 2:
            kp, km = _count("k_plus", option[0]), _count("k_minus", option[1])
        else:
            kp = km = _count("k (guesses per side)", option)
        if kp + km < 1 or kp + km > m:
            raise AuditInputError(
                f"k_options: ({kp}, {km}) makes {kp + km} guesses; need 1 to m={m}"
            )
        options.append((kp, km))
    if not options:
        raise AuditInputError("k_options is empty")
    return list(dict.fromkeys(options))


def _ranking(scores: np.ndarray, seed: int | np.random.Generator) -> np.ndarray:
    """Canary indices from highest to lowest score, ties broken by a seeded random permutation.

    Tie-breaking must not depend on inclusion: breaking ties by position would leak it whenever
    the caller lists members first."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(scores.size)
    return perm[np.argsort(-scores[perm], kind="stable")]


def _check_canaries(scores: Any, included: Any) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=float)
    included = np.asarray(included)
    if scores.ndim != 1 or included.ndim != 1:
        raise AuditInputError(
            f"scores and included must be 1-D (one entry per canary), got shapes "
            f"{scores.shape} and {included.shape}"
        )
    if scores.shape != included.shape:
        raise AuditInputError(
            f"scores and included must have the same shape, got {scores.shape} and "
            f"{included.shape}"
        )
    if not np.all(np.isfinite(scores)):
        raise AuditInputError("scores must be finite (found NaN or inf)")
    if included.dtype != bool:
        if included.size and not np.isin(included, (0, 1)).all():
            raise AuditInputError(
                "included must be boolean (or 0/1): True where a canary was trained on"
            )
        included = included.astype(bool)
    return scores, included


def audit_from_scores(
    scores: Any,
    included: Any,
    delta: float,
    beta: float = 0.05,
    k_options: Iterable[int | tuple[int, int]] | None = None,
    *,
    seed: int | np.random.Generator = 0,
) -> dict[str, Any]:
    """Lower bound on epsilon from canary scores (higher = more likely included) of one run.

    For each option (k_plus, k_minus) the auditor guesses "included" for the k_plus highest scores
    and "excluded" for the k_minus lowest, abstaining on the rest; v is the number of correct
    guesses out of r = k_plus + k_minus. The paper optimises the number of guesses; doing that on
    the same data inflates the bound, so each of the n options tried is tested at beta / n (a union
    bound) and the largest of their bounds is reported: it holds with confidence >= 1 - beta.

    Assumptions (see the module docstring): `included` is the true inclusion of m canaries, each
    drawn independently with probability 1/2; `scores` were computed from the trained model
    without looking at `included`; `k_options` and `seed` (which breaks score ties) were fixed
    without looking at it either.

    `k_options`: ints k (meaning k_plus = k_minus = k) or (k_plus, k_minus) pairs; default: k per
    side = m * f / 2 for f in `DEFAULT_GUESS_FRACTIONS`. Duplicates are tried once.

    Returns a dict: epsilon_lower, r, v, k_plus, k_minus (of the option giving the largest bound),
    m, k_options (the options tried), beta, beta_per_option, delta, selection (how the option was
    chosen) and per_option (r, v and bound of each option).
    """
    scores, included = _check_canaries(scores, included)
    delta, beta = _check_delta(delta), _check_beta(beta)
    m = int(scores.size)
    options = _k_options(k_options, m)
    beta_each = beta / len(options)
    order = _ranking(scores, seed)

    per_option = []
    for k_plus, k_minus in options:
        v = int(included[order[:k_plus]].sum()) + int((~included[order[m - k_minus :]]).sum())
        r = k_plus + k_minus
        eps = epsilon_lower_bound(r, v, delta, beta_each, m=m)
        per_option.append(
            {"k_plus": k_plus, "k_minus": k_minus, "r": r, "v": v, "epsilon_lower": eps}
        )
    best = max(per_option, key=lambda o: o["epsilon_lower"])  # first of equals
    return {
        **best,
        "m": m,
        "k_options": options,
        "beta": beta,
        "beta_per_option": beta_each,
        "delta": delta,
        "selection": (
            f"largest bound over {len(options)} option(s) of (k_plus, k_minus), each tested at "
            f"beta / {len(options)} (union bound), so the reported bound holds with confidence "
            f">= 1 - beta"
        ),
        "per_option": per_option,
    }


# ------------------------------------------------------------------------------------ simulation


def simulate_dp_canaries(
    m: int, epsilon: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Randomized-response canaries, for testing: a mechanism exactly epsilon-DP per canary.

    Each of m canaries is included with probability 1/2; its score is 1.0 (looks included) with
    probability e^eps / (1 + e^eps) when included and 1 / (1 + e^eps) when not, else 0.0. Returns
    (scores, included).
    """
    m = _count("m (number of canaries)", m)
    epsilon = float(epsilon)
    if not 0.0 <= epsilon < math.inf:
        raise AuditInputError(f"epsilon must be finite and >= 0, got {epsilon}")
    included = rng.random(m) < 0.5
    truthful = rng.random(m) < special.expit(epsilon)
    scores = np.where(truthful, included, ~included).astype(float)
    return scores, included

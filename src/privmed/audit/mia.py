"""Membership-inference attacks: the statistics only (numpy in, numpy out; nothing is trained here).

Every attack is **black box**: the attacker sees the final model's outputs (logits, or the class
probabilities they define) on inputs of its choice, and the candidate's true label. The shadow-model
attacks (LiRA, RMIA) also assume the attacker knows the training recipe and holds data of the same
distribution, so that it can train shadow (reference) models and query them the same way. The caller
computes every model's logits; this module turns them into membership scores (higher = more likely a
member), and `mia_metrics` (re-exported here) evaluates scores against the ground truth.

Conventions:

- `logits`: (..., N, K) float, K >= 1. K == 1 is a binary model whose single logit is the log-odds of
  class 1 (so class 0 has log-odds minus that logit). `labels`: (N,) int, in [0, K) (in {0, 1} when
  K == 1). Leading dimensions (e.g. S shadow models) broadcast against `labels`.
- phi, the "logit-scaled confidence", is in nats of log-odds: phi = log(p_y) - log(1 - p_y).
- The ground truth `members` is used only by `membership_metrics`, never to compute a score.

References:

- Yeom, Giacomelli, Fredrikson, Jha (2018), "Privacy Risk in Machine Learning: Analyzing the
  Connection to Overfitting", IEEE CSF. (loss threshold attack)
- Carlini, Chien, Nasr, Song, Terzis, Tramèr (2022), "Membership Inference Attacks From First
  Principles", IEEE S&P. (LiRA; logit scaling; TPR at low FPR as the metric that matters)
- Zarifzadeh, Liu, Shokri (2024), "Low-Cost High-Power Membership Inference Attacks", ICML. (RMIA)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import expit, logsumexp
from scipy.stats import norm

from privmed.audit.mia_arrays import BoolArray, FloatArray, bool_array, finite_float, probabilities
from privmed.audit.mia_metrics import (
    CONFIDENCE,
    DEFAULT_FPRS,
    ROC_MAX_POINTS,
    membership_metrics,
    roc_points,
    tpr_at_fpr,
)

__all__ = [
    "CONFIDENCE", "DEFAULT_FPRS", "MIN_STD", "ROC_MAX_POINTS", "loss_attack", "lira", "losses",
    "membership_metrics", "rmia", "rmia_marginal", "roc_points", "tpr_at_fpr", "true_class_confidence",
    "true_class_prob",
]

MIN_STD = 1e-3  # LiRA's floor on a fitted standard deviation, in units of phi (log-odds)
_TINY = np.finfo(np.float64).tiny  # RMIA's floor on a probability before its logarithm


# --------------------------------------------------------------------------------------------------
# Signals of one model on labelled examples


def true_class_confidence(logits: ArrayLike, labels: ArrayLike) -> FloatArray:
    """phi = log(p_y) - log(1 - p_y), the logit-scaled probability of the true class y (Carlini et
    al. 2022: the "logit scaling" phi(p) = log(p / (1 - p)) that makes the shadow models' outputs on
    one example close to Gaussian). Shape: `logits` without its last axis; unit: log-odds (nats).

    Computed without forming p, so it stays finite and accurate for saturated logits (|z| ~ 100):
    phi = z_y - logsumexp(z_j, j != y) for K > 1, and +z / -z for y = 1 / y = 0 when K == 1.
    """
    z, y = _logits_and_labels(logits, labels)
    if z.shape[-1] == 1:
        return np.where(y == 1, z[..., 0], -z[..., 0])
    idx = y[..., None]
    z_y = np.take_along_axis(z, idx, axis=-1)[..., 0]
    others = z.copy()
    np.put_along_axis(others, idx, -np.inf, axis=-1)
    return z_y - logsumexp(others, axis=-1)


def true_class_prob(logits: ArrayLike, labels: ArrayLike) -> FloatArray:
    """p_y, the model's probability of the true class, in [0, 1] (= sigmoid(phi))."""
    return expit(true_class_confidence(logits, labels))


def losses(logits: ArrayLike, labels: ArrayLike) -> FloatArray:
    """Per-example cross-entropy -log p_y in nats (>= 0), computed stably as log(1 + exp(-phi))."""
    return np.logaddexp(0.0, -true_class_confidence(logits, labels))


# --------------------------------------------------------------------------------------------------
# Attacks


def loss_attack(logits: ArrayLike, labels: ArrayLike) -> FloatArray:
    """Loss-threshold attack (Yeom et al. 2018): score = -loss, so that a lower loss (the model fits
    the example better) is more likely a member. (N,) scores, in nats.

    Sees: the target model's output on the example and its true label; nothing else (no shadows).
    One global threshold for every example, so it confuses "hard" non-members with members less
    well than the per-example calibrated attacks below.
    """
    return -losses(logits, labels)


def lira(
    target_phi: ArrayLike,
    shadow_phi: ArrayLike,
    shadow_in: ArrayLike,
    online: bool = True,
    fixed_variance: bool = False,
    min_std: float = MIN_STD,
) -> FloatArray:
    """Likelihood-ratio attack, LiRA (Carlini et al. 2022). (N,) scores, higher = more likely a member.

    Sees: the target's phi on each example (black box: the true class's output), plus S shadow models
    trained with the target's recipe on data of the same distribution, and which of them trained on
    each example (`shadow_in`). Online LiRA needs shadows that trained on the example (IN) and
    shadows that did not (OUT); offline LiRA needs only OUT shadows.

    Arguments: `target_phi` (N,), `shadow_phi` (S, N), both `true_class_confidence` values
    (log-odds); `shadow_in` (S, N) bool.

    Per example, Gaussians are fitted to the shadows' phi where it was IN and where it was OUT
    (mean; variance with ddof=1). Then

    - online:  score = log N(phi; mu_in, s_in^2) - log N(phi; mu_out, s_out^2), the log likelihood
      ratio (nats);
    - offline: score = log Phi((phi - mu_out) / s_out), the log of the one-sided probability that an
      OUT model's phi lies below the target's (a one-sided test against the OUT distribution).

    `fixed_variance=True` uses one variance per side shared by all examples, as Carlini et al.
    recommend with few shadows (< 64): the pooled within-example variance, sum over examples of the
    squared deviations from that example's own mean, over (count - examples). (Their code instead
    takes the variance of all values together, which also counts how the per-example means differ.)

    Fallbacks (documented choices; the paper assumes every example has enough IN and OUT shadows):

    - an example with fewer than 2 shadows on a side has no variance of its own on that side: it gets
      the pooled variance of that side (of the other side if that side has none anywhere);
    - an example with no shadow on a side it needs gets, as that side's mean, its other side's mean
      shifted by the average IN - OUT difference over the examples that have both (the typical
      memorisation effect), and the pooled variance;
    - every standard deviation is floored at `min_std` (log-odds), so a side whose shadows agree
      exactly (e.g. saturated outputs) gives a large but finite score.

    ValueError when a fallback has nothing to fall back on (e.g. online with no example that has
    both IN and OUT shadows, or no side with two values on one example).
    """
    phi = finite_float(target_phi, "target_phi", ndim=1)
    values = finite_float(shadow_phi, "shadow_phi", ndim=2)
    inside = bool_array(shadow_in, "shadow_in")
    if values.shape[1] != len(phi) or inside.shape != values.shape:
        raise ValueError(
            f"shapes: target_phi {phi.shape}, shadow_phi {values.shape} and shadow_in {inside.shape}; "
            "need (N,), (S, N) and (S, N)"
        )
    if min_std <= 0:
        raise ValueError(f"min_std: {min_std}; must be > 0")
    fit = _fit_lira(values, inside, online=online, fixed_variance=fixed_variance, min_std=min_std)
    if online:
        return norm.logpdf(phi, fit.mu_in, fit.std_in) - norm.logpdf(phi, fit.mu_out, fit.std_out)
    return norm.logcdf((phi - fit.mu_out) / fit.std_out)


def rmia_marginal(ref_probs: ArrayLike, ref_in: ArrayLike, a: float = 0.3) -> FloatArray:
    """RMIA's Pr(x): the probability of x's true label averaged over models trained on random data of
    the population (Zarifzadeh et al. 2024). (N,) probabilities.

    Arguments: `ref_probs` (R, N), reference models' probabilities of the true label; `ref_in` (R, N)
    bool, whether reference model r trained on example n.

    - x with IN and OUT reference models (online): the mean over all reference models.
    - x with only OUT reference models (offline): the paper's linear approximation
      Pr(x) = ((1 + a) Pr_out(x) + (1 - a)) / 2, Pr_out the mean over the OUT models. It says that the
      IN probability is Pr_in = a Pr_out + (1 - a) and Pr(x) the average of Pr_in and Pr_out.
    - x with only IN reference models (e.g. one reference model trained on half the data): the same
      relation inverted, Pr_out = clip((Pr_in - (1 - a)) / a, 0, 1) and Pr(x) = (Pr_in + Pr_out) / 2,
      as the authors' code does with one reference model; ValueError when a == 0 (no inverse).
    """
    probs = probabilities(ref_probs, "ref_probs", ndim=2)
    inside = bool_array(ref_in, "ref_in")
    if inside.shape != probs.shape:
        raise ValueError(f"shapes: ref_probs {probs.shape} and ref_in {inside.shape}; need both (R, N)")
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"a: {a}; RMIA's offline coefficient must be in [0, 1]")
    n_in = inside.sum(axis=0)
    n_out = len(probs) - n_in
    mean_all = probs.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_in = np.where(inside, probs, 0.0).sum(axis=0) / n_in
        mean_out = np.where(inside, 0.0, probs).sum(axis=0) / n_out
    offline = ((1.0 + a) * mean_out + (1.0 - a)) / 2.0
    only_in = n_out == 0
    if only_in.any():
        if a == 0.0:
            raise ValueError("a = 0 gives no Pr_out for examples that only IN reference models trained on")
        est_out = np.clip((mean_in - (1.0 - a)) / a, 0.0, 1.0)
        inverted = (mean_in + est_out) / 2.0
    else:
        inverted = mean_all
    return np.where(n_in == 0, offline, np.where(only_in, inverted, mean_all))


def rmia(
    target_prob: ArrayLike,
    ref_probs: ArrayLike,
    ref_in: ArrayLike,
    population_idx: ArrayLike,
    a: float = 0.3,
    gamma: float = 1.0,
) -> FloatArray:
    """Relative membership inference attack, RMIA (Zarifzadeh et al. 2024). (N,) scores in [0, 1],
    higher = more likely a member.

    Sees: the target's probability of the true label, Pr(x|theta) (black box), reference models
    trained with the target's recipe (and which examples each trained on), and a population sample Z
    of examples the attacker knows are not members of the target's training set (`population_idx`,
    indices into the N examples; they may be in reference models).

    score(x) = fraction of z in Z, z != x, with LR(x, z) = (Pr(x|theta) / Pr(x)) / (Pr(z|theta) /
    Pr(z)) > gamma, Pr(.) from `rmia_marginal` (online or offline per example, with coefficient `a`).
    A z equal to x is left out (its ratio with itself is 1), so population examples are scored against
    the rest. Ties (LR exactly gamma, measure zero for continuous outputs) do not count, as in the
    authors' reference code. Computed with logarithms and one sort, O((N + |Z|) log |Z|).

    Arguments: `target_prob` (N,), `ref_probs` (R, N) probabilities; `ref_in` (R, N) bool;
    `population_idx` distinct ints in [0, N); `gamma` > 0.
    """
    p = probabilities(target_prob, "target_prob", ndim=1)
    marginal = rmia_marginal(ref_probs, ref_in, a)
    if marginal.shape != p.shape:
        raise ValueError(f"shapes: target_prob {p.shape}, ref_probs (R, {len(marginal)}); need the same N")
    if gamma <= 0:
        raise ValueError(f"gamma: {gamma}; must be > 0")
    pop = _population(population_idx, len(p))
    log_ratio = np.log(np.maximum(p, _TINY)) - np.log(np.maximum(marginal, _TINY))
    threshold = log_ratio - np.log(gamma)  # LR(x, z) > gamma  <=>  log_ratio(z) < threshold(x)
    counts = np.searchsorted(np.sort(log_ratio[pop]), threshold, side="left")
    in_pop = np.zeros(len(p), dtype=bool)
    in_pop[pop] = True
    counts = counts - (in_pop & (log_ratio < threshold))  # x's comparison with itself
    others = len(pop) - in_pop.astype(np.int64)
    if np.any(others == 0):
        raise ValueError("population_idx: a population of one cannot score its own example")
    return counts / others


# --------------------------------------------------------------------------------------------------
# Helpers


@dataclass(frozen=True)
class _LiraFit:
    """Per-example Gaussians of the shadows' phi (log-odds): means and standard deviations (N,)."""

    mu_in: FloatArray
    std_in: FloatArray
    mu_out: FloatArray
    std_out: FloatArray


@dataclass(frozen=True)
class _Side:
    """One side's (IN or OUT) per-example sample statistics; NaN where not estimable."""

    count: NDArray[np.int64]
    mean: FloatArray  # NaN where count == 0
    var: FloatArray  # ddof=1; NaN where count < 2
    pooled_var: float  # within-example pooled variance; NaN when no example has count >= 2


def _side(values: FloatArray, mask: BoolArray) -> _Side:
    count = mask.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(mask, values, 0.0).sum(axis=0) / count
        sq = np.where(mask, (values - np.where(count > 0, mean, 0.0)) ** 2, 0.0).sum(axis=0)
        var = np.where(count >= 2, sq / (count - 1), np.nan)
    dof = int(np.sum(np.maximum(count - 1, 0)))
    pooled = float(sq[count >= 2].sum() / dof) if dof > 0 else float("nan")
    return _Side(count=count, mean=np.where(count > 0, mean, np.nan), var=var, pooled_var=pooled)


def _fit_lira(
    values: FloatArray, inside: BoolArray, *, online: bool, fixed_variance: bool, min_std: float
) -> _LiraFit:
    side_in, side_out = _side(values, inside), _side(values, ~inside)
    both = (side_in.count > 0) & (side_out.count > 0)
    shift = float(np.mean(side_in.mean[both] - side_out.mean[both])) if both.any() else float("nan")

    def complete(mean: FloatArray, other_mean: FloatArray, sign: float, name: str) -> FloatArray:
        missing = np.isnan(mean)
        if not missing.any():
            return mean
        if np.isnan(shift):
            raise ValueError(f"LiRA: some examples have no {name} shadow, and no example has both IN and "
                             "OUT shadows to estimate the IN - OUT shift from")
        return np.where(missing, other_mean + sign * shift, mean)

    def pooled(first: _Side, second: _Side) -> float:
        if not np.isnan(first.pooled_var):
            return first.pooled_var
        if not np.isnan(second.pooled_var):
            return second.pooled_var
        raise ValueError("LiRA: no example has two shadows on one side; no variance can be estimated")

    def std(side: _Side, other: _Side) -> FloatArray:
        shared = pooled(side, other)
        var = np.full(side.mean.shape, shared) if fixed_variance else np.where(np.isnan(side.var), shared, side.var)
        return np.maximum(np.sqrt(var), min_std)

    mu_out = complete(side_out.mean, side_in.mean, -1.0, "OUT")
    std_out = std(side_out, side_in)
    if not online:
        return _LiraFit(mu_in=np.full_like(mu_out, np.nan), std_in=np.full_like(mu_out, np.nan),
                        mu_out=mu_out, std_out=std_out)
    mu_in = complete(side_in.mean, side_out.mean, 1.0, "IN")
    return _LiraFit(mu_in=mu_in, std_in=std(side_in, side_out), mu_out=mu_out, std_out=std_out)


def _logits_and_labels(logits: ArrayLike, labels: ArrayLike) -> tuple[FloatArray, NDArray[np.int64]]:
    z = finite_float(logits, "logits", ndim=None)
    if z.ndim < 2 or z.shape[-1] < 1:
        raise ValueError(f"logits: shape {z.shape}; need (..., N, K) with K >= 1")
    y = np.asarray(labels)
    if y.dtype.kind not in "iub":
        raise ValueError(f"labels: dtype {y.dtype}; need integers")
    if y.ndim != 1 or len(y) != z.shape[-2]:
        raise ValueError(f"labels: shape {y.shape}; need ({z.shape[-2]},) to match logits {z.shape}")
    n_classes = max(z.shape[-1], 2)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels: values in [{y.min()}, {y.max()}]; need [0, {n_classes - 1}] for K = {z.shape[-1]}")
    return z, np.broadcast_to(y.astype(np.int64), z.shape[:-1])


def _population(idx: ArrayLike, n: int) -> NDArray[np.int64]:
    pop = np.asarray(idx)
    if pop.ndim != 1 or pop.size == 0 or pop.dtype.kind not in "iu":
        raise ValueError(
            f"population_idx: shape {pop.shape}, dtype {pop.dtype}; need a non-empty 1-d array of ints"
        )
    if pop.min() < 0 or pop.max() >= n or len(np.unique(pop)) != len(pop):
        raise ValueError(f"population_idx: need distinct indices in [0, {n})")
    return pop.astype(np.int64)

"""Robust aggregation (`federation.aggregator`): rules that combine the sites' updates so that a
few malicious sites cannot steer the shared model, and the strategy wrapper that applies them.

A rule maps the sites' model changes Δ_i = y_i - x (float64, one array per state entry) and their
sample counts to one change. Flower's implementations serve where Flower has the rule (coordinate
median, trimmed mean, Krum / multi-Krum, Bulyan); they are translation invariant, so applying them
to the changes is applying them to the models. Integer state entries (counters) are not attacked
in any meaningful way and take the weighted mean.

    mean          the n_samples-weighted mean (FedAvg's; no defence)
    median        coordinate-wise median (Yin et al. 2018)
    trimmed-mean  coordinate-wise mean after cutting the `byzantine` largest and smallest values
    krum          the one update closest to its n - f - 2 nearest neighbours (Blanchard et al. 2017)
    multi-krum    the weighted mean of the n - f updates with the best Krum scores
    bulyan        Krum selection, then a trimmed mean around the median (El Mhamdi et al. 2018)
    norm-clip     every update clipped to L2 norm `update_clip` (default: the round's median
                  norm), then the weighted mean (Sun et al. 2019)

f is `federation.byzantine`, the number of malicious sites the rule must withstand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from privmed.config import AGGREGATORS, aggregator_min_sites
from privmed.federation.strategies import GLOBAL, SiteUpdate, State, Weights, contribution, is_float, weighted_mean

if TYPE_CHECKING:
    from privmed.config import FederationConfig
    from privmed.federation.strategies import Strategy

RULES = AGGREGATORS


def _norm(delta: Weights) -> float:
    return float(np.sqrt(sum(float(np.sum(d * d)) for d in delta)))


def combine(
    rule: str, deltas: list[Weights], counts: list[float], *, byzantine: int = 1, clip: float | None = None,
) -> Weights:
    """One change from the sites' `deltas` (each a list of float64 arrays) by `rule`; `counts`: the
    sites' sample counts (the weights of the rules that average). ValueError when the rule cannot
    withstand `byzantine` malicious sites among this many."""
    if rule not in RULES:
        raise ValueError(f"unknown aggregation rule {rule!r} (known: {', '.join(RULES)})")
    n = len(deltas)
    if n == 0 or len(counts) != n:
        raise ValueError(f"need one count per update, got {n} updates and {len(counts)} counts")
    if n < aggregator_min_sites(rule, byzantine):
        raise ValueError(
            f"aggregation rule '{rule}' withstands {byzantine} malicious sites only with "
            f"{aggregator_min_sites(rule, byzantine)} updates or more; this round has {n}"
        )
    if rule == "mean":
        return weighted_mean(deltas, counts)
    if rule == "norm-clip":
        norms = [_norm(d) for d in deltas]
        bound = float(np.median(norms)) if clip is None else float(clip)
        scaled = [[min(1.0, bound / nm) * a for a in d] if nm > 0 else d for d, nm in zip(deltas, norms)]
        return weighted_mean(scaled, counts)
    from flwr.server.strategy import aggregate as flwr_agg  # ~1 s to import: only when a rule needs it

    results = [(d, int(c)) for d, c in zip(deltas, counts, strict=True)]
    if rule == "median":
        return flwr_agg.aggregate_median(results)
    if rule == "trimmed-mean":
        # Flower cuts int(p * n) values at each end: ask for f of n, nudged up past float rounding
        return flwr_agg.aggregate_trimmed_avg(results, proportiontocut=np.nextafter(byzantine / n, 1.0))
    if rule == "krum":
        return flwr_agg.aggregate_krum(results, num_malicious=byzantine, to_keep=0)
    if rule == "multi-krum":
        return flwr_agg.aggregate_krum(results, num_malicious=byzantine, to_keep=n - byzantine)
    # bulyan: Flower's removes the models it selects from the list it is given
    return flwr_agg.aggregate_bulyan(list(results), num_malicious=byzantine,
                                     aggregation_rule=flwr_agg.aggregate_krum, to_keep=0)


def with_aggregator(inner: Strategy, fed: FederationConfig) -> Strategy:
    """`inner` (strategies.build_strategy's) aggregating by `fed.aggregator`: itself for 'mean',
    else wrapped in RobustAggregation."""
    if fed.aggregator == "mean":
        return inner
    return RobustAggregation(inner, fed.aggregator, byzantine=fed.byzantine, clip=fed.update_clip)


class RobustAggregation:
    """A strategy whose one-model aggregation goes through a robust rule: the inner strategy
    (FedAvg, FedProx or an adaptive server optimizer) gets, in place of the sites' updates, one
    update x + rule(Δ_1 .. Δ_n) and steps from it as from their mean (its server learning rate and
    moments unchanged). Everything else (stages, configure, state) is the inner strategy's. It needs
    every site's update, so it has no secure-aggregation path."""

    def __init__(self, inner: Strategy, rule: str, byzantine: int = 1, clip: float | None = None):
        if rule not in RULES:
            raise ValueError(f"unknown aggregation rule {rule!r} (known: {', '.join(RULES)})")
        self.inner, self.rule, self.byzantine, self.clip = inner, rule, int(byzantine), clip

    def __getattr__(self, name: str) -> Any:  # name, pools_data, init_state, stages, configure
        if name.startswith("__") or name == "inner":  # not yet set (copy, pickle): no recursion
            raise AttributeError(name)
        if name in ("aggregate_secure", "secure_weighting", "secure_clip"):
            raise AttributeError(f"aggregation rule '{self.rule}' needs each site's update; secure aggregation has only their sum")
        return getattr(self.inner, name)

    def aggregate(self, state: State, updates: list[SiteUpdate], rnd: int) -> State:
        x = state[GLOBAL]
        deltas = [contribution(x, u.weights) for u in updates]
        counts = [u.n_samples for u in updates]
        robust = combine(self.rule, deltas, counts, byzantine=self.byzantine, clip=self.clip)
        mean = weighted_mean(deltas, counts)
        # integer entries (counters) take the mean, as every strategy gives them
        change = [r if is_float(a) else m for r, m, a in zip(robust, mean, x, strict=True)]
        combined = [np.asarray(a.astype(np.float64) + c if is_float(a) else np.rint(a.astype(np.float64) + c))
                    .astype(a.dtype, copy=False) for a, c in zip(x, change)]
        first = updates[0]
        merged = SiteUpdate(site=f"{self.rule}({len(updates)} sites)", weights=combined,
                            n_samples=sum(counts), model_key=first.model_key)
        return self.inner.aggregate(state, [merged], rnd)

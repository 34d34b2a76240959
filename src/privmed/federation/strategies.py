"""Federated strategies: pure objects that plan a round and combine what sites return.

A strategy never touches data, models or files. Its state is a mapping from a model key to weights
(a list of numpy arrays in the order of the model's state_dict): `{"global": w}` for strategies that
train one shared model, `{site: w}` for `local`, where every site keeps its own.

A round is a list of *stages*. Sites within a stage train in parallel, each from the weights that
`configure` hands it; `aggregate` then folds their updates into the state. FedAvg has one stage with
every site; cyclic training has one stage per site, in the order the model travels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from privmed.errors import ConfigError, unknown_name

Weights = list[np.ndarray]
State = dict[str, Weights]
GLOBAL = "global"
POOLED_SITE = "pooled"


@dataclass(frozen=True)
class TrainTask:
    """Instruction to a site: train from these weights."""

    site: str
    weights: Weights
    model_key: str = GLOBAL  # which entry of the state the result belongs to


@dataclass(frozen=True)
class SiteUpdate:
    """What a site hands back after local training."""

    site: str
    weights: Weights
    n_samples: int  # training items the site holds (FedAvg's weight)
    model_key: str = GLOBAL
    metrics: dict = field(default_factory=dict)


def weighted_mean(weights: list[Weights], counts: list[float]) -> Weights:
    """Layer-wise mean of several models' weights, weighted by `counts` (computed in float64)."""
    if not weights or len(weights) != len(counts):
        raise ValueError(f"need one count per model, got {len(weights)} models, {len(counts)} counts")
    c = np.asarray(counts, dtype=np.float64)
    if np.any(c < 0) or c.sum() <= 0:
        raise ValueError(f"counts must be non-negative with a positive sum, got {counts}")
    c = c / c.sum()
    out = []
    for layers in zip(*weights, strict=True):
        acc = sum(ci * layer.astype(np.float64) for ci, layer in zip(c, layers))
        out.append(np.asarray(acc).astype(layers[0].dtype, copy=False))
    return out


class Strategy(Protocol):
    name: str
    pools_data: bool  # True: the runner trains one site holding every site's data

    def init_state(self, weights: Weights, sites: list[str]) -> State: ...

    def stages(self, rnd: int, sites: list[str]) -> list[list[str]]: ...

    def configure(self, state: State, stage: list[str]) -> list[TrainTask]: ...

    def aggregate(self, state: State, updates: list[SiteUpdate], rnd: int) -> State: ...


class FedAvg:
    """McMahan et al. 2017: every site trains from the global model; the new global model is the
    mean of their models weighted by their number of training samples."""

    name = "fedavg"
    pools_data = False

    def init_state(self, weights: Weights, sites: list[str]) -> State:
        return {GLOBAL: weights}

    def stages(self, rnd: int, sites: list[str]) -> list[list[str]]:
        return [list(sites)]

    def configure(self, state: State, stage: list[str]) -> list[TrainTask]:
        return [TrainTask(s, state[GLOBAL]) for s in stage]

    def aggregate(self, state: State, updates: list[SiteUpdate], rnd: int) -> State:
        mean = weighted_mean([u.weights for u in updates], [u.n_samples for u in updates])
        return {**state, GLOBAL: mean}


class Cyclic:
    """Clinic-to-clinic training (Chang et al. 2018): the model travels from site to site, each
    training on the model the previous site handed on. `order`: 'fixed' visits sites in the
    configured order every round; 'shuffled' draws a new order each round from (seed, round)."""

    name = "cyclic"
    pools_data = False

    def __init__(self, order: str = "fixed", seed: int = 0):
        if order not in ("fixed", "shuffled"):
            raise ValueError(f"order must be 'fixed' or 'shuffled', got {order!r}")
        self.order, self.seed = order, seed

    def init_state(self, weights: Weights, sites: list[str]) -> State:
        return {GLOBAL: weights}

    def stages(self, rnd: int, sites: list[str]) -> list[list[str]]:
        visit = list(sites)
        if self.order == "shuffled":
            rng = np.random.default_rng([self.seed, rnd, 0xC7C1])
            visit = [visit[i] for i in rng.permutation(len(visit))]
        return [[s] for s in visit]

    def configure(self, state: State, stage: list[str]) -> list[TrainTask]:
        return [TrainTask(s, state[GLOBAL]) for s in stage]

    def aggregate(self, state: State, updates: list[SiteUpdate], rnd: int) -> State:
        if len(updates) != 1:
            raise ValueError(f"cyclic training takes one site per stage, got {len(updates)}")
        return {**state, GLOBAL: updates[0].weights}


class Local:
    """No federation: every site trains its own model on its own data. The baseline that
    federated learning must beat."""

    name = "local"
    pools_data = False

    def init_state(self, weights: Weights, sites: list[str]) -> State:
        return {s: weights for s in sites}

    def stages(self, rnd: int, sites: list[str]) -> list[list[str]]:
        return [list(sites)]

    def configure(self, state: State, stage: list[str]) -> list[TrainTask]:
        return [TrainTask(s, state[s], model_key=s) for s in stage]

    def aggregate(self, state: State, updates: list[SiteUpdate], rnd: int) -> State:
        return {**state, **{u.model_key: u.weights for u in updates}}


class Pooled(FedAvg):
    """All data in one place (the centralised reference): one 'site' holds every site's data.
    Aggregating a single update is the identity, so FedAvg's logic serves unchanged."""

    name = "pooled"
    pools_data = True

    def stages(self, rnd: int, sites: list[str]) -> list[list[str]]:
        return [[POOLED_SITE]]


class DPFedAvg(FedAvg):
    """DP-FedAvg (McMahan et al. 2018), site-level differential privacy: each site's update (its
    model minus the global model) is clipped to L2 norm `clip` over all weights, the server adds
    Gaussian noise of std `noise_multiplier` x `clip` to their sum and divides by `n_sites`, the
    configured number of sites (a public constant, not the count received). Adding or removing a site
    changes the sum by at most `clip`, so each round is a Gaussian mechanism on each site's whole
    data. The mean is unweighted: weighting by sample counts would let a large site move it by more
    than `clip`. The noise is drawn from (seed, round) only.
    The server sees each update before noising: it must be trusted, or combined with secure
    aggregation."""

    name = "fedavg"

    def __init__(self, clip: float, noise_multiplier: float, n_sites: int, seed: int = 0):
        if not clip > 0 or not noise_multiplier >= 0 or not n_sites >= 1:
            raise ValueError(
                f"need clip > 0, noise_multiplier >= 0 and n_sites >= 1, got {clip!r}, "
                f"{noise_multiplier!r}, {n_sites!r}"
            )
        self.clip, self.noise_multiplier, self.seed = float(clip), float(noise_multiplier), seed
        self.n_sites = int(n_sites)

    def aggregate(self, state: State, updates: list[SiteUpdate], rnd: int) -> State:
        if not updates:
            raise ValueError("DP-FedAvg needs at least one update")
        old = [layer.astype(np.float64) for layer in state[GLOBAL]]
        total = [np.zeros_like(layer) for layer in old]
        for u in updates:
            delta = [np.asarray(w, dtype=np.float64) - o for w, o in zip(u.weights, old, strict=True)]
            norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in delta)))
            scale = min(1.0, self.clip / norm) if norm > 0 else 1.0
            total = [t + scale * d for t, d in zip(total, delta)]
        rng = np.random.default_rng([self.seed, rnd, 0xD9F])
        std = self.noise_multiplier * self.clip
        new = [
            (o + (t + rng.normal(0.0, std, size=t.shape)) / self.n_sites).astype(layer.dtype, copy=False)
            for o, t, layer in zip(old, total, state[GLOBAL])
        ]
        return {**state, GLOBAL: new}


_REGISTRY = {"fedavg": FedAvg, "cyclic": Cyclic, "local": Local, "pooled": Pooled}


def build_strategy(name: str, *, cyclic_order: str = "fixed", seed: int = 0) -> Strategy:
    if name not in _REGISTRY:
        raise ConfigError(unknown_name("federation.strategy", "strategy", name, _REGISTRY))
    if name == "cyclic":
        return Cyclic(order=cyclic_order, seed=seed)
    return _REGISTRY[name]()

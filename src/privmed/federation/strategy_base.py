"""What a strategy exchanges with the sites and the runner (TrainTask, SiteUpdate, SecureSum), the
Strategy protocols, and the pure maths strategies share (weighted_mean, contribution).

Weights are a list of numpy arrays in the order of the model's state_dict; a State maps a key
(a model key, or "_..." bookkeeping) to weights: see privmed.federation.strategies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from privmed.privacy.accountants import Release

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
    # FedProx: the site adds prox_mu * (w - weights) to each parameter's gradient (0: none)
    prox_mu: float = 0.0
    # SCAFFOLD: c - c_i, one array per state entry; the site adds it to each parameter's gradient
    # (entries that are buffers are ignored). None: no correction.
    correction: Weights | None = None


@dataclass(frozen=True)
class SiteUpdate:
    """What a site hands back after local training."""

    site: str
    weights: Weights
    n_samples: int  # training items the site holds (FedAvg's weight)
    model_key: str = GLOBAL
    metrics: dict = field(default_factory=dict)
    # the DP release this update is (noise multiplier, sample rate, steps), which the coordinator's
    # ledger charges; None for a site training without DP-SGD or central DP
    release: Release | None = None


@dataclass(frozen=True)
class SecureSum:
    """What secure aggregation reveals of one stage: the weighted mean of the sites' contributions
    (see `contribution`), float64, and who contributed. `reports` are the sites' updates without
    their weights (`weights` is empty): their sample counts and metrics, which travel in the clear."""

    mean: Weights
    reports: list[SiteUpdate]

    @property
    def sites(self) -> list[str]:
        return [r.site for r in self.reports]


def contribution(sent: Weights, trained: Weights, clip: float | None = None) -> Weights:
    """A site's contribution to a secure sum: its model change `trained - sent` (float64), scaled
    to L2 norm at most `clip` over all entries when `clip` is given (DP-FedAvg's clipping, done at
    the site before its update is masked)."""
    delta = [np.asarray(y, dtype=np.float64) - np.asarray(x, dtype=np.float64) for x, y in zip(sent, trained, strict=True)]
    if clip is None:
        return delta
    norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in delta)))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return [scale * d for d in delta]


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


def mean64(updates: list[SiteUpdate]) -> Weights:
    """The n_samples-weighted mean of the updates' weights, in float64 (not cast back)."""
    if not updates:
        raise ValueError("need at least one update")
    return weighted_mean(
        [[np.asarray(a, dtype=np.float64) for a in u.weights] for u in updates],
        [u.n_samples for u in updates],
    )


def is_float(a: np.ndarray) -> bool:
    """Floating entries move by the strategies' rules; integer ones (e.g. BatchNorm's
    num_batches_tracked) just take the weighted mean."""
    return np.issubdtype(np.asarray(a).dtype, np.floating)


def zeros64(weights: Weights) -> Weights:
    return [np.zeros(np.shape(a), dtype=np.float64) for a in weights]


def check_server_lr(server_lr: float) -> float:
    if not (np.isfinite(server_lr) and server_lr > 0):
        raise ValueError(f"server_lr must be a positive number, got {server_lr!r}")
    return float(server_lr)


class Strategy(Protocol):
    name: str
    pools_data: bool  # True: the runner trains one site holding every site's data

    def init_state(self, weights: Weights, sites: list[str]) -> State: ...

    def stages(self, rnd: int, sites: list[str]) -> list[list[str]]: ...

    def configure(self, state: State, stage: list[str]) -> list[TrainTask]: ...

    def aggregate(self, state: State, updates: list[SiteUpdate], rnd: int) -> State: ...


class SecureStrategy(Strategy, Protocol):
    """A strategy that can work from a secure sum alone. Each site contributes
    `contribution(sent, trained, secure_clip)` with weight n_samples (`secure_weighting`
    'samples') or 1 ('uniform'); `aggregate_secure` gets their weighted mean."""

    secure_weighting: str
    secure_clip: float | None

    def aggregate_secure(self, state: State, total: SecureSum, rnd: int) -> State: ...

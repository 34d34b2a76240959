"""Federated strategies: pure objects that plan a round and combine what sites return.

A strategy never touches data, models or files. Its state is a mapping from a key to weights (a list
of numpy arrays in the order of the model's state_dict). A key is either a *model key*: `"global"`
for strategies that train one shared model, or a site name for those where every site keeps its own
model (`local`, `fedbn`); or, when it starts with "_", the strategy's own bookkeeping, which is never
a model to evaluate or select: SCAFFOLD's control variates (`"_c"`, `"_c/<site>"`), the adaptive
server optimizers' moments (`"_m"`, `"_v"`). Bookkeeping arrays are float64 and have the shapes of
the model's state entries.

A round is a list of *stages*. Sites within a stage train in parallel, each from the weights that
`configure` hands it; `aggregate` then folds their updates into the state. FedAvg has one stage with
every site; cyclic training has one stage per site, in the order the model travels.

Which strategies exist, and what each can do, is privmed.catalog.STRATEGIES: each entry names its
class, which builds itself from the config (`from_config`). The classes live here, SCAFFOLD in
`scaffold` and the adaptive server optimizers in `adaptive`, all importable from here; what they
exchange with the sites, and the maths they share, in `strategy_base`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from privmed import catalog
from privmed.errors import ConfigError, unknown_name
from privmed.federation.adaptive import FedAdagrad, FedAdam, FedOpt, FedYogi
from privmed.federation.scaffold import Scaffold
from privmed.federation.strategy_base import (
    GLOBAL,
    POOLED_SITE,
    SecureStrategy,
    SecureSum,
    SiteUpdate,
    State,
    Strategy,
    TrainTask,
    Weights,
    check_server_lr,
    contribution,
    is_float,
    mean64,
    weighted_mean,
)

if TYPE_CHECKING:
    from privmed.config import FederationConfig

__all__ = [
    "GLOBAL", "POOLED_SITE", "Cyclic", "DPFedAvg", "FedAdagrad", "FedAdam", "FedAvg", "FedBN", "FedOpt",
    "FedProx", "FedYogi", "Local", "Pooled", "Scaffold", "SecureStrategy", "SecureSum", "SiteUpdate",
    "State", "Strategy", "TrainTask", "Weights", "build_strategy", "contribution", "is_float",
    "registry", "strategy_class", "weighted_mean",
]


class FedAvg:
    """McMahan et al. 2017: every site trains from the global model; the new global model is the
    mean of their models weighted by their number of training samples. With a server learning rate
    (Reddi et al. 2021, Hsu et al. 2019) the global model x moves only part of the way:
    x + server_lr * (mean - x); server_lr 1 is plain FedAvg. Integer entries take the mean."""

    name = "fedavg"
    pools_data = False
    server_lr = 1.0  # a subclass that does not call __init__ stays plain
    secure_weighting = "samples"
    secure_clip = None

    def __init__(self, server_lr: float = 1.0):
        self.server_lr = check_server_lr(server_lr)

    @classmethod
    def from_config(cls, fed: FederationConfig, *, seed: int, local_lr: float, shared: list[bool] | None):
        return cls(server_lr=fed.effective_server_lr)

    def init_state(self, weights: Weights, sites: list[str]) -> State:
        return {GLOBAL: weights}

    def stages(self, rnd: int, sites: list[str]) -> list[list[str]]:
        return [list(sites)]

    def configure(self, state: State, stage: list[str]) -> list[TrainTask]:
        return [TrainTask(s, state[GLOBAL]) for s in stage]

    def aggregate(self, state: State, updates: list[SiteUpdate], rnd: int) -> State:
        if self.server_lr == 1.0:  # plain FedAvg, bit for bit
            mean = weighted_mean([u.weights for u in updates], [u.n_samples for u in updates])
            return {**state, GLOBAL: mean}
        mean = mean64(updates)
        return self._step(state, [m - x.astype(np.float64) for x, m in zip(state[GLOBAL], mean, strict=True)])

    def aggregate_secure(self, state: State, total: SecureSum, rnd: int) -> State:
        return self._step(state, total.mean)

    def _step(self, state: State, delta: Weights) -> State:
        """x + server_lr * delta for floating entries, x + delta (the mean) for integer ones."""
        new = []
        for x, d in zip(state[GLOBAL], delta, strict=True):
            x64 = x.astype(np.float64)
            m = x64 + (self.server_lr if is_float(x) else 1.0) * d
            if not is_float(x):
                m = np.rint(m)
            new.append(np.asarray(m).astype(x.dtype, copy=False))
        return {**state, GLOBAL: new}


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

    @classmethod
    def from_config(cls, fed: FederationConfig, *, seed: int, local_lr: float, shared: list[bool] | None):
        return cls(order=fed.cyclic_order, seed=seed)

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

    @classmethod
    def from_config(cls, fed: FederationConfig, *, seed: int, local_lr: float, shared: list[bool] | None):
        return cls()

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

    @classmethod
    def from_config(cls, fed: FederationConfig, *, seed: int, local_lr: float, shared: list[bool] | None):
        return cls()

    def stages(self, rnd: int, sites: list[str]) -> list[list[str]]:
        return [[POOLED_SITE]]


class DPFedAvg:
    """DP-FedAvg (McMahan et al. 2018) as distributed DP, site-level differential privacy: each site
    clips its update (its model minus the global model) to L2 norm `clip` over all weights and adds
    Gaussian noise of std `noise_multiplier` x `clip` drawn from its own secret key, before the
    update leaves it (privmed.federation.client); the server sums what arrives and divides by
    `n_sites`, the configured number of sites (a public constant, not the count received). Each
    site's update is then a Gaussian mechanism on its whole data on its own, whatever the server
    does; the sum of m sites' updates carries noise sqrt(m) x noise_multiplier x clip. The mean is
    unweighted: weighting by sample counts would let a large site move it by more than `clip`. The
    server adds nothing and clips nothing: it never sees an unnoised update.

    A wrapper, as Flower adds DP to any strategy: the rounds, the tasks sent and the state are the
    `inner` strategy's (default: FedAvg); only the aggregation is DP-FedAvg's, x + sum / n_sites."""

    def __init__(self, clip: float, noise_multiplier: float, n_sites: int, inner: Strategy | None = None):
        if not clip > 0 or not noise_multiplier > 0 or not n_sites >= 1:
            raise ValueError(
                f"need clip > 0, noise_multiplier > 0 and n_sites >= 1, got {clip!r}, "
                f"{noise_multiplier!r}, {n_sites!r}"
            )
        self.clip, self.noise_multiplier = float(clip), float(noise_multiplier)
        self.n_sites = int(n_sites)
        self.inner = inner if inner is not None else FedAvg()

    def __getattr__(self, name: str) -> Any:  # name, pools_data, init_state, stages, configure
        if name.startswith("__") or name == "inner":  # not yet set (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    secure_weighting = "uniform"
    # Under secure aggregation each entry of a site's noisy update is rounded stochastically to
    # SecAgg+'s grid, which can add up to sqrt(d) levels to its L2 norm: the site then clips below
    # `clip` by that much, so that what enters the sum still moves it by at most `clip` (this is for
    # the sum's guarantee; each site's own share is a Gaussian mechanism before any rounding).
    rounding_bound: float = 0.0

    @property
    def secure_clip(self) -> float:
        return self.clip - self.rounding_bound

    def aggregate(self, state: State, updates: list[SiteUpdate], rnd: int) -> State:
        if not updates:
            raise ValueError("DP-FedAvg needs at least one update")
        total = [np.zeros(np.shape(layer), dtype=np.float64) for layer in state[GLOBAL]]
        for u in updates:
            total = [t + c for t, c in zip(total, contribution(state[GLOBAL], u.weights))]
        return self._step_mean(state, total)

    def aggregate_secure(self, state: State, total: SecureSum, rnd: int) -> State:
        """The sites clipped and noised their updates and weighed them equally: the sum is the mean
        times the number of contributors."""
        n = len(total.reports)
        return self._step_mean(state, [n * m for m in total.mean])

    def _step_mean(self, state: State, total: Weights) -> State:
        new = [
            (layer.astype(np.float64) + t / self.n_sites).astype(layer.dtype, copy=False)
            for t, layer in zip(total, state[GLOBAL])
        ]
        return {**state, GLOBAL: new}


class FedProx(FedAvg):
    """FedProx (Li et al. 2020): FedAvg whose sites add the proximal term mu/2 |w - w_global|^2 to
    their loss (mu (w - w_global) to each parameter's gradient), which keeps heterogeneous sites
    from drifting far from the global model. Aggregation is FedAvg's."""

    name = "fedprox"

    def __init__(self, mu: float, server_lr: float = 1.0):
        super().__init__(server_lr)
        if not (np.isfinite(mu) and mu >= 0):
            raise ValueError(f"mu must be a non-negative number, got {mu!r}")
        self.mu = float(mu)

    @classmethod
    def from_config(cls, fed: FederationConfig, *, seed: int, local_lr: float, shared: list[bool] | None):
        return cls(fed.mu, server_lr=fed.effective_server_lr)

    def configure(self, state: State, stage: list[str]) -> list[TrainTask]:
        return [TrainTask(s, state[GLOBAL], prox_mu=self.mu) for s in stage]


class FedBN(Local):
    """FedBN (Li et al. 2021), personalisation: every site keeps its own model, all starting from the
    same initial weights (state {site: weights}, planned as `Local`). The entries marked `shared`
    (one flag per state entry) are replaced at every site by their n_samples-weighted mean over the
    round's updates; the others (the normalisation layers, which the caller marks) keep each site's
    own trained values."""

    name = "fedbn"

    def __init__(self, shared: list[bool]):
        self.shared = [bool(b) for b in shared]
        if all(self.shared):
            raise ValueError("FedBN needs a local (unshared) entry; with all shared it is FedAvg")
        if not any(self.shared):
            raise ValueError("FedBN needs a shared entry; with none shared it is local training")

    @classmethod
    def from_config(cls, fed: FederationConfig, *, seed: int, local_lr: float, shared: list[bool] | None):
        if shared is None:
            raise ConfigError("federation.strategy: 'fedbn' needs a model with normalisation layers")
        return cls(shared)

    def _check(self, weights: Weights) -> None:
        if len(weights) != len(self.shared):
            raise ValueError(f"FedBN's mask has {len(self.shared)} entries, the weights {len(weights)}")

    def init_state(self, weights: Weights, sites: list[str]) -> State:
        self._check(weights)
        return super().init_state(weights, sites)

    def aggregate(self, state: State, updates: list[SiteUpdate], rnd: int) -> State:
        if not updates:
            raise ValueError("FedBN needs at least one update")
        for u in updates:
            self._check(u.weights)
        mean = weighted_mean([u.weights for u in updates], [u.n_samples for u in updates])
        trained = {u.model_key: u.weights for u in updates}
        unknown = sorted(set(trained) - {k for k in state if not k.startswith("_")})
        if unknown:
            raise ValueError(f"FedBN got updates for models it does not hold: {unknown}")
        new = dict(state)
        for key, w in state.items():
            if key.startswith("_"):
                continue
            own = trained.get(key, w)
            self._check(own)
            new[key] = [m if sh else o for m, o, sh in zip(mean, own, self.shared, strict=True)]
        return new


def strategy_class(name: str) -> type:
    """The class the catalog names for strategy `name` (privmed.catalog.STRATEGIES); ConfigError
    naming the known strategies for any other name."""
    known = catalog.by_name(catalog.STRATEGIES)
    if name not in known:
        raise ConfigError(unknown_name("federation.strategy", "strategy", name, known))
    return catalog.load(known[name].impl)


def registry() -> dict[str, type]:
    """Every strategy's class by name, as the catalog lists them."""
    return {s.name: strategy_class(s.name) for s in catalog.STRATEGIES}


def build_strategy(
    fed: FederationConfig, *, seed: int, local_lr: float, shared: list[bool] | None = None
) -> Strategy:
    """The strategy `fed` names (aggregating by the mean: `robust.with_aggregator` applies
    `fed.aggregator`). `local_lr`: the sites' learning rate (SCAFFOLD's control variates); `shared`:
    one flag per state entry, False for normalisation layers (FedBN), None when the model has none."""
    return strategy_class(fed.strategy).from_config(fed, seed=seed, local_lr=local_lr, shared=shared)

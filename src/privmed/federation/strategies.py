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
class, which builds itself from the config (`from_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from privmed import catalog
from privmed.errors import ConfigError, unknown_name

if TYPE_CHECKING:
    from privmed.config import FederationConfig

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


def _mean64(updates: list[SiteUpdate]) -> Weights:
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


def _zeros64(weights: Weights) -> Weights:
    return [np.zeros(np.shape(a), dtype=np.float64) for a in weights]


def _check_server_lr(server_lr: float) -> float:
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


class FedAvg:
    """McMahan et al. 2017: every site trains from the global model; the new global model is the
    mean of their models weighted by their number of training samples. With a server learning rate
    (Reddi et al. 2021, Hsu et al. 2019) the global model x moves only part of the way:
    x + server_lr * (mean - x); server_lr 1 is plain FedAvg. Integer entries take the mean."""

    name = "fedavg"
    pools_data = False
    server_lr = 1.0  # subclasses that do not call __init__ (DPFedAvg) stay plain
    secure_weighting = "samples"
    secure_clip = None

    def __init__(self, server_lr: float = 1.0):
        self.server_lr = _check_server_lr(server_lr)

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
        mean = _mean64(updates)
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


class DPFedAvg(FedAvg):
    """DP-FedAvg (McMahan et al. 2018) as distributed DP, site-level differential privacy: each site
    clips its update (its model minus the global model) to L2 norm `clip` over all weights and adds
    Gaussian noise of std `noise_multiplier` x `clip` drawn from its own secret key, before the
    update leaves it (privmed.federation.client); the server sums what arrives and divides by
    `n_sites`, the configured number of sites (a public constant, not the count received). Each
    site's update is then a Gaussian mechanism on its whole data on its own, whatever the server
    does; the sum of m sites' updates carries noise sqrt(m) x noise_multiplier x clip. The mean is
    unweighted: weighting by sample counts would let a large site move it by more than `clip`. The
    server adds nothing and clips nothing: it never sees an unnoised update."""

    name = "fedavg"

    def __init__(self, clip: float, noise_multiplier: float, n_sites: int):
        if not clip > 0 or not noise_multiplier > 0 or not n_sites >= 1:
            raise ValueError(
                f"need clip > 0, noise_multiplier > 0 and n_sites >= 1, got {clip!r}, "
                f"{noise_multiplier!r}, {n_sites!r}"
            )
        self.clip, self.noise_multiplier = float(clip), float(noise_multiplier)
        self.n_sites = int(n_sites)

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


class Scaffold:
    """SCAFFOLD (Karimireddy et al. 2020), option II control variates, every site every round.

    The server keeps the global model x, a server control variate c and one control variate c_i per
    site (state keys "global", "_c", "_c/<site>"; all c start at zero). Site i trains from x adding
    c - c_i to each parameter's gradient (the task's `correction`). From its result y_i after K
    local steps (`metrics["optimizer_steps"]`):
        c_i+ = c_i - c + (x - y_i) / (K * local_lr)
        x+   = x + server_lr * sum_i p_i (y_i - x)
        c+   = sum_i p_i c_i+            over all sites
    with p_i = n_i / sum n (FedAvg's weights). The paper averages the control variates uniformly;
    weighting c by the same p_i as the model makes the corrections c - c_i sum to zero under the
    weights the server averages with (sum_i p_i (c - c_i) = 0), so they cancel in the aggregate as
    the method intends. Option II assumes the sites take plain SGD steps of size local_lr; with
    momentum or Adam at the sites it is an approximation. Integer entries take the weighted mean and
    have zero corrections."""

    name = "scaffold"
    pools_data = False

    def __init__(self, local_lr: float, server_lr: float = 1.0):
        if not (np.isfinite(local_lr) and local_lr > 0):
            raise ValueError(f"local_lr must be a positive number, got {local_lr!r}")
        self.local_lr = float(local_lr)
        self.server_lr = _check_server_lr(server_lr)

    @classmethod
    def from_config(cls, fed: FederationConfig, *, seed: int, local_lr: float, shared: list[bool] | None):
        return cls(local_lr, server_lr=fed.effective_server_lr)

    @staticmethod
    def _key(site: str) -> str:
        return f"_c/{site}"

    def init_state(self, weights: Weights, sites: list[str]) -> State:
        state = {GLOBAL: weights, "_c": _zeros64(weights)}
        state.update({self._key(s): _zeros64(weights) for s in sites})
        return state

    def stages(self, rnd: int, sites: list[str]) -> list[list[str]]:
        return [list(sites)]

    def configure(self, state: State, stage: list[str]) -> list[TrainTask]:
        c = state["_c"]
        tasks = []
        for s in stage:
            correction = [cj - cij for cj, cij in zip(c, state[self._key(s)], strict=True)]
            tasks.append(TrainTask(s, state[GLOBAL], correction=correction))
        return tasks

    def aggregate(self, state: State, updates: list[SiteUpdate], rnd: int) -> State:
        sites = sorted(k[len("_c/"):] for k in state if k.startswith("_c/"))
        got = sorted(u.site for u in updates)
        if got != sites:
            raise ValueError(f"SCAFFOLD needs one update from every site each round: {sites}, got {got}")
        x, c = state[GLOBAL], state["_c"]
        x64 = [a.astype(np.float64) for a in x]
        new_ci: dict[str, Weights] = {}
        for u in updates:
            k = u.metrics.get("optimizer_steps")
            if k is None or not k > 0:
                raise ValueError(f"SCAFFOLD needs the local steps taken (> 0); {u.site!r} reports {k!r}")
            step = float(k) * self.local_lr
            new_ci[u.site] = [
                ci - cj + (xj - np.asarray(y, dtype=np.float64)) / step if is_float(xo)
                else np.zeros_like(ci)
                for ci, cj, xj, y, xo in zip(state[self._key(u.site)], c, x64, u.weights, x, strict=True)
            ]
        mean = _mean64(updates)
        new_x = []
        for xo, xj, m in zip(x, x64, mean, strict=True):
            if is_float(xo):
                m = xj + self.server_lr * (m - xj)
            new_x.append(np.asarray(m).astype(xo.dtype, copy=False))
        new_c = weighted_mean([new_ci[u.site] for u in updates], [u.n_samples for u in updates])
        return {**state, GLOBAL: new_x, "_c": new_c, **{self._key(s): ci for s, ci in new_ci.items()}}


class FedOpt:
    """Adaptive federated optimization (Reddi et al. 2021, Algorithm 2), as FLamby implements it:
    the server treats Δ = sum_i p_i y_i - x (p_i = n_i / sum n) as a pseudo-gradient and updates
        m  = beta1 m + (1 - beta1) Δ
        v  = `_second_moment(v, Δ²)`
        x+ = x + server_lr * m / (sqrt(v) + tau)
    with m and v starting at zero and no bias correction (state keys "global", "_m", "_v").
    Integer entries take the weighted mean and no optimizer step. Floating buffers (e.g. BatchNorm
    running statistics) are stepped like parameters."""

    name = "fedopt"
    pools_data = False
    secure_weighting = "samples"
    secure_clip = None

    def __init__(
        self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.999, tau: float = 1e-8
    ):
        self.server_lr = _check_server_lr(server_lr)
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1 and np.isfinite(tau) and tau > 0):
            raise ValueError(
                f"need 0 <= beta1, beta2 < 1 and tau > 0, got {beta1!r}, {beta2!r}, {tau!r}"
            )
        self.beta1, self.beta2, self.tau = float(beta1), float(beta2), float(tau)

    @classmethod
    def from_config(cls, fed: FederationConfig, *, seed: int, local_lr: float, shared: list[bool] | None):
        return cls(server_lr=fed.effective_server_lr, beta1=fed.beta1, beta2=fed.beta2, tau=fed.tau)

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def init_state(self, weights: Weights, sites: list[str]) -> State:
        return {GLOBAL: weights, "_m": _zeros64(weights), "_v": _zeros64(weights)}

    def stages(self, rnd: int, sites: list[str]) -> list[list[str]]:
        return [list(sites)]

    def configure(self, state: State, stage: list[str]) -> list[TrainTask]:
        return [TrainTask(s, state[GLOBAL]) for s in stage]

    def aggregate(self, state: State, updates: list[SiteUpdate], rnd: int) -> State:
        mean = _mean64(updates)
        return self._step(state, [y - x.astype(np.float64) for x, y in zip(state[GLOBAL], mean, strict=True)])

    def aggregate_secure(self, state: State, total: SecureSum, rnd: int) -> State:
        return self._step(state, total.mean)

    def _step(self, state: State, delta: Weights) -> State:
        new_x, new_m, new_v = [], [], []
        for xo, mo, vo, d in zip(state[GLOBAL], state["_m"], state["_v"], delta, strict=True):
            x = xo.astype(np.float64)
            if is_float(xo):
                m = self.beta1 * mo + (1 - self.beta1) * d
                v = self._second_moment(vo, d * d)
                y = x + self.server_lr * m / (np.sqrt(v) + self.tau)
            else:
                m, v, y = mo, vo, np.rint(x + d)
            new_x.append(np.asarray(y).astype(xo.dtype, copy=False))
            new_m.append(m)
            new_v.append(v)
        return {**state, GLOBAL: new_x, "_m": new_m, "_v": new_v}


class FedAdam(FedOpt):
    """v = beta2 v + (1 - beta2) Δ²."""

    name = "fedadam"

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1 - self.beta2) * d2


class FedYogi(FedOpt):
    """v = v - (1 - beta2) Δ² sign(v - Δ²): v grows towards Δ² additively, never by more than
    (1 - beta2) Δ² per round."""

    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return v - (1 - self.beta2) * d2 * np.sign(v - d2)


class FedAdagrad(FedOpt):
    """v = v + Δ² (beta2 unused)."""

    name = "fedadagrad"

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return v + d2


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

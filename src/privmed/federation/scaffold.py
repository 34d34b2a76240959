"""SCAFFOLD: FedAvg with control variates that correct each site's drift."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from privmed.federation.strategy_base import (
    GLOBAL,
    SiteUpdate,
    State,
    TrainTask,
    Weights,
    check_server_lr,
    is_float,
    mean64,
    weighted_mean,
    zeros64,
)

if TYPE_CHECKING:
    from privmed.config import FederationConfig


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
        self.server_lr = check_server_lr(server_lr)

    @classmethod
    def from_config(cls, fed: FederationConfig, *, seed: int, local_lr: float, shared: list[bool] | None):
        return cls(local_lr, server_lr=fed.effective_server_lr)

    @staticmethod
    def _key(site: str) -> str:
        return f"_c/{site}"

    def init_state(self, weights: Weights, sites: list[str]) -> State:
        state = {GLOBAL: weights, "_c": zeros64(weights)}
        state.update({self._key(s): zeros64(weights) for s in sites})
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
        mean = mean64(updates)
        new_x = []
        for xo, xj, m in zip(x, x64, mean, strict=True):
            if is_float(xo):
                m = xj + self.server_lr * (m - xj)
            new_x.append(np.asarray(m).astype(xo.dtype, copy=False))
        new_c = weighted_mean([new_ci[u.site] for u in updates], [u.n_samples for u in updates])
        return {**state, GLOBAL: new_x, "_c": new_c, **{self._key(s): ci for s, ci in new_ci.items()}}

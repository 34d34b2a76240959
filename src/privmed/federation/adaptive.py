"""Adaptive federated optimisation: FedOpt and its server optimizers FedAdam, FedYogi, FedAdagrad."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from privmed.federation.strategy_base import (
    GLOBAL,
    SecureSum,
    SiteUpdate,
    State,
    TrainTask,
    Weights,
    check_server_lr,
    is_float,
    mean64,
    zeros64,
)

if TYPE_CHECKING:
    from privmed.config import FederationConfig


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
        self.server_lr = check_server_lr(server_lr)
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
        return {GLOBAL: weights, "_m": zeros64(weights), "_v": zeros64(weights)}

    def stages(self, rnd: int, sites: list[str]) -> list[list[str]]:
        return [list(sites)]

    def configure(self, state: State, stage: list[str]) -> list[TrainTask]:
        return [TrainTask(s, state[GLOBAL]) for s in stage]

    def aggregate(self, state: State, updates: list[SiteUpdate], rnd: int) -> State:
        mean = mean64(updates)
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

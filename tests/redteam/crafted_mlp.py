"""The crafted-MLP attack on scoring (issue 25, item 3), written as an attacker would write it: a
coordinator sends a hospital hand-made weights of privmed's tabular `mlp` (13 features -> tanh ->
tanh -> one logit) and reads one test patient's record out of the score histogram the hospital
returns. Pure functions; the hospital is any `oracle(weights) -> counts`:

    oracle = exact_oracle(site_test)                 # what a site returned before issue 25
    oracle = noisy_oracle(site_test, sigma, rng)     # through privmed.tasks.counts.noisy_counts
    band, label = isolate(oracle, EXACT_EDGES, rng)  # 1 query: a band of u.x holding one patient
    record = read_record(oracle, EXACT_EDGES, band, label)          # 13 queries, one per feature
    record = read_record_bisection(oracle, PRIVATE_EDGES, band, label, queries=99)  # noise-robust

`EXACT_EDGES` is the grid of today's counts (8,192 bins over logits +-32), `PRIVATE_EDGES` that of
the private release. To point it at a hospital's endpoint, write an oracle that sends the weights
as a scoring request and returns the test counts it answers.

How the weights work (W hidden units, float32 as a site runs them):
- a monotone pass-through of a projection s: hidden 1 tanh(eps s), hidden 2 tanh(h), output
  c h2: the logit is phi(s) = c tanh(tanh(eps s)), which the attacker inverts;
- a gate on a band lo <= u.x < hi: hidden 1 tanh(A (u.x - lo)) and tanh(A (hi - u.x)), hidden 2
  g = tanh(B (h_a + h_b - 1)): +1 inside the band, -1 outside; the output adds M (g - 1), which
  sends everyone outside the band to logit -2M (the lowest bin) and leaves the patient inside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from privmed.models.tabular import MLP
from privmed.tasks.base import class_probabilities, get_task
from privmed.tasks.counts import LOGIT_MAX, PRIVATE_EDGES, SCORE_BINS, uniform_edges

Weights = list[np.ndarray]
Oracle = Callable[[Weights], dict]

EXACT_EDGES = uniform_edges(SCORE_BINS, LOGIT_MAX)
WIDTH = 8
EPS, GATE_A, GATE_B, FAR = 0.1, 1e5, 10.0, 100.0


@dataclass(frozen=True)
class Band:
    """lo <= u . x < hi holds the target and no other patient of the split."""

    u: np.ndarray
    lo: float
    hi: float


# ------------------------------------------------------------------------------------ the hospital


def site_probabilities(weights: Weights, x: np.ndarray) -> np.ndarray:
    """(N, 2) float64: what a hospital's scoring computes for tabular features `x` (N, D) float32
    under `weights` (privmed's mlp, one logit, as privmed.federation.site.predict runs it)."""
    model = MLP(x.shape[1], 1, WIDTH)
    model.load_state_dict({k: torch.from_numpy(w) for k, w in zip(model.state_dict(), weights)})
    with torch.no_grad():
        return class_probabilities(model(torch.from_numpy(x))).numpy().astype(np.float64)


def exact_oracle(data) -> Oracle:
    """The hospital before issue 25: the exact counts of any weights on its split `data`."""
    task = get_task("tabular-classification")
    return lambda w: task.counts(site_probabilities(w, data.images), data)


def noisy_oracle(data, noise_multiplier: float, rng: np.random.Generator) -> Oracle:
    """The hospital after issue 25: every answer a release of privmed.tasks.counts.noisy_counts."""
    from privmed.tasks.counts import noisy_counts

    task = get_task("tabular-classification")
    return lambda w: noisy_counts(task, site_probabilities(w, data.images), data, noise_multiplier, rng)


# ------------------------------------------------------------------------------------- the weights


def _empty(d: int) -> list[np.ndarray]:
    return [np.zeros((WIDTH, d), np.float32), np.zeros(WIDTH, np.float32),
            np.zeros((WIDTH, WIDTH), np.float32), np.zeros(WIDTH, np.float32),
            np.zeros((1, WIDTH), np.float32), np.zeros(1, np.float32)]


def _gate(w: list[np.ndarray], band: Band) -> None:
    """Units 0, 1 of hidden 1 and unit 0 of hidden 2: g = +1 inside the band, -1 outside; the
    output gets FAR (g - 1)."""
    w[0][0], w[1][0] = GATE_A * band.u, -GATE_A * band.lo
    w[0][1], w[1][1] = -GATE_A * band.u, GATE_A * band.hi
    w[2][0, 0] = w[2][0, 1] = GATE_B
    w[3][0] = -GATE_B
    w[4][0, 0], w[5][0] = FAR, -FAR


def _passthrough(w: list[np.ndarray], direction: np.ndarray, scale: float, offset: float = 0.0) -> None:
    """Unit 2 of both hidden layers: the output gets scale tanh(tanh(EPS (direction . x - offset)))."""
    w[0][2], w[1][2] = EPS * direction, -EPS * offset
    w[2][2, 2] = 1.0
    w[4][0, 2] = scale


def projection_weights(u: np.ndarray, scale: float) -> Weights:
    """logit = phi(u . x) for everyone: spreads the patients over the grid."""
    w = _empty(len(u))
    _passthrough(w, u, scale)
    return w


def readout_weights(band: Band, feature: int, scale: float) -> Weights:
    """The patient in `band` at logit phi(x_feature), everyone else at -2 FAR."""
    w = _empty(len(band.u))
    _gate(w, band)
    _passthrough(w, np.eye(len(band.u), dtype=np.float32)[feature], scale)
    return w


def threshold_weights(band: Band, feature: int, t: float, scale: float) -> Weights:
    """The patient in `band` at logit +scale when x_feature > t, else -scale; everyone else at
    -2 FAR."""
    w = _empty(len(band.u))
    _gate(w, band)
    w[0][2, feature], w[1][2] = GATE_A, -GATE_A * t
    w[2][2, 2] = GATE_B
    w[4][0, 2] = scale
    return w


def phi_inverse(z: np.ndarray, scale: float) -> np.ndarray:
    """s from the logit z = scale tanh(tanh(EPS s))."""
    inner = np.clip(np.asarray(z, dtype=np.float64) / scale, -1 + 1e-12, 1 - 1e-12)
    return np.arctanh(np.clip(np.arctanh(inner), -1 + 1e-12, 1 - 1e-12)) / EPS


def _scale_for(edges: np.ndarray) -> float:
    """The pass-through's scale: phi (phi(+-inf) = +-0.76 scale) spans the inner edges, and stays
    within logit +-15, where a site's float32 probabilities still tell logits apart (1 - p below
    6e-8 rounds to 1)."""
    return min(0.95 * float(edges[-1]), 15.0) / math.tanh(1.0)


def _bin_interval(edges: np.ndarray, b: int) -> tuple[float, float]:
    lo = -math.inf if b == 0 else float(edges[b - 1])
    hi = math.inf if b == len(edges) else float(edges[b])
    return lo, hi


# ------------------------------------------------------------------------------------- the attack


def isolate(oracle: Oracle, edges: np.ndarray, rng: np.random.Generator, d: int = 13) -> tuple[Band, int]:
    """One query: spread the patients by a random projection u . x and take an inner bin holding
    one patient: the band of u . x it maps to, and that patient's label (the histogram row it is
    in). On noisy counts: the inner bin whose total is nearest 1."""
    u = rng.standard_normal(d).astype(np.float32)
    u /= np.linalg.norm(u)
    scale = _scale_for(edges)
    hist = np.asarray(oracle(projection_weights(u, scale))["score_hist"][1], dtype=np.float64)  # (2, B)
    total = hist.sum(axis=0)
    inner = np.arange(1, len(total) - 1)
    b = int(inner[np.argmin(np.abs(total[inner] - 1.0))])
    lo, hi = (phi_inverse(v, scale) for v in _bin_interval(edges, b))
    return Band(u, float(lo), float(hi)), int(np.argmax(hist[:, b]))


def read_record(oracle: Oracle, edges: np.ndarray, band: Band, label: int, repeats: int = 1) -> np.ndarray:
    """(D,) the band's patient's features, one readout query per feature (`repeats` each, their
    histograms averaged): the patient's bin on its label's row, outside the lowest bin, decoded at
    its middle."""
    scale = _scale_for(edges)
    out = []
    for j in range(len(band.u)):
        rows = [np.asarray(oracle(readout_weights(band, j, scale))["score_hist"][1][label], dtype=np.float64)
                for _ in range(repeats)]
        row = np.mean(rows, axis=0)
        b = 1 + int(np.argmax(row[1:]))
        lo, hi = _bin_interval(edges, b)
        lo, hi = max(lo, -0.76 * scale), min(hi, 0.76 * scale)
        out.append(float(phi_inverse(0.5 * (lo + hi), scale)))
    return np.asarray(out)


def read_record_bisection(oracle: Oracle, edges: np.ndarray, band: Band, label: int, queries: int,
                          features: list[int] | None = None, span: float = 4.0) -> np.ndarray:
    """(len(features),) the band's patient's features by noisy bisection over [-span, span]: each
    step asks 'x_j > t?' (the patient in the top bin or the lowest), `repeats` times, and follows
    the mean count of the top bin on the label's row. The `queries` are shared equally among the
    features; each feature gets depth x repeats of them (depth up to 8)."""
    features = list(range(len(band.u))) if features is None else features
    per = max(queries // len(features), 1)
    depth = min(per, 8)
    repeats = per // depth
    scale = 1.05 * float(edges[-1])
    out = []
    for j in features:
        lo, hi = -span, span
        for _ in range(depth):
            t = 0.5 * (lo + hi)
            top = np.mean([float(oracle(threshold_weights(band, j, t, scale))["score_hist"][1][label][-1])
                           for _ in range(repeats)])
            lo, hi = (t, hi) if top > 0.5 else (lo, t)
        out.append(0.5 * (lo + hi))
    return np.asarray(out)


def target_record(data, band: Band) -> tuple[np.ndarray, int]:
    """The truth the attacker is after (for measuring it): the features and label of the patients
    in `band`, which must be exactly one. ValueError otherwise."""
    s = data.images.astype(np.float32) @ band.u
    inside = np.flatnonzero((s >= band.lo) & (s < band.hi))
    if len(inside) != 1:
        raise ValueError(f"the band holds {len(inside)} patients")
    return data.images[inside[0]].astype(np.float64), int(data.labels[inside[0]])

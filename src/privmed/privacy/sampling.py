"""Which patients a DP-SGD step draws: Poisson sampling, as the accountant assumes, and the fixed
physical batch a drawn batch is padded to.

    poisson_batches(n, q, steps, generator)     index tensors, each item in with probability q
    patient_batches(patients, q, steps, gen.)   the same per patient, one item of each drawn patient
    physical_batch_size(n, q)                   the fixed batch a Poisson batch is padded to
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

# dp_train's fixed physical batch: P(a Poisson batch of the site's patients exceeds it) per step.
# Only such a step takes longer (two physical batches), so the time tells at most that it happened.
PAD_TAIL = 1e-9


def poisson_batches(
    n: int, sample_rate: float, steps: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """For each of `steps` steps, the sorted int64 indices (B,) of the items in 0..n-1 included
    independently with probability `sample_rate`; B varies and may be 0. This is the sampling the
    accountant assumes. Draws n uniforms per step from `generator` only."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    if not 0.0 <= sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate!r}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")

    def batches() -> Iterator[torch.Tensor]:
        for _ in range(steps):
            # float64 uniforms, so P(u < q) is q to 2^-53 even for tiny rates.
            u = torch.rand(n, dtype=torch.float64, generator=generator)
            yield torch.nonzero(u < sample_rate).flatten()

    return batches()


def patient_batches(
    patients: np.ndarray, sample_rate: float, steps: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Poisson sampling of patients, for data with several items (images) per patient.

    For each step, every patient (a distinct value of `patients`, (N,) ids per item) is in the batch
    independently with probability `sample_rate`, and brings one of its items, drawn uniformly. So
    each patient contributes at most one clipped gradient per step, and adding or removing a patient
    changes a step's gradient sum by at most C: the guarantee is per patient, as the accountant
    assumes. Yields the int64 item indices (B,), B = patients drawn. When every patient has one item
    this draws exactly what `poisson_batches` draws over the items."""
    patients = np.asarray(patients)
    _, inverse, counts = np.unique(patients, return_inverse=True, return_counts=True)
    if counts.max(initial=1) == 1:
        yield from poisson_batches(len(patients), sample_rate, steps, generator)
        return
    items = torch.from_numpy(np.argsort(inverse, kind="stable"))  # items grouped by patient
    counts_t = torch.from_numpy(counts)
    offsets = torch.cumsum(counts_t, 0) - counts_t
    for chosen in poisson_batches(len(counts), sample_rate, steps, generator):
        u = torch.rand(len(chosen), dtype=torch.float64, generator=generator)
        k = torch.clamp((u * counts_t[chosen]).long(), max=counts_t[chosen] - 1)
        yield items[offsets[chosen] + k]



def physical_batch_size(n: int, sample_rate: float, tail: float = PAD_TAIL) -> int:
    """The smallest P >= 1 (at most n) with P(Binomial(n, sample_rate) > P) <= tail: the fixed
    physical batch a Poisson batch of n patients is padded to. From public numbers only."""
    if n <= 1 or sample_rate >= 1.0:
        return max(n, 1)
    if sample_rate <= 0.0:
        return 1
    mean, sd = n * sample_rate, math.sqrt(n * sample_rate * (1 - sample_rate))
    top = min(n, math.ceil(mean + 40 * sd + 40))  # beyond: far below any tail asked for
    log_q, log_1q, log_n = math.log(sample_rate), math.log1p(-sample_rate), math.lgamma(n + 1)
    above = 0.0  # P(B > k), built from the top
    for k in range(top, 0, -1):
        above_k_minus_1 = above + math.exp(
            log_n - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_q + (n - k) * log_1q
        )
        if above_k_minus_1 > tail:
            return k
        above = above_k_minus_1
    return 1

"""One site's local DP training, in memory: Poisson-sampled batches of patients, DPSGD steps, and
the figures the site keeps for itself.

    dp_train(model, x, y, steps=, sample_rate=, ...)        one site's local DP training, in memory

Weights that are not all finite are refused (ValueError) before any patient is touched. If the
trained weights are not all finite (e.g. a finite noisy step overflowing weights sent near the
float32 limit), the model is given back the weights it started from: that choice is a function of
the noisy gradients alone (post-processing), never an error. (Not "the noise alone": that reveals
the noise together with the fact that noise + sum overflowed, which is not DP.)
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, TypedDict

import numpy as np
import torch
from torch import nn

from privmed.privacy.dp_step import DEFAULT_GRAD_SAMPLE_MODE, DPSGD
from privmed.privacy.exact import MAX_BATCH
from privmed.privacy.optimizers import make_optimizer
from privmed.privacy.sampling import patient_batches, physical_batch_size, poisson_batches


class DPTrainFigures(TypedDict):
    """What dp_train returns, for the site alone (computed from its patients outside the mechanism,
    or a function of the release): train_loss (mean loss over the items drawn; NaN if none was),
    sample_gradient_steps (items drawn, summed over steps), optimizer_steps (= steps: empty batches
    count, as the accountant counts them), empty_batches, expected_batch_size, zeroed_gradients
    (drawn items whose gradient counted as zero: non-finite, huge, or a label outside the model's
    outputs), physical_batch (P, or None), oversized_batches (steps that drew more than P: only
    those took longer) and nonfinite_release (True when the starting weights were given back)."""

    train_loss: float
    sample_gradient_steps: int
    optimizer_steps: int
    empty_batches: int
    expected_batch_size: float
    zeroed_gradients: int
    physical_batch: int | None
    oversized_batches: int
    nonfinite_release: bool


def dp_train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    sample_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    lr: float,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    generator: torch.Generator,
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    patients: np.ndarray | None = None,
    criterion: nn.Module | None = None,
    after_noise: Callable[[], None] | None = None,
    expected_batch_size: float | None = None,
    constant_work: bool = True,
) -> DPTrainFigures:
    """Train `model` in place for `steps` DP-SGD steps on x (N, ...) items, y (N, ...) targets, with
    Poisson batches of rate `sample_rate` and a fresh optimizer; returns DPTrainFigures.

    The privacy unit is the patient: `patients` (N,) gives each item's patient (None: one item per
    patient), sampled as in `patient_batches`. `criterion` (default cross-entropy, reduction mean)
    and `after_noise` are DPSGD's. `expected_batch_size`: what the noisy sum is divided by, a public
    constant (default: sample_rate x the patients in x; an auditor whose canaries join x keeps the
    site's own count). `augment(x_batch, generator)` transforms each drawn batch (per item).
    `constant_work`: every step runs on DPSGD's fixed physical batch of physical_batch_size(patients,
    sample_rate) rows, so that a turn's time does not follow the batch sizes drawn (False: each
    drawn batch as it is). Batches, augmentation and noise all draw from `generator`, in that order
    per step: same seed, bitwise the same weights. Afterwards `model` is a plain nn.Module again,
    holding the trained weights under its usual state_dict keys (non-finite ones: see the module).
    """
    start = _starting_weights(model, x, y, sample_rate)
    batches, n_patients = _batches(len(x), patients, sample_rate, steps, generator)
    if expected_batch_size is None:
        expected_batch_size = sample_rate * n_patients
    physical = physical_batch_size(n_patients, sample_rate) if constant_work else None
    dp = DPSGD(model, make_optimizer(model, optimizer, lr, momentum, weight_decay),
               noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
               expected_batch_size=expected_batch_size, generator=generator,
               grad_sample_mode=grad_sample_mode, criterion=criterion, after_noise=after_noise,
               physical_batch=physical)
    with dp:
        total_loss, drawn, empty, oversized = _train(dp, batches, x, y, augment, generator, physical)
        kept = dp.kept
    released = _all_finite(model.state_dict().values())
    if not released:
        model.load_state_dict(start)
    return {"train_loss": total_loss / drawn if drawn else math.nan, "sample_gradient_steps": drawn,
            "optimizer_steps": steps, "empty_batches": empty, "expected_batch_size": expected_batch_size,
            "zeroed_gradients": drawn - kept, "physical_batch": physical, "oversized_batches": oversized,
            "nonfinite_release": not released}


def _starting_weights(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, sample_rate: float
) -> dict[str, torch.Tensor]:
    """A copy of `model`'s state_dict, after checking the items and the weights (ValueError)."""
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x has {n} items but y has {len(y)}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if n == 0:
        raise ValueError("no training items")
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if not _all_finite(start.values()):
        raise ValueError("the weights to train from are not all finite numbers")
    return start


def _batches(
    n: int, patients: np.ndarray | None, sample_rate: float, steps: int, generator: torch.Generator
) -> tuple[Iterator[torch.Tensor], int]:
    """(the item indices of each step's Poisson batch of patients, the number of patients)."""
    if patients is None:
        batches = poisson_batches(n, sample_rate, steps, generator)
        n_patients = n
    else:
        if len(patients) != n:
            raise ValueError(f"x has {n} items but patients has {len(patients)}")
        batches = patient_batches(patients, sample_rate, steps, generator)
        n_patients = len(np.unique(patients))
    if n_patients > MAX_BATCH:
        raise ValueError(f"{n_patients} patients at one site are more than DP-SGD's {MAX_BATCH}")
    return batches, n_patients


def _train(
    dp: DPSGD,
    batches: Iterator[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None,
    generator: torch.Generator,
    physical: int | None,
) -> tuple[float, int, int, int]:
    """One DP step per batch: (summed loss, items drawn, empty batches, batches over `physical`)."""
    total_loss, drawn, empty, oversized = 0.0, 0, 0, 0
    for idx in batches:
        xb = x[idx]
        if augment is not None and len(idx):
            xb = augment(xb, generator)
        total_loss += dp.step(xb, y[idx])
        drawn += len(idx)
        empty += len(idx) == 0
        oversized += physical is not None and len(idx) > physical
    return total_loss, drawn, empty, oversized


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())

"""DP-SGD at a site (Abadi et al. 2016) through Opacus: Poisson-sampled batches, each sample's gradient
clipped to L2 norm C, Gaussian noise of std sigma*C added to the sum, divided by the expected batch size.

    validate_model(model)                                   ConfigError naming the layer and the fix
    poisson_batches(n, q, steps, generator)                 index tensors, each item in with probability q
    DPSGD(model, optimizer, noise_multiplier=, max_grad_norm=, expected_batch_size=, generator=)
        .step(x, y)                                         one DP step (x may hold no items)
        .close()                                            model back to a plain nn.Module
    dp_train(model, x, y, steps=, sample_rate=, ...)        one site's local DP training, in memory

Pure: nothing here knows about rounds, runners or files. Per-sample gradients come from Opacus'
GradSampleModule (`grad_sample_mode` "hooks", "functorch", "ew") or its ghost-clipping module
("ghost"); clipping, noise and scaling are Opacus' DPOptimizer stages. Every mode clips per patient:
ghost mode needs the criterion's per-patient losses (reduction "none"), and a criterion that cannot
give them (or, like the Cox loss, has none) is refused, not run.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Callable, Iterator

import numpy as np
import torch
from opacus.grad_sample import prepare_module
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from opacus.validators import ModuleValidator
from torch import nn

from privmed.errors import ConfigError, unknown_name

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")
# Measured on privmed's `cnn` at 28 px, CPU, 1 thread (benchmarks/dp_grad_sample_modes.py, short runs
# on a loaded machine): all four modes give the same clipped step to ~2e-6; ms per DP step (non-private
# 81 / 332) at batch 64: ew 154-180, hooks 178-216, functorch 230-300, ghost 234-273; at batch 256:
# ew 799, functorch 969, ghost 1061, hooks 1211. ew (torch's ExpandedWeights) is the fastest or tied.
DEFAULT_GRAD_SAMPLE_MODE = "ew"
OPTIMIZERS = ("sgd", "adam")
# Float32 per-sample norms can come out low by up to ~1e-4 relative (measured on resnet18), so such
# models are clipped 1e-3 below C: their sensitivity is then at most C, as accounted.
CLIP_MARGIN = 1e-3

# torch warns that the first layer's full backward hook fires with no input gradient (images never
# require grad); that is how Opacus' hooks always run, so this one message is noise.
_FIRST_LAYER_HOOK_WARNING = r"Full backward hook is firing when gradients are computed"


def check_grad_sample_mode(mode: str) -> None:
    if mode not in GRAD_SAMPLE_MODES:
        raise ConfigError(unknown_name("grad_sample_mode", "mode", mode, GRAD_SAMPLE_MODES))


# ---------------------------------------------------------------------------------------------------
# Model validation


def validate_model(model: nn.Module) -> None:
    """Raise ConfigError (one line) if `model` cannot be trained with DP-SGD, naming the first offending
    layer by its path in `model.named_modules()`, the problem and the fix.

    Checks BatchNorm (any affine setting) and in-place activations/dropout ourselves (Opacus flags
    neither an affine-free BatchNorm nor `inplace=True`), then runs Opacus' registered per-layer
    validators (those `ModuleValidator.validate` runs), layer by layer so the message can name the
    layer (Opacus' own messages do not). The train/eval mode is not checked: the trainer sets it.
    """
    problems = [p for name, m in model.named_modules() for p in _layer_problems(name or "<root>", m)]
    if problems:
        more = f" (and {len(problems) - 1} more layer(s))" if len(problems) > 1 else ""
        raise ConfigError(f"model.name: {problems[0]}{more}")


def _layer_problems(name: str, m: nn.Module) -> list[str]:
    kind = type(m).__name__
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return [
            f"layer '{name}' is {kind}, which mixes patients in a batch (so per-sample gradients and "
            "the privacy guarantee do not hold); use GroupNorm (privmed's models do)"
        ]
    if getattr(m, "inplace", False) is True:
        return [
            f"layer '{name}' is {kind}(inplace=True), which overwrites a tensor that the per-sample "
            "gradient hooks need; set inplace=False"
        ]
    validator = ModuleValidator.VALIDATORS.get(type(m))
    if validator is None or not any(p.requires_grad for p in m.parameters(recurse=False)):
        return []
    return [
        f"layer '{name}' is {kind}, which Opacus cannot train privately: {_first_sentence(str(e))}"
        for e in validator(m)
    ]


def _first_sentence(text: str) -> str:
    return " ".join(text.split(". ")[0].split())


# ---------------------------------------------------------------------------------------------------
# Sampling


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


# ---------------------------------------------------------------------------------------------------
# DP steps


def _prepare(model: nn.Module, mode: str, max_grad_norm: float) -> nn.Module:
    """`model` wrapped in Opacus' grad-sample module for `mode` (mean loss reduction: Opacus rescales
    by the drawn batch size, so each per-sample gradient is that of the sample's own loss)."""
    check_grad_sample_mode(mode)
    kwargs = {"max_grad_norm": max_grad_norm} if mode == "ghost" else {}
    try:
        return prepare_module(model, mode, loss_reduction="mean", **kwargs)
    except NotImplementedError as e:  # a trainable layer with buffers, with hooks/functorch
        raise ConfigError(f"model.name: Opacus cannot compute per-sample gradients: {e}") from e


def _check_criterion(criterion: Callable, mode: str) -> None:
    """Raise (one line) if DP-SGD in `mode` cannot bound one patient's influence with `criterion`:
    ConfigError for a loss that couples patients (`per_sample` False) or, in ghost mode, one with no
    `reduction` to ask for per-patient losses; ValueError for a reduction other than "mean"."""
    name = type(criterion).__name__
    if getattr(criterion, "per_sample", True) is False:
        raise ConfigError(
            f"privacy.mode: 'dp-sgd' cannot train with criterion {name}: it couples the patients "
            "in a batch, so clipping per-sample gradients does not bound one patient's influence "
            "(task 'survival': use privacy.mode 'central')"
        )
    if mode == "ghost" and not hasattr(criterion, "reduction"):
        raise ConfigError(
            f"grad_sample_mode: 'ghost' needs per-patient losses, and criterion {name} has no "
            "'reduction' to ask for them; use a torch loss or privmed's task losses, or "
            "grad_sample_mode 'ew'"
        )
    reduction = getattr(criterion, "reduction", "mean")
    if reduction != "mean":
        raise ValueError(
            f"criterion: reduction '{reduction}' of {name} is not allowed (allowed: 'mean', which "
            "Opacus' per-sample scaling assumes)"
        )


class DPSGD:
    """DP-SGD steps on `model` with `optimizer` (a torch optimizer over `model`'s parameters).

    Each `step(x, y)`: the per-sample gradients of `criterion` (default cross-entropy) computed by
    Opacus in `grad_sample_mode`; each clipped to L2 norm `max_grad_norm` (C) over all parameters;
    summed; N(0, (noise_multiplier*C)^2) added to every coordinate; divided by `expected_batch_size`
    (q*n for Poisson sampling: never by the drawn batch size, which would itself leak); then
    `optimizer.step()`. With noise_multiplier 0, no clipping and a full batch this is plain SGD on the
    mean loss. A batch with no items still takes a step of pure noise: the accountant counts it.

    The criterion must be a mean of per-patient terms (reduction "mean"); one whose `per_sample`
    attribute is False (privmed's CoxLoss: each patient's data enters the others' terms) is refused
    in every mode, as clipping per-sample gradients would not bound one patient's influence. Ghost
    mode reads the per-patient losses (B,) by running a copy of the criterion with reduction
    "none" (so the caller's criterion is never modified), and refuses a step whose criterion
    ignores that, before anything is applied.

    `after_noise()`, if given, runs after the noisy gradient is in each `p.grad` and before the
    optimizer's step: a data-independent change to the gradient there (FedProx's proximal term,
    SCAFFOLD's correction) is post-processing and costs no privacy.

    The noise is drawn from `generator` only (a site's secret one: see privmed.federation.client),
    so a run is reproducible from the site's key. That is Opacus' default (`secure_mode=False`):
    torch's Mersenne Twister (seeded from the key), not a CSPRNG, and without the defence against
    floating-point attacks on the Gaussian sampler. Reproducibility with the key was chosen over
    that; Opacus' `secure_mode` could be exposed as an option later.

    Opacus computes the per-sample norms in the parameters' dtype, and in float32 they come out
    slightly low for large layers, so a gradient clipped to C can exceed C by a relative ~1e-6 (cnn)
    to ~1e-4 (resnet18). So that the sensitivity is at most C as the accountant assumes, models with
    any parameter below float64 are clipped to C x (1 - CLIP_MARGIN) while the noise stays
    noise_multiplier x C (a little more noise per unit of signal than accounted: conservative);
    float64 models clip exactly at C.

    While open, `model` carries Opacus' hooks (it stays the same object, with the same state_dict
    keys); `close()` (or leaving a `with` block) removes them and Opacus' attributes.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        generator: torch.Generator,
        grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE,
        criterion: nn.Module | None = None,
        after_noise: Callable[[], None] | None = None,
    ):
        if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm!r}")
        if not expected_batch_size > 0:
            raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size!r}")
        check_grad_sample_mode(grad_sample_mode)
        validate_model(model)
        self.model = model
        self.mode = grad_sample_mode
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        _check_criterion(self.criterion, grad_sample_mode)
        model.train()
        # Clip a hair below C where float32 norms can come out low (see above); noise stays sigma*C.
        exact = all(p.dtype == torch.float64 for p in model.parameters())
        clip = max_grad_norm * (1.0 if exact else 1.0 - CLIP_MARGIN)
        self._gsm: nn.Module | None = _prepare(model, grad_sample_mode, clip)
        optimizer_class = DPOptimizerFastGradientClipping if self.ghost else DPOptimizer
        self.optimizer = optimizer_class(
            optimizer,
            noise_multiplier=noise_multiplier * max_grad_norm / clip,
            max_grad_norm=clip,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=generator,
            secure_mode=False,
        )
        # Opacus switches its criterion's reduction to "none" and back on every call (and not back
        # if the call raises): it gets a copy, so the caller's criterion stays as it was.
        self._ghost_loss = (
            DPLossFastGradientClipping(self._gsm, self.optimizer, copy.copy(self.criterion), "mean")
            if self.ghost
            else None
        )
        if after_noise is not None:  # Opacus calls it between the noise and the optimizer's step
            self.optimizer.attach_step_hook(lambda _optimizer: after_noise())

    @property
    def ghost(self) -> bool:
        return self.mode == "ghost"

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One DP step on the batch x (B, C, H, W), y (B,), B >= 0; returns the batch's summed loss
        (0.0 when B == 0)."""
        if self._gsm is None:
            raise RuntimeError("DPSGD is closed")
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} items but y has {len(y)}")
        loss_sum = self._backward(x, y) if len(x) else self._empty_backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum

    def _backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Leaves per-sample gradients (or, in ghost mode, the summed clipped gradient) on the params."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_FIRST_LAYER_HOOK_WARNING, category=UserWarning)
            out = self._gsm(x)
            if self.ghost:
                loss = self._ghost_loss(out, y)
                self._check_per_patient_losses(loss.loss_per_sample, len(x))
            else:
                loss = self.criterion(out, y)
            loss.backward()
        return loss.item() * len(x)

    def _check_per_patient_losses(self, losses: torch.Tensor, b: int) -> None:
        """Ghost clipping scales each patient's loss by its clipping factor: with anything but (B,)
        per-patient losses (a criterion that ignores reduction "none" returns the batch mean) the
        step is not clipped per patient, so it is refused before the backward pass."""
        if tuple(losses.shape) != (b,):
            raise ConfigError(
                f"grad_sample_mode: 'ghost' needs one loss per patient, and criterion "
                f"{type(self.criterion).__name__} with reduction 'none' returned shape "
                f"{tuple(losses.shape)} where ({b},) is needed; make it honour reduction 'none' or "
                f"use grad_sample_mode 'ew'"
            )

    def _empty_backward(self) -> float:
        """What an empty batch leaves: zero per-sample gradients of shape (0, *p.shape), as Opacus'
        hooks produce for the empty batches of its DPDataLoader (functorch and ew cannot run a model
        on 0 items, so the forward pass is skipped in every mode); in ghost mode, a zero sum."""
        for p in self.optimizer.params:
            if self.ghost:
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = p.new_zeros((0, *p.shape))
        return 0.0

    def close(self) -> nn.Module:
        """Remove Opacus' hooks and attributes from the model and return it (the same object)."""
        if self._gsm is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self._gsm.to_standard_module()
            # Opacus' cleanup leaves DPOptimizer's `summed_grad` on every parameter and the hooks'
            # (emptied) `activations` list on every layer; the next wrapping recreates both.
            for p in self.model.parameters():
                if hasattr(p, "summed_grad"):
                    del p.summed_grad
            for m in self.model.modules():
                if getattr(m, "activations", None) == []:
                    del m.activations
            self._gsm = None
        return self.model

    def __enter__(self) -> DPSGD:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def per_sample_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE,
    criterion: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample gradients as Opacus computes them for DPSGD (before clipping): {parameter name:
    (B, *param.shape)} of `criterion` (default cross-entropy) on each item of x (B, C, H, W), y (B,).
    Works on a copy: `model` is left as it was. Ghost mode never forms them (ConfigError)."""
    if grad_sample_mode == "ghost":
        raise ConfigError("grad_sample_mode: 'ghost' computes only per-sample gradient norms")
    copy_ = copy.deepcopy(model).train()
    gsm = _prepare(copy_, grad_sample_mode, max_grad_norm=1.0)
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_FIRST_LAYER_HOOK_WARNING, category=UserWarning)
        criterion(gsm(x), y).backward()
    grads = {name: p.grad_sample.detach().clone() for name, p in copy_.named_parameters() if p.requires_grad}
    gsm.to_standard_module()
    return grads


# ---------------------------------------------------------------------------------------------------
# One site's local training


def make_optimizer(
    model: nn.Module, name: str, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """A fresh "sgd" (with `momentum`) or "adam" optimizer over `model`'s parameters."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"training.optimizer: unknown optimizer '{name}' (known: {', '.join(OPTIMIZERS)})")


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
) -> dict[str, float | int]:
    """Train `model` in place for `steps` DP-SGD steps on x (N, ...) items, y (N, ...) targets, with
    Poisson batches of rate `sample_rate` and a fresh optimizer.

    The privacy unit is the patient: `patients` (N,) gives each item's patient (None: one item per
    patient). Patients are sampled, each bringing one of its items (`patient_batches`); the expected
    batch size is sample_rate x patients.

    `criterion` (default cross-entropy, reduction mean) and `after_noise` are DPSGD's.
    `expected_batch_size`: what the noisy sum is divided by, a public constant (default: sample_rate
    x the patients in x; an auditor whose canaries join x keeps the site's own count).
    `augment(x_batch, generator)` transforms each drawn batch (per item, so privacy is unaffected).
    Batches, augmentation and noise all draw from `generator`, in that order per step: same seed,
    bitwise the same weights. Afterwards `model` is a plain nn.Module again (no Opacus hooks), holding
    the trained weights under its usual state_dict keys.

    Returns train_loss (mean loss over the items drawn; NaN if none was), sample_gradient_steps
    (items drawn, summed over steps), optimizer_steps (= steps: empty batches count, as the accountant
    counts them), empty_batches and expected_batch_size.
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x has {n} items but y has {len(y)}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if n == 0:
        raise ValueError("no training items")
    if patients is None:
        batches = poisson_batches(n, sample_rate, steps, generator)
        n_patients = n
    else:
        if len(patients) != n:
            raise ValueError(f"x has {n} items but patients has {len(patients)}")
        batches = patient_batches(patients, sample_rate, steps, generator)
        n_patients = len(np.unique(patients))
    if expected_batch_size is None:
        expected_batch_size = sample_rate * n_patients
    base = make_optimizer(model, optimizer, lr, momentum, weight_decay)
    total_loss, drawn, empty = 0.0, 0, 0
    with DPSGD(
        model,
        base,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        generator=generator,
        grad_sample_mode=grad_sample_mode,
        criterion=criterion,
        after_noise=after_noise,
    ) as dp:
        for idx in batches:
            xb = x[idx]
            if augment is not None and len(idx):
                xb = augment(xb, generator)
            total_loss += dp.step(xb, y[idx])
            drawn += len(idx)
            empty += len(idx) == 0
    return {
        "train_loss": total_loss / drawn if drawn else math.nan,
        "sample_gradient_steps": drawn,
        "optimizer_steps": steps,
        "empty_batches": empty,
        "expected_batch_size": expected_batch_size,
    }

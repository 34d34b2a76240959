"""DP-SGD steps on a model through Opacus (Abadi et al. 2016): per-sample gradients clipped to L2
norm C, Gaussian noise of std sigma*C added to the sum, divided by the expected batch size.

    DPSGD(model, optimizer, noise_multiplier=, max_grad_norm=, expected_batch_size=, generator=)
        .step(x, y)                                         one DP step (x may hold no items)
        .close()                                            model back to a plain nn.Module
    grad_sample_module(model, mode, max_grad_norm)          Opacus' per-sample gradient wrapper
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Callable

import torch
from opacus.grad_sample import prepare_module
from torch import nn

from privmed.errors import ConfigError, unknown_name
from privmed.privacy.exact import (
    MAX_BATCH,
    MAX_NOISE_MULTIPLIER,
    GRID_BITS,
    ExactDPOptimizer,
    ExactFastGradientClipping,
    clip_factors,
    grid_spacing,
    in_range_targets,
    kept_rows,
)
from privmed.privacy.model_check import validate_model

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")
# Measured on privmed's `cnn` at 28 px, CPU, 1 thread (benchmarks/dp_grad_sample_modes.py, short runs
# on a loaded machine): all four modes give the same clipped step to ~2e-6; ms per DP step (non-private
# 81 / 332) at batch 64: ew 154-180, hooks 178-216, functorch 230-300, ghost 234-273; at batch 256:
# ew 799, functorch 969, ghost 1061, hooks 1211. ew (torch's ExpandedWeights) is the fastest or tied.
DEFAULT_GRAD_SAMPLE_MODE = "ew"
# Models are clipped 1e-3 below C (the noise stays sigma x C), so that one patient moves the noised
# sum by at most C, as accounted: in hooks/functorch/ew mode the norms, clipping and sum are float64
# and what the margin must pay for is the noise grid, sqrt(parameters) x 2^-30 C (provably, for up to
# 2.9e11 parameters); in ghost mode it also pays for Opacus' float32 norms and float32 sum, which
# have no such bound: measured, a resnet18 patient's clipped gradient came out 4.4e-5 above the clip
# (benchmarks/results/dp_float.md), 4% of the margin.
CLIP_MARGIN = 1e-3

# torch warns that the first layer's full backward hook fires with no input gradient (images never
# require grad); that is how Opacus' hooks always run, so this one message is noise.
FIRST_LAYER_HOOK_WARNING = r"Full backward hook is firing when gradients are computed"


def check_grad_sample_mode(mode: str) -> None:
    if mode not in GRAD_SAMPLE_MODES:
        raise ConfigError(unknown_name("grad_sample_mode", "mode", mode, GRAD_SAMPLE_MODES))


def grad_sample_module(model: nn.Module, mode: str, max_grad_norm: float) -> nn.Module:
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

    Exact under any weights (issue 25): a patient whose gradient has a non-finite norm, or one above
    MAX_NORM_RATIO x C, or whose class label is outside the model's outputs (in_range_targets), adds
    exactly zero, in every mode; nothing in a step raises on a patient's data. Norms, clipping and
    the sum are float64 (ghost mode: Opacus' float32 norms and sum); the noise is float64 and the
    noised sum is formed on a grid and rounded once (noised_sum). `kept` counts the patients whose
    gradient counted, over all steps: like the loss, a figure for the site alone.

    `physical_batch` P: every step runs the model on batches of exactly P rows, the drawn patients
    followed by zero rows that count as zero (masked before clipping), so the work does not depend on
    how many patients were drawn; more than P are run as several batches of P, summed before the
    noise. None: the drawn batch as it is (a batch of 0 skips the model).

    `after_noise()`, if given, runs after the noisy gradient is in each `p.grad` and before the
    optimizer's step: a data-independent change to the gradient there (FedProx's proximal term,
    SCAFFOLD's correction) is post-processing and costs no privacy.

    The noise is drawn from `generator` only (a site's secret one: see privmed.federation.client),
    so a run is reproducible from the site's key: torch's Mersenne Twister (seeded from the key),
    not a CSPRNG.

    So that the sensitivity is at most C as the accountant assumes, the clip is C x (1 -
    CLIP_MARGIN) while the noise stays noise_multiplier x C, for float32 models and for any model
    with noise; the margin pays for the grid (sqrt(parameters) x 2^-30 C), and in ghost mode for
    Opacus' float32 norms and sum (measured 4.4e-5 relative on resnet18: see CLIP_MARGIN). Float64
    models without noise (tests' references) clip exactly at C.

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
        physical_batch: int | None = None,
    ):
        if not (0 <= noise_multiplier <= MAX_NOISE_MULTIPLIER):
            raise ValueError(
                f"noise_multiplier must be in [0, {MAX_NOISE_MULTIPLIER:g}], got {noise_multiplier!r}"
            )
        if not (0 < max_grad_norm < math.inf):
            raise ValueError(f"max_grad_norm must be finite and > 0, got {max_grad_norm!r}")
        if not expected_batch_size > 0:
            raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size!r}")
        if physical_batch is not None and not (
            isinstance(physical_batch, int) and 1 <= physical_batch <= MAX_BATCH
        ):
            raise ValueError(
                f"physical_batch must be an integer in 1..{MAX_BATCH} or None, got {physical_batch!r}"
            )
        check_grad_sample_mode(grad_sample_mode)
        validate_model(model)
        self.model = model
        self.mode = grad_sample_mode
        self.physical_batch = physical_batch
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        _check_criterion(self.criterion, grad_sample_mode)
        model.train()
        exact = all(p.dtype == torch.float64 for p in model.parameters()) and noise_multiplier == 0
        self.clip = max_grad_norm * (1.0 if exact else 1.0 - CLIP_MARGIN)
        _check_grid(model, self.clip, max_grad_norm, noise_multiplier)
        self._gsm: nn.Module | None = grad_sample_module(model, grad_sample_mode, self.clip)
        optimizer_class = ExactFastGradientClipping if self.ghost else ExactDPOptimizer
        self.optimizer = optimizer_class(
            optimizer,
            noise_multiplier=noise_multiplier * max_grad_norm / self.clip,
            max_grad_norm=self.clip,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=generator,
            secure_mode=False,
        )
        # Per-patient losses from a copy with reduction "none" (the caller's criterion is left as it
        # was); None for a criterion without a reduction (refused in ghost mode).
        self._row_loss = None
        if hasattr(self.criterion, "reduction"):
            self._row_loss = copy.copy(self.criterion)
            self._row_loss.reduction = "none"
        if after_noise is not None:  # Opacus calls it between the noise and the optimizer's step
            self.optimizer.attach_step_hook(lambda _optimizer: after_noise())

    @property
    def ghost(self) -> bool:
        return self.mode == "ghost"

    @property
    def kept(self) -> int:
        return self.optimizer.kept

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One DP step on the batch x (B, C, H, W), y (B,), B >= 0; returns the summed loss of the
        batch's patients (0.0 when B == 0; inf or NaN when one's is)."""
        if self._gsm is None:
            raise RuntimeError("DPSGD is closed")
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} items but y has {len(y)}")
        if len(x) > MAX_BATCH:
            raise ValueError(f"a batch of {len(x)} items is more than {MAX_BATCH}")
        if self.physical_batch is None:
            loss_sum = self._backward(x, y, None) if len(x) else self._empty_backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return loss_sum
        p = self.physical_batch
        starts = range(0, max(len(x), 1), p)
        loss_sum = 0.0
        for k, start in enumerate(starts):
            xb, yb, mask = _padded(x[start : start + p], y[start : start + p], p)
            loss_sum += self._backward(xb, yb, mask)
            if k < len(starts) - 1:  # Opacus' virtual step: clip and add up, no noise yet
                self.optimizer.signal_skip_step(True)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss_sum

    def _backward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> float:
        """Leaves per-sample gradients (or, in ghost mode, the summed clipped gradient) on the params,
        and which rows count (`mask`: the real ones, None: all) for the optimizer's clipping."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=FIRST_LAYER_HOOK_WARNING, category=UserWarning)
            out = self._gsm(x)
            y, valid = in_range_targets(out, y)
            mask = valid if mask is None else mask & valid
            if self.ghost:
                return self._ghost_backward(x, y, out, mask)
            losses = self._row_losses(out, y)
            loss = losses.mean() if losses is not None else self.criterion(out, y)
            loss.backward()
        self.optimizer.row_mask = mask
        if losses is None:
            return loss.item() * int(mask.sum())
        return losses.detach()[mask].sum().item()

    def _row_losses(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """(B,) per-patient losses, or None where the criterion gives none."""
        if self._row_loss is None:
            return None
        losses = self._row_loss(out, y)
        return losses if tuple(losses.shape) == (len(out),) else None

    def _ghost_backward(
        self, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, mask: torch.Tensor
    ) -> float:
        """Ghost clipping in two passes, as Opacus' DPTensorFastGradientClipping does, made exact.
        Pass 1 (Opacus' hooks) gives each row's gradient norm. Pass 2 takes the gradient of
        sum_i coefficient_i x loss_i, with coefficient 0 for rows that count as zero; as 0 x inf is
        NaN in backpropagation, those rows are first replaced by a copy of a row that counts (its
        forward values are then bitwise those of pass 1, same batch shape), and pass 2 runs on a
        fresh forward pass of that batch in every step, so the work does not depend on who counts.
        Its upstream coefficients are scaled by 2^-ceil(log2 B) <= 1/B (pass 1's), so that no value
        of pass 2 exceeds pass 1's, and the sum is scaled back exactly."""
        losses = self._row_loss(out, y)
        self._check_per_patient_losses(losses, len(x))
        losses.mean().backward()
        norms = self._gsm.get_norm_sample().detach().double()
        keep = kept_rows(norms, self.clip, mask)
        coefficients = clip_factors(norms, self.clip, keep)
        params = self.optimizer.params
        for p in params:
            p.grad = None
        b = len(x)
        first = torch.argmax(keep.to(torch.uint8))  # a row that counts (row 0 when none does)
        rows = torch.where(keep, torch.arange(b, device=keep.device), first)
        scale = math.ldexp(1.0, -math.ceil(math.log2(b)))
        self._gsm.disable_hooks()
        try:
            second = self._row_loss(self._gsm(x[rows]), y[rows])
            (second * (coefficients * scale).to(second.dtype)).sum().backward()
        finally:
            self._gsm.enable_hooks()
        counted = keep.any()
        for p in params:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = torch.where(counted, grad / scale, torch.zeros_like(grad))
        self.optimizer.kept += int(keep.sum())
        return losses.detach()[mask].sum().item()

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


def _padded(x: torch.Tensor, y: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, ...), y (B, ...) with B <= p, followed by p - B zero rows; and the (p,) bool mask of the
    real rows."""
    b = len(x)
    x = torch.cat([x, x.new_zeros((p - b, *x.shape[1:]))])
    y = torch.cat([y, y.new_zeros((p - b, *y.shape[1:]))])
    return x, y, torch.arange(p, device=x.device) < b


def _check_grid(model: nn.Module, clip: float, max_grad_norm: float, noise_multiplier: float) -> None:
    """ConfigError if the grid of noised_sum would raise one patient's influence above C: the clipped
    gradient (clip) plus sqrt(parameters) x grid must stay at most max_grad_norm."""
    if noise_multiplier == 0:
        return
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if clip * (1 + 1e-12) + math.sqrt(d) * grid_spacing(clip) > max_grad_norm:
        raise ConfigError(
            f"model.name: {d} trainable parameters are too many for DP-SGD's exact noise grid "
            f"(sqrt(parameters) x 2^-{GRID_BITS} must stay below CLIP_MARGIN {CLIP_MARGIN})"
        )

"""DP-SGD at a site (Abadi et al. 2016) through Opacus: Poisson-sampled batches, each sample's gradient
clipped to L2 norm C, Gaussian noise of std sigma*C added to the sum, divided by the expected batch size.

    validate_model(model)                                   ConfigError naming the layer and the fix
    poisson_batches(n, q, steps, generator)                 index tensors, each item in with probability q
    physical_batch_size(n, q)                               the fixed batch a Poisson batch is padded to
    DPSGD(model, optimizer, noise_multiplier=, max_grad_norm=, expected_batch_size=, generator=)
        .step(x, y)                                         one DP step (x may hold no items)
        .close()                                            model back to a plain nn.Module
    dp_train(model, x, y, steps=, sample_rate=, ...)        one site's local DP training, in memory

Pure: nothing here knows about rounds, runners or files. Per-sample gradients come from Opacus'
GradSampleModule (`grad_sample_mode` "hooks", "functorch", "ew") or its ghost-clipping module
("ghost"); clipping, noise and scaling are Opacus' DPOptimizer stages, with the clipping and noise
stages overridden to be exact under any weights (ExactDPOptimizer): a patient whose gradient is not
finite counts as zero, norms and sums are float64, and the noise is float64 on a grid, rounded once.
Every mode clips per patient: ghost mode needs the criterion's per-patient losses (reduction
"none"), and a criterion that cannot give them (or, like the Cox loss, has none) is refused, not run.
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
# Models are clipped 1e-3 below C (the noise stays sigma x C), so that one patient moves the noised
# sum by at most C, as accounted: in hooks/functorch/ew mode the norms, clipping and sum are float64
# and what the margin must pay for is the noise grid, sqrt(parameters) x 2^-30 C (provably, for up to
# 2.9e11 parameters); in ghost mode it also pays for Opacus' float32 norms and float32 sum, which
# have no such bound: measured, a resnet18 patient's clipped gradient came out 4.4e-5 above the clip
# (benchmarks/results/dp_float.md), 4% of the margin.
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
# Exact arithmetic: what reaches the noise depends on one patient only through that patient's clipped
# gradient, whatever weights the coordinator sent (issue 25). Every rule here is applied to each
# patient's own gradient alone (like clipping) or to the noisy sum alone (post-processing).

# A per-sample gradient whose L2 norm is not finite (an inf or NaN entry, from weights crafted to
# overflow on one patient), or above MAX_NORM_RATIO x C, counts as zero. Opacus would multiply it by a
# NaN or zero clip factor, and 0 x inf is NaN: the whole sum, and so the release, would be NaN exactly
# when that patient is drawn. Above 2^100 x C a clip factor is below 2^-100, and ghost clipping's
# float32 coefficients (scaled by 2^-ceil(log2 B) >= 2^-21 in its second pass) would turn subnormal,
# losing the bits that keep a clipped gradient within C. No honest gradient comes near 1.3e30 x C.
MAX_NORM_RATIO = 2.0**100
# The noised sum is formed on a grid: the clipped sum (float64) is rounded to a multiple of GRID = the
# largest power of two <= C, times 2^-GRID_BITS, the float64 Gaussian noise (noised_sum) is rounded
# to one, and the two integers are added exactly (both below 2^53 for batches of up to MAX_BATCH patients and
# noise multipliers up to MAX_NOISE_MULTIPLIER). So the output is m(S) + round(N / GRID): a fixed
# function of the exact-arithmetic Gaussian mechanism on m(S), whose sensitivity is at most the
# clipped one plus sqrt(parameters) x GRID (<= 1e-6 C below 1e6 parameters), which CLIP_MARGIN pays
# for. Rounding once to float32 afterwards is post-processing. Float32 noise added in float32 (Opacus)
# instead lets the low bits of the output tell whether a coordinate's sum was 0 (Jin et al. 2022).
GRID_BITS = 30
MAX_BATCH = 2**21
MAX_NOISE_MULTIPLIER = 2.0**16
# The least noise multiplier a site accepts for a DP-SGD release. The sampler (noised_sum: two
# float64 draws) cannot reach past about 12.1 standard deviations; a coordinate beyond that from the
# clipped sum without a patient could only come from the sum with them, which happens with
# probability about Phi(-(12.1 - 1 / sigma)) per coordinate and step: 1e-19 at sigma 0.2, 0.018 at
# 0.1. Below this floor that leak is not negligible beside delta, so the site refuses.
MIN_NOISE_MULTIPLIER = 0.2
# dp_train's fixed physical batch: P(a Poisson batch of the site's patients exceeds it) per step.
# Only such a step takes longer (two physical batches), so the time tells at most that it happened.
PAD_TAIL = 1e-9
_SCRATCH = 2**22  # float64 values converted at once when clipping (32 MiB)


class Float64Scratch:
    """A float64 buffer reused from step to step, into which per-sample gradients are converted row
    block by row block: a fresh 50 MB tensor each step costs more in page faults than the arithmetic
    (measured 3x on dpcnn at B 256)."""

    def __init__(self, limit: int = _SCRATCH):
        self.limit = limit
        self._buffer = torch.empty(0, dtype=torch.float64)

    def rows(self, g: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
        """(rows, float64 copy (r, d) of g[rows] flattened) for consecutive row blocks of g (B, ...);
        each copy is overwritten by the next."""
        b, d = len(g), math.prod(g.shape[1:])
        flat = g.reshape(b, d)
        per = max(1, self.limit // max(d, 1))
        for start in range(0, b, per):
            rows = slice(start, min(start + per, b))
            n = (rows.stop - rows.start) * d
            if self._buffer.numel() < n or self._buffer.device != g.device:
                size = max(n, min(self.limit, b * d))
                self._buffer = torch.empty(size, dtype=torch.float64, device=g.device)
            block = self._buffer[:n].view(rows.stop - rows.start, d)
            block.copy_(flat[rows])
            yield rows, block


def per_sample_norms(grad_samples: list[torch.Tensor], scratch: Float64Scratch | None = None) -> torch.Tensor:
    """(B,) float64 L2 norms over all parameters of per-sample gradients [(B, *p.shape), ...] of any
    float dtype, computed in float64 (float32 squares can neither overflow nor underflow there, and
    the sum is exact to ~1e-16 relative, where Opacus' float32 norms come out low by up to 1e-4 on
    large layers); inf or NaN for a sample with a non-finite entry."""
    scratch = scratch or Float64Scratch()
    b = len(grad_samples[0]) if grad_samples else 0
    squares = torch.zeros(b, dtype=torch.float64, device=grad_samples[0].device if grad_samples else None)
    for g in grad_samples:
        for rows, block in scratch.rows(g):
            squares[rows] += torch.linalg.vector_norm(block, dim=1).square()
    return squares.sqrt()


def kept_rows(norms: torch.Tensor, clip: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) bool: the samples whose gradient counts, those with a finite norm of at most
    MAX_NORM_RATIO x clip (and `mask`, e.g. not padding); the others count as zero."""
    keep = torch.isfinite(norms) & (norms <= MAX_NORM_RATIO * clip)
    return keep if mask is None else keep & mask.to(keep.device)


def clip_factors(norms: torch.Tensor, clip: float, keep: torch.Tensor) -> torch.Tensor:
    """(B,) float64: Opacus' clip factor min(1, clip / (norm + 1e-6)) for kept samples, 0 for the
    others. A kept sample's clipped gradient has norm <= clip (1 + 2^-52)."""
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    return torch.where(keep, factors, torch.zeros_like(factors))


def clipped_sum(
    grad_sample: torch.Tensor, factors: torch.Tensor, scratch: Float64Scratch | None = None
) -> torch.Tensor:
    """sum_i factors[i] x grad_sample[i] in float64, shape grad_sample.shape[1:], from per-sample
    gradients (B, ...) of any float dtype, with every factor 0 where a row is not finite (as
    clip_factors gives them). Such a row adds exactly 0: its inf and NaN entries are zeroed first (0 x
    inf is NaN), in a pass over every row, so that the cost does not depend on how many there are."""
    scratch = scratch or Float64Scratch()
    total = torch.zeros(math.prod(grad_sample.shape[1:]), dtype=torch.float64, device=grad_sample.device)
    for rows, block in scratch.rows(grad_sample):
        block.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        total.addmv_(block.t(), factors[rows].to(block.device))
    return total.view(grad_sample.shape[1:])


def grid_spacing(clip: float) -> float:
    """The grid the noised sum is formed on: the largest power of two <= clip, times 2^-GRID_BITS."""
    return math.ldexp(1.0, math.frexp(clip)[1] - 1 - GRID_BITS)


def noised_sum(total: torch.Tensor, std: float, grid: float, generator: torch.Generator) -> torch.Tensor:
    """float64 `total` + N(0, std^2) per coordinate: round(total / grid) + round(N / grid), times
    grid, all exact in float64; `total` itself (in float64) when std is 0: no noise, no grid.

    N is the sum of two float64 draws of std / sqrt(2) from `generator` only. torch draws a normal by
    Box-Muller from one uniform u1 of 24 bits (float32) or 53 (float64), so |N| <= 5.77 std (float32)
    or 8.57 std (one float64 draw): a release beyond that of the sum without a patient is proof of
    the patient, which happens with probability Phi(-(5.77 - 1/sigma)), 9e-7 a step at sigma 1, for
    float32. The sum of two reaches 12.1 std (Phi(-11.1) at sigma 1), and smooths Box-Muller's
    coarse tail (as Opacus' secure_mode sums four float32 draws)."""
    total = total.double()
    if std == 0:
        return total
    half = std / math.sqrt(2.0)
    noise = torch.normal(0.0, half, size=total.shape, dtype=torch.float64, generator=generator,
                         device=total.device)
    noise += torch.normal(0.0, half, size=total.shape, dtype=torch.float64, generator=generator,
                          device=total.device)
    return (torch.round(total / grid) + torch.round(noise / grid)) * grid


class _ExactNoise:
    """Opacus' add_noise stage, with the noise of noised_sum: the sum + float64 noise, on the grid,
    rounded once to the parameter's dtype."""

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        grid = grid_spacing(self.max_grad_norm)
        for p in self.params:
            p.grad = noised_sum(p.summed_grad, std, grid, self.generator).to(p.dtype).view_as(p)


class ExactDPOptimizer(_ExactNoise, DPOptimizer):
    """Opacus' DPOptimizer with exact clipping (per_sample_norms, kept_rows, clip_factors,
    clipped_sum: float64, non-finite gradients count as zero) and noise (noised_sum). Before each
    step the caller may set `row_mask` (B,) bool: rows outside it (padding, invalid targets) count
    as zero too. `kept` counts the rows that counted, over all steps."""

    row_mask: torch.Tensor | None = None
    kept: int = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._scratch = Float64Scratch()

    def clip_and_accumulate(self) -> None:
        samples = self.grad_samples
        norms = per_sample_norms(samples, self._scratch)
        keep = kept_rows(norms, self.max_grad_norm, self.row_mask)
        factors = clip_factors(norms, self.max_grad_norm, keep)
        for p, g in zip(self.params, samples):
            s = clipped_sum(g, factors, self._scratch)
            p.summed_grad = s if p.summed_grad is None else p.summed_grad + s
        self.kept += int(keep.sum())
        self.row_mask = None


class ExactFastGradientClipping(_ExactNoise, DPOptimizerFastGradientClipping):
    """Opacus' optimizer for ghost clipping with the noise of noised_sum (DPSGD clips in two passes
    itself: see DPSGD._ghost_backward)."""

    kept: int = 0


def in_range_targets(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, (B,) bool rows): integer class targets y (B, ...) for outputs out (B, K, ...) with any
    label outside 0..K-1 (0..1 for one logit) set to 0, and which rows had all labels in range.
    Cross-entropy (and MONAI's one-hot) raise on such a label: an error raised only when that patient
    is drawn would itself be a reply that depends on the patient, so the patient's gradient counts
    as zero instead. Other targets (float: images, times) come back unchanged, every row valid."""
    rows = torch.ones(len(y), dtype=torch.bool, device=y.device)
    if y.dtype.is_floating_point or y.dtype == torch.bool or out.ndim != y.ndim + 1:
        return y, rows
    top = 1 if out.shape[1] == 1 else out.shape[1] - 1
    ok = (y >= 0) & (y <= top)
    return torch.where(ok, y, torch.zeros_like(y)), ok.reshape(len(y), -1).all(dim=1)


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
        self._gsm: nn.Module | None = _prepare(model, grad_sample_mode, self.clip)
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
            warnings.filterwarnings("ignore", message=_FIRST_LAYER_HOOK_WARNING, category=UserWarning)
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
    constant_work: bool = True,
) -> dict[str, float | int | bool | None]:
    """Train `model` in place for `steps` DP-SGD steps on x (N, ...) items, y (N, ...) targets, with
    Poisson batches of rate `sample_rate` and a fresh optimizer.

    The privacy unit is the patient: `patients` (N,) gives each item's patient (None: one item per
    patient). Patients are sampled, each bringing one of its items (`patient_batches`); the expected
    batch size is sample_rate x patients.

    `criterion` (default cross-entropy, reduction mean) and `after_noise` are DPSGD's.
    `expected_batch_size`: what the noisy sum is divided by, a public constant (default: sample_rate
    x the patients in x; an auditor whose canaries join x keeps the site's own count).
    `augment(x_batch, generator)` transforms each drawn batch (per item, so privacy is unaffected).
    `constant_work`: every step runs on DPSGD's fixed physical batch of
    physical_batch_size(patients, sample_rate) rows, so that the time a turn takes does not follow
    the batch sizes drawn (False: each drawn batch as it is).
    Batches, augmentation and noise all draw from `generator`, in that order per step: same seed,
    bitwise the same weights. Afterwards `model` is a plain nn.Module again (no Opacus hooks), holding
    the trained weights under its usual state_dict keys.

    Weights that are not all finite are refused (ValueError) before any patient is touched. If the
    trained weights are not all finite (e.g. a finite noisy step overflowing weights sent near the
    float32 limit), `model` is given back the weights it started from: that choice is a function
    of the noisy gradients alone (post-processing), never an error. (Not "the noise alone": that
    reveals the noise together with the fact that noise + sum overflowed, which is not DP.)

    Returns, for the site alone (computed from its patients outside the mechanism, or a function of
    the release): train_loss (mean loss over the items drawn; NaN if none was), sample_gradient_steps
    (items drawn, summed over steps), optimizer_steps (= steps: empty batches count, as the accountant
    counts them), empty_batches, expected_batch_size, zeroed_gradients (drawn items whose gradient
    counted as zero: non-finite, huge, or a label outside the model's outputs), physical_batch (P, or
    None), oversized_batches (steps that drew more than P: only those took longer) and
    nonfinite_release (True when the starting weights were given back).
    """
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
    if expected_batch_size is None:
        expected_batch_size = sample_rate * n_patients
    physical = physical_batch_size(n_patients, sample_rate) if constant_work else None
    base = make_optimizer(model, optimizer, lr, momentum, weight_decay)
    total_loss, drawn, empty, oversized = 0.0, 0, 0, 0
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
        physical_batch=physical,
    ) as dp:
        for idx in batches:
            xb = x[idx]
            if augment is not None and len(idx):
                xb = augment(xb, generator)
            total_loss += dp.step(xb, y[idx])
            drawn += len(idx)
            empty += len(idx) == 0
            oversized += physical is not None and len(idx) > physical
        kept = dp.kept
    released = _all_finite(model.state_dict().values())
    if not released:
        model.load_state_dict(start)
    return {
        "train_loss": total_loss / drawn if drawn else math.nan,
        "sample_gradient_steps": drawn,
        "optimizer_steps": steps,
        "empty_batches": empty,
        "expected_batch_size": expected_batch_size,
        "zeroed_gradients": drawn - kept,
        "physical_batch": physical,
        "oversized_batches": oversized,
        "nonfinite_release": not released,
    }


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())

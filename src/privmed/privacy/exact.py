"""DP-SGD's clipping and noise made exact under any weights, as Opacus' DPOptimizer stages.

    per_sample_norms, kept_rows, clip_factors, clipped_sum   float64 clipping, non-finite rows as zero
    grid_spacing, noised_sum                                 float64 noise added on a grid, rounded once
    ExactDPOptimizer, ExactFastGradientClipping              Opacus' optimizers with those stages
    in_range_targets                                         class labels outside the outputs as zero
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

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
# clipped one plus sqrt(parameters) x GRID (<= 1e-6 C below 1e6 parameters), which dp_step.CLIP_MARGIN pays
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

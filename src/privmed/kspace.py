"""Single-coil Cartesian k-space, simulated from magnitude images: the maths that the reconstruction
data (privmed.data.recon), model (privmed.models.cascade) and task share. Imports only torch and
MONAI, no privmed module, so it sits below data, models and tasks; no files, no global random state.

    mask = cartesian_mask("random", 4, width=W, generator=g)          # (1, 1, 1, W) float32 0/1
    k = simulate_kspace(image, mask, noise_std=0.01, generator=g)     # (N, 2, H, W) real, imag
    baseline = zero_filled(k)                                         # (N, 1, H, W) magnitude
    x = pack_input(k, mask)                                           # (N, 3, H, W) what a model reads
    k, mask = unpack_input(x)                                         # (N, 2, H, W), (N, 1, H, W)

Conventions (those of fastMRI and MONAI's `fftn_centered_t`):
- Complex tensors live in "channel form": (N, 2, H, W) float32, channel 0 the real part and channel 1
  the imaginary part, so k-space fits privmed's (N, C, H, W) float32 image arrays.
- The 2D FFT is centred (the zero frequency at index (H // 2, W // 2)) and orthonormal
  (`norm="ortho"`): it preserves the sum of squares, so noise of std s per k-space entry is noise of
  std s per pixel after the inverse transform at full sampling.
- The phase-encode direction is the last axis (W): a mask selects whole lines k[:, :, :, j] (all H
  readout samples of column j), as a Cartesian scanner skips phase-encode steps.
- Simulating k-space from real magnitude images gives Hermitian-symmetric k-space, which real scans
  do not have (they carry phase): a reconstruction learned here is optimistic for real raw data
  (Shimron et al., PNAS 2022, "implicit data crimes"). The task compares methods on equal terms.
"""

from __future__ import annotations

import torch
from monai.apps.reconstruction.transforms.array import EquispacedKspaceMask, RandomKspaceMask
from monai.networks.blocks.fft_utils_t import fftn_centered_t, ifftn_centered_t

MASK_KINDS = ("random", "equispaced")
ACCELERATIONS = (4, 6, 8)
# fastMRI's centre fractions: 0.08 at 4x, 0.04 at 8x, i.e. 0.32 / acceleration (6x: 0.053).
CENTER_FRACTION_TIMES_ACCELERATION = 0.32
_SEED_RANGE = 2**31 - 1  # MONAI transforms take a seed below 2**32; any int32 will do

_MASK_TRANSFORMS = {"random": RandomKspaceMask, "equispaced": EquispacedKspaceMask}


def default_center_fraction(acceleration: float) -> float:
    """fastMRI's fully sampled centre for an acceleration: 0.32 / acceleration (4x: 0.08, 8x: 0.04)."""
    return CENTER_FRACTION_TIMES_ACCELERATION / acceleration


def fft2c(image: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D FFT in channel form: (N, 2, H, W) image -> (N, 2, H, W) k-space."""
    return _from_last(fftn_centered_t(_to_last(image), spatial_dims=2, is_complex=True))


def ifft2c(kspace: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal inverse 2D FFT in channel form: (N, 2, H, W) -> (N, 2, H, W) image."""
    return _from_last(ifftn_centered_t(_to_last(kspace), spatial_dims=2, is_complex=True))


def complex_abs(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Magnitude of a channel-form complex tensor: (N, 2, H, W) -> (N, 1, H, W).

    eps > 0 (e.g. 1e-12) keeps the gradient finite where the magnitude is 0; it adds at most
    sqrt(eps) to the magnitude."""
    return torch.sqrt(x.pow(2).sum(dim=1, keepdim=True) + eps)


def real_to_complex(image: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) real image -> (N, 2, H, W) channel form with a zero imaginary part."""
    return torch.cat([image, torch.zeros_like(image)], dim=1)


def cartesian_mask(
    kind: str,
    acceleration: float,
    center_fraction: float | None = None,
    *,
    width: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """One undersampling pattern over `width` phase-encode lines: (1, 1, 1, width) float32 of 0/1.

    kind "random": the `center_fraction * width` central lines (rounded), plus every other line with
    the probability that makes the expected number of lines width / acceleration (fastMRI's
    RandomMaskFunc). kind "equispaced": the same centre plus lines spaced so that the total is about
    width / acceleration, from a random offset (fastMRI's EquispacedMaskFunc). Both are MONAI's
    `RandomKspaceMask` / `EquispacedKspaceMask`, seeded from one draw of `generator`.
    center_fraction None: fastMRI's `default_center_fraction(acceleration)`.
    """
    if kind not in _MASK_TRANSFORMS:
        raise ValueError(f"kind: '{kind}' is not a mask kind (allowed: {', '.join(MASK_KINDS)})")
    if not acceleration > 1:
        raise ValueError(f"acceleration: {acceleration} must be > 1 (4 samples 1 line in 4)")
    if center_fraction is None:
        center_fraction = default_center_fraction(acceleration)
    if not 0 < center_fraction < 1 / acceleration:
        raise ValueError(
            f"center_fraction: {center_fraction} must lie in (0, 1/acceleration = {1 / acceleration:.3f})"
        )
    transform = _MASK_TRANSFORMS[kind](
        center_fractions=[center_fraction], accelerations=[acceleration], spatial_dims=2, is_complex=True
    )
    seed = int(torch.randint(_SEED_RANGE, (1,), generator=generator))
    transform.set_random_state(seed=seed)  # a local numpy RandomState: global state untouched
    transform(torch.zeros(1, 1, width, 2))  # (coils, H=1, W, re/im): the mask is drawn along W
    return transform.mask.reshape(1, 1, 1, width).to(torch.float32)


def simulate_kspace(
    image: torch.Tensor, mask: torch.Tensor, noise_std: float, generator: torch.Generator
) -> torch.Tensor:
    """Undersampled, noisy single-coil k-space of magnitude images.

    image: (N, 1, H, W) real, in [0, 1]. mask: (N, 1, 1, W) or (1, 1, 1, W), 1 = line acquired.
    noise_std: std of the complex Gaussian noise added to each k-space entry, E|n|^2 = noise_std^2
    (real and imaginary parts each N(0, noise_std^2 / 2)); as the FFT is orthonormal, it is also the
    per-pixel noise std of a fully sampled reconstruction, in units of the image's [0, 1] intensity.
    Returns (N, 2, H, W) float32: real and imaginary parts, 0 on the lines not acquired.
    """
    if image.dim() != 4 or image.shape[1] != 1:
        raise ValueError(f"image: expected (N, 1, H, W), got {tuple(image.shape)}")
    if mask.dim() != 4 or mask.shape[1:3] != (1, 1) or mask.shape[3] != image.shape[3]:
        raise ValueError(f"mask: expected (N or 1, 1, 1, {image.shape[3]}), got {tuple(mask.shape)}")
    if noise_std < 0:
        raise ValueError(f"noise_std: {noise_std} must be >= 0")
    kspace = fft2c(real_to_complex(image.to(torch.float32)))
    if noise_std > 0:
        noise = torch.randn(kspace.shape, generator=generator, dtype=kspace.dtype)
        kspace = kspace + noise * (noise_std / 2**0.5)
    return kspace * mask.to(kspace.dtype)


def zero_filled(kspace: torch.Tensor) -> torch.Tensor:
    """The baseline: magnitude of the inverse FFT with missing lines left at 0.
    (N, 2, H, W) channel-form k-space -> (N, 1, H, W)."""
    return complex_abs(ifft2c(kspace))


def pack_input(kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What a reconstruction model reads, one array per item: channels [k_re, k_im, mask].
    kspace (N, 2, H, W), mask (N or 1, 1, 1, W) -> (N, 3, H, W) float32; each item carries its own
    mask, so items from scanners with different masks or accelerations share a batch."""
    n, _, h, w = kspace.shape
    return torch.cat([kspace, mask.to(kspace.dtype).expand(n, 1, h, w)], dim=1)


def unpack_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack_input`: (N, 3, H, W) -> (k-space (N, 2, H, W), mask (N, 1, H, W))."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected packed input (N, 3, H, W) [k_re, k_im, mask], got {tuple(x.shape)}")
    return x[:, :2], x[:, 2:3]


# Stacking, not permuting, moves re/im between the channel axis and the last axis: the gradients
# then flow back contiguous, which torch's expanded-weights convolutions (Opacus' "ew" mode) need
# (a permute's gradient reaches them channels-last, and they fail with "view size is not compatible").


def _to_last(x: torch.Tensor) -> torch.Tensor:
    """(N, 2, H, W) -> (N, H, W, 2), contiguous, as view_as_complex (inside MONAI) needs."""
    return torch.stack([x[:, 0], x[:, 1]], dim=-1)


def _from_last(x: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 2) -> (N, 2, H, W)."""
    return torch.stack([x[..., 0], x[..., 1]], dim=1)


def undersample(
    image: torch.Tensor,
    *,
    kind: str,
    acceleration: float,
    center_fraction: float | None = None,
    noise_std: float = 0.0,
    generator: torch.Generator,
) -> torch.Tensor:
    """A scanner's acquisition of magnitude images, ready for a model: (N, 1, H, W) in [0, 1] ->
    packed (N, 3, H, W) [k_re, k_im, mask]. Each item gets its own mask (a fresh draw of
    `cartesian_mask`, as each acquisition of a random-mask scanner differs), then noise as in
    `simulate_kspace`; all randomness from `generator`, masks first, then noise."""
    width = image.shape[3]
    masks = torch.cat(
        [
            cartesian_mask(kind, acceleration, center_fraction, width=width, generator=generator)
            for _ in range(image.shape[0])
        ]
    )
    return pack_input(simulate_kspace(image, masks, noise_std, generator), masks)

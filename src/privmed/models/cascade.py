"""A deep cascade of CNNs with data-consistency layers for single-coil MRI reconstruction
(Schlemper et al., "A Deep Cascade of Convolutional Neural Networks for Dynamic MR Image
Reconstruction", IEEE TMI 2017; their "D5-C5" is n_convs=5, n_cascades=5, width=64).

    model = cascade(in_channels=3, num_classes=1, image_size=120, width=32)
    image = model(pack_input(kspace, mask))      # (N, 3, H, W) -> (N, 1, H, W) magnitude

Starting from the zero-filled complex image x0 = IFFT(k0), each cascade i does
    x <- x + CNN_i(x)                     a residual CNN on the 2-channel complex image (re, im)
    x <- IFFT(DC(FFT(x), k0, mask))       data consistency in k-space
and the model returns |x|. The DC layer (`data_consistency`) is the noiseless one by default: the
acquired entries of k-space are replaced by the measurement, the rest keep the CNN's estimate. With
`dc_weight` = lambda > 0 it is Schlemper's noisy-data version, (k + lambda k0) / (1 + lambda) on the
acquired entries (lambda -> infinity is the noiseless one), with lambda FIXED: a learnable lambda
would be a bare parameter outside any layer Opacus knows, which its per-sample gradient hooks
cannot handle.

DP-ready: no normalisation (as in the paper; BatchNorm would mix samples, and the cascade's
residual CNNs need none at these depths), non-in-place LeakyReLU; the FFTs and DC have no
parameters, so Opacus' hooks see only Conv2d layers.
"""

from __future__ import annotations

import torch
from torch import nn

from privmed.kspace import complex_abs, fft2c, ifft2c, unpack_input

# Keeps the gradient of |x| finite at 0 (background pixels); adds at most 1e-6 to a magnitude.
_ABS_EPS = 1e-12


def data_consistency(
    kspace: torch.Tensor, measured: torch.Tensor, mask: torch.Tensor, weight: float | None = None
) -> torch.Tensor:
    """Schlemper's DC in k-space; all (N, 2, H, W) channel form, mask (N, 1, H, W) or broadcastable.

    weight None: acquired entries (mask 1) take the measurement, the others keep `kspace`.
    weight lambda > 0: acquired entries take (kspace + lambda * measured) / (1 + lambda)."""
    if weight is None:
        return (1 - mask) * kspace + mask * measured
    return (1 - mask) * kspace + mask * (kspace + weight * measured) / (1 + weight)


def residual_cnn(width: int, n_convs: int) -> nn.Sequential:
    """(N, 2, H, W) -> (N, 2, H, W): n_convs 3x3 convolutions (2 -> width -> ... -> width -> 2),
    LeakyReLU between them, none after the last (its output is added to the input)."""
    if n_convs < 2:
        raise ValueError(f"n_convs: {n_convs} must be >= 2 (one convolution in, one out)")
    chans = [2] + [width] * (n_convs - 1) + [2]
    layers: list[nn.Module] = []
    for i, (c_in, c_out) in enumerate(zip(chans[:-1], chans[1:])):
        layers.append(nn.Conv2d(c_in, c_out, 3, padding=1))
        if i < n_convs - 1:
            layers.append(nn.LeakyReLU(0.01))
    return nn.Sequential(*layers)


class DeepCascade(nn.Module):
    """(N, 3, H, W) packed [k_re, k_im, mask] (see `privmed.kspace.pack_input`) ->
    (N, 1, H, W) magnitude image. Any H, W: the network is fully convolutional."""

    def __init__(
        self, n_cascades: int = 5, n_convs: int = 5, width: int = 32, dc_weight: float | None = None
    ):
        super().__init__()
        if n_cascades < 1:
            raise ValueError(f"n_cascades: {n_cascades} must be >= 1")
        if dc_weight is not None and not dc_weight > 0:
            raise ValueError(f"dc_weight: {dc_weight} must be > 0, or None for noiseless DC")
        self.dc_weight = dc_weight
        self.cnns = nn.ModuleList(residual_cnn(width, n_convs) for _ in range(n_cascades))

    def complex_image(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction before the magnitude: (N, 3, H, W) -> (N, 2, H, W) (re, im)."""
        measured, mask = unpack_input(x)
        image = ifft2c(measured)  # the zero-filled complex image
        for cnn in self.cnns:
            image = image + cnn(image)
            image = ifft2c(data_consistency(fft2c(image), measured, mask, self.dc_weight))
        return image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return complex_abs(self.complex_image(x), eps=_ABS_EPS)


def cascade(
    in_channels: int = 3,
    num_classes: int = 1,
    image_size: int = 0,
    width: int = 32,
    n_cascades: int = 10,
    n_convs: int = 3,
    dc_weight: float | None = None,
) -> DeepCascade:
    """The registry's signature: in_channels must be 3 (packed k-space and mask) and num_classes 1
    (one magnitude image); image_size is not needed (fully convolutional). The default, 10
    cascades of 3 convolutions (104,340 parameters at width 32), beat zero-filling on held-out IXI
    subjects at 4x by 5.07 dB in benchmarks/recon_pilot.py, and costs less than 5 of 5."""
    if in_channels != 3:
        raise ValueError(
            f"in_channels: {in_channels}; the cascade reads 3 channels [k_re, k_im, mask] (pack_input)"
        )
    if num_classes != 1:
        raise ValueError(f"num_classes: {num_classes}; the cascade outputs 1 channel (a magnitude image)")
    return DeepCascade(n_cascades=n_cascades, n_convs=n_convs, width=width, dc_weight=dc_weight)

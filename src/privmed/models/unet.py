"""U-Nets for segmentation: MONAI's BasicUNet, made DP-ready (GroupNorm, LeakyReLU that is not in
place, upsampling by interpolation so that every trainable layer has an Opacus grad sampler).

    unet(in_channels=1, num_classes=3, image_size=128)    # (N, 1, H, W) -> (N, 3, H, W) logits
    unet3d(in_channels=1, num_classes=2, image_size=32)   # (N, 1, D, H, W) -> (N, 2, D, H, W) logits

Both halve each side four times: a side needs at least 16 pixels (voxels); a side that is not a
multiple of 16 is padded back up on the way out (MONAI's UpCat), so the output has the input's shape.
"""

from __future__ import annotations

from monai.networks.nets import BasicUNet
from torch import nn

DEFAULT_WIDTH = 16


def unet(in_channels: int, num_classes: int, image_size: int, width: int | None = None,
         spatial_dims: int = 2) -> nn.Module:
    """Five levels of `width` x (1, 2, 4, 8, 16) channels (16 by default: about 1.8M parameters in
    2D, 5.4M in 3D), GroupNorm of 8 groups (or fewer where a level has fewer channels)."""
    w = width or DEFAULT_WIDTH
    features = (w, 2 * w, 4 * w, 8 * w, 16 * w, w)
    return BasicUNet(
        spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes, features=features,
        act=("LeakyReLU", {"negative_slope": 0.1, "inplace": False}),
        norm=("group", {"num_groups": min(8, w)}),
        upsample="nontrainable",
    )


def unet3d(in_channels: int, num_classes: int, image_size: int, width: int | None = None) -> nn.Module:
    """`unet` on volumes (N, C, D, H, W): the same levels, norms and activations with 3D layers."""
    return unet(in_channels, num_classes, image_size, width, spatial_dims=3)

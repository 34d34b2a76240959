"""A 2D U-Net for segmentation: MONAI's BasicUNet, made DP-ready (GroupNorm, LeakyReLU that is not
in place, upsampling by interpolation so that every trainable layer has an Opacus grad sampler).

    unet(in_channels=1, num_classes=3, image_size=128)  # (N, 1, H, W) -> (N, 3, H, W) logits
"""

from __future__ import annotations

from monai.networks.nets import BasicUNet
from torch import nn

DEFAULT_WIDTH = 16


def unet(in_channels: int, num_classes: int, image_size: int, width: int | None = None) -> nn.Module:
    """Five levels of `width` x (1, 2, 4, 8, 16) channels (16 by default: about 1.8M parameters),
    GroupNorm of 8 groups (or fewer where a level has fewer channels)."""
    w = width or DEFAULT_WIDTH
    features = (w, 2 * w, 4 * w, 8 * w, 16 * w, w)
    return BasicUNet(
        spatial_dims=2, in_channels=in_channels, out_channels=num_classes, features=features,
        act=("LeakyReLU", {"negative_slope": 0.1, "inplace": False}),
        norm=("group", {"num_groups": min(8, w)}),
        upsample="nontrainable",
    )

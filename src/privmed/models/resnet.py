"""ResNet-18 (He et al. 2016) adapted to 28-224 px medical images, to 3D volumes and to DP-SGD.

Changes from the ImageNet network: GroupNorm instead of BatchNorm, no in-place activations, and a
stem chosen by image size (a 3x3 stride-1 stem without max-pool below 64 px, as MedMNIST's 28 px
ResNet does; the 7x7 stride-2 stem with max-pool from 64 px up).

"resnet18-3d" is the same network with 3x3x3 convolutions (MedMNIST v2's "ResNet-18 + 3D"), made
affordable on CPUs: width 16 by default (ResNet-18's is 64) and, below 64 voxels, a 3x3x3 stem of
stride 2 (stride 1 was 12 times slower: 165 against 14 s per epoch of VesselMNIST3D on one CPU
thread at width 16). MONAI's `resnet18(spatial_dims=3, norm=...)` would be the library's network,
but MONAI 1.6.1 passes `norm` and `act` only to the stem: its residual blocks keep BatchNorm and
in-place ReLUs, which DP-SGD cannot train (Project-MONAI/MONAI PR #9028).
"""

from __future__ import annotations

import torch
from torch import nn

from privmed.models.layers import conv_class, global_avg_pool, group_norm


class BasicBlock(nn.Module):
    """Two 3x3 (x3) convs with a residual; (N, c_in, *S) -> (N, c_out, *S / stride)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, spatial_dims: int = 2):
        super().__init__()
        conv = conv_class(spatial_dims)
        self.conv1 = conv(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = group_norm(c_out, 32)
        self.conv2 = conv(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = group_norm(c_out, 32)
        self.act = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                conv(c_in, c_out, 1, stride=stride, bias=False), group_norm(c_out, 32)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet18(nn.Module):
    """(N, in_channels, H, W) -> (N, num_classes) logits, or (N, in_channels, D, H, W) with
    spatial_dims 3."""

    def __init__(
        self, in_channels: int, num_classes: int, image_size: int = 28, width: int = 64,
        spatial_dims: int = 2,
    ):
        super().__init__()
        conv = conv_class(spatial_dims)
        if image_size < 64:
            stride = 2 if spatial_dims == 3 else 1  # see the module docstring
            self.stem = nn.Sequential(
                conv(in_channels, width, 3, stride=stride, padding=1, bias=False),
                group_norm(width, 32),
                nn.ReLU(),
            )
        else:
            pool = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
            self.stem = nn.Sequential(
                conv(in_channels, width, 7, stride=2, padding=3, bias=False),
                group_norm(width, 32),
                nn.ReLU(),
                pool(3, stride=2, padding=1),
            )
        chans = [width, 2 * width, 4 * width, 8 * width]
        layers, c_in = [], width
        for i, c in enumerate(chans):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(c_in, c, stride, spatial_dims), BasicBlock(c, c, 1, spatial_dims)]
            c_in = c
        self.layers = nn.Sequential(*layers)
        self.pool = global_avg_pool(spatial_dims)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet18(in_channels: int, num_classes: int, image_size: int = 28, width: int = 64) -> ResNet18:
    return ResNet18(in_channels, num_classes, image_size, width)


def resnet18_3d(in_channels: int, num_classes: int, image_size: int = 28, width: int = 16) -> ResNet18:
    """The registry's "resnet18-3d": ResNet18 on volumes (N, C, D, H, W), width 16 by default."""
    return ResNet18(in_channels, num_classes, image_size, width, spatial_dims=3)

"""ResNet-18 (He et al. 2016) adapted to 28-224 px medical images and to DP-SGD.

Changes from the ImageNet network: GroupNorm instead of BatchNorm, no in-place activations, and a
stem chosen by image size (a 3x3 stride-1 stem without max-pool below 64 px, as MedMNIST's 28 px
ResNet does; the 7x7 stride-2 stem with max-pool from 64 px up).
"""

from __future__ import annotations

import torch
from torch import nn

from privmed.models.layers import group_norm


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; (N, c_in, H, W) -> (N, c_out, H/stride, W/stride)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = group_norm(c_out, 32)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = group_norm(c_out, 32)
        self.act = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), group_norm(c_out, 32)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet18(nn.Module):
    """(N, in_channels, H, W) -> (N, num_classes) logits."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int = 28, width: int = 64):
        super().__init__()
        if image_size < 64:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                group_norm(width, 32),
                nn.ReLU(),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
                group_norm(width, 32),
                nn.ReLU(),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        chans = [width, 2 * width, 4 * width, 8 * width]
        layers, c_in = [], width
        for i, c in enumerate(chans):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(c_in, c, stride), BasicBlock(c, c)]
            c_in = c
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet18(in_channels: int, num_classes: int, image_size: int = 28, width: int = 64) -> ResNet18:
    return ResNet18(in_channels, num_classes, image_size, width)

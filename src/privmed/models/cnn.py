"""A small CNN for 28-224 px images: the fast default on CPUs.

Four stages of conv-GroupNorm-SiLU, each halving the resolution (the first one only from 64 px up),
then global average pooling and a linear head. About 0.1 M parameters at width 16.
"""

from __future__ import annotations

import torch
from torch import nn

from privmed.models.layers import conv_gn_act


class SmallCNN(nn.Module):
    """(N, in_channels, H, W) -> (N, num_classes) logits; H, W >= 8."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int = 28, width: int = 16):
        super().__init__()
        w = width
        # Larger images get a strided stem so the cost per image stays close to the 28 px cost.
        stem_stride = 1 if image_size < 64 else (2 if image_size < 128 else 4)
        self.features = nn.Sequential(
            conv_gn_act(in_channels, w, stride=stem_stride),
            conv_gn_act(w, w),
            conv_gn_act(w, 2 * w, stride=2),
            conv_gn_act(2 * w, 2 * w),
            conv_gn_act(2 * w, 4 * w, stride=2),
            conv_gn_act(4 * w, 4 * w),
            conv_gn_act(4 * w, 8 * w, stride=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))

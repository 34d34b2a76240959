"""Models for feature tables: (N, D) float32 features -> (N, num_classes) outputs.

    "linear"  one nn.Linear(D, num_classes): logistic regression (one logit, or K logits for a
              softmax), or the linear Cox model (one risk score) for survival, as FLamby's
              baselines for heart disease and TCGA-BRCA
    "mlp"     Linear(D, width) -> Tanh -> Linear(width, width) -> Tanh -> Linear(width, num_classes)

Both are DP-SGD ready as they are: no normalisation layers, nothing in place, and bounded (tanh)
activations, which Papernot et al. 2021 found to suit DP-SGD (see dpcnn.py). The registry's
`in_channels` is the number of features D; `image_size` is 0 for tables and ignored here.
"""

from __future__ import annotations

import torch
from torch import nn

from privmed.errors import ConfigError


class LinearModel(nn.Module):
    """(N, D) -> (N, num_classes): x @ W.T + b."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class MLP(nn.Module):
    """(N, D) -> (N, num_classes) through two tanh hidden layers of `width` units."""

    def __init__(self, in_features: int, num_classes: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, width),
            nn.Tanh(),
            nn.Linear(width, width),
            nn.Tanh(),
            nn.Linear(width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def linear(
    in_channels: int, num_classes: int, image_size: int = 0, width: int | None = None
) -> LinearModel:
    """The registry's "linear": `in_channels` features; it has no hidden layer, so no width."""
    if width is not None:
        raise ConfigError("model.width: 'linear' has no hidden layer; leave model.width out")
    return LinearModel(in_channels, num_classes)


def mlp(in_channels: int, num_classes: int, image_size: int = 0, width: int = 32) -> MLP:
    """The registry's "mlp": `in_channels` features, `width` units per hidden layer."""
    return MLP(in_channels, num_classes, width)

"""The torch optimizer a site trains with, DP or not.

    make_optimizer(model, name, lr, momentum=, weight_decay=)   a fresh "sgd" or "adam" optimizer
"""

from __future__ import annotations

import torch
from torch import nn

from privmed.errors import ConfigError

OPTIMIZERS = ("sgd", "adam")


def make_optimizer(
    model: nn.Module, name: str, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """A fresh "sgd" (with `momentum`) or "adam" optimizer over `model`'s parameters."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"training.optimizer: unknown optimizer '{name}' (known: {', '.join(OPTIMIZERS)})")

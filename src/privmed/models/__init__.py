"""Model registry: networks by name, all DP-ready (GroupNorm, no in-place activations).

    build_model("cnn", in_channels=1, num_classes=2, image_size=28)  -> nn.Module
Every model maps (N, C, H, W) float images to (N, num_classes) logits.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from privmed.errors import ConfigError, unknown_name
from privmed.models.cnn import SmallCNN
from privmed.models.dpcnn import TemperedSigmoidCNN
from privmed.models.resnet import resnet18

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "cnn": SmallCNN,
    "dpcnn": TemperedSigmoidCNN,
    "resnet18": resnet18,
}


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def check_model_name(name: str) -> None:
    if name not in _REGISTRY:
        raise ConfigError(unknown_name("model.name", "model", name, _REGISTRY))


def build_model(
    name: str, *, in_channels: int, num_classes: int, image_size: int, width: int | None = None
) -> nn.Module:
    """A freshly initialised model (initialise under torch.manual_seed for reproducibility)."""
    check_model_name(name)
    kwargs = {} if width is None else {"width": width}
    return _REGISTRY[name](
        in_channels=in_channels, num_classes=num_classes, image_size=image_size, **kwargs
    )

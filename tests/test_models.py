"""Models: the registry, shapes at every supported size, and DP-readiness (no BatchNorm, nothing
in place)."""

import pytest
import torch
from torch import nn

from privmed.errors import ConfigError
from privmed.models import build_model, model_names


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
@pytest.mark.parametrize("size", [28, 64, 128, 224])
def test_shapes_and_dp_ready(name, size):
    model = build_model(name, in_channels=3 if size == 64 else 1, num_classes=4, image_size=size)
    x = torch.rand(2, 3 if size == 64 else 1, size, size)
    assert model(x).shape == (2, 4)
    for m in model.modules():
        assert not isinstance(m, nn.modules.batchnorm._BatchNorm), f"{name}: {m}"
        assert not getattr(m, "inplace", False), f"{name}: in-place {m}"


def test_models_are_per_sample_independent():
    # GroupNorm normalises each sample alone: a sample's output must not depend on its batch mates
    # (BatchNorm would fail this, and with it per-sample gradients for DP-SGD).
    for name in model_names():
        model = build_model(name, in_channels=1, num_classes=2, image_size=28).train()
        x = torch.rand(4, 1, 28, 28)
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
        torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_unknown_model_suggests():
    with pytest.raises(ConfigError, match="did you mean 'resnet18'"):
        build_model("resnet-18", in_channels=1, num_classes=2, image_size=28)

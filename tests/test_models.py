"""Models: the registry, shapes at every supported size, and DP-readiness (no BatchNorm, nothing
in place); the 3D models, the tabular models and the normalisation-layer mask FedBN uses."""

import re

import pytest
import torch
from grad_samples import per_sample_gradients
from torch import nn

from privmed.errors import ConfigError
from privmed.models import (
    TABULAR_MODELS,
    VOLUME_MODELS,
    build_model,
    is_tabular_model,
    model_names,
    models_for,
    norm_state_mask,
    spatial_dims,
)
from privmed.privacy.dpsgd import validate_model


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
        if is_tabular_model(name):
            model = build_model(name, in_channels=5, num_classes=2, image_size=0).train()
            x = torch.randn(4, 5)
        elif name in VOLUME_MODELS:
            model = build_model(name, in_channels=1, num_classes=2, image_size=16, width=8).train()
            x = torch.rand(4, 1, 16, 16, 16)
        elif name == "cascade":  # packed k-space [re, im, mask] in, one magnitude image out
            model = build_model(name, in_channels=3, num_classes=1, image_size=16, width=8).train()
            x = torch.rand(4, 3, 16, 16)
            x[:, 2] = (x[:, 2] > 0.5).float()
        else:
            model = build_model(name, in_channels=1, num_classes=2, image_size=28).train()
            x = torch.rand(4, 1, 28, 28)
        # in float64, so that a batched convolution's other summation order cannot hide a real
        # dependence between samples (float32 differs by ~1e-4 on the 3-D ResNet)
        model, x = model.double(), x.double()
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
        torch.testing.assert_close(together, alone, rtol=1e-9, atol=1e-10)


def test_unknown_model_suggests():
    with pytest.raises(ConfigError, match="did you mean 'resnet18'"):
        build_model("resnet-18", in_channels=1, num_classes=2, image_size=28)


# ---------------------------------------------------------------------------------------------------
# 3D models


def test_registry_says_what_each_model_takes():
    assert VOLUME_MODELS == {"cnn3d", "resnet18-3d", "unet3d"} and VOLUME_MODELS <= set(model_names())
    assert models_for(3) == ["cnn3d", "resnet18-3d"]
    assert models_for(3, dense=True) == ["unet3d"]
    assert models_for(2) == ["cnn", "dpcnn", "resnet18"]
    assert models_for(2, dense=True) == ["cascade", "unet"]
    assert models_for(0) == sorted(TABULAR_MODELS)
    assert [spatial_dims(n) for n in ("cnn", "cnn3d", "mlp")] == [2, 3, 0]
    with pytest.raises(ConfigError, match="did you mean 'resnet18-3d'"):
        spatial_dims("resnet18_3d")


@pytest.mark.parametrize("name", models_for(3))
@pytest.mark.parametrize("size", [28, 64])
def test_volume_shapes_and_dp_ready(name, size):
    model = build_model(name, in_channels=1, num_classes=3, image_size=size)
    assert model(torch.rand(2, 1, size, size, size)).shape == (2, 3)
    assert any(isinstance(m, nn.Conv3d) for m in model.modules())
    assert not any(isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    validate_model(model)  # our checks, then Opacus' ModuleValidator's, layer by layer


def _loop_gradients(model, x, y):
    out = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    return out


@pytest.mark.parametrize(
    "name, mode",
    [("cnn3d", "ew"), ("cnn3d", "hooks"), ("cnn3d", "functorch"), ("resnet18-3d", "ew")],
)
def test_volume_per_sample_gradients_match_single_sample_backward(name, mode):
    # Opacus' per-sample gradients of Conv3d and GroupNorm, against one backward pass per volume; in
    # float64, so that a wrong gradient cannot hide in float32's rounding of sums over voxels
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, num_classes=2, image_size=12, width=8).double()
    x, y = torch.rand(4, 1, 12, 12, 12, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    got = per_sample_gradients(model, x, y, mode)
    loop = _loop_gradients(model, x, y)
    assert list(got) == [n for n, _ in model.named_parameters()]
    for n, g in got.items():
        expected = torch.stack([per_item[n] for per_item in loop])
        assert expected.abs().max() > 0, n  # every layer takes part
        torch.testing.assert_close(g, expected, rtol=1e-9, atol=1e-12, msg=f"{name} {mode} {n}")


# ---------------------------------------------------------------------------------------------------
# Tabular models


def test_tabular_registry():
    assert TABULAR_MODELS == {"linear", "mlp"} and TABULAR_MODELS <= set(model_names())
    assert is_tabular_model("linear") and is_tabular_model("mlp")
    assert not is_tabular_model("cnn") and not is_tabular_model("nope")


@pytest.mark.parametrize("name", sorted(TABULAR_MODELS))
@pytest.mark.parametrize("k", [1, 3])
def test_tabular_shapes_and_dp_ready(name, k):
    model = build_model(name, in_channels=7, num_classes=k, image_size=0)
    assert model(torch.randn(5, 7)).shape == (5, k)
    validate_model(model)
    for m in model.modules():
        assert not isinstance(m, nn.modules.batchnorm._BatchNorm)
        assert not getattr(m, "inplace", False)


def test_linear_is_x_w_plus_b_and_has_no_width():
    torch.manual_seed(0)
    model = build_model("linear", in_channels=4, num_classes=3, image_size=0)
    params = dict(model.named_parameters())
    assert [tuple(p.shape) for p in params.values()] == [(3, 4), (3,)]
    w, b = params.values()
    x = torch.randn(6, 4)
    torch.testing.assert_close(model(x), x @ w.T + b)
    with pytest.raises(ConfigError, match="model.width"):
        build_model("linear", in_channels=4, num_classes=1, image_size=0, width=16)


def test_mlp_layout_and_width():
    model = build_model("mlp", in_channels=6, num_classes=2, image_size=0)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(32, 6), (32,), (32, 32), (32,), (2, 32), (2,)]  # width 32 by default
    assert [type(m) for m in model.modules() if not list(m.children())] == [
        nn.Linear, nn.Tanh, nn.Linear, nn.Tanh, nn.Linear
    ]
    wide = build_model("mlp", in_channels=6, num_classes=2, image_size=0, width=8)
    assert [tuple(p.shape) for p in wide.parameters()][0] == (8, 6)


@pytest.mark.parametrize("name", sorted(TABULAR_MODELS))
def test_tabular_per_sample_gradients_match_per_item_autograd(name):
    torch.manual_seed(0)
    model = build_model(name, in_channels=5, num_classes=3, image_size=0)
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 2, 1, 0])
    got = per_sample_gradients(model, x, y, "ew")
    names = [n for n, _ in model.named_parameters()]
    assert list(got) == names
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(got[n][i], p.grad, rtol=1e-4, atol=1e-6, msg=f"{n} item {i}")


# ---------------------------------------------------------------------------------------------------
# norm_state_mask


@pytest.mark.parametrize(
    "name, pattern",
    [
        ("cnn", r"features\.\d+\.1\.(weight|bias)"),  # conv -> GroupNorm -> SiLU blocks
        ("resnet18", r"(stem\.1|layers\.\d+\.(norm1|norm2|shortcut\.1))\.(weight|bias)"),
    ],
)
def test_norm_state_mask_marks_group_norm_entries(name, pattern):
    model = build_model(name, in_channels=1, num_classes=2, image_size=28)
    keys = list(model.state_dict())
    mask = norm_state_mask(model)
    assert len(mask) == len(keys) and any(mask) and not all(mask)
    assert mask == [re.fullmatch(pattern, k) is not None for k in keys]
    groupnorm_params = sum(2 for m in model.modules() if isinstance(m, nn.GroupNorm))
    assert sum(mask) == groupnorm_params


def test_norm_state_mask_batch_norm_layer_norm_and_none():
    model = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8), nn.LayerNorm(8),
        nn.Sequential(nn.InstanceNorm1d(8, affine=True, track_running_stats=True)), nn.Linear(8, 2),
    )
    keys = list(model.state_dict())
    assert keys == [
        "0.weight", "0.bias",
        "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked",
        "3.weight", "3.bias",
        "4.weight", "4.bias",
        "5.0.weight", "5.0.bias", "5.0.running_mean", "5.0.running_var", "5.0.num_batches_tracked",
        "6.weight", "6.bias",
    ]
    expected = [False] * 2 + [True] * 5 + [False] * 2 + [True] * 7 + [False] * 2
    assert norm_state_mask(model) == expected
    for name in sorted(TABULAR_MODELS):
        m = build_model(name, in_channels=4, num_classes=1, image_size=0)
        assert norm_state_mask(m) == [False] * len(m.state_dict())

"""Model registry: networks by name, all DP-ready (GroupNorm or no normalisation, no in-place
activations).

    build_model("cnn", in_channels=1, num_classes=2, image_size=28)    -> nn.Module  (images)
    build_model("cnn3d", in_channels=1, num_classes=2, image_size=28)  -> nn.Module  (volumes)
    build_model("linear", in_channels=13, num_classes=1, image_size=0) -> nn.Module  (features)
    is_tabular_model("mlp")                                            -> True
    spatial_dims("resnet18-3d")        3 (volumes), 2 (images) or 0 (feature tables)
    models_for(3)                      the registry names that take volumes, sorted
    norm_state_mask(model)             one bool per state_dict entry: a normalisation layer's?

Image models ("cnn", "dpcnn", "resnet18") map (N, C, H, W) float images to (N, num_classes) logits;
volume models (VOLUME_MODELS: "cnn3d", "resnet18-3d") map (N, C, D, H, W) volumes, image_size being
the side; the dense models (DENSE_MODELS) output an image per item instead: "unet" (N, K, H, W)
logits, "unet3d" (N, K, D, H, W) on volumes or nifti's 3D patches, "cascade" a reconstruction;
tabular models (TABULAR_MODELS: "linear", "mlp") map (N, D) float features, D = in_channels, to (N, num_classes) outputs (logits, or one risk score for survival); their
image_size is 0.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from privmed import catalog
from privmed.errors import ConfigError, unknown_name

# Every model the catalog lists (privmed.catalog.MODELS), by name.
_REGISTRY: dict[str, Callable[..., nn.Module]] = {m.name: catalog.load(m.impl) for m in catalog.MODELS}

# Models that take (N, D) feature tables rather than images.
TABULAR_MODELS = frozenset(m.name for m in catalog.MODELS if m.tabular)
# Models whose output is an image (N, K, H, W) or volume (N, K, D, H, W): the dense tasks'
# (segmentation, reconstruction).
DENSE_MODELS = frozenset(m.name for m in catalog.MODELS if m.dense)
# Models that take (N, C, D, H, W) volumes.
VOLUME_MODELS = frozenset(m.name for m in catalog.MODELS if m.dims == 3)

# Normalisation layers, whose state FedBN keeps at each site.
_NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,  # BatchNorm1d/2d/3d, SyncBatchNorm, the lazy ones
    nn.modules.instancenorm._InstanceNorm,  # InstanceNorm1d/2d/3d and the lazy ones
    nn.GroupNorm,
    nn.LayerNorm,
    nn.RMSNorm,
)


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def is_tabular_model(name: str) -> bool:
    """Whether the registry's `name` takes (N, D) features (else (N, C, H, W) images)."""
    return name in TABULAR_MODELS


def spatial_dims(name: str) -> int:
    """What the registry's `name` takes: 3 for volumes (N, C, D, H, W), 2 for images (N, C, H, W),
    0 for feature tables (N, D)."""
    check_model_name(name)
    return 0 if name in TABULAR_MODELS else 3 if name in VOLUME_MODELS else 2


def models_for(dims: int, dense: bool = False) -> list[str]:
    """The registry names whose models take data of `dims` spatial dimensions (0: tables) and
    output one prediction per item (`dense` True: an image, for segmentation and reconstruction)."""
    return sorted(n for n in _REGISTRY if spatial_dims(n) == dims and (n in DENSE_MODELS) == dense)


def check_model_name(name: str) -> None:
    if name not in _REGISTRY:
        raise ConfigError(unknown_name("model.name", "model", name, _REGISTRY))


def build_model(
    name: str, *, in_channels: int, num_classes: int, image_size: int, width: int | None = None
) -> nn.Module:
    """A freshly initialised model (initialise under torch.manual_seed for reproducibility).
    For tabular models in_channels is the number of features and image_size 0."""
    check_model_name(name)
    kwargs = {} if width is None else {"width": width}
    return _REGISTRY[name](
        in_channels=in_channels, num_classes=num_classes, image_size=image_size, **kwargs
    )


def norm_state_mask(model: nn.Module) -> list[bool]:
    """One bool per entry of `model.state_dict()`, in its order: True for a normalisation layer's
    (BatchNorm*, InstanceNorm*, GroupNorm, LayerNorm, RMSNorm: weight, bias, running statistics,
    num_batches_tracked), False for everything else. FedBN keeps the True ones at each site."""
    norm_keys: set[str] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, _NORM_LAYERS):
            norm_keys.update(module.state_dict(prefix=f"{name}." if name else ""))
    return [key in norm_keys for key in model.state_dict()]

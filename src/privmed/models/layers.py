"""Building blocks shared by the networks."""

from torch import nn


def conv_class(spatial_dims: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    """nn.Conv2d for images (N, C, H, W), nn.Conv3d for volumes (N, C, D, H, W)."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims: {spatial_dims}; allowed: 2 (images), 3 (volumes)")
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def global_avg_pool(spatial_dims: int) -> nn.Module:
    """Average over every spatial position: (N, C, *spatial) -> (N, C, 1, ...)."""
    conv_class(spatial_dims)  # checks spatial_dims
    return nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)


def group_norm(channels: int, max_groups: int = 8) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= max_groups that divides `channels`.

    GroupNorm, unlike BatchNorm, normalises each sample on its own, so per-sample gradients (DP-SGD)
    stay per-sample. It serves images and volumes alike.
    """
    groups = max(g for g in range(1, max_groups + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def conv_gn_act(c_in: int, c_out: int, stride: int = 1, spatial_dims: int = 2) -> nn.Sequential:
    """3x3 (x3) conv -> GroupNorm -> SiLU; (N, c_in, *S) -> (N, c_out, *S / stride), S the
    `spatial_dims` spatial sides."""
    return nn.Sequential(
        conv_class(spatial_dims)(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        group_norm(c_out),
        nn.SiLU(),
    )

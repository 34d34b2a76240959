"""Building blocks shared by the networks."""

from torch import nn


def group_norm(channels: int, max_groups: int = 8) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= max_groups that divides `channels`.

    GroupNorm, unlike BatchNorm, normalises each sample on its own, so per-sample gradients (DP-SGD)
    stay per-sample.
    """
    groups = max(g for g in range(1, max_groups + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def conv_gn_act(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv -> GroupNorm -> SiLU; (N, c_in, H, W) -> (N, c_out, H/stride, W/stride)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        group_norm(c_out),
        nn.SiLU(),
    )

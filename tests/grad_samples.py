"""Per-sample gradients as DPSGD's Opacus module computes them, before clipping: the reference the
model and DP-SGD tests compare against (privmed itself never needs them outside DPSGD)."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from privmed.errors import ConfigError
from privmed.privacy.dp_step import DEFAULT_GRAD_SAMPLE_MODE, FIRST_LAYER_HOOK_WARNING, grad_sample_module


def per_sample_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE,
    criterion: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample gradients as Opacus computes them for DPSGD (before clipping): {parameter name:
    (B, *param.shape)} of `criterion` (default cross-entropy) on each item of x (B, C, H, W), y (B,).
    Works on a copy: `model` is left as it was. Ghost mode never forms them (ConfigError)."""
    if grad_sample_mode == "ghost":
        raise ConfigError("grad_sample_mode: 'ghost' computes only per-sample gradient norms")
    copy_ = copy.deepcopy(model).train()
    gsm = grad_sample_module(copy_, grad_sample_mode, max_grad_norm=1.0)
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=FIRST_LAYER_HOOK_WARNING, category=UserWarning)
        criterion(gsm(x), y).backward()
    grads = {name: p.grad_sample.detach().clone() for name, p in copy_.named_parameters() if p.requires_grad}
    gsm.to_standard_module()
    return grads

"""Whether a model can be trained with DP-SGD, checked before it is made private.

    validate_model(model)        ConfigError naming the first offending layer, the problem and the fix
"""

from __future__ import annotations

from opacus.validators import ModuleValidator
from torch import nn

from privmed.errors import ConfigError


def validate_model(model: nn.Module) -> None:
    """Raise ConfigError (one line) if `model` cannot be trained with DP-SGD, naming the first offending
    layer by its path in `model.named_modules()`, the problem and the fix.

    Checks BatchNorm (any affine setting) and in-place activations/dropout ourselves (Opacus flags
    neither an affine-free BatchNorm nor `inplace=True`), then runs Opacus' registered per-layer
    validators (those `ModuleValidator.validate` runs), layer by layer so the message can name the
    layer (Opacus' own messages do not). The train/eval mode is not checked: the trainer sets it.
    """
    problems = [p for name, m in model.named_modules() for p in _layer_problems(name or "<root>", m)]
    if problems:
        more = f" (and {len(problems) - 1} more layer(s))" if len(problems) > 1 else ""
        raise ConfigError(f"model.name: {problems[0]}{more}")


def _layer_problems(name: str, m: nn.Module) -> list[str]:
    kind = type(m).__name__
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return [
            f"layer '{name}' is {kind}, which mixes patients in a batch (so per-sample gradients and "
            "the privacy guarantee do not hold); use GroupNorm (privmed's models do)"
        ]
    if getattr(m, "inplace", False) is True:
        return [
            f"layer '{name}' is {kind}(inplace=True), which overwrites a tensor that the per-sample "
            "gradient hooks need; set inplace=False"
        ]
    validator = ModuleValidator.VALIDATORS.get(type(m))
    if validator is None or not any(p.requires_grad for p in m.parameters(recurse=False)):
        return []
    return [
        f"layer '{name}' is {kind}, which Opacus cannot train privately: {_first_sentence(str(e))}"
        for e in validator(m)
    ]


def _first_sentence(text: str) -> str:
    return " ".join(text.split(". ")[0].split())

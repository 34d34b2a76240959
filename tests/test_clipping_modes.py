"""One patient moves a DP-SGD step by at most C in every grad-sample mode, with privmed's own task
losses and models (issue 12, item 2); the task losses' reductions; what DPSGD refuses to run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from privmed.errors import ConfigError
from privmed.models import build_model
from privmed.privacy.dpsgd import CLIP_MARGIN, DPSGD, GRAD_SAMPLE_MODES
from privmed.tasks.base import ClassificationLoss
from privmed.tasks.survival import CoxLoss

BATCH = 8  # patients besides the one with the huge gradient


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


# name: (model, outputs, input shape, criterion); float32, as users train them.
CASES = {
    "cnn-3-classes": ("cnn", 3, (1, 28, 28), ClassificationLoss),
    "dpcnn-2-classes": ("dpcnn", 2, (1, 28, 28), ClassificationLoss),
    "linear-binary": ("linear", 1, (13,), ClassificationLoss),
    "mlp-binary": ("mlp", 1, (13,), ClassificationLoss),
    "cnn-torch-cross-entropy": ("cnn", 2, (1, 28, 28), nn.CrossEntropyLoss),  # the reference
}


def _case(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, nn.Module]:
    """A small privmed model, BATCH + 1 patients (x, y) and the loss. Patient 0 has the largest
    gradient we can give it: its input scaled by 1e4 and the label the model finds least likely
    (GroupNorm in `cnn` undoes the scale, so there it is merely a wrong label)."""
    model_name, k, shape, criterion = CASES[name]
    torch.manual_seed(0)
    image_size = shape[-1] if len(shape) == 3 else 0
    width = {"cnn": 4, "dpcnn": 4, "mlp": 8}.get(model_name)
    model = build_model(model_name, in_channels=shape[0], num_classes=k, image_size=image_size,
                        width=width)
    gen = torch.Generator().manual_seed(1)
    draw = torch.rand if image_size else torch.randn  # images in [0, 1]; standardised features
    x = draw(BATCH + 1, *shape, generator=gen)
    y = torch.randint(0, max(k, 2), (BATCH + 1,), generator=gen)
    x[0] = x[0] * 1e4
    with torch.no_grad():
        out = model(x[:1])
    y[0] = out.argmin(1)[0] if k > 1 else (out[0, 0] <= 0).long()  # the wrong class
    return model, x, y, criterion()


def _gradient_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: nn.Module) -> torch.Tensor:
    """(B,) L2 norm over all parameters of each patient's own gradient, from its own backward."""
    norms = []
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        loss(model(x[i : i + 1]), y[i : i + 1]).backward()
        norms.append(torch.cat([p.grad.flatten() for p in model.parameters()]).double().norm())
    model.zero_grad(set_to_none=True)
    return torch.stack(norms)


def _step(model, x, y, loss, *, mode: str, c: float) -> torch.Tensor:
    """The parameter change (flat, float64) of one noise-free DP step, plain SGD at lr 1 and expected
    batch size 1: the sum of the clipped per-patient gradients, negated. `model` is left as it was."""
    start = {k: v.clone() for k, v in model.state_dict().items()}
    before = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with DPSGD(model, opt, noise_multiplier=0.0, max_grad_norm=c, expected_batch_size=1,
               generator=torch.Generator().manual_seed(0), grad_sample_mode=mode, criterion=loss) as dp:
        dp.step(x, y)
    after = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    model.load_state_dict(start)
    return after - before


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_one_patient_moves_the_step_by_at_most_c(case, mode):
    model, x, y, loss = _case(case)
    norms = _gradient_norms(model, x, y, loss)
    c = 0.5 * norms.median().item()  # some patients clipped, some (maybe) not
    assert norms[0] >= 1.5 * c, "patient 0 must be clipped for the test to mean anything"
    moved = _step(model, x, y, loss, mode=mode, c=c) - _step(model, x[1:], y[1:], loss, mode=mode, c=c)
    assert moved.norm() <= c * (1 + 1e-5), f"{case} {mode}: {moved.norm() / c:.4f} C"
    assert moved.norm() >= 0.9 * c
    # Exactly patient 0's own clipped gradient (float32 models clip at C(1 - CLIP_MARGIN)).
    alone = _step(model, x[:1], y[:1], loss, mode=mode, c=c)
    torch.testing.assert_close(alone.norm().item(), c * (1 - CLIP_MARGIN), rtol=1e-5, atol=0.0)
    assert (moved - alone).norm() <= 1e-4 * c, f"{case} {mode}: not patient 0's clipped gradient"


class _NoNone(nn.Module):
    """Cross-entropy that fails when asked for per-patient losses (Opacus then leaves its
    criterion's reduction at "none")."""

    reduction = "mean"

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.reduction == "none":
            raise RuntimeError("no per-patient losses here")
        return F.cross_entropy(out, y)


def test_ghost_mode_leaves_the_callers_criterion_as_it_was():
    model, x, y, loss = _case("linear-binary")
    _step(model, x, y, loss, mode="ghost", c=1.0)
    assert loss.reduction == "mean"
    out = model(x)
    torch.testing.assert_close(loss(out, y), F.binary_cross_entropy_with_logits(out[:, 0], y.float()))
    model, x, y, _ = _case("cnn-torch-cross-entropy")
    failing = _NoNone()
    with pytest.raises(RuntimeError, match="no per-patient losses"):
        _step(model, x, y, failing, mode="ghost", c=1.0)
    assert failing.reduction == "mean"


def test_ghost_mode_refuses_a_criterion_without_a_reduction():
    model, _, _, _ = _case("cnn-torch-cross-entropy")
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ConfigError, match=r"^grad_sample_mode: 'ghost' .*function has no 'reduction'"):
        DPSGD(model, opt, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=1,
              generator=torch.Generator().manual_seed(0), grad_sample_mode="ghost",
              criterion=lambda out, y: F.cross_entropy(out, y))


class _MeanOnly(nn.Module):
    """A loss that claims a reduction but always returns the batch mean."""

    reduction = "mean"

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y)


def test_ghost_mode_refuses_a_criterion_without_per_patient_losses_before_any_step():
    model, x, y, _ = _case("cnn-torch-cross-entropy")
    start = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with DPSGD(model, opt, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=1,
               generator=torch.Generator().manual_seed(0), grad_sample_mode="ghost",
               criterion=_MeanOnly()) as dp:
        with pytest.raises(ConfigError, match=r"^grad_sample_mode: 'ghost' .*_MeanOnly.*shape \(\).*\(9,\)"):
            dp.step(x, y)
    assert all(torch.equal(a, p) for a, p in zip(start, model.parameters()))


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_dp_sgd_refuses_the_cox_loss_in_every_mode(mode):
    torch.manual_seed(0)
    model = build_model("linear", in_channels=5, num_classes=1, image_size=0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ConfigError, match=r"^privacy.mode: 'dp-sgd' .*CoxLoss.*couples.*'central'"):
        DPSGD(model, opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4,
              generator=torch.Generator().manual_seed(0), grad_sample_mode=mode, criterion=CoxLoss())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())  # not wrapped


# --- the task losses' reductions -----------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 4])
def test_classification_loss_reductions_match_the_per_item_losses(k):
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(6, k, generator=gen, dtype=torch.float64)
    y = torch.randint(0, max(k, 2), (6,), generator=gen)
    if k == 1:
        items = [F.binary_cross_entropy_with_logits(out[i, 0], y[i].double()) for i in range(6)]
    else:
        items = [F.cross_entropy(out[i : i + 1], y[i : i + 1]) for i in range(6)]
    items = torch.stack(items)
    none = ClassificationLoss(reduction="none")(out, y)
    assert none.shape == (6,)
    torch.testing.assert_close(none, items)
    torch.testing.assert_close(ClassificationLoss(reduction="sum")(out, y), items.sum())
    torch.testing.assert_close(ClassificationLoss()(out, y), items.mean())
    loss = ClassificationLoss()
    loss.reduction = "none"  # as Opacus' ghost clipping sets it
    torch.testing.assert_close(loss(out, y), items)


def test_classification_loss_rejects_an_unknown_reduction():
    with pytest.raises(ValueError, match=r"^reduction: 'avg' .*'mean', 'sum', 'none'"):
        ClassificationLoss(reduction="avg")

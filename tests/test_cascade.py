"""The deep cascade (privmed.models.cascade): shapes, data consistency (the acquired k-space lines
come out as measured), and DP-readiness: Opacus' validator, per-sample gradients equal to a loop
of single-sample gradients, and one item moving a DP-SGD step by at most C in every grad-sample mode."""

import pytest
import torch
from grad_samples import per_sample_gradients
from opacus.validators import ModuleValidator

from privmed.models.cascade import DeepCascade, cascade, data_consistency
from privmed.privacy.dpsgd import DPSGD, GRAD_SAMPLE_MODES
from privmed.kspace import fft2c, simulate_kspace, undersample, unpack_input
from privmed.tasks.recon_metrics import ReconLoss


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def small(**kw) -> DeepCascade:
    torch.manual_seed(0)
    return cascade(in_channels=3, num_classes=1, image_size=0, width=4, n_cascades=2, n_convs=3, **kw)


def test_shape_on_non_square_images():
    x = undersample(torch.rand(2, 1, 20, 14, generator=gen()), kind="random", acceleration=4, generator=gen())
    out = small()(x)
    assert out.shape == (2, 1, 20, 14) and bool((out >= 0).all())


def test_registry_signature_checks_channels():
    assert isinstance(cascade(3, 1, 120, width=8), DeepCascade)
    with pytest.raises(ValueError, match="in_channels: 1"):
        cascade(1, 1, 120)
    with pytest.raises(ValueError, match="num_classes: 2"):
        cascade(3, 2, 120)
    with pytest.raises(ValueError, match="dc_weight"):
        cascade(3, 1, 120, dc_weight=0.0)


def test_data_consistency_by_definition():
    k, k0 = torch.randn(2, 2, 6, 5, generator=gen()), torch.randn(2, 2, 6, 5, generator=gen(1))
    mask = (torch.rand(2, 1, 1, 5, generator=gen(2)) < 0.5).float().expand(2, 1, 6, 5)
    hard = data_consistency(k, k0, mask)
    torch.testing.assert_close(hard * mask, k0 * mask)
    torch.testing.assert_close(hard * (1 - mask), k * (1 - mask))
    soft = data_consistency(k, k0, mask, weight=1.0)
    torch.testing.assert_close(soft * mask, (k + k0) / 2 * mask)
    torch.testing.assert_close(data_consistency(k, k0, mask, weight=1e8), hard, atol=1e-6, rtol=0)


def test_acquired_lines_come_out_as_measured():
    image = torch.rand(3, 1, 16, 12, generator=gen())
    x = undersample(image, kind="random", acceleration=4, noise_std=0.05, generator=gen(1))
    measured, mask = unpack_input(x)
    model = small()
    k_out = fft2c(model.complex_image(x))
    torch.testing.assert_close(k_out * mask, measured * mask, atol=1e-5, rtol=0)
    assert (k_out * (1 - mask)).abs().sum() > 0  # the CNNs filled in the lines not acquired


def test_full_sampling_returns_the_image_whatever_the_weights():
    image = torch.rand(2, 1, 12, 10, generator=gen())
    full = torch.ones(1, 1, 1, 10)
    x = torch.cat([simulate_kspace(image, full, 0.0, gen()), full.expand(2, 1, 12, 10)], 1)
    torch.testing.assert_close(small()(x), image, atol=1e-5, rtol=0)


def test_batch_mates_do_not_change_an_items_output():
    x = undersample(torch.rand(4, 1, 12, 10, generator=gen()), kind="equispaced", acceleration=4, generator=gen())
    model = small()
    together = model(x)
    alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-6)


def test_opacus_validates_strictly():
    model = cascade(3, 1, 64, width=8)
    assert ModuleValidator.validate(model, strict=True) == []
    assert not any(getattr(m, "inplace", False) for m in model.modules())


@pytest.mark.parametrize("mode", ["hooks", "ew"])
@pytest.mark.parametrize("kind", ["l1", "ssim_l1"])
def test_per_sample_gradients_equal_a_loop_of_single_samples(mode, kind, one_thread):
    image = torch.rand(3, 1, 10, 8, generator=gen())
    x = undersample(image, kind="random", acceleration=4, center_fraction=0.1, noise_std=0.01, generator=gen(1))
    model = small(dc_weight=None if kind == "l1" else 2.0)
    criterion = ReconLoss(kind)
    grads = per_sample_gradients(model, x, image, grad_sample_mode=mode, criterion=criterion)
    params = dict(model.named_parameters())
    assert set(grads) == set(params)
    for i in range(3):
        model.zero_grad()
        criterion(model(x[i : i + 1]), image[i : i + 1]).backward()
        for name, p in params.items():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-4, atol=1e-6, msg=f"{mode} {name} item {i}")


def _dp_step(model, x, y, mode: str, c: float) -> torch.Tensor:
    """The flat parameter change of one noise-free DP-SGD step (SGD, lr 1, expected batch 1)."""
    start = {k: v.clone() for k, v in model.state_dict().items()}
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with DPSGD(model, opt, noise_multiplier=0.0, max_grad_norm=c, expected_batch_size=1,
               generator=gen(), grad_sample_mode=mode, criterion=ReconLoss("ssim_l1")) as dp:
        dp.step(x, y)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    model.load_state_dict(start)
    return (after - before).double()


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_one_item_moves_a_dp_step_by_at_most_c(mode, one_thread):
    image = torch.rand(6, 1, 10, 8, generator=gen())
    x = undersample(image, kind="random", acceleration=4, center_fraction=0.1, generator=gen(1))
    y = image.clone()
    y[0] = 1 - y[0]  # item 0's target far from its measurement: the largest gradient
    model = small()
    norms = []
    for i in range(6):
        model.zero_grad()
        ReconLoss("ssim_l1")(model(x[i : i + 1]), y[i : i + 1]).backward()
        norms.append(torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item())
    c = 0.5 * sorted(norms)[3]
    assert norms[0] >= 1.5 * c
    moved = _dp_step(model, x, y, mode, c) - _dp_step(model, x[1:], y[1:], mode, c)
    assert 0.9 * c <= moved.norm() <= c * (1 + 1e-5)
    alone = _dp_step(model, x[:1], y[:1], mode, c)
    assert (moved - alone).norm() <= 1e-4 * c

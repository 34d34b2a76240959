"""Reconstruction metrics against their definitions (PSNR of a known MSE, NMSE, SSIM by a direct
window-by-window formula) and the loss's reductions."""

import numpy as np
import pytest
import torch

from privmed.tasks.recon_metrics import ReconLoss, nmse, psnr, ssim


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_psnr_of_a_known_mse():
    target = rand(3, 1, 12, 10) * 0.8
    offsets = torch.tensor([0.1, 0.01, 0.2]).view(3, 1, 1, 1)
    np.testing.assert_allclose(psnr(target + offsets, target), [20.0, 40.0, 10 * np.log10(1 / 0.04)], rtol=1e-5)
    np.testing.assert_allclose(psnr(target + 0.1, target, data_range=2.0), 10 * np.log10(4 / 0.01), rtol=1e-5)


def test_nmse_by_definition_and_numpy_inputs():
    pred, target = rand(4, 1, 8, 8, seed=1).numpy(), rand(4, 1, 8, 8, seed=2).numpy()
    expected = [np.sum((p - t) ** 2) / np.sum(t**2) for p, t in zip(pred.astype(np.float64), target.astype(np.float64))]
    np.testing.assert_allclose(nmse(pred, target), expected, rtol=1e-6)
    assert nmse(target, target).tolist() == [0.0] * 4


def _ssim_direct(x: np.ndarray, y: np.ndarray, win: int = 7, data_range: float = 1.0) -> float:
    """Wang et al. 2004 over every valid win x win window, uniform weights, biased moments."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(x.shape[0] - win + 1):
        for j in range(x.shape[1] - win + 1):
            a, b = x[i : i + win, j : j + win], y[i : i + win, j : j + win]
            ma, mb = a.mean(), b.mean()
            va, vb, cov = a.var(), b.var(), ((a - ma) * (b - mb)).mean()
            values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_ssim_against_the_direct_formula():
    target = rand(2, 1, 10, 9, seed=3)
    pred = (target + 0.2 * rand(2, 1, 10, 9, seed=4)).clamp(0, 1)
    got = ssim(pred, target)
    expected = [_ssim_direct(p[0].double().numpy(), t[0].double().numpy()) for p, t in zip(pred, target)]
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert 0.2 < got.min() and got.max() < 0.99
    np.testing.assert_allclose(ssim(target, target), [1.0, 1.0], rtol=1e-6)


def test_metric_shapes_are_checked():
    with pytest.raises(ValueError, match="same"):
        psnr(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 7))


@pytest.mark.parametrize("kind", ["l1", "ssim", "ssim_l1"])
def test_loss_reductions_and_per_item_values(kind):
    pred, target = rand(5, 1, 12, 12, seed=5), rand(5, 1, 12, 12, seed=6)
    per_item = ReconLoss(kind, reduction="none")(pred, target)
    assert per_item.shape == (5,)
    torch.testing.assert_close(ReconLoss(kind)(pred, target), per_item.mean())
    torch.testing.assert_close(ReconLoss(kind, reduction="sum")(pred, target), per_item.sum())
    l1 = (pred - target).abs().mean(dim=(1, 2, 3)).double()
    one_minus_ssim = torch.from_numpy(1 - ssim(pred, target))
    expected = {"l1": l1, "ssim": one_minus_ssim, "ssim_l1": 0.84 * one_minus_ssim + 0.16 * l1}[kind]
    torch.testing.assert_close(per_item.double(), expected, rtol=1e-5, atol=1e-6)
    assert ReconLoss.per_sample is True


def test_loss_reduction_is_a_settable_attribute_and_names_are_checked():
    loss = ReconLoss("l1")
    loss.reduction = "none"  # as Opacus' ghost clipping does
    assert loss(rand(3, 1, 8, 8), rand(3, 1, 8, 8, seed=1)).shape == (3,)
    with pytest.raises(ValueError, match="kind: 'l2'"):
        ReconLoss("l2")
    with pytest.raises(ValueError, match="reduction: 'avg'"):
        ReconLoss("l1", reduction="avg")

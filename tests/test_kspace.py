"""Simulated single-coil k-space (privmed.kspace): the FFT against numpy's, masks against
their definition (lines per acceleration, fully sampled centre, equal spacing), the noise level
within a statistical bound, and explicit randomness that leaves global state alone."""

import numpy as np
import pytest
import torch

from privmed.kspace import (
    ACCELERATIONS,
    MASK_KINDS,
    cartesian_mask,
    default_center_fraction,
    fft2c,
    ifft2c,
    pack_input,
    simulate_kspace,
    undersample,
    unpack_input,
    zero_filled,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_fft2c_is_numpys_centred_orthonormal_fft():
    x = torch.randn(2, 2, 9, 12, generator=gen(), dtype=torch.float64)  # odd and even sizes
    z = x[:, 0].numpy() + 1j * x[:, 1].numpy()
    ref = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(z, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    k = fft2c(x)
    np.testing.assert_allclose(k[:, 0].numpy() + 1j * k[:, 1].numpy(), ref, atol=1e-12)
    torch.testing.assert_close(ifft2c(k), x)
    # orthonormal: energy preserved; centred: the mean image value sits at (H // 2, W // 2)
    torch.testing.assert_close(k.pow(2).sum(), x.pow(2).sum())
    flat = torch.ones(1, 1, 9, 12, dtype=torch.float64)
    dc = fft2c(torch.cat([flat, 0 * flat], 1))
    assert dc[0, 0, 4, 6] == pytest.approx((9 * 12) ** 0.5) and dc.abs().sum() == pytest.approx(dc[0, 0, 4, 6])


def test_full_mask_without_noise_zero_filled_is_the_image():
    image = torch.rand(3, 1, 16, 12, generator=gen())
    k = simulate_kspace(image, torch.ones(1, 1, 1, 12), noise_std=0.0, generator=gen())
    assert k.shape == (3, 2, 16, 12) and k.dtype == torch.float32
    torch.testing.assert_close(zero_filled(k), image, atol=1e-5, rtol=0)


def test_undersampled_zero_filled_loses_detail():
    image = torch.rand(2, 1, 32, 32, generator=gen())
    mask = cartesian_mask("random", 4, width=32, generator=gen())
    baseline = zero_filled(simulate_kspace(image, mask, 0.0, gen()))
    assert (baseline - image).abs().mean() > 0.05


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("acceleration", ACCELERATIONS)
@pytest.mark.parametrize("width", [90, 120])
def test_mask_centre_fully_sampled(kind, acceleration, width):
    n_low = round(width * default_center_fraction(acceleration))
    half = (n_low - 1) // 2
    g = gen(acceleration)
    for _ in range(20):
        m = cartesian_mask(kind, acceleration, width=width, generator=g)
        assert m.shape == (1, 1, 1, width) and m.dtype == torch.float32
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        centre = m[0, 0, 0, width // 2 - half : width // 2 + half + 1]
        assert centre.numel() >= n_low - 1 and bool((centre == 1).all())


@pytest.mark.parametrize("acceleration", ACCELERATIONS)
@pytest.mark.parametrize("width", [90, 120])
def test_random_mask_samples_one_line_in_acceleration_on_average(acceleration, width):
    draws = 400
    g = gen(1)
    counts = np.array([cartesian_mask("random", acceleration, width=width, generator=g).sum().item() for _ in range(draws)])
    # each non-centre line is a Bernoulli draw, so a count's std is at most sqrt(width) / 2
    bound = 4 * (width**0.5 / 2) / draws**0.5
    assert abs(counts.mean() - width / acceleration) < bound
    assert counts.std() > 0  # the pattern is drawn, not fixed


@pytest.mark.parametrize("acceleration", ACCELERATIONS)
@pytest.mark.parametrize("width", [90, 120])
def test_equispaced_mask_lines_are_equally_spaced(acceleration, width):
    g = gen(2)
    offsets = set()
    for _ in range(30):
        m = cartesian_mask("equispaced", acceleration, width=width, generator=g)[0, 0, 0]
        assert abs(m.sum().item() - width / acceleration) <= 2
        lines = torch.nonzero(m)[:, 0]
        offsets.add(int(lines[0]))
        n_low = round(width * default_center_fraction(acceleration))
        # away from the centre block, on either side, the lines are one spacing apart (+-1: rounding)
        left, right = lines[lines < width // 2 - n_low], lines[lines > width // 2 + n_low]
        gaps = torch.cat([torch.diff(left), torch.diff(right)])
        assert len(gaps) >= width / acceleration / 2 - 3
        assert gaps.max() - gaps.min() <= 1
        # the spacing that spreads the W / acceleration - n_low outer lines over the W - n_low columns
        spacing = (width - n_low) / (width / acceleration - n_low)
        assert abs(gaps.float().mean() - spacing) <= 0.5
    assert len(offsets) > 1  # the offset is drawn


def test_mask_arguments_are_checked():
    with pytest.raises(ValueError, match="kind: 'radial'"):
        cartesian_mask("radial", 4, width=32, generator=gen())
    with pytest.raises(ValueError, match="acceleration"):
        cartesian_mask("random", 1, width=32, generator=gen())
    with pytest.raises(ValueError, match="center_fraction"):
        cartesian_mask("random", 4, 0.3, width=32, generator=gen())


def test_noise_std_per_entry_within_a_statistical_bound():
    sigma, n = 0.05, 4 * 64 * 64
    k = simulate_kspace(torch.zeros(4, 1, 64, 64), torch.ones(1, 1, 1, 64), sigma, gen(3)).double()
    # real and imaginary parts each N(0, sigma^2 / 2); a sample variance's relative std is sqrt(2 / n)
    for part in (k[:, 0], k[:, 1]):
        assert abs(part.var().item() / (sigma**2 / 2) - 1) < 5 * (2 / n) ** 0.5
    assert abs(k.pow(2).sum(1).mean().item() / sigma**2 - 1) < 5 * (1 / n) ** 0.5
    # orthonormal FFT: the same per-pixel std in the fully sampled image
    image_noise = ifft2c(k.float()).double()
    assert abs(image_noise.pow(2).sum(1).mean().item() / sigma**2 - 1) < 5 * (1 / n) ** 0.5


def test_lines_not_acquired_are_zero_even_with_noise():
    mask = cartesian_mask("random", 4, width=40, generator=gen())
    k = simulate_kspace(torch.rand(2, 1, 24, 40, generator=gen()), mask, 0.1, gen(1))
    assert bool((k[..., mask[0, 0, 0] == 0] == 0).all())
    assert bool((k[..., mask[0, 0, 0] == 1] != 0).all())


def test_simulate_checks_shapes():
    with pytest.raises(ValueError, match="image"):
        simulate_kspace(torch.zeros(2, 2, 8, 8), torch.ones(1, 1, 1, 8), 0.0, gen())
    with pytest.raises(ValueError, match="mask"):
        simulate_kspace(torch.zeros(2, 1, 8, 8), torch.ones(1, 1, 8, 8), 0.0, gen())


def test_pack_unpack_round_trip():
    k = torch.randn(3, 2, 8, 6, generator=gen())
    masks = torch.cat([cartesian_mask("random", 4, 0.1, width=6, generator=gen(i)) for i in range(3)])
    x = pack_input(k, masks)
    assert x.shape == (3, 3, 8, 6)
    k2, m2 = unpack_input(x)
    torch.testing.assert_close(k2, k)
    torch.testing.assert_close(m2, masks.expand(3, 1, 8, 6))
    with pytest.raises(ValueError, match="packed"):
        unpack_input(k)


def test_undersample_draws_a_mask_per_item_and_is_deterministic():
    image = torch.rand(6, 1, 16, 40, generator=gen())
    x = undersample(image, kind="random", acceleration=4, noise_std=0.02, generator=gen(5))
    assert x.shape == (6, 3, 16, 40)
    masks = x[:, 2]
    assert bool((masks == masks[:, :1]).all())  # one mask per item, constant along the readout
    assert len({tuple(m[0].tolist()) for m in masks}) > 1
    again = undersample(image, kind="random", acceleration=4, noise_std=0.02, generator=gen(5))
    assert torch.equal(x, again)
    other = undersample(image, kind="random", acceleration=4, noise_std=0.02, generator=gen(6))
    assert not torch.equal(x, other)


def test_global_random_state_untouched():
    torch.manual_seed(123)
    np.random.seed(123)
    torch_before, np_before = torch.get_rng_state(), np.random.get_state()
    image = torch.rand(2, 1, 16, 24, generator=gen())
    for kind in MASK_KINDS:
        undersample(image, kind=kind, acceleration=6, noise_std=0.01, generator=gen(7))
    assert torch.equal(torch.get_rng_state(), torch_before)
    np_after = np.random.get_state()
    assert np_before[0] == np_after[0] and np.array_equal(np_before[1], np_after[1]) and np_before[2:] == np_after[2:]

"""IXI T1 as reconstruction data: the slices privmed.data.ixi serves, acquired by a site's scanner
profile (privmed.data.recon)."""

import numpy as np
import pytest
import torch

from privmed.data.ixi import load_subject, subjects_in
from privmed.data.recon import ScannerProfile, acquire
from privmed.kspace import zero_filled


def test_profile_fields_are_checked():
    assert ScannerProfile(acceleration=8).centre == pytest.approx(0.04)
    with pytest.raises(ValueError, match="mask_kind: 'spiral'"):
        ScannerProfile(mask_kind="spiral")
    with pytest.raises(ValueError, match="noise_std"):
        ScannerProfile(noise_std=-0.1)
    with pytest.raises(ValueError, match="center_fraction: 0.3"):
        ScannerProfile(acceleration=4, center_fraction=0.3)


def test_ixi_slices_as_a_scanner_acquires_them(shared_data):
    _, image, label = subjects_in(shared_data / "ixi-t1")[0]
    targets, _, _ = load_subject(image, label, step=4)
    assert targets.shape[1:] == (1, 112, 80) and targets.dtype == np.float32
    assert 0 <= targets.min() and targets.max() <= 1 and 15 <= len(targets) <= 30
    profile = ScannerProfile("equispaced", acceleration=6, noise_std=0.01)
    inputs = acquire(targets, profile, torch.Generator().manual_seed(0))
    assert inputs.shape == (len(targets), 3, 112, 80) and inputs.dtype == np.float32
    lines = inputs[:, 2, 0].sum(1)  # the mask's phase-encode lines run along W
    assert np.all(np.abs(lines - 80 / 6) <= 2)
    assert np.array_equal(inputs, acquire(targets, profile, torch.Generator().manual_seed(0)))
    baseline = zero_filled(torch.from_numpy(inputs[:, :2])).numpy()
    own = np.abs(baseline - targets).mean()
    other = np.abs(baseline - np.roll(targets, len(targets) // 2, axis=0)).mean()
    assert 0.01 < own < other / 2  # degraded, but its own slice's anatomy

"""IXI T1 as reconstruction data (privmed.data.ixi_recon): axial slices of the real volumes,
normalised to [0, 1], acquired by a site's scanner profile."""

import numpy as np
import pytest
import torch

from privmed.data.ixi_recon import (
    ScannerProfile,
    head_slices,
    load_subjects,
    load_volume,
    normalise_volume,
    site_arrays,
    slice_subjects,
)
from privmed.tasks.kspace import zero_filled


def test_normalise_maps_the_percentile_to_one():
    vol = np.linspace(0, 100, 1000, dtype=np.float32).reshape(10, 10, 10)
    out = normalise_volume(vol, percentile=90)
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
    assert np.mean(out == 1) == pytest.approx(0.1, abs=0.002)


def test_head_slices_rule():
    vol = np.zeros((10, 4, 10), dtype=np.float32)
    vol[:5, 1] = 0.5  # half of slice 1 is head
    vol[:2, 2] = 0.5  # a fifth of slice 2
    assert head_slices(vol).tolist() == [1]
    assert head_slices(vol, min_foreground=0.2).tolist() == [1, 2]


def test_profile_fields_are_checked():
    assert ScannerProfile(acceleration=8).centre == pytest.approx(0.04)
    with pytest.raises(ValueError, match="mask_kind: 'spiral'"):
        ScannerProfile(mask_kind="spiral")
    with pytest.raises(ValueError, match="noise_std"):
        ScannerProfile(noise_std=-0.1)
    with pytest.raises(ValueError, match="center_fraction: 0.3"):
        ScannerProfile(acceleration=4, center_fraction=0.3)


def test_ixi_volumes_to_site_arrays(shared_data):
    folder = shared_data / "ixi-t1" / "images"
    first = sorted(folder.glob("*.nii.gz"))[0]
    assert load_volume(first).shape == (120, 120, 90)  # axes (P, S, R): S is already axis 1
    volumes = load_subjects(folder)
    assert len(volumes) == 10 and next(iter(volumes)) == "IXI012-HH-1211"
    two = {k: volumes[k] for k in list(volumes)[:2]}
    targets, patients = slice_subjects(two, step=4)
    assert targets.shape[1:] == (1, 120, 90) and targets.dtype == np.float32
    assert 0 <= targets.min() and targets.max() <= 1
    assert set(patients) == set(two) and 40 <= len(targets) <= 60  # ~80-100 head slices each
    profile = ScannerProfile("equispaced", acceleration=6, noise_std=0.01)
    arrays = site_arrays(targets, patients, profile, torch.Generator().manual_seed(0))
    assert arrays.inputs.shape == (len(targets), 3, 120, 90) and arrays.inputs.dtype == np.float32
    assert np.array_equal(arrays.patient, patients) and arrays.targets is targets
    lines = arrays.inputs[:, 2, 0].sum(1)
    assert np.all(np.abs(lines - 90 / 6) <= 2)
    again = site_arrays(targets, patients, profile, torch.Generator().manual_seed(0))
    assert np.array_equal(arrays.inputs, again.inputs)
    baseline = zero_filled(torch.from_numpy(arrays.inputs[:, :2])).numpy()
    assert 0.01 < np.abs(baseline - targets).mean() < 0.1  # degraded, but the same anatomy

"""The nifti source's data.spacing: volumes resampled to one voxel size (MONAI's Spacing) before
slicing, masks by nearest neighbour; HD95 in mm only when every volume has the same pixel side; a
bad spacing refused in one line."""

from __future__ import annotations

import numpy as np
import pytest

from privmed.config import DataConfig, SitesConfig, validate_config
from privmed.data import load_source
from privmed.data.volumes import read_volume
from privmed.errors import ConfigError


def _save(path, arr, zooms, origin=(0.0, 0.0, 0.0)):
    import nibabel as nib

    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = origin
    nib.save(nib.Nifti1Image(arr, affine), str(path))


def test_trilinear_resampling_keeps_a_linear_ramp(tmp_path):
    """Trilinear interpolation reproduces a linear function exactly: a ramp of world x sampled at
    0.5 mm reads, at 1 mm, the world x of each new voxel's centre (away from the border)."""
    zooms = (0.5, 0.5, 2.0)
    x = np.arange(40) * zooms[0]  # world x of each voxel centre (origin 0)
    _save(tmp_path / "ramp.nii.gz", np.broadcast_to(x[:, None, None], (40, 12, 6)).astype(np.float32), zooms)
    vol, side = read_volume(tmp_path / "ramp.nii.gz", spacing=(1.0, 1.0, 2.0))
    assert side == 1.0
    assert vol.shape[1:] == (6, 6) and 19 <= vol.shape[0] <= 20  # 40 x 0.5 mm -> about 20 x 1 mm
    inner = vol[1:-1, 2, 2]
    np.testing.assert_allclose(inner, np.arange(1, len(inner) + 1) * 1.0, atol=1e-4)


def test_a_mask_keeps_whole_classes_and_its_image_s_grid(tmp_path):
    rng = np.random.default_rng(0)
    mask = np.zeros((30, 30, 8), np.uint8)
    mask[5:20, 8:25, 2:6] = 1
    mask[10:14, 12:16, 3:5] = 2
    image = (mask * 100 + rng.normal(0, 5, mask.shape)).astype(np.float32)
    _save(tmp_path / "m.nii.gz", mask, (0.7, 0.7, 3.0))
    _save(tmp_path / "i.nii.gz", image, (0.7, 0.7, 3.0))
    m, _ = read_volume(tmp_path / "m.nii.gz", spacing=(1.4, 1.4, 3.0), mask=True)
    i, _ = read_volume(tmp_path / "i.nii.gz", spacing=(1.4, 1.4, 3.0))
    assert m.shape == i.shape == (15, 15, 8)
    assert set(np.unique(m)) == {0.0, 1.0, 2.0}  # nearest neighbour: no class 1.5 at the edges
    # the class volumes in mm^3 survive halving the resolution, within a voxel layer at each face
    for c in (1, 2):
        before = (mask == c).sum() * 0.7 * 0.7 * 3.0
        after = (m == c).sum() * 1.4 * 1.4 * 3.0
        assert after == pytest.approx(before, rel=0.35)


def _two_scanners(folder, sides=(0.7, 1.0)) -> str:
    """4 volumes of one phantom (a disc of radius 7 mm in a 28 mm square, 4 slices), stored at two
    pixel sides."""
    lines = ["file,mask,site,patient,split"]
    for i in range(4):
        side = sides[i % 2]
        n = int(round(28 / side))
        grid = np.meshgrid(*[(np.arange(n) + 0.5) * side] * 2, indexing="ij")
        disc = ((grid[0] - 14) ** 2 + (grid[1] - 14) ** 2) < 7.0**2
        mask = np.repeat(disc[:, :, None], 4, axis=2).astype(np.uint8)
        _save(folder / f"v{i}.nii.gz", (mask * 300.0 + 100).astype(np.float32), (side, side, 3.0))
        _save(folder / f"v{i}_m.nii.gz", mask, (side, side, 3.0))
        lines.append(f"v{i}.nii.gz,v{i}_m.nii.gz,{'ab'[i % 2]},p{i},{'test' if i == 3 else 'train'}")
    (folder / "index.csv").write_text("\n".join(lines) + "\n")
    return str(folder / "index.csv")


def test_mixed_pixel_sides_give_hd95_in_pixels_unless_resampled(tmp_path):
    csv = _two_scanners(tmp_path)
    sites = SitesConfig(count=2, partition="natural")
    stored = load_source(DataConfig(source="nifti", csv=csv), sites, 0, task="segmentation")
    assert stored.spacing_mm is None
    assert "pixel sides 0.70 to 1.00 mm (HD95 in pixels; data.spacing resamples them to one)" in stored.description
    same = load_source(DataConfig(source="nifti", csv=csv, spacing=[1.0, 1.0, 3.0]), sites, 0, task="segmentation")
    assert same.spacing_mm == 1.0 and "resampled to 1 x 1 x 3 mm" in same.description
    # resampled, the 0.7 mm volumes' discs cover what the 1 mm ones do (pi 7^2 mm^2, to an edge)
    area = (same.train.target > 0).reshape(len(same.train), -1).sum(axis=1)
    per_patient = {p: area[same.train.patient == p].mean() for p in np.unique(same.train.patient)}
    assert per_patient["p0"] == pytest.approx(per_patient["p1"], rel=0.1)
    assert per_patient["p1"] == pytest.approx(np.pi * 49, rel=0.1)
    # one pixel side: mm as before
    (tmp_path / "one").mkdir()
    one = _two_scanners(tmp_path / "one", sides=(0.8, 0.8))
    assert load_source(DataConfig(source="nifti", csv=one), sites, 0, task="segmentation").spacing_mm == pytest.approx(0.8)


@pytest.mark.parametrize("spacing, match", [
    ([1.0, 1.0], r"data.spacing: \[1.0, 1.0\] is not a voxel size; allowed: three sides \[x, y, z\] in mm"),
    ([1.0, 0.0, 2.0], r"data.spacing: \[1.0, 0.0, 2.0\] is not a voxel size"),
])
def test_a_bad_spacing_is_refused_in_one_line(spacing, match):
    with pytest.raises(ConfigError, match=match) as e:
        validate_config({"task": "segmentation", "data": {"source": "nifti", "csv": "x.csv", "spacing": spacing}})
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="only source 'nifti' resamples volumes"):
        validate_config({"task": "segmentation", "data": {"source": "phantom", "spacing": [1, 1, 1]}})


@pytest.mark.parametrize(("value", "why"), [("validation", "validation rows are marked 'val'"), ("tset", "")])
def test_a_split_other_than_train_val_or_test_is_refused_naming_the_file_and_value(tmp_path, value, why):
    """Before this check any other value, 'val' and typos included, silently counted as train."""
    from privmed.errors import DataError

    csv = _two_scanners(tmp_path)
    lines = (tmp_path / "index.csv").read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + f",{value}"
    (tmp_path / "index.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_source(DataConfig(source="nifti", csv=csv), SitesConfig(count=2, partition="natural"), 0,
                    task="segmentation")
    msg = str(e.value)
    assert csv in msg and "file 'v1.nii.gz' has split '" + value + "'; allowed: train, val, test" in msg and why in msg
    lines[2] = lines[2].rsplit(",", 1)[0] + ",TEST"  # any case
    (tmp_path / "index.csv").write_text("\n".join(lines) + "\n")
    loaded = load_source(DataConfig(source="nifti", csv=csv), SitesConfig(count=2, partition="natural"), 0,
                         task="segmentation")
    assert set(loaded.test.patient) == {"p1", "p3"}


def test_rows_marked_val_are_their_site_s_validation_set(tmp_path):
    """A 'val' row's volume is its site's validation data (not a val_fraction draw); a site with
    no 'val' row is told how to fix it, and runs without validation at data.val_fraction 0."""
    from privmed.data.sites import split_into_sites
    from privmed.errors import DataError

    csv = _two_scanners(tmp_path)
    lines = (tmp_path / "index.csv").read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ",Val"  # v2, patient p2, at site a (any case)
    (tmp_path / "index.csv").write_text("\n".join(lines) + "\n")
    natural = SitesConfig(count=2, partition="natural", min_samples=1)  # 4 slices a volume
    src = load_source(DataConfig(source="nifti", csv=csv), natural, 0, task="segmentation")
    assert set(src.val.patient) == {"p2"} and set(src.val.site) == {"a"}
    assert "p2" not in set(src.train.patient) and set(src.test.patient) == {"p3"}
    with pytest.raises(DataError, match="site 'b' has no validation data .*rows marked 'val'"):
        split_into_sites(src, natural, val_fraction=0.15, seed=0)
    a, b = split_into_sites(src, natural, val_fraction=0.0, seed=0)
    assert set(a.val.patient) == {"p2"} and set(a.train.patient) == {"p0"} and len(b.val) == 0

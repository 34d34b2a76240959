"""The nifti source's 3D patches (data.patch) and segmentation on them with the 3D U-Net: patches
tile each volume and carry its patient, a bad patch size is refused in one line, and tiny fedavg
and DP-SGD runs go end to end on generated NIfTI files (and on a crop of the real spleen CT)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import privmed
from privmed.config import DataConfig, SitesConfig, validate_config
from privmed.data import load_source
from privmed.data.volumes import patches
from privmed.errors import ConfigError
from privmed.models import build_model
from privmed.tasks.segmentation import DiceCELoss, segmentation_counts

PATCH = [16, 16, 16]
SHAPE = (24, 20, 16)  # (X, Y, Z): 2 x 2 x 1 patches of 16, padded from 24 x 20


def _volume(rng: np.random.Generator, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """A noisy image with a bright ball in it, and the ball as mask 1."""
    centre = [rng.uniform(0.35, 0.65) * n for n in shape]
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ball = sum((g - c) ** 2 for g, c in zip(grid, centre)) < 6.0**2
    image = 100 + 400 * ball + rng.normal(0, 40, shape)
    return image.astype(np.float32), ball.astype(np.uint8)


def _write(folder, n=8, test=2, sites=("a", "b")) -> str:
    """`n` volumes as NIfTI files and their CSV; the last `test` are the test set, the others are
    dealt to `sites` in turn."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    lines = ["file,mask,site,patient,split"]
    for i in range(n):
        image, mask = _volume(rng)
        for name, arr in ((f"v{i}.nii.gz", image), (f"v{i}_mask.nii.gz", mask)):
            nib.save(nib.Nifti1Image(arr, np.diag([1.5, 1.5, 3.0, 1.0])), str(folder / name))
        split = "test" if i >= n - test else "train"
        lines.append(f"v{i}.nii.gz,v{i}_mask.nii.gz,{sites[i % len(sites)]},p{i},{split}")
    (folder / "index.csv").write_text("\n".join(lines) + "\n")
    return str(folder / "index.csv")


def _config(csv: str, **over) -> dict:
    cfg = {"data": {"source": "nifti", "csv": csv, "patch": PATCH, "class_names": ["background", "ball"],
                    "val_fraction": 0},
           "sites": {"count": 2, "partition": "natural"}, "model": {"width": 4},
           "federation": {"rounds": 1, "local_epochs": 3},
           "training": {"optimizer": "adam", "lr": 0.01, "batch_size": 4}}
    for key, value in over.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


@pytest.fixture(scope="module")
def csv(tmp_path_factory) -> str:
    return _write(tmp_path_factory.mktemp("nifti3d"))


# ------------------------------------------------------------------------------------ patches


def test_patches_tile_the_volume_and_put_it_back():
    vol = np.arange(5 * 7 * 3, dtype=np.float32).reshape(5, 7, 3) + 1  # no voxel is 0
    cut = patches(vol, 2, (2, 4, 4))  # depth: the last axis, 3 -> 2 patches; 5 -> 2; 7 -> 2
    assert cut.shape == (8, 2, 4, 4)
    # every voxel lies in exactly one patch, the rest is zero padding
    np.testing.assert_array_equal(np.sort(cut[cut > 0]), np.sort(vol.ravel()))
    # depth-major grid, centre-padded: put back together, it is the padded volume
    whole = cut.reshape(2, 2, 2, 2, 4, 4).transpose(0, 3, 1, 4, 2, 5).reshape(4, 8, 8)
    block = np.moveaxis(vol, 2, 0)  # (3, 5, 7)
    np.testing.assert_array_equal(whole[0:3, 1:6, 0:7], block)
    assert whole.sum() == vol.sum()


def test_nifti_serves_patches_that_carry_the_volume(csv):
    src = load_source(DataConfig(source="nifti", csv=csv, patch=PATCH), SitesConfig(count=2, partition="natural"),
                      0, task="segmentation")
    assert src.train.images.shape[1:] == (1, 16, 16, 16) and src.train.target.shape[1:] == (16, 16, 16)
    # 4 patches a volume (2 x 2 x 1): 6 training volumes, 2 test volumes, none dropped
    assert len(src.train) == 24 and len(src.test) == 8
    for p in np.unique(src.train.patient):
        rows = src.train.patient == p
        assert rows.sum() == 4 and len(set(src.train.site[rows])) == 1
    assert not set(src.test.patient) & set(src.train.patient)
    # a test row stays the test set of the site it names (p6 at a, p7 at b), unless made public
    assert dict(zip(src.test.patient, src.test.site)) == {"p6": "a", "p7": "b"}
    public = load_source(DataConfig(source="nifti", csv=csv, patch=PATCH, public_test=True),
                         SitesConfig(count=2, partition="natural"), 0, task="segmentation")
    assert public.test.site is None and len(public.test) == 8
    # the patches hold the whole mask of their volume: nothing cropped
    import nibabel as nib

    mask = np.asarray(nib.load(str(csv).replace("index.csv", "v0_mask.nii.gz")).dataobj)
    assert src.train.target[src.train.patient == "p0"].sum() == mask.sum() > 0
    # min_foreground drops the patches whose mask covers less than that share
    some = load_source(DataConfig(source="nifti", csv=csv, patch=PATCH, min_foreground=0.01),
                       SitesConfig(count=2, partition="natural"), 0, task="segmentation")
    assert 0 < len(some.train) < len(src.train)
    share = (some.train.target > 0).reshape(len(some.train), -1).mean(axis=1)
    assert share.min() >= 0.01


@pytest.mark.parametrize("patch, match", [
    ([16, 16], r"data.patch: \[16, 16\] is not a patch size; allowed: three sides \[D, H, W\], each 16 to 512"),
    ([8, 16, 16], r"data.patch: \[8, 16, 16\] is not a patch size"),
])
def test_a_bad_patch_size_is_refused_in_one_line(csv, patch, match):
    with pytest.raises(ConfigError, match=match) as e:
        validate_config(_config(csv, data={"patch": patch}))
    assert "\n" not in str(e.value)


def test_patches_want_the_nifti_source_and_no_slice_size(csv):
    with pytest.raises(ConfigError, match="only source 'nifti'"):
        validate_config({"task": "segmentation", "data": {"source": "phantom", "patch": PATCH}})
    with pytest.raises(ConfigError, match="data.size: 32 sets a slice's side"):
        validate_config(_config(csv, data={"size": 32}))


def test_patches_default_to_the_3d_unet_and_refuse_the_2d_one(csv):
    assert validate_config(_config(csv)).model.name == "unet3d"
    # DP-SGD's image defaults (the 2D 'dpcnn') are not for a source whose task is segmentation
    dp = {"mode": "dp-sgd", "epsilon": 8}
    assert validate_config(_config(csv, privacy=dp)).model.name == "unet3d"
    assert validate_config({"data": {"source": "ixi", "root": "x"}, "privacy": dp}).model.name == "unet"
    assert validate_config({**_config(csv), "data": {"source": "nifti", "csv": csv}}).model.name == "unet"
    with pytest.raises(ConfigError, match="'unet' takes images.*use one of: unet3d"):
        privmed.run(_config(csv, model={"name": "unet"}), report=False)


def test_the_example_config_asks_for_patches():
    from pathlib import Path

    from privmed.config import read_yaml

    cfg = validate_config(read_yaml(Path(__file__).parents[1] / "configs" / "nifti-ct-3d.yaml"))
    assert cfg.data.patch == [16, 96, 96] and cfg.model.name == "unet3d"


# ------------------------------------------------------------------------------------ the 3D task


def test_loss_and_counts_take_patches():
    """The loss is per patch on 5D logits; Dice sums over a volume's patches, HD95 over their slices."""
    g = torch.Generator().manual_seed(0)
    out = torch.randn(3, 2, 4, 6, 6, generator=g)
    y = torch.randint(0, 2, (3, 4, 6, 6), generator=g)
    per = DiceCELoss(reduction="none")(out, y)
    torch.testing.assert_close(per[1], DiceCELoss()(out[1:2], y[1:2]))
    target = y.numpy()
    probs = np.eye(2)[target].transpose(0, 4, 1, 2, 3)  # a perfect prediction
    c = segmentation_counts(probs, target, np.array(["a", "a", "b"]))
    assert c["dice_sum"][0] == 2 and c["dice_n"][0] == 2 and c["volumes"] == 2 and c["n"] == 3
    assert c["hd95_n"][0] == 12 and c["hd95_sum"][0] == 0  # one HD95 per slice of each patch


def test_unet3d_is_private_under_opacus():
    """Opacus' per-sample gradients of the 3D U-Net (privmed's grad_sample mode, ew) equal one
    backward pass per patch."""
    from grad_samples import per_sample_gradients
    from privmed.privacy.dpsgd import DEFAULT_GRAD_SAMPLE_MODE, validate_model

    torch.manual_seed(0)
    model = build_model("unet3d", in_channels=1, num_classes=2, image_size=16, width=4).double()
    validate_model(model)
    x = torch.rand(2, 1, 16, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 2, (2, 16, 16, 16))
    assert model(x).shape == (2, 2, 16, 16, 16)
    loss = DiceCELoss()  # the segmentation task's criterion
    got = per_sample_gradients(model, x, y, DEFAULT_GRAD_SAMPLE_MODE, criterion=loss)
    for i in range(2):
        model.zero_grad()
        loss(model(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(got[n][i], p.grad, rtol=1e-7, atol=1e-10, msg=n)


# ------------------------------------------------------------------------------------ runs


def test_fedavg_segments_3d_patches_and_reports_them(csv, tmp_path, one_thread):
    res = privmed.run(_config(csv, data={"public_test": True}), tmp_path / "run")
    test = res.summary["test"]
    assert test["dice"] > 0.3 and test["volumes"] == 2 and test["n"] == 8
    with np.load(tmp_path / "run" / "predictions.npz") as z:
        assert z["mask:global"].shape == (8, 16, 16, 16)
        assert z["example_input"].shape[1:] == (1, 16, 16, 16)
    html = (tmp_path / "run" / "report.html").read_text()
    assert "one test patch, drawn by its slice" in html
    assert (tmp_path / "run" / "plots" / "examples.png").stat().st_size > 1000


def test_a_site_s_test_rows_are_scored_at_the_site(csv, tmp_path, one_thread):
    """Without data.public_test each site scores its own test volume: the pooled figure comes from
    the sites' counts, and the coordinator's files hold none of those volumes."""
    res = privmed.run(_config(csv), tmp_path / "run", report=False)
    test, sites = res.summary["test"], res.summary["sites"]
    assert test["volumes"] == 2 and test["n"] == 8
    assert {name: s["test"]["volumes"] for name, s in sites.items()} == {"a": 1, "b": 1}
    released = tmp_path / "run" / "predictions.npz"
    if released.exists():
        with np.load(released) as z:
            assert not [k for k in z.files if k.startswith(("mask", "example"))], z.files


def test_dp_sgd_on_3d_patches_keeps_the_ledger(csv, tmp_path, one_thread):
    res = privmed.run(_config(csv, privacy={"mode": "dp-sgd", "epsilon": 8, "delta": 1e-3}),
                      tmp_path / "dp", report=False)
    privacy = res.summary["privacy"]
    assert 0 < privacy["epsilon"] <= 8
    assert "patient" in str(privacy.get("unit", "")).lower()
    assert 0.0 <= res.summary["test"]["dice"] <= 1.0


def test_the_spleen_ct_in_3d_patches(shared_data, tmp_path, one_thread):
    """The real CT, cropped to 48 x 48 x 16 voxels round the spleen and split in two volumes (one to
    train, one to test): it loads as patches of HU-windowed voxels and one round runs."""
    import nibabel as nib

    folder = shared_data / "spleen-ct"
    img = nib.load(str(folder / "spleen_ct.nii.gz"))
    ct = np.asarray(img.dataobj, dtype=np.float32)
    mask = np.asarray(nib.load(str(folder / "spleen_ct_mask.nii.gz")).dataobj).astype(np.uint8)
    x, y, z = (int(round(c)) for c in np.argwhere(mask > 0).mean(axis=0))
    z = min(max(z, 8), ct.shape[2] - 8)
    lines = ["file,mask,site,patient,split"]
    for part, (lo, split) in enumerate(((x - 48, "train"), (x, "test"))):
        box = np.s_[max(lo, 0):max(lo, 0) + 48, y - 24:y + 24, z - 8:z + 8]
        for name, arr in ((f"ct{part}.nii.gz", ct[box]), (f"ct{part}_mask.nii.gz", mask[box])):
            nib.save(nib.Nifti1Image(arr, img.affine), str(tmp_path / name))
        lines.append(f"ct{part}.nii.gz,ct{part}_mask.nii.gz,site-1,half{part},{split}")
    (tmp_path / "spleen.csv").write_text("\n".join(lines) + "\n")
    cfg = _config(str(tmp_path / "spleen.csv"), data={"window": [-160, 240], "class_names": ["background", "spleen"]},
                  sites={"count": 1, "min_samples": 4}, federation={"local_epochs": 1})
    src = load_source(validate_config(cfg).data, validate_config(cfg).sites, 0, task="segmentation")
    assert src.train.images.shape == (9, 1, 16, 16, 16) and 0 <= src.train.images.min() < src.train.images.max() <= 1
    assert src.train.target.sum() > 0 and src.test.target.sum() > 0
    test = privmed.run(cfg, report=False).summary["test"]
    assert test["volumes"] == 1 and 0.0 <= test["dice"] <= 1.0


def test_the_pixel_side_is_in_plane_not_the_slice_thickness(tmp_path):
    """HD95 in mm reads the pixel side within the slices: 0.8 mm pixels in 5 mm slices are 0.8 mm
    (along the last axis, nifti's), and IXI's slices along axis 1 take the other two sides."""
    import nibabel as nib

    from privmed.data.volumes import read_volume

    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.diag([0.8, 0.9, 5.0, 1.0]))
    nib.save(img, tmp_path / "v.nii.gz")
    assert read_volume(tmp_path / "v.nii.gz")[1] == pytest.approx(0.8)
    assert read_volume(tmp_path / "v.nii.gz", slice_axis=0)[1] == pytest.approx(0.9)

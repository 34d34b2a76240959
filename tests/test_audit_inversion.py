"""Gradient inversion (privmed.audit.inversion and `privmed audit --attack inversion`).

The attack itself on a tiny model whose gradient determines its input: a single image comes back
almost exactly from a plain update, not from a DP-SGD update or from the sum of several images'
updates. Then the coordinator's view as privmed's sites make it (a plain step is -lr x the
gradient; a DP step carries the calibrated noise; the secure sum is the mean of the sites' steps),
and the audit end to end on a tiny phantom run: private/audit.json, the image file beside it, the
private report's figure (the shareable report shows neither), one-line errors.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import privmed
from conftest import tiny_config
from privmed.audit import inversion as inv
from privmed.audit.membership import load_target
from privmed.audit.run import InversionOptions, audit
from privmed.audit.updates import Setting, UpdateMaker, initial_weights
from privmed.cli import main
from privmed.federation.flower.secagg import quantization_bound
from privmed.privacy.dpsgd import DPSGD
from privmed.tasks.base import ClassificationLoss

SIZE = 16
FAST = inv.InversionSettings(iterations=300, restarts=1)


def tiny_model(num_classes: int = 2, seed: int = 0) -> nn.Module:
    """A small conv net whose gradient pins its input down: the attack's best case."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Tanh(),
            nn.Flatten(), nn.Linear(8 * (SIZE // 2) ** 2, num_classes),
        )


def smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 1, 16, 16) random smooth images in [0, 1]: 4 x 4 uniform noise, bilinearly upsampled."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 4, 4, generator=g)
    return nn.functional.interpolate(coarse, size=SIZE, mode="bilinear", align_corners=True)


def sgd_update(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 0.1) -> list[torch.Tensor]:
    return [-lr * g for g in inv.gradient(model, x, y, ClassificationLoss())]


def dp_update(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float, lr: float = 0.1) -> list[torch.Tensor]:
    """One step of privmed's DP-SGD (per-sample clipping to 1, noise sigma) on a copy of `model`."""
    m = copy.deepcopy(model)
    before = [p.detach().clone() for p in m.parameters()]
    with DPSGD(m, torch.optim.SGD(m.parameters(), lr=lr), noise_multiplier=sigma, max_grad_norm=1.0,
               expected_batch_size=len(x), generator=torch.Generator().manual_seed(1),
               criterion=ClassificationLoss()) as dp:
        dp.step(x, y)
    return [p.detach() - b for p, b in zip(m.parameters(), before)]


def attack(model: nn.Module, update: list[torch.Tensor], labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    rec = inv.invert(model, update, labels, (1, SIZE, SIZE), FAST, torch.Generator().manual_seed(seed),
                     ClassificationLoss())
    return rec.images


def test_one_image_comes_back_from_a_plain_update(one_thread):
    model, x, y = tiny_model(), smooth_images(1), torch.tensor([1])
    before = copy.deepcopy(model.state_dict())
    rec = attack(model, sgd_update(model, x, y), y)
    assert rec.shape == x.shape and rec.min() >= 0 and rec.max() <= 1
    assert inv.psnr(x, rec)[0] >= 30 and inv.ssim(x, rec)[0] >= 0.95
    # the search, not the prior, did it: the other images are nowhere near
    assert inv.psnr(smooth_images(4, seed=1), rec.expand(4, -1, -1, -1)).max() < 20
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # model untouched
    # same generator seed, same reconstruction
    assert torch.equal(rec, attack(model, sgd_update(model, x, y), y))


def test_a_brightness_prior_restores_what_a_normalised_model_does_not_tell(one_thread):
    """privmed's cnn normalises right after its first convolution: an image and a brighter, more
    contrasted copy have nearly the same gradient, so the search finds the structure at a random
    brightness. The prior (the mean and spread of images of the same kind) puts it back."""
    from privmed.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model("cnn", in_channels=1, num_classes=2, image_size=SIZE, width=8)
    population = smooth_images(64, seed=9)
    prior = (float(population.mean(dim=(1, 2, 3)).mean()), float(population.std(dim=(1, 2, 3)).mean()))
    plain, with_prior = [], []
    for seed in (0, 1):
        x, y = smooth_images(1, seed=20 + seed), torch.tensor([seed])
        update = sgd_update(model, x, y)
        a = attack(model, update, y)
        b = inv.invert(model, update, y, (1, SIZE, SIZE), FAST, torch.Generator().manual_seed(0),
                       ClassificationLoss(), prior)
        assert b.calibrated  # the start at the prior's brightness matched the update best
        plain.append(inv.psnr(x, a)[0])
        with_prior.append(inv.psnr(x, b.images)[0])
    assert np.mean(with_prior) >= np.mean(plain) + 6, (plain, with_prior)
    # where the gradient does fix the brightness (no normalisation), the prior does no harm
    tiny, x, y = tiny_model(), smooth_images(1), torch.tensor([1])
    b = inv.invert(tiny, sgd_update(tiny, x, y), y, (1, SIZE, SIZE), FAST, torch.Generator().manual_seed(0),
                   ClassificationLoss(), prior)
    assert inv.psnr(x, b.images)[0] >= 30


def test_a_dp_update_hides_the_image(one_thread):
    model, x, y = tiny_model(), smooth_images(1), torch.tensor([0])
    plain = inv.psnr(x, attack(model, sgd_update(model, x, y), y))[0]
    noisy = inv.psnr(x, attack(model, dp_update(model, x, y, sigma=1.0), y))[0]
    assert noisy <= plain - 15, (plain, noisy)
    # without noise, DP-SGD's clipping alone only rescales one image's gradient: still recoverable
    assert inv.psnr(x, attack(model, dp_update(model, x, y, sigma=0.0), y))[0] >= 30


def test_the_sum_of_several_images_updates_is_no_single_image(one_thread):
    model, xs, ys = tiny_model(), smooth_images(3, seed=2), torch.tensor([0, 1, 0])
    total = [sum(parts) for parts in zip(*(sgd_update(model, xs[i : i + 1], ys[i : i + 1]) for i in range(3)))]
    rec = attack(model, total, ys[:1])  # as one image
    assert inv.best_match_psnr(xs, rec).max() < 18
    single = attack(model, sgd_update(model, xs[:1], ys[:1]), ys[:1])
    assert inv.psnr(xs[:1], single)[0] >= 30


@pytest.mark.parametrize("num_classes", [1, 2, 5])
def test_the_label_of_one_image_is_read_off_its_update(num_classes):
    model = tiny_model(num_classes)
    xs = smooth_images(6, seed=3)
    for i in range(6):
        y = torch.tensor([i % max(num_classes, 2)])
        if num_classes == 1:
            loss = nn.BCEWithLogitsLoss()
            g = torch.autograd.grad(loss(model(xs[i : i + 1])[:, 0], y.float()), list(model.parameters()))
            update = [-0.1 * t for t in g]
        else:
            update = sgd_update(model, xs[i : i + 1], y)
        assert inv.infer_label(model, update) == int(y), (num_classes, i)


def test_reconstructions_are_matched_to_their_originals():
    xs = smooth_images(5, seed=4)
    perm = torch.tensor([3, 0, 4, 1, 2])
    order = inv.match_to_originals(xs, xs[perm])
    assert torch.equal(xs[perm][order], xs)


def test_psnr_and_ssim_against_their_definitions():
    x = smooth_images(2, seed=5)
    y = (x + 0.05).clamp(0, 1)
    mse = ((x - y) ** 2).flatten(1).mean(1).double().numpy()
    assert inv.psnr(x, y) == pytest.approx(10 * np.log10(1.0 / mse), rel=1e-5)
    assert inv.ssim(x, x) == pytest.approx([1.0, 1.0], abs=1e-6)
    assert (inv.ssim(x, y) < 1).all() and (inv.ssim(x, 1 - x) < 0.5).all()


def test_bad_updates_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="trainable parameters"):
        inv.invert(model, [torch.zeros(1)], torch.tensor([0]), (1, SIZE, SIZE), FAST, torch.Generator())
    with pytest.raises(ValueError, match="iterations"):
        inv.InversionSettings(iterations=0)


# ------------------------------------------------------------------------------ the coordinator's view


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("inversion") / "tiny"
    privmed.run(tiny_config(name="tiny-inversion", federation__rounds=1, data__samples_per_site=40), out)
    return out


def test_the_updates_are_what_the_sites_release(tiny_run):
    target = load_target(tiny_run)
    maker = UpdateMaker(target, initial_weights(target), seed=0)
    model, crit, lr = maker.model(), ClassificationLoss(), target.config.training.lr
    # one plain SGD step on 2 patients: -lr x their mean gradient
    seen = maker.observe(Setting("site", 2), 0)
    assert seen.images.shape == (2, 1, 16, 16) and seen.sites == [target.site_data[0].name]
    expected = [-lr * g for g in inv.gradient(model, seen.images, seen.labels, crit)]
    for u, e in zip(seen.update, expected):
        torch.testing.assert_close(u, e, rtol=1e-3, atol=1e-7)
    # DP-SGD: the noise privmed calibrates for the run's first site, sigma x C per coordinate
    sigma8, clip, _ = maker.noise(8.0)
    assert maker.noise(1.0)[0] > sigma8 > 0
    dp = maker.observe(Setting("site-dp", 1, epsilon=8.0), 0)
    d = sum(u.numel() for u in dp.update)
    norm = float(torch.sqrt(sum((u / lr).pow(2).sum() for u in dp.update)))
    assert norm == pytest.approx(sigma8 * clip * np.sqrt(d), rel=0.05)  # the clipped signal is <= C
    # secure aggregation: the mean of the 3 sites' steps, as SecAgg+ unmasks it
    sec = maker.observe(Setting("secure-sum", 1), 0)
    assert len(sec.sites) == 3 and len(sec.images) == 3
    mean = [-lr * g for g in inv.gradient(model, sec.images, sec.labels, crit)]  # one step each: the mean gradient
    bound = quantization_bound([1, 1, 1], target.config.federation.secagg_clipping_range,
                               target.config.federation.secagg_quantization_bits)
    err = max(float((u - m).abs().max()) for u, m in zip(sec.update, mean))
    assert err <= bound + 1e-6, (err, bound)


def test_the_audit_writes_its_entry_and_the_report_shows_it(tiny_run, capsys):
    audit(tiny_run, ["loss"], candidates=30, seed=0)  # a membership audit first: kept beside
    opts = InversionOptions(batches=(1,), epsilons=(8.0,), trials=1,
                            search=inv.InversionSettings(iterations=150, restarts=1))
    result = audit(tiny_run, ["inversion"], inversion=opts, seed=1)
    written = json.loads((tiny_run / "private" / "audit.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert "loss" in written["attacks"]
    entry = written["inversion"]
    assert entry["seed"] == 1 and entry["weights"] == "initial"
    s = entry["settings"]
    assert set(s) == {"site-b1-step", "site-dp-eps8-b1-step", "secure-sum-b1-step", "secure-sum-b1-step-as-one"}
    for key, r in s.items():
        assert r["psnr"]["n"] == r["rebuilt_per_trial"] and r["ssim"]["std"] >= 0, key
        assert r["psnr"]["min"] <= r["psnr"]["mean"] <= r["psnr"]["max"]
    assert s["secure-sum-b1-step"]["images_per_trial"] == s["secure-sum-b1-step"]["rebuilt_per_trial"] == 3
    assert s["secure-sum-b1-step-as-one"]["rebuilt_per_trial"] == 1
    assert s["site-dp-eps8-b1-step"]["noise_multiplier"] > 0
    # the noise hides what the plain update shows
    assert s["site-dp-eps8-b1-step"]["psnr"]["mean"] < s["site-b1-step"]["psnr"]["mean"] - 4
    assert s["site-dp-eps8-b1-step"]["cosine"] < 0.5 < s["site-b1-step"]["cosine"]
    # the run trained without privacy: what it released is one site's plain update
    assert entry["released"]["view"] == "site" and entry["released"]["setting"] == "site-b1-step"
    assert entry["images_file"] == "private/audit_inversion.npz" and not (tiny_run / "audit_inversion.npz").exists()
    with np.load(tiny_run / "private" / "audit_inversion.npz") as z:
        assert z["secure-sum-b1-step__originals"].shape == z["secure-sum-b1-step__reconstructions"].shape == (3, 1, 16, 16)
        assert z["secure-sum-b1-step-as-one__reconstructions"].shape == (1, 1, 16, 16)
        assert z["site-b1-step__psnr"][0] == pytest.approx(s["site-b1-step"]["psnr"]["mean"])
    html = (tiny_run / "private" / "report.html").read_text()
    assert "Gradient inversion: images rebuilt from the updates" in html and "audit-attacks" in html
    assert (tiny_run / "private" / "plots" / "audit_inversion.png").stat().st_size > 5000
    shared = (tiny_run / "report.html").read_text()
    assert "audit-inversion-table" not in shared and "fig-audit_inversion" not in shared
    assert not (tiny_run / "plots" / "audit_inversion.png").exists()
    # a later membership audit keeps the inversion entry
    audit(tiny_run, ["loss"], candidates=30, seed=0)
    assert json.loads((tiny_run / "private" / "audit.json").read_text())["inversion"] == entry


@pytest.mark.parametrize("args, says", [
    (["--batch", "0"], "--batch: 0; allowed: 1 to 64"),
    (["--trials", "0"], "--trials: 0; give a positive number"),
    (["--epsilon", "-1"], "--epsilon: -1; allowed: above 0"),
    (["--attack", "inversio"], "unknown attack 'inversio' (allowed: loss, lira-online, lira-offline, rmia, inversion, canaries, input-canaries, attribute)"),
])
def test_bad_inversion_input_is_one_line(tiny_run, capsys, args, says):
    argv = ["audit", str(tiny_run), *(["--attack", "inversion"] if args[0] != "--attack" else []), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err

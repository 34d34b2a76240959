"""`privmed audit RUN_DIR --attack inversion`: gradient inversion of the updates a coordinator sees.

For each setting (privmed.audit.updates.Setting: whose update, how many patients, how much local
training, which DP noise) and each of `trials` fresh batches of patients, the sites train as the
setting says (privmed.audit.updates), and the attacker (privmed.audit.inversion) rebuilds the
images from the update. Each reconstruction is scored against the image it is paired with (or,
for a sum rebuilt as one image, the one it is closest to), by PSNR and SSIM; beside them, those of
the sites' mean training image, what an attacker who learnt nothing from the update could show.
Returns audit.json's "inversion" entry, and the first trial's originals and reconstructions of each
setting, for the private report's figure. The originals are training images: `write_images` keeps
them in RUN_DIR/private/ (privmed.report.private), never beside the shareable files.
"""

from __future__ import annotations

import datetime as _dt
import io as _io
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from privmed import io
from privmed.audit import inversion as inv
from privmed.audit.membership import Target
from privmed.audit.updates import EPOCH_BATCH, SECURE_MIN_SITES, Setting, UpdateMaker, initial_weights
from privmed.errors import ConfigError
from privmed.federation.site import derive_seed, get_weights
from privmed.report.private import INVERSION_FILE, inversion_file, private_dir

IMAGES_FILE = INVERSION_FILE  # under RUN_DIR/private/
WEIGHTS = ("initial", "final")
TITLE = "Gradient inversion (Geiping et al. 2020)"
SEES = {
    "site": "the coordinator, white box: one site's model update in the clear (its new weights less "
            "the weights it was sent), the model and the weights it sent",
    "site-dp": "the coordinator, white box: one site's DP-SGD update (each patient's gradient clipped, "
               "Gaussian noise added at the site), the model and the weights it sent",
    "secure-sum": "the coordinator under secure aggregation (SecAgg+): only the weighted mean of all "
                  "sites' updates, the model and the weights it sent",
}
ASSUMES = (
    "it sets the sites' local training (it writes the run config): plain SGD at the run's learning "
    "rate, no augmentation; it knows the batch size and the labels of a batch of several images (a "
    "single image's label it reads off the update, iDLG); it searches by Adam on the images with a "
    "total-variation prior, from random starts drawn with the brightness and contrast of public images "
    "of the same kind (the pooled test set's), plus one start from the best of them set to that "
    "brightness and contrast, keeping the start that matches best; it does not hold the sites' DP keys"
)


def default_settings(batches: list[int], epsilons: list[float]) -> list[Setting]:
    """One local step of one site's update at every batch size, a local epoch at the largest (when
    it is more than one step), the same steps under DP-SGD at every epsilon, and the secure sum of
    the sites' single-step updates at the smallest batch size (the easiest for the attacker),
    rebuilt as all the sites' images and as one image."""
    out = [Setting("site", b) for b in batches]
    if max(batches) > EPOCH_BATCH:
        out.append(Setting("site", max(batches), "epoch"))
    out += [Setting("site-dp", b, epsilon=e) for e in epsilons for b in batches]
    out += [Setting("secure-sum", min(batches)), Setting("secure-sum", min(batches), as_one=True)]
    return out


def run_inversion(
    target: Target, settings: list[Setting], *, trials: int = 2, attack: inv.InversionSettings | None = None,
    weights: str = "initial", seed: int = 0, progress: Callable[[str], None] | None = None,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Attack every setting `trials` times. Returns (audit.json's "inversion" entry, the arrays to
    keep of each setting's first trial: '<setting>__originals' (n, C, H, W) and
    '<setting>__reconstructions' (m, C, H, W) float32, the reconstructions in the originals' order
    (m = n, or 1 for a sum rebuilt as one image), and '<setting>__psnr' (m,))."""
    if weights not in WEIGHTS:
        raise ConfigError(f"--weights: '{weights}' (allowed: {', '.join(WEIGHTS)})")
    if trials < 1:
        raise ConfigError(f"--trials: {trials}; give a positive number")
    attack = attack or inv.InversionSettings()
    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    sent = initial_weights(target) if weights == "initial" else get_weights(target.model)
    maker = UpdateMaker(target, sent, seed)
    model = maker.model()
    criterion = maker.task.criterion()
    image_shape = tuple(target.source.train.images.shape[1:])
    results, arrays = {}, {}
    for s in settings:
        if s.view == "secure-sum" and len(target.site_data) < SECURE_MIN_SITES:
            results[s.key] = {**_describe(s), "skipped": f"the run has {len(target.site_data)} sites; "
                              f"secure aggregation needs {SECURE_MIN_SITES} or more"}
            continue
        t0 = time.perf_counter()
        entry, first = _attack_setting(maker, model, criterion, s, trials, attack, image_shape, seed)
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        results[s.key] = entry
        for part, array in zip(("originals", "reconstructions", "psnr"), first):
            arrays[f"{s.key}__{part}"] = array
        say(f"inversion {s.key}: PSNR {entry['psnr']['mean']:.1f} dB (best {entry['psnr']['max']:.1f}), "
            f"SSIM {entry['ssim']['mean']:.3f}")
    entry = {
        "title": TITLE,
        "assumes": ASSUMES,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "weights": weights,
        "weights_meaning": ("the run's initial model: what every site was sent in round 1" if weights == "initial"
                            else "the run's final model, as if sent for one more round"),
        "trials": trials,
        "search": {**asdict(attack), "optimizer": "Adam on signed gradients, lr x0.1 at 3/8, 5/8, 7/8",
                   "objective": "1 - cosine(gradient, -update) + tv_weight x total variation"},
        "metrics": "PSNR (dB) and SSIM (11 px Gaussian window) by MONAI, each reconstruction against "
                   "the original it is assigned to (linear assignment on PSNR); images in [0, 1]",
        "images_file": f"private/{IMAGES_FILE}",
        "settings": results,
        "seconds": round(time.perf_counter() - start, 1),
    }
    return entry, arrays


def _describe(s: Setting) -> dict:
    # one local step from the same weights: the sites' mean update is the gradient of all their
    # images together, so the attacker rebuilds them as one batch (or, naively, as one image)
    return {"view": s.view, "sees": SEES[s.view], "batch": s.batch, "local": s.local,
            "local_steps": s.local_steps, "local_batch": s.local_batch, "epsilon": s.epsilon,
            "rebuilt_as": "one image" if s.as_one else "all the images trained on"}


def _attack_setting(
    maker: UpdateMaker, model: torch.nn.Module, criterion: torch.nn.Module, s: Setting, trials: int,
    attack: inv.InversionSettings, image_shape: tuple[int, ...], seed: int,
) -> tuple[dict, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    span = attack.bounds[1] - attack.bounds[0]
    psnrs, ssims, raw_psnrs, floor, floor_ssim, cosines, calibrated, label_hits = [], [], [], [], [], [], [], []
    n_sites, first = 1, None
    for trial in range(trials):
        seen = maker.observe(s, trial)
        n_sites = len(seen.sites)
        labels = seen.labels
        if len(labels) == 1 or s.as_one:  # iDLG: the attacker reads the label off the update
            labels = torch.tensor([inv.infer_label(model, seen.update)])
            if len(seen.labels) == 1:
                label_hits.append(int(labels[0] == seen.labels[0]))
        gen = torch.Generator().manual_seed(derive_seed(seed, "inversion-attack", s.key, trial))
        rec = inv.invert(model, seen.update, labels, image_shape, attack, gen, criterion, maker.intensity)
        originals, rebuilt, p, q = _score(seen.images, rec.images, span)
        psnrs.append(p)
        ssims.append(q)
        raw_psnrs.append(_score(seen.images, rec.raw, span)[2])
        mean_image = maker.mean_image.expand_as(seen.images)
        floor.append(inv.psnr(seen.images, mean_image, span))
        floor_ssim.append(inv.ssim(seen.images, mean_image, span))
        cosines.append(rec.cosine)
        calibrated.append(rec.calibrated)
        if first is None:
            first = (originals.numpy().astype(np.float32), rebuilt.numpy().astype(np.float32), p)
    p, q = np.concatenate(psnrs), np.concatenate(ssims)
    entry = {**_describe(s), "sites": n_sites, "images_per_trial": int(len(seen.images)),
             "rebuilt_per_trial": int(len(rec.images))}
    if s.view != "secure-sum":  # the site whose update was attacked (its noise is the run's there)
        entry["site"] = seen.sites[0]
    if s.view == "site-dp":
        sigma, clip, _ = maker.noise(s.epsilon)
        entry.update(noise_multiplier=sigma, max_grad_norm=clip)
    if label_hits or s.as_one:
        how = "inferred from the update (iDLG)"
    else:
        how = "known to the attacker"
    entry.update({
        "labels": how,
        "label_accuracy": float(np.mean(label_hits)) if label_hits else None,
        "psnr": _stats(p), "ssim": _stats(q),
        "psnr_random_starts": _stats(np.concatenate(raw_psnrs)),
        "prior_start_kept": f"{sum(calibrated)} of {trials} batches",
        "psnr_mean_image": float(np.mean(np.concatenate(floor))),
        "ssim_mean_image": float(np.mean(np.concatenate(floor_ssim))),
        "cosine": float(np.mean(cosines)),
        "trials": trials,
    })
    return entry, first


def _score(originals: torch.Tensor, rebuilt: torch.Tensor, span: float) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """(originals, reconstructions, PSNR, SSIM) of a trial: as many reconstructions as originals
    are paired one to one (linear assignment); fewer (a sum rebuilt as one image) each with the
    original it is closest to. The originals are returned whole, the reconstructions in their
    order when paired one to one; PSNR and SSIM are per reconstruction."""
    if len(rebuilt) == len(originals):
        rebuilt = rebuilt[inv.match_to_originals(originals, rebuilt, span)]
        return originals, rebuilt, inv.psnr(originals, rebuilt, span), inv.ssim(originals, rebuilt, span)
    n, m = len(originals), len(rebuilt)
    table = inv.psnr(originals.repeat(m, 1, 1, 1), rebuilt.repeat_interleave(n, dim=0), span).reshape(m, n)
    closest = originals[torch.from_numpy(table.argmax(axis=1))]
    return originals, rebuilt, table.max(axis=1), inv.ssim(closest, rebuilt, span)


def _stats(v: np.ndarray) -> dict:
    v = np.asarray(v, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}


def write_images(run_dir: Path, arrays: dict[str, np.ndarray]) -> Path:
    """The settings' originals (training images) and reconstructions to
    RUN_DIR/private/audit_inversion.npz, owner-only and atomically; returns its path."""
    private_dir(run_dir)
    buf = _io.BytesIO()
    np.savez_compressed(buf, **arrays)
    path = inversion_file(run_dir)
    io.write_bytes(path, buf.getvalue(), private=True)
    return path

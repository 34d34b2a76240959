"""Gradient inversion: rebuild a site's training images from the model update it released.

The attack of Geiping et al. 2020 ("Inverting Gradients - How easy is it to break privacy in
federated learning?", NeurIPS): find images whose gradient points the way the released update does,

    min_x  1 - cos(grad_theta L(model(x), y), -update)  +  tv_weight * TV(x),   x boxed to the data range,

by Adam on the images with signed gradients, from a few random starts, keeping the start that ends
with the lowest objective; with a prior on the images' brightness and contrast, one more start
from the best one set to it (see `invert`). The cosine is scale invariant, so the update of one plain SGD step
(-lr x the batch's mean gradient) is matched exactly without knowing lr, and a DP-SGD step (clipped,
noised, divided by the expected batch size) or a local epoch (several steps) is matched as a
gradient direction. The label of a single image is read off the last layer's update (iDLG, Zhao et
al. 2020); for larger batches the caller gives the labels (the attacker is assumed to know them).

Pure: tensors in, tensors out; every random draw comes from the caller's torch.Generator, and
torch's global random state is left alone. PSNR and SSIM come from MONAI's metrics.

    update = [new - old for each trainable parameter]        # what the coordinator saw
    label = infer_label(model, update)                        # batch of 1
    rec = invert(model, update, labels, (1, 28, 28), InversionSettings(), generator)
    order = match_to_originals(originals, rec.images)        # a batch comes back in any order
    psnr(originals, rec.images[order]), ssim(originals, rec.images[order])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class InversionSettings:
    """How hard the attacker searches. Geiping et al. run 24,000 Adam iterations on CIFAR ResNets;
    privmed's 28 px models need far fewer. `lr` is Adam's on the images, decayed x0.1 at 3/8, 5/8
    and 7/8 of the iterations (as Geiping et al.); `tv_weight` the weight of the total-variation
    prior; `bounds` the data range the images are boxed to (privmed's images are in [0, 1])."""

    iterations: int = 1000
    restarts: int = 2
    lr: float = 0.1
    tv_weight: float = 0.01
    bounds: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.restarts < 1:
            raise ValueError(f"iterations and restarts must be >= 1, got {self.iterations}, {self.restarts}")
        if not (self.lr > 0 and self.tv_weight >= 0 and self.bounds[0] < self.bounds[1]):
            raise ValueError(f"need lr > 0, tv_weight >= 0, bounds lo < hi; got {self}")


@dataclass(frozen=True)
class Reconstruction:
    """The attack's answer: `images` (B, C, H, W) in the settings' bounds, in the attacker's own
    order (see `match_to_originals`), the `labels` (B,) it assumed, and the final cosine between
    its images' gradient and the update's direction (1: a perfect match). `raw`: the best of the
    random starts; `calibrated`: whether the start from them at the prior's intensity won (see
    `invert`)."""

    images: torch.Tensor
    labels: torch.Tensor
    cosine: float
    restart: int  # which start was kept (index `restarts`: the one at the prior's intensity)
    raw: torch.Tensor
    calibrated: bool


def trainable(model: nn.Module) -> list[torch.Tensor]:
    """The parameters an update changes, in `model.named_parameters()` order."""
    return [p for p in model.parameters() if p.requires_grad]


def gradient(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, criterion: nn.Module | None = None,
    create_graph: bool = False,
) -> list[torch.Tensor]:
    """The gradient of the mean loss of `images` (B, C, H, W) with `labels` (B,) with respect to
    each trainable parameter (shapes as the parameters'); the model's own .grad is left alone."""
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
    loss = criterion(model(images), labels)
    return list(torch.autograd.grad(loss, trainable(model), create_graph=create_graph))


def cosine_distance(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """1 - cos(a, b) of two lists of tensors taken as one long vector each (Geiping et al.'s cost);
    0 when they point the same way, 2 when opposite."""
    dot = sum((x * y).sum() for x, y in zip(a, b, strict=True))
    na = torch.sqrt(sum(x.pow(2).sum() for x in a))
    nb = torch.sqrt(sum(y.pow(2).sum() for y in b))
    return 1.0 - dot / (na * nb).clamp_min(1e-30)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of images (B, C, H, W): the mean absolute difference between
    vertical and between horizontal neighbours (Geiping et al.'s prior)."""
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean()
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()
    return dx + dy


def _last_linear(model: nn.Module) -> nn.Linear:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ValueError("the model has no linear layer to read the label from")
    return last


def infer_label(model: nn.Module, update: Sequence[torch.Tensor]) -> int:
    """The label of a single image from the update of its one training step (iDLG, Zhao et al.
    2020). For cross-entropy the gradient of the last layer's outputs is softmax - onehot(y): below
    zero for the true class only, so the update (-lr x gradient) of the last bias is above zero
    there alone. Without a bias, the rows of the last weight are summed (the same sign when the
    features that feed it are non-negative). With one logit (binary cross-entropy) the gradient
    sigmoid - y is below zero exactly when y is 1. `update`: one tensor per trainable parameter."""
    params = trainable(model)
    if len(update) != len(params):
        raise ValueError(f"the model has {len(params)} trainable parameters, the update {len(update)}")
    last = _last_linear(model)
    index = {id(p): i for i, p in enumerate(params)}
    if last.bias is not None and id(last.bias) in index:
        signal = update[index[id(last.bias)]].detach()
    else:
        signal = update[index[id(last.weight)]].detach().sum(dim=1)
    if signal.numel() == 1:
        return int(signal.item() > 0)
    return int(torch.argmax(signal).item())


def invert(
    model: nn.Module,
    update: Sequence[torch.Tensor],
    labels: torch.Tensor,
    image_shape: tuple[int, ...],
    settings: InversionSettings,
    generator: torch.Generator,
    criterion: nn.Module | None = None,
    intensity: tuple[float, float] | None = None,
) -> Reconstruction:
    """Reconstruct the B = len(labels) images (B, *image_shape) whose gradient at `model`'s weights
    points opposite to `update` (one tensor per trainable parameter: new weights - the weights the
    site was sent). `model` holds the weights the site trained from; it is not changed. The
    `settings.restarts` random starts are drawn from `generator` (uniform in the bounds without a
    prior); each runs `settings.iterations` Adam steps on the signed gradient of the objective,
    projected back into the bounds after each; the start with the lowest objective is kept.

    `intensity`: the (mean, std) of an image's pixels in the attacker's data of the same kind. The
    random starts then draw their pixels from it, and one more start follows: the best random
    start's images mapped to that mean and spread (`match_intensity`), searched again at a tenth of
    the learning rate. It is kept when it matches better. A model whose first convolution feeds a
    normalisation layer (privmed's cnn) gives nearly the same gradient for an image and a brighter
    or more contrasted copy: the search finds the structure at an arbitrary brightness, and the
    prior puts it back near the right one."""
    params = trainable(model)
    if len(update) != len(params):
        raise ValueError(f"the model has {len(params)} trainable parameters, the update {len(update)}")
    for u, p in zip(update, params):
        if u.shape != p.shape:
            raise ValueError(f"an update tensor has shape {tuple(u.shape)}, its parameter {tuple(p.shape)}")
    target = [-u.detach().to(p.dtype) for u, p in zip(update, params)]
    shape = (len(labels), *image_shape)
    was_training = model.training
    model.eval()  # no layer of privmed's models differs, but a dropout layer would make the match noisy
    try:
        found = [_search(model, _start(shape, settings.bounds, intensity, generator), labels, target,
                         settings, settings.lr, criterion) for _ in range(settings.restarts)]
        kept = min(range(len(found)), key=lambda i: found[i][0])
        raw = found[kept][1]
        if intensity is not None:
            start = match_intensity(raw, *intensity, bounds=settings.bounds)
            found.append(_search(model, start, labels, target, settings, settings.lr / 10, criterion))
            kept = min(range(len(found)), key=lambda i: found[i][0])
    finally:
        model.train(was_training)
    images = found[kept][1]
    cos = 1.0 - float(cosine_distance(gradient(model, images, labels, criterion), target))
    return Reconstruction(images, labels.clone(), cos, kept, raw, kept == settings.restarts)


def _search(
    model: nn.Module, x0: torch.Tensor, labels: torch.Tensor, target: list[torch.Tensor],
    settings: InversionSettings, lr: float, criterion: nn.Module | None,
) -> tuple[float, torch.Tensor]:
    """One start: `settings.iterations` Adam steps from x0 on the objective's signed gradient,
    the learning rate decayed x0.1 at 3/8, 5/8 and 7/8, boxed after each step. Returns (final
    objective, images)."""
    lo, hi = settings.bounds
    x = x0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    milestones = [int(settings.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)
    for _ in range(settings.iterations):
        opt.zero_grad(set_to_none=True)
        cost = _objective(model, x, labels, target, settings.tv_weight, criterion)
        (x_grad,) = torch.autograd.grad(cost, [x])
        x.grad = x_grad.sign()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(lo, hi)
    x = x.detach()
    return float(_objective(model, x, labels, target, settings.tv_weight, criterion, create_graph=False)), x


def _start(shape: tuple[int, ...], bounds: tuple[float, float], intensity: tuple[float, float] | None,
           generator: torch.Generator) -> torch.Tensor:
    """A random start: Gaussian pixels of the prior's mean and spread (Geiping et al. start from
    N(0, 1) in the data's standardised units), or uniform in the bounds without a prior."""
    lo, hi = bounds
    if intensity is None:
        return lo + (hi - lo) * torch.rand(shape, generator=generator)
    mean, std = intensity
    return (mean + std * torch.randn(shape, generator=generator)).clamp(lo, hi)


def match_intensity(images: torch.Tensor, mean: float, std: float, bounds: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Each image (B, C, H, W) mapped affinely so that its pixels have mean `mean` and standard
    deviation `std`, then clipped to `bounds`. A flat image stays flat, at `mean`."""
    m = images.mean(dim=(1, 2, 3), keepdim=True)
    s = images.std(dim=(1, 2, 3), keepdim=True)
    scaled = torch.where(s > 1e-6, (images - m) / s.clamp_min(1e-6) * std, torch.zeros_like(images))
    return (scaled + mean).clamp(*bounds)


def _objective(
    model: nn.Module, x: torch.Tensor, labels: torch.Tensor, target: list[torch.Tensor],
    tv_weight: float, criterion: nn.Module | None, create_graph: bool = True,
) -> torch.Tensor:
    """Geiping et al.'s objective: 1 - cos(gradient of x, target) + tv_weight x TV(x)."""
    g = gradient(model, x, labels, criterion, create_graph=create_graph)
    return cosine_distance(g, target) + tv_weight * total_variation(x)


# ------------------------------------------------------------------------------------------ scoring


def psnr(originals: torch.Tensor, images: torch.Tensor, data_range: float = 1.0) -> np.ndarray:
    """Peak signal-to-noise ratio (dB) of each image (N, C, H, W) against its original, by MONAI's
    PSNRMetric: 10 log10(range^2 / MSE). (N,) float64; inf for an exact copy."""
    from monai.metrics import PSNRMetric

    metric = PSNRMetric(max_val=data_range, reduction="none")
    return metric(images.detach().float(), originals.detach().float()).double().numpy().reshape(-1)


def ssim(originals: torch.Tensor, images: torch.Tensor, data_range: float = 1.0) -> np.ndarray:
    """Structural similarity of each 2-D image (N, C, H, W) with its original, by MONAI's
    SSIMMetric (Gaussian window 11 px, sigma 1.5, as Wang et al. 2004), averaged over channels.
    (N,) float64 in [-1, 1]; 1 for an exact copy. Images under 11 px use a window of their size
    (odd)."""
    from monai.metrics import SSIMMetric

    side = min(originals.shape[-2:])
    win = min(11, side if side % 2 else side - 1)
    metric = SSIMMetric(spatial_dims=2, data_range=data_range, win_size=win, reduction="none")
    return metric(images.detach().float(), originals.detach().float()).double().numpy().reshape(-1)


def match_to_originals(originals: torch.Tensor, images: torch.Tensor, data_range: float = 1.0) -> np.ndarray:
    """A batch's reconstruction comes back in no particular order: the permutation `order` (N,)
    such that images[order[i]] is the reconstruction of originals[i], maximising the summed PSNR
    (a linear assignment). Needs as many images as originals."""
    from scipy.optimize import linear_sum_assignment

    n = len(originals)
    if len(images) != n:
        raise ValueError(f"{n} originals but {len(images)} reconstructions")
    pairs_o = originals.repeat_interleave(n, dim=0)
    pairs_r = images.repeat(n, 1, 1, 1)
    table = psnr(pairs_o, pairs_r, data_range).reshape(n, n)  # [original, reconstruction]
    table = np.nan_to_num(table, posinf=1e6)
    rows, cols = linear_sum_assignment(-table)
    return cols[np.argsort(rows)]


def best_match_psnr(originals: torch.Tensor, images: torch.Tensor, data_range: float = 1.0) -> np.ndarray:
    """For each reconstruction (M, C, H, W), its PSNR against the original it is closest to among
    `originals` (N, C, H, W): (M,). What says whether any single image was recognisably rebuilt
    when the reconstructions need not map one-to-one onto the originals."""
    n, m = len(originals), len(images)
    pairs_o = originals.repeat(m, 1, 1, 1)
    pairs_r = images.repeat_interleave(n, dim=0)
    return psnr(pairs_o, pairs_r, data_range).reshape(m, n).max(axis=1)

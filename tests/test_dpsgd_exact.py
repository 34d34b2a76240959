"""DP-SGD exact under any weights (issue 25, item 1): what a site releases depends on one patient
only through that patient's clipped gradient and the noise, whatever weights it was sent.

- A per-sample gradient that is not finite counts as zero, in every grad-sample mode.
- Clipped contributions stay within C at every input scale (1e-40 .. 3e38, inf).
- A label outside the model's outputs never raises: the patient counts as zero.
- Float noise: the low bits of a release do not tell whether a coordinate's sum was 0 (Jin et al.
  2022's attack on float32 noise added in float32).
- A release that is not finite gives back the starting weights, flagged for the site; weights that
  are not finite are refused before any patient is touched.
- Fixed physical batches: padding counts as exactly zero, and every forward pass sees P rows.
- References: with finite gradients and no noise, a step is Opacus' own to float32 rounding.

Each rule's test fails on the code before issue 25 (checked with PYTHONPATH pointing at it).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from opacus.grad_sample import prepare_module
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn

from privmed.models import build_model
from privmed.privacy.dpsgd import CLIP_MARGIN, DPSGD, GRAD_SAMPLE_MODES, dp_train
from privmed.tasks.base import ClassificationLoss
from privmed.tasks.segmentation import DiceCELoss

pytestmark = pytest.mark.usefixtures("one_thread")

D = 13  # features of the tabular models, as UCI heart disease


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).double()


def _step(model, x, y, *, mode, c=1.0, sigma=0.0, seed=0, criterion=None, lr=1.0, physical=None):
    """The parameter change (float64) of one DP step at expected batch size 1, SGD at `lr`; `model`
    is left as it was."""
    start = {k: v.clone() for k, v in model.state_dict().items()}
    before = _flat(model)
    kw = {} if physical is None else {"physical_batch": physical}
    with DPSGD(model, torch.optim.SGD(model.parameters(), lr=lr), noise_multiplier=sigma,
               max_grad_norm=c, expected_batch_size=1, generator=torch.Generator().manual_seed(seed),
               grad_sample_mode=mode, criterion=criterion or ClassificationLoss(), **kw) as dp:
        dp.step(x, y)
    moved = _flat(model) - before
    model.load_state_dict(start)
    return moved


def _crafted_mlp(x: torch.Tensor, target: int) -> nn.Module:
    """privmed's 'mlp' with weights an attacker crafts so that its logit overflows (3e38 x 1.46)
    only on patient `target` (the largest feature 0): hidden unit 0 is +1 there and -1 elsewhere; the
    next layer's unit 0, 1000 (h + 1) - 1999.5, sits at 0.5 there and at -1999.5 (tanh exactly -1)
    elsewhere. With label 0 the target's backpropagated gradient overflows into inf x 0 = NaN."""
    model = build_model("mlp", in_channels=D, num_classes=1, image_size=0, width=8)
    top = torch.sort(x[:, 0]).values
    assert int(torch.argmax(x[:, 0])) == target
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.net[0].weight[0, 0] = 1000.0
        model.net[0].bias[0] = -1000.0 * float(top[-1] + top[-2]) / 2
        model.net[2].weight[0, 0] = 1000.0
        model.net[2].bias[0] = 0.5 - 1000.0
        model.net[4].weight[0, 0] = 3e38
        model.net[4].bias[0] = 3e38
    return model


def _tabular(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=gen), torch.randint(0, 2, (n,), generator=gen)


def _crafted_case() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    x, y = _tabular()
    target = int(torch.argmax(x[:, 0]))
    y[target] = 0
    return _crafted_mlp(x, target), x, y, target


def _nan_pixel_case() -> tuple[nn.Module, torch.Tensor, torch.Tensor, int]:
    """The default DP model on 28 px images, one of which holds a NaN pixel."""
    torch.manual_seed(0)
    model = build_model("dpcnn", in_channels=1, num_classes=2, image_size=28, width=4)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(5, 1, 28, 28, generator=gen)
    y = torch.randint(0, 2, (5,), generator=gen)
    x[2, 0, 3, 4] = math.nan
    return model, x, y, 2


# --- a gradient that is not finite counts as zero ------------------------------------------------


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
@pytest.mark.parametrize("case", ["crafted-mlp", "nan-pixel-dpcnn"])
def test_a_patient_whose_gradient_is_not_finite_counts_as_zero(case, mode):
    model, x, y, target = _crafted_case() if case == "crafted-mlp" else _nan_pixel_case()
    others = torch.arange(len(x)) != target
    for sigma in (0.0, 0.8):
        with_target = _step(model, x, y, mode=mode, sigma=sigma, seed=3)
        without = _step(model, x[others], y[others], mode=mode, sigma=sigma, seed=3)
        assert torch.isfinite(with_target).all(), f"{case} {mode}: the release is not finite"
        torch.testing.assert_close(with_target, without, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_clipped_contributions_stay_within_c_at_every_scale(mode):
    """One patient's features scaled from 1e-40 (subnormal) to 3e38 and inf: it moves a noise-free
    step by at most C, and the step stays finite (above float32's range its gradient counts as 0)."""
    model = nn.Sequential(nn.Linear(D, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # every logit 0, so the gradient is (0.5 - y) [x, 1]: it scales with x
    x, y = _tabular(5, seed=1)
    for c in (1.0, 1e-3):
        for scale in (1e-40, 1e-30, 1e-10, 1.0, 1e10, 1e20, 1e30, 3e38, math.inf):
            xs = x.clone()
            xs[0] = xs[0] * scale if math.isfinite(scale) else math.inf
            moved = _step(model, xs, y, mode=mode, c=c) - _step(model, xs[1:], y[1:], mode=mode, c=c)
            assert torch.isfinite(moved).all(), f"scale {scale:g}, C {c:g}: not finite"
            assert moved.norm() <= c, f"scale {scale:g}, C {c:g}: moved {moved.norm() / c:.7f} C"


# --- no error on a patient's data ----------------------------------------------------------------


def _segmentation_case() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 3, 1))
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(4, 1, 8, 8, generator=gen)
    y = torch.randint(0, 3, (4, 8, 8), generator=gen)
    y[1, 2, 2] = 7  # a class the model has no output for
    return model, x, y


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
@pytest.mark.parametrize("case", ["classification", "binary", "segmentation"])
def test_a_label_outside_the_models_outputs_never_raises_and_counts_as_zero(case, mode):
    """Cross-entropy (and MONAI's one-hot) raise on such a label, and only when that patient is
    drawn: the error would tell the coordinator so. The patient counts as zero instead."""
    if case == "segmentation":
        model, x, y = _segmentation_case()
        criterion, bad = DiceCELoss(), 1
    else:
        torch.manual_seed(0)
        k = 2 if case == "classification" else 1
        model = build_model("mlp", in_channels=D, num_classes=k, image_size=0, width=8)
        x, y = _tabular(5)
        criterion, bad = ClassificationLoss(), 3
        y[bad] = 5
    others = torch.arange(len(x)) != bad
    with_bad = _step(model, x, y, mode=mode, sigma=0.5, seed=1, criterion=criterion)
    without = _step(model, x[others], y[others], mode=mode, sigma=0.5, seed=1, criterion=criterion)
    torch.testing.assert_close(with_bad, without, rtol=1e-5, atol=1e-6)


# --- floating-point noise ------------------------------------------------------------------------


def _low_bits_attack(released: torch.Tensor, contribution: torch.Tensor) -> bool:
    """Jin et al. 2022's test against float noise, on the coordinates where only the target has a
    gradient: if the target was in the sum, a released value y = fl(s + n) within s/2 of 0 is an
    exact float subtraction (Sterbenz), so a multiple of ulp(s)/2. A smaller bit set in any such
    coordinate says: the target was not in the sum."""
    s = contribution.abs()
    near_zero = released.abs() < s / 2
    spacing = torch.ldexp(torch.ones_like(s), torch.frexp(s).exponent - 25)  # ulp(s) / 2 in float32
    finer = torch.remainder(released.double(), spacing.double()) != 0
    return bool((near_zero & finer).any())


def test_the_low_bits_of_a_release_do_not_tell_whether_a_patient_was_in_the_sum():
    """The attacker's weights are zero, its learning rate 1 and the expected batch size 1, so the
    release is minus the noisy sum itself; 1000 features are 0 for every patient but the target,
    whose gradient there is known to the attacker (membership inference knows the record). Noise
    added in float32 (Opacus) gives the answer in about 9 releases of 10; on a grid, none."""
    k = 1000
    model = nn.Sequential(nn.Linear(1 + k, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    gen = torch.Generator().manual_seed(5)
    x = torch.zeros(5, 1 + k)
    x[:, 0] = torch.randn(5, generator=gen)
    x[0, 1:] = (1 + torch.rand(k, generator=gen)) * 2.0**-6  # the target; 0.5 x: in [2^-7, 2^-6)
    y = torch.tensor([0, 1, 0, 1, 0])
    contribution = 0.5 * x[0, 1:]  # its unclipped gradient there: (sigmoid(0) - 0) x
    assert 0.5 * x[0].norm() < 1.0 * (1 - CLIP_MARGIN)  # not clipped: the attacker knows it exactly
    says_absent = {True: 0, False: 0}
    trials = 30
    for present in (True, False):
        rows = slice(0, 5) if present else slice(1, 5)
        for seed in range(trials):
            moved = _step(model, x[rows], y[rows], mode="ew", c=1.0, sigma=1.0, seed=100 + seed)
            released = -moved[:k].float()  # the weights of features 1..k: minus the noisy sum
            says_absent[present] += _low_bits_attack(released, contribution)
    advantage = (says_absent[False] - says_absent[True]) / trials
    assert advantage < 0.25, f"the attack tells membership: advantage {advantage:.2f} ({says_absent})"


# --- releases that are not finite, weights that are not ------------------------------------------


def _overflowing_model() -> nn.Module:
    """Weights at 3.3e38: every logit overflows, and a finite noisy step of lr 1e38 pushes some weight
    past float32's largest value."""
    model = nn.Sequential(nn.Linear(D, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.3e38)
    return model


def _train(model, x, y, **kw):
    args = dict(steps=3, sample_rate=0.5, noise_multiplier=1.0, max_grad_norm=1.0, lr=1e38,
                generator=torch.Generator().manual_seed(0), criterion=ClassificationLoss())
    return dp_train(model, x, y, **{**args, **kw})


def test_a_release_that_is_not_finite_gives_back_the_starting_weights():
    model = _overflowing_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _tabular(20)
    report = _train(model, x, y)
    assert report["nonfinite_release"] is True
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    honest = nn.Sequential(nn.Linear(D, 1))
    assert _train(honest, x, y, lr=0.1)["nonfinite_release"] is False
    assert torch.isfinite(_flat(honest)).all()


def test_weights_that_are_not_finite_are_refused_before_any_patient_is_touched():
    model = nn.Sequential(nn.Linear(D, 1))
    with torch.no_grad():
        model[0].bias[0] = math.nan
    x, y = _tabular(20)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    with pytest.raises(ValueError, match="not all finite"):
        _train(model, x, y, generator=gen, lr=0.1)
    assert torch.equal(gen.get_state(), state)  # no batch was drawn


# --- fixed physical batches ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_padding_counts_as_exactly_zero_and_larger_batches_are_split(mode):
    torch.manual_seed(0)
    model = build_model("dpcnn", in_channels=1, num_classes=2, image_size=28, width=4)
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(5, 1, 28, 28, generator=gen)
    y = torch.randint(0, 2, (5,), generator=gen)
    for sigma in (0.0, 1.0):
        plain = _step(model, x, y, mode=mode, c=0.1, sigma=sigma, seed=9)
        for physical in (8, 5, 2):  # padded; exact; split into 3 batches of 2
            padded = _step(model, x, y, mode=mode, c=0.1, sigma=sigma, seed=9, physical=physical)
            torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-6)
        empty = _step(model, x[:0], y[:0], mode=mode, c=0.1, sigma=sigma, seed=9, physical=4)
        none = _step(model, x[:0], y[:0], mode=mode, c=0.1, sigma=sigma, seed=9)
        torch.testing.assert_close(empty, none, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_every_forward_pass_of_dp_train_sees_the_same_number_of_rows(mode):
    torch.manual_seed(0)
    model = build_model("mlp", in_channels=D, num_classes=1, image_size=0, width=8)
    x, y = _tabular(60)
    rows: list[int] = []
    hook = model.register_forward_pre_hook(lambda _m, args: rows.append(len(args[0])))
    report = dp_train(model, x, y, steps=12, sample_rate=0.2, noise_multiplier=1.0, max_grad_norm=1.0,
                      lr=0.1, generator=torch.Generator().manual_seed(1), grad_sample_mode=mode,
                      criterion=ClassificationLoss())
    hook.remove()
    assert report["physical_batch"] is not None and report["oversized_batches"] == 0
    passes = 2 if mode == "ghost" else 1  # ghost clipping runs every batch twice
    assert rows == [report["physical_batch"]] * (12 * passes)


def test_the_physical_batch_is_the_binomial_tail_bound():
    from scipy.stats import binom

    from privmed.privacy.dpsgd import PAD_TAIL, physical_batch_size

    for n, q in [(1500, 256 / 1500), (300, 256 / 300), (120, 0.3), (40, 0.1), (7, 0.5)]:
        p = physical_batch_size(n, q)
        assert binom.sf(p, n, q) <= PAD_TAIL < binom.sf(p - 1, n, q), (n, q, p)
    assert physical_batch_size(50, 1.0) == 50 and physical_batch_size(1, 0.3) == 1


# --- the noise: a grid that does not depend on the sum -------------------------------------------


def test_the_noised_sum_is_the_rounded_sum_plus_noise_that_does_not_depend_on_it():
    from privmed.privacy.dpsgd import grid_spacing, noised_sum

    grid = grid_spacing(0.7)
    assert grid == 2.0**-31
    sums = [torch.zeros(4000, dtype=torch.float64), torch.randn(4000, dtype=torch.float64) * 3]
    noise = None
    for s in sums:
        out = noised_sum(s.float(), 1.3, grid, torch.Generator().manual_seed(2))
        assert torch.equal(torch.remainder(out, grid), torch.zeros_like(out))  # on the grid
        part = out - torch.round(s.float().double() / grid) * grid
        noise = part if noise is None else noise
        assert torch.equal(part, noise)  # the same noise, whatever the sum
    z = noise / 1.3
    assert abs(z.mean().item()) < 6 / math.sqrt(len(z))
    assert abs(z.var().item() - 1) < 6 * math.sqrt(2 / len(z))
    assert torch.equal(noised_sum(sums[1], 0.0, grid, torch.Generator()), sums[1])


# --- references: with finite gradients, Opacus' own step -----------------------------------------


def _opacus_step(model, x, y, *, mode, c):
    """One noise-free step as the code before issue 25 ran it: Opacus' own DPOptimizer (ghost:
    its fast-gradient-clipping optimizer and loss), clipping at C(1 - CLIP_MARGIN)."""
    start = {k: v.clone() for k, v in model.state_dict().items()}
    before = _flat(model)
    clip = c * (1 - CLIP_MARGIN)
    kwargs = {"max_grad_norm": clip} if mode == "ghost" else {}
    gsm = prepare_module(model.train(), mode, loss_reduction="mean", **kwargs)
    cls = DPOptimizerFastGradientClipping if mode == "ghost" else DPOptimizer
    opt = cls(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=clip,
              expected_batch_size=1, generator=torch.Generator().manual_seed(0))
    criterion = ClassificationLoss()
    if mode == "ghost":
        DPLossFastGradientClipping(gsm, opt, criterion, "mean")(gsm(x), y).backward()
    else:
        criterion(gsm(x), y).backward()
    opt.step()
    gsm.to_standard_module()
    moved = _flat(model) - before
    model.load_state_dict(start)
    return moved


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_with_finite_gradients_a_step_is_opacus_own_to_float32_rounding(mode):
    """Not bitwise: norms, clipped products and the sum are now float64 (Opacus': float32), and the
    ghost mode's second pass runs on a fresh forward pass at 2^-ceil(log2 B) scale."""
    torch.manual_seed(0)
    model = build_model("dpcnn", in_channels=1, num_classes=2, image_size=28, width=4)
    gen = torch.Generator().manual_seed(6)
    x = torch.rand(6, 1, 28, 28, generator=gen)
    y = torch.randint(0, 2, (6,), generator=gen)
    ours = _step(model, x, y, mode=mode, c=0.05)
    theirs = _opacus_step(model, x, y, mode=mode, c=0.05)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    assert (ours - theirs).norm() <= 1e-5 * theirs.norm()

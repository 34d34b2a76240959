"""DP-SGD at a site: per-sample gradients against single-sample backward passes, clipping, noise std,
empty batches, Poisson sampling, model validation, reproducibility and unwrapping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from grad_samples import per_sample_gradients
from torch import nn

from privmed.errors import ConfigError
from privmed.federation.site import random_shift
from privmed.models import build_model
from privmed.privacy.dpsgd import (
    CLIP_MARGIN,
    DEFAULT_GRAD_SAMPLE_MODE,
    DPSGD,
    GRAD_SAMPLE_MODES,
    dp_train,
    grid_spacing,
    noised_sum,
    poisson_batches,
    validate_model,
)

MATERIALISING_MODES = ("hooks", "functorch", "ew")  # ghost never forms per-sample gradients


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def _cnn(size: int = 16, width: int = 8, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return build_model("cnn", in_channels=1, num_classes=2, image_size=size, width=width).to(dtype)


def _linear(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 3)).to(dtype)


MODELS = {"cnn": _cnn, "linear": _linear}


def _data(n: int, size: int = 16, classes: int = 2, dtype: torch.dtype = torch.float32, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=gen).to(dtype)
    return x, torch.randint(0, classes, (n,), generator=gen)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def _loop_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per item, its gradients (one tensor per parameter) from its own backward pass."""
    model.train()
    out = []
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        out.append([p.grad.detach().clone() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return out


def _dp_step_gradient(model, x, y, *, mode, c, sigma=0.0, expected=None, seed=0) -> torch.Tensor:
    """The (noised, scaled) gradient one DP step applied: -(w' - w) / lr with SGD at lr 1."""
    before = _flat(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with DPSGD(model, opt, noise_multiplier=sigma, max_grad_norm=c,
               expected_batch_size=expected or max(len(x), 1),
               generator=torch.Generator().manual_seed(seed), grad_sample_mode=mode) as dp:
        dp.step(x, y)
    return before - _flat(model)


# --- per-sample gradients and clipping ------------------------------------------------------------


@pytest.mark.parametrize("mode", MATERIALISING_MODES)
@pytest.mark.parametrize("model_name", ["cnn28", "linear"])
def test_per_sample_gradients_match_single_sample_backward(model_name, mode):
    model = _cnn(size=28, width=16) if model_name == "cnn28" else _linear()
    x, y = _data(6, size=28 if model_name == "cnn28" else 16)
    got = per_sample_gradients(model, x, y, mode)
    loop = _loop_gradients(model, x, y)
    names = [n for n, _ in model.named_parameters()]
    assert list(got) == names
    for k, name in enumerate(names):
        expected = torch.stack([g[k] for g in loop])
        torch.testing.assert_close(got[name], expected, rtol=1e-4, atol=1e-6, msg=f"{mode} {name}")


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
@pytest.mark.parametrize("model_name", ["cnn", "linear"])
def test_each_clipped_gradient_has_norm_at_most_c_and_small_ones_are_unchanged(model_name, mode):
    # float64, so that the invariant is checked to 1e-6 rather than to float32's rounding.
    model = MODELS[model_name](dtype=torch.float64)
    x, y = _data(6, dtype=torch.float64)
    loop = [torch.cat([t.flatten() for t in g]) for g in _loop_gradients(model, x, y)]
    norms = torch.stack([g.norm() for g in loop])
    c = norms.median().item()
    assert (norms < c).any() and (norms > c).any()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(len(x)):
        model.load_state_dict(start)
        # One item, expected batch size 1: the step is exactly that item's clipped gradient.
        clipped = _dp_step_gradient(model, x[i : i + 1], y[i : i + 1], mode=mode, c=c)
        assert clipped.norm() <= c + 1e-6
        if norms[i] < c:
            torch.testing.assert_close(clipped, loop[i], rtol=1e-9, atol=1e-12)
        else:
            torch.testing.assert_close(clipped, loop[i] * c / norms[i], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("model_name", ["cnn", "dpcnn", "resnet18"])
def test_float32_models_are_clipped_to_at_most_c(model_name):
    # Opacus' float32 per-sample norms come out low for large layers (resnet18 overshot C by ~7.5e-5
    # relative before CLIP_MARGIN); every clipped gradient must still have norm <= C.
    torch.manual_seed(0)
    model = build_model(model_name, in_channels=1, num_classes=2, image_size=16)
    x, y = _data(4)
    c = 1e-3  # far below every gradient's norm: every item is clipped
    start = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(len(x)):
        model.load_state_dict(start)
        clipped = _dp_step_gradient(model, x[i : i + 1], y[i : i + 1], mode="ew", c=c).double()
        assert clipped.norm() <= c
        assert clipped.norm() >= c * (1 - 2 * CLIP_MARGIN)  # clipped, not zeroed


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_dp_step_sums_the_clipped_gradients_over_the_expected_batch_size(mode):
    model = _cnn(dtype=torch.float64)
    x, y = _data(8, dtype=torch.float64)
    loop = torch.stack([torch.cat([t.flatten() for t in g]) for g in _loop_gradients(model, x, y)])
    norms = loop.norm(dim=1, keepdim=True)
    c = norms.median().item()
    expected = (loop * (c / (norms + 1e-6)).clamp(max=1.0)).sum(0) / 10.0
    got = _dp_step_gradient(model, x, y, mode=mode, c=c, expected=10.0)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-12)


# --- equivalence with plain SGD -------------------------------------------------------------------


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
@pytest.mark.parametrize("momentum, weight_decay, steps", [(0.0, 0.0, 1), (0.9, 1e-3, 3)])
def test_no_noise_no_clipping_full_batch_equals_plain_sgd(mode, momentum, weight_decay, steps):
    x, y = _data(16)
    plain = _cnn()
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(plain(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    private = _cnn()
    metrics = dp_train(private, x, y, steps=steps, sample_rate=1.0, noise_multiplier=0.0,
                       max_grad_norm=1e6, lr=0.1, optimizer="sgd", momentum=momentum,
                       weight_decay=weight_decay, generator=torch.Generator().manual_seed(0),
                       grad_sample_mode=mode)
    for (name, a), b in zip(plain.state_dict().items(), private.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert metrics["sample_gradient_steps"] == steps * len(x)
    assert metrics["optimizer_steps"] == steps
    assert metrics["train_loss"] == pytest.approx(sum(losses) / steps, rel=1e-5)


# --- noise ----------------------------------------------------------------------------------------


def _assert_gaussian(noise: torch.Tensor, std: float) -> None:
    """Mean 0 and variance std^2, each within 6 standard errors. For the ~37k coordinates here the
    variance bound is about +-4.4%: a std off by 10% (variance by 21%) fails it."""
    z = noise.double() / std
    k = z.numel()
    assert k > 10_000
    assert abs(z.mean().item()) < 6 / math.sqrt(k)
    assert abs(z.pow(2).mean().item() - 1) < 6 * math.sqrt(2 / k), z.std().item()


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_noise_has_std_sigma_c_over_expected_batch_size(mode):
    x, y = _data(6)
    sigma, c, expected = 1.3, 0.7, 5.0
    clean = _dp_step_gradient(_cnn(), x, y, mode=mode, c=c, sigma=0.0, expected=expected)
    noisy = _dp_step_gradient(_cnn(), x, y, mode=mode, c=c, sigma=sigma, expected=expected)
    _assert_gaussian(noisy - clean, sigma * c / expected)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_empty_batch_step_is_noise_only(mode):
    x, y = _data(0)
    sigma, c, expected = 0.9, 2.0, 3.0
    model = _cnn()
    start = _flat(model)
    assert torch.equal(_dp_step_gradient(model, x, y, mode=mode, c=c, sigma=0.0, expected=expected),
                       torch.zeros_like(start))
    assert torch.equal(_flat(model), start)
    noise = _dp_step_gradient(_cnn(), x, y, mode=mode, c=c, sigma=sigma, expected=expected)
    _assert_gaussian(noise, sigma * c / expected)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_empty_batch_step_is_exactly_the_noise_on_its_grid():
    # An empty batch still takes a step (the accountant counts it): its gradient is noised_sum's
    # noise alone (two float64 draws from the generator, on the grid of the clip C(1 - CLIP_MARGIN),
    # rounded once to float32) over the expected batch size. DPSGD skips the forward pass then
    # (functorch and ew cannot run on 0 items).
    x, y = _data(0)
    model = _cnn()
    seen = []
    with DPSGD(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0,
               max_grad_norm=1.0, expected_batch_size=4.0, generator=torch.Generator().manual_seed(7),
               grad_sample_mode="hooks",
               after_noise=lambda: seen.extend(p.grad.clone() for p in model.parameters())) as dp:
        dp.step(x, y)
    clip = 1 - CLIP_MARGIN
    gen = torch.Generator().manual_seed(7)
    assert len(seen) == len(list(_cnn().parameters()))
    for p, got in zip(_cnn().parameters(), seen):
        noise = noised_sum(torch.zeros(p.shape), (1.0 / clip) * clip, grid_spacing(clip), gen).float() / 4.0
        assert torch.equal(got, noise)


def test_dp_train_counts_empty_batches_as_steps():
    x, y = _data(10)
    model = _cnn()
    start = _flat(model)
    m = dp_train(model, x, y, steps=30, sample_rate=0.02, noise_multiplier=1.0, max_grad_norm=1.0,
                 lr=0.1, generator=torch.Generator().manual_seed(0))
    assert m["optimizer_steps"] == 30 and m["empty_batches"] > 0
    assert not torch.equal(_flat(model), start)
    none_drawn = dp_train(_cnn(), x[:1], y[:1], steps=2, sample_rate=1e-3, noise_multiplier=1.0,
                          max_grad_norm=1.0, lr=0.1, generator=torch.Generator().manual_seed(0))
    assert none_drawn["sample_gradient_steps"] == 0 and math.isnan(none_drawn["train_loss"])


# --- Poisson sampling -----------------------------------------------------------------------------


def test_poisson_batches_have_binomial_sizes_and_are_reproducible():
    n, q, steps = 2000, 0.05, 200
    batches = list(poisson_batches(n, q, steps, torch.Generator().manual_seed(3)))
    assert len(batches) == steps
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    # Mean of `steps` Binomial(n, q) sizes: within 5 standard errors of q*n.
    assert abs(sizes.mean().item() - q * n) < 5 * math.sqrt(n * q * (1 - q) / steps)
    assert abs(sizes.var().item() / (n * q * (1 - q)) - 1) < 0.5
    for b in batches:
        assert b.dtype == torch.int64 and bool((b[1:] > b[:-1]).all())
        assert b.numel() == 0 or (0 <= b.min() and b.max() < n)
    again = list(poisson_batches(n, q, steps, torch.Generator().manual_seed(3)))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = list(poisson_batches(n, q, steps, torch.Generator().manual_seed(4)))
    assert not all(torch.equal(a, b) for a, b in zip(batches, other))


def test_poisson_batches_edge_rates():
    small = [len(b) for b in poisson_batches(10, 0.05, 100, torch.Generator().manual_seed(0))]
    assert 0 in small  # P(empty) = 0.95^10 = 0.6 per step
    assert all(len(b) == 0 for b in poisson_batches(5, 0.0, 3, torch.Generator()))
    assert all(torch.equal(b, torch.arange(5)) for b in poisson_batches(5, 1.0, 3, torch.Generator()))
    with pytest.raises(ValueError, match="sample_rate"):
        poisson_batches(5, 1.5, 3, torch.Generator())


def test_dp_train_draws_the_batches_poisson_batches_draws():
    # With sigma 0 and no augmentation nothing else draws from the generator.
    x, y = _data(40)
    m = dp_train(_cnn(), x, y, steps=7, sample_rate=0.1, noise_multiplier=0.0, max_grad_norm=1.0,
                 lr=0.1, generator=torch.Generator().manual_seed(5))
    sizes = [len(b) for b in poisson_batches(40, 0.1, 7, torch.Generator().manual_seed(5))]
    assert m["sample_gradient_steps"] == sum(sizes)
    assert m["empty_batches"] == sizes.count(0)
    assert m["expected_batch_size"] == pytest.approx(4.0)


# --- model validation -----------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self, norm: nn.Module, act: nn.Module):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), norm, act)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


@pytest.mark.parametrize(
    "norm, act, layer, fix",
    [
        (nn.BatchNorm2d(4), nn.SiLU(), "'features.1' is BatchNorm2d", "use GroupNorm"),
        (nn.BatchNorm2d(4, affine=False), nn.SiLU(), "'features.1' is BatchNorm2d", "use GroupNorm"),
        (nn.GroupNorm(2, 4), nn.ReLU(inplace=True), "'features.2' is ReLU(inplace=True)",
         "set inplace=False"),
        (nn.InstanceNorm2d(4, affine=True, track_running_stats=True), nn.SiLU(),
         "'features.1' is InstanceNorm2d", "running stats"),
    ],
)
def test_validate_model_names_the_layer_and_the_fix(norm, act, layer, fix):
    model = _Net(norm, act)
    with pytest.raises(ConfigError, match="model.name") as err:
        validate_model(model)
    msg = str(err.value)
    assert layer in msg and fix in msg and "\n" not in msg
    with pytest.raises(ConfigError):  # DPSGD validates before training
        DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
              max_grad_norm=1.0, expected_batch_size=1.0, generator=torch.Generator())


def test_privmeds_models_pass_validation():
    validate_model(_Net(nn.GroupNorm(2, 4), nn.ReLU()))
    for name in ("cnn", "resnet18"):
        validate_model(build_model(name, in_channels=3, num_classes=4, image_size=28).eval())


def test_unknown_names_are_config_errors():
    x, y = _data(4)
    kwargs = dict(steps=1, sample_rate=0.5, noise_multiplier=1.0, max_grad_norm=1.0, lr=0.1,
                  generator=torch.Generator())
    with pytest.raises(ConfigError, match="did you mean 'hooks'"):
        dp_train(_cnn(), x, y, grad_sample_mode="hook", **kwargs)
    with pytest.raises(ConfigError, match="training.optimizer"):
        dp_train(_cnn(), x, y, optimizer="rmsprop", **kwargs)
    assert DEFAULT_GRAD_SAMPLE_MODE in GRAD_SAMPLE_MODES


# --- reproducibility and the model afterwards -----------------------------------------------------


def _train(model, x, y, seed, mode=DEFAULT_GRAD_SAMPLE_MODE, optimizer="sgd"):
    return dp_train(model, x, y, steps=4, sample_rate=0.25, noise_multiplier=1.0, max_grad_norm=1.0,
                    lr=0.05, optimizer=optimizer, momentum=0.5,
                    generator=torch.Generator().manual_seed(seed), grad_sample_mode=mode,
                    augment=lambda xb, g: random_shift(xb, 1, g))


@pytest.mark.parametrize("mode, optimizer", [(DEFAULT_GRAD_SAMPLE_MODE, "sgd"), ("ghost", "adam")])
def test_same_seed_same_weights_bitwise(mode, optimizer):
    x, y = _data(32)
    a, b, c = _cnn(), _cnn(), _cnn()
    assert _train(a, x, y, 11, mode, optimizer) == _train(b, x, y, 11, mode, optimizer)
    _train(c, x, y, 12, mode, optimizer)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(_flat(a), _flat(c))


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_model_is_plain_after_training_and_can_be_reused(mode):
    x, y = _data(32)
    model = _cnn()
    keys = list(model.state_dict())
    start = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, x, y, 1, mode)
    assert list(model.state_dict()) == keys
    assert type(model).__name__ == "SmallCNN"
    for m in model.modules():
        assert not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks
        assert not hasattr(m, "activations")
    for p in model.parameters():
        assert p.grad is None
        assert not any(hasattr(p, a) for a in ("grad_sample", "summed_grad", "_forward_counter"))
    # The next round: the same object, loaded with the round's weights, trains like a fresh one.
    model.load_state_dict(start)
    fresh = _cnn()
    _train(model, x, y, 2, mode)
    _train(fresh, x, y, 2, mode)
    assert torch.equal(_flat(model), _flat(fresh))


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_after_noise_changes_the_noisy_gradient_before_the_step(mode):
    """FedProx's and SCAFFOLD's gradient terms are added after the noise (post-processing): the step
    taken is lr x (noisy clipped mean gradient + the added term), with the noise as without it."""
    x, y = _data(6)
    kw = dict(noise_multiplier=0.8, max_grad_norm=0.5, expected_batch_size=5.0)
    plain, adjusted = _cnn(), _cnn()
    before = _flat(plain)
    extra = 0.25
    with DPSGD(plain, torch.optim.SGD(plain.parameters(), lr=1.0),
               generator=torch.Generator().manual_seed(3), grad_sample_mode=mode, **kw) as dp:
        dp.step(x, y)

    def add_extra() -> None:
        for p in adjusted.parameters():
            p.grad.add_(extra)

    with DPSGD(adjusted, torch.optim.SGD(adjusted.parameters(), lr=1.0), after_noise=add_extra,
               generator=torch.Generator().manual_seed(3), grad_sample_mode=mode, **kw) as dp:
        dp.step(x, y)
    step_plain, step_adjusted = before - _flat(plain), before - _flat(adjusted)
    torch.testing.assert_close(step_adjusted, step_plain + extra, rtol=1e-5, atol=1e-6)

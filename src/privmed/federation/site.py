"""A site (hospital): trains and evaluates a model on its own data, and knows nothing of rounds'
bookkeeping, strategies or runners. Both runners (in-process, Flower) drive this same class.

Weights travel as lists of numpy arrays in the order of the model's state_dict.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from privmed.config import TrainingConfig
from privmed.data.base import ImageSet
from privmed.data.sites import SiteData
from privmed.errors import ConfigError, TrainingDiverged
from privmed.federation.strategies import SiteUpdate, TrainTask, Weights
from privmed.privacy.accountants import Release
from privmed.privacy.dpsgd import dp_train, make_optimizer
from privmed.tasks.base import Task, get_task, metrics_and_counts
from privmed.tasks.counts import noisy_metrics_and_counts

log = logging.getLogger("privmed.site")


def resolve_device(training: TrainingConfig, private: bool = False) -> torch.device:
    """training.device as a torch device: auto is cuda when a GPU is there and the site does not
    train with DP-SGD (whose noise comes from a CPU generator), else cpu. ConfigError for cuda
    without a GPU."""
    choice = training.device
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() and not private else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device: 'cuda', but torch sees no GPU here (this torch is "
                          f"{torch.__version__}); use cpu or auto")
    return torch.device(choice)


def round_lr(training: TrainingConfig, rnd: int, rounds: int | None) -> float:
    """The sites' learning rate in round `rnd` (1-based) of `rounds`: training.lr, or under the
    cosine schedule lr * (1 + cos(pi (rnd - 1) / rounds)) / 2, from lr in round 1 down towards 0
    (Loshchilov & Hutter 2017, stepped once a round). Rounds past the end (a resumed run given more
    rounds) keep the last round's rate."""
    if training.lr_schedule == "constant" or not rounds:
        return training.lr
    r = min(max(rnd, 1), rounds)
    return training.lr * 0.5 * (1.0 + math.cos(math.pi * (r - 1) / rounds))


def get_weights(model: nn.Module) -> Weights:
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def set_weights(model: nn.Module, weights: Weights) -> None:
    keys = list(model.state_dict())
    if len(keys) != len(weights):
        raise ValueError(f"model has {len(keys)} tensors, got {len(weights)} arrays")
    model.load_state_dict({k: torch.from_numpy(np.asarray(w)) for k, w in zip(keys, weights)})


def n_patients(images: ImageSet) -> int:
    """Distinct patients in `images` (each item is its own patient when the source names none)."""
    return len(images) if images.patient is None else len(np.unique(images.patient))


def derive_seed(seed: int, *parts: int | str) -> int:
    """A 63-bit seed for one purpose (e.g. site 'b', round 3, training) from the run's seed.

    Every draw in a run comes from such a seed, never from global state, so round r of a resumed run
    draws exactly what round r of an uninterrupted run drew.
    """
    words = [seed] + [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image (N, C, H, W), or volume (N, C, D, H, W), by up to `max_shift` pixels
    along each spatial axis, filling the border by reflection. Draws only from `gen`."""
    if max_shift <= 0:
        return x
    n, c, *sides = x.shape
    dims = len(sides)
    padded = F.pad(x, (max_shift,) * (2 * dims), mode="reflect")
    # one index tensor per axis, each broadcast over (N, C, *sides)
    index: list[torch.Tensor] = [
        torch.arange(n).view(n, *[1] * (dims + 1)),
        torch.arange(c).view(1, c, *[1] * dims),
    ]
    for axis, side in enumerate(sides):
        offset = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
        shape = [n, 1] + [1] * dims
        shape[2 + axis] = side
        index.append((offset[:, None] + torch.arange(side)[None, :]).view(shape))
    return padded[tuple(index)]


@dataclass(frozen=True)
class DPTraining:
    """How a site trains under DP-SGD: each turn is `release.steps` steps with patients Poisson-sampled
    at `release.sample_rate`, per-patient gradients clipped to `max_grad_norm`, noise
    `release.noise_multiplier` x `max_grad_norm`."""

    release: Release
    max_grad_norm: float
    grad_sample_mode: str


class Site:
    """One hospital's training and evaluation.

    `model_factory()` returns a model of the run's architecture (its initial weights do not matter:
    the weights to train from always come with the task). `task` (privmed.tasks) gives the targets,
    the loss and the meaning of the model's output. With `dp`, every training turn is DP-SGD and its
    update reports the release it made (`SiteUpdate.release`) for the privacy ledger.
    """

    def __init__(
        self,
        data: SiteData,
        model_factory: Callable[[], nn.Module],
        training: TrainingConfig,
        local_epochs: int,
        seed: int,
        local_steps: int | None = None,
        dp: DPTraining | None = None,
        task: Task | None = None,
        label_shares: Sequence[float] | None = None,
        rounds: int | None = None,
    ):
        self.data = data
        self.rounds = rounds  # the run's federation.rounds: the length of training.lr_schedule
        self.dp = dp
        self.name = data.name
        self.training = training
        self.local_epochs = local_epochs
        self.local_steps = local_steps
        self.seed = seed
        self.task = task if task is not None else get_task("classification")
        self.device = resolve_device(training, private=dp is not None)
        self.model_factory = model_factory
        self.model = model_factory().to(self.device)
        self.criterion = self.task.criterion()
        self._x = torch.from_numpy(data.train.images)
        self._y = self.task.targets(data.train)
        # state_dict position of each trainable parameter (corrections come per state entry)
        position = {k: i for i, k in enumerate(self.model.state_dict())}
        self._params = [(position[n], p) for n, p in self.model.named_parameters() if p.requires_grad]
        self._logit_shift = self._label_shift(label_shares)
        # An auditor's gradient canaries (privmed.audit.canaries), None in every real run: called as
        # hook(parameters, rate, divisor) after each step's gradient is final (after DP-SGD's noise)
        # and before the optimizer steps; a patient joins a step's batch with probability `rate`
        # and its gradient enters divided by `divisor` (DP-SGD's expected batch size, or the batch
        # size of plain training's mean loss).
        self.audit_hook: Callable[[list[nn.Parameter], float, float], None] | None = None
        # The site's public counts, (training items, training patients): FedAvg's weight, and under
        # DP-SGD the patients its noisy sum is divided by (sample_rate x patients, the expected
        # batch). Those of data.train in every real run; an auditor's input canaries
        # (privmed.audit.input_canaries) join data.train and keep the counts of the site's own.
        self.counts = (len(data.train), n_patients(data.train))

    def _label_shift(self, reference: Sequence[float] | None) -> torch.Tensor | None:
        """training.logit_adjustment: what is added to the model's logits in the training loss,
        the log of this site's label shares (Laplace-smoothed, so a class the site lacks gets a
        large negative shift rather than minus infinity) less the log of the federation's
        (`reference`, from the sites' validation counts; uniform when None): cross-entropy then
        trains softmax(z + log prior - log reference), and z itself, used to predict, learns the
        score calibrated to the federation's label shares, whatever this site's (logit adjustment,
        Menon et al. 2021; balanced softmax, Ren et al. 2020; FedLC, Zhang et al. 2022 for federated
        label skew). A site whose shares are the federation's trains unshifted. With one logit
        (binary tables) the shift is the difference of the log prior odds. None when off (auto:
        off under DP-SGD, and for survival)."""
        choice = self.training.logit_adjustment
        if choice == "off" or self.task.name == "survival" or self.task.dense or (choice == "auto" and self.dp is not None):
            return None
        with torch.no_grad():  # the number of logits, from one item in eval mode
            self.model.eval()
            k = self.model(self._x[:1]).shape[1]
            self.model.train()
        n_classes = max(k, 2)
        counts = np.bincount(self.data.train.labels, minlength=n_classes).astype(np.float64)
        log_prior = np.log((counts + 1) / (counts.sum() + n_classes))
        if reference is not None:
            log_prior = log_prior - np.log(np.asarray(reference, dtype=np.float64))
        if k == 1:
            return torch.tensor([log_prior[1] - log_prior[0]], dtype=torch.float32)
        return torch.from_numpy(log_prior[:k].astype(np.float32))

    @property
    def n_train(self) -> int:
        return len(self.data.train)

    def train(
        self, task: TrainTask, rnd: int, steps: int | None = None, purpose: str = "train",
        generator: torch.Generator | None = None,
    ) -> SiteUpdate:
        """Train from `task.weights` for `local_epochs` epochs, or `local_steps` batches when set (or
        `steps` batches when given: fine-tuning); the optimizer starts fresh each round. FedProx's
        proximal term and SCAFFOLD's correction (in `task`) are added to the gradients.
        Every draw (batches, augmentation, DP noise) comes from `generator`: under DP-SGD the one
        the site's secret key gives (see privmed.federation.client); by default one derived from
        the public seed, (seed, purpose, round, site)."""
        start = time.perf_counter()
        set_weights(self.model, task.weights)
        self.model.train()
        gen = generator if generator is not None else torch.Generator().manual_seed(
            derive_seed(self.seed, purpose, rnd, self.name)
        )
        images = self._x.ndim in (4, 5)  # images or volumes, not feature tables
        augment = self.training.augment and images and self.task.augment
        max_shift = max(1, self._x.shape[-1] // 14) if augment else 0
        adjust = self._with_audit_hook(self._gradient_adjustment(task))
        lr = round_lr(self.training, rnd, self.rounds) if purpose == "train" else self.training.lr
        if self.dp is not None:
            return self._train_dp(task, gen, max_shift, start, adjust, lr, steps)
        t = self.training
        opt = make_optimizer(self.model, t.optimizer, lr, t.momentum, t.weight_decay)
        total_loss, samples, n_steps = 0.0, 0, 0
        dev = self.device
        for idx in self._batches(gen, steps):
            xb = random_shift(self._x[idx], max_shift, gen).to(dev)
            out = self.model(xb)
            if self._logit_shift is not None:
                out = out + self._logit_shift.to(dev)
            loss = self.criterion(out, self._y[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if adjust is not None:
                adjust()
            opt.step()
            total_loss += loss.item() * len(idx)
            samples += len(idx)
            n_steps += 1
        return SiteUpdate(
            site=self.name,
            weights=get_weights(self.model),
            n_samples=self.counts[0],
            model_key=task.model_key,
            metrics={
                "train_loss": total_loss / samples,
                "sample_gradient_steps": samples,
                "optimizer_steps": n_steps,
                "train_seconds": time.perf_counter() - start,
            },
        )

    def _gradient_adjustment(self, task: TrainTask) -> Callable[[], None] | None:
        """What to add to each parameter's gradient before a step: FedProx's mu (w - w_global)
        (Li et al. 2020) and SCAFFOLD's c - c_i (Karimireddy et al. 2020). Both depend only on the
        weights the site was sent and its own previous updates, never on this step's data."""
        if not task.prox_mu and task.correction is None:
            return None
        dev = self.device
        anchor = [torch.from_numpy(np.asarray(task.weights[i])).to(dev) for i, _ in self._params]
        corr = (
            None if task.correction is None
            else [torch.as_tensor(np.asarray(task.correction[i])).to(dev) for i, _ in self._params]
        )
        mu = float(task.prox_mu)

        @torch.no_grad()
        def adjust() -> None:
            for k, (_, p) in enumerate(self._params):
                if p.grad is None:
                    continue
                if mu:
                    p.grad.add_(p.detach() - anchor[k].to(p.dtype), alpha=mu)
                if corr is not None:
                    p.grad.add_(corr[k].to(p.dtype))

        return adjust

    def _with_audit_hook(self, adjust: Callable[[], None] | None) -> Callable[[], None] | None:
        """`adjust`, followed by the auditor's hook when one is attached."""
        hook = self.audit_hook
        if hook is None:
            return adjust
        params = [p for _, p in self._params]
        if self.dp is not None:
            r = self.dp.release
            rate, divisor = r.sample_rate, r.sample_rate * self.counts[1]
        else:  # about one batch per epoch holds a given patient
            rate = min(1.0, self.training.batch_size / self.n_train)
            divisor = float(min(self.training.batch_size, self.n_train))

        def adjust_and_hook() -> None:
            if adjust is not None:
                adjust()
            hook(params, rate, divisor)

        return adjust_and_hook

    def _train_dp(
        self, task: TrainTask, gen: torch.Generator, max_shift: int, start: float,
        adjust: Callable[[], None] | None, lr: float, steps: int | None = None,
    ) -> SiteUpdate:
        """A DP-SGD turn: the release's steps, or `steps` (fine-tuning) at its noise and rate."""
        dp, t = self.dp, self.training
        r = dp.release if steps is None else Release(dp.release.noise_multiplier, dp.release.sample_rate, steps)
        stats = dp_train(
            self.model, self._x, self._y,
            steps=r.steps,
            sample_rate=r.sample_rate,
            noise_multiplier=r.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            lr=lr, optimizer=t.optimizer, momentum=t.momentum, weight_decay=t.weight_decay,
            generator=gen,
            grad_sample_mode=dp.grad_sample_mode,
            augment=(lambda xb, g: random_shift(xb, max_shift, g)) if max_shift else None,
            patients=self.data.train.patient,
            criterion=self.criterion,
            after_noise=adjust,
            expected_batch_size=r.sample_rate * self.counts[1],
        )
        # What the weights did to the patients' gradients (any counted as zero, a non-finite release
        # given back as the starting weights) depends on the data: it goes to the site's own log,
        # never into the reply.
        if stats["zeroed_gradients"] or stats["nonfinite_release"]:
            log.warning("site '%s': %d drawn gradient(s) of a DP-SGD turn were not finite (or past the "
                        "clipping range) and counted as zero%s", self.name, stats["zeroed_gradients"],
                        "; the release was not finite: the weights sent back unchanged"
                        if stats["nonfinite_release"] else "")
        # The training loss and the sizes of the batches drawn are computed from the training
        # patients outside the DP mechanism: they stay at the site (the guarantee covers only what
        # leaves it; SiteClient._released also keeps the timing here). The work done is reported as
        # its expectation, a public figure.
        return SiteUpdate(
            site=self.name,
            weights=get_weights(self.model),
            n_samples=self.counts[0],
            model_key=task.model_key,
            metrics={
                "train_loss": math.nan,
                "sample_gradient_steps": round(r.sample_rate * self.counts[1] * r.steps),
                "optimizer_steps": r.steps,
                "train_seconds": time.perf_counter() - start,
            },
            release=r,
        )

    def _batches(self, gen: torch.Generator, steps: int | None = None) -> Iterator[torch.Tensor]:
        """Index batches: `local_epochs` passes over the shuffled data; or, when `local_steps` (or
        `steps`) is set, exactly that many full batches cut from a stream of consecutive shuffled
        passes."""
        n, bs = self.n_train, self.training.batch_size
        steps = self.local_steps if steps is None else steps
        if steps is None:
            for _ in range(self.local_epochs):
                perm = torch.randperm(n, generator=gen)
                yield from (perm[i : i + bs] for i in range(0, n, bs))
            return
        stream = torch.empty(0, dtype=torch.long)
        for _ in range(steps):
            while len(stream) < bs:
                stream = torch.cat([stream, torch.randperm(n, generator=gen)])
            yield stream[:bs]
            stream = stream[bs:]

    def predict(self, weights: Weights, images: np.ndarray) -> np.ndarray:
        """The task's predictions of the model with `weights` on `images` (see `predict`)."""
        return predict(self.model, weights, images, self.training.eval_batch_size, self.task)

    def holds(self, split: str) -> bool:
        """Whether the site has patients in `split` ('val' or 'test')."""
        data = self._split(split)
        return data is not None and len(data) > 0

    def _split(self, split: str) -> ImageSet | None:
        if split not in ("val", "test"):
            raise ValueError(f"split: '{split}' is not one a site scores (allowed: val, test)")
        return {"val": self.data.val, "test": self.data.test}[split]

    def check_weights(self, weights: Weights, what: str = "weights") -> None:
        """ValueError (saying what is wrong, never what a patient's data did) unless `weights` are
        one finite array per entry of the model's state, each of that entry's shape and dtype (a
        SCAFFOLD 'correction' may be of any float dtype: the server keeps it in float64)."""
        state = self.model.state_dict()
        if not isinstance(weights, (list, tuple)) or len(weights) != len(state):
            n = len(weights) if isinstance(weights, (list, tuple)) else type(weights).__name__
            raise ValueError(f"{what}: {n} arrays, the run's model has {len(state)}")
        for (name, ref), w in zip(state.items(), weights):
            w = np.asarray(w)
            want = torch.empty(0, dtype=ref.dtype).numpy().dtype
            dtype_ok = w.dtype == want or (what == "correction" and np.issubdtype(w.dtype, np.floating)
                                           and np.issubdtype(want, np.floating))
            if w.shape != tuple(ref.shape) or not dtype_ok:
                raise ValueError(f"{what}: '{name}' is {w.dtype}{list(w.shape)}, the run's model has "
                                 f"{want}{list(ref.shape)}")
            if np.issubdtype(w.dtype, np.floating) and not np.all(np.isfinite(w)):
                raise ValueError(f"{what}: '{name}' holds values that are not finite numbers")

    def score(self, weights: Weights, split: str, noise_multiplier: float | None = None,
              rng: np.random.Generator | None = None) -> tuple[dict, dict]:
        """(metrics, counts) of `weights` on this site's own `split` ('val' or 'test'). Without
        `noise_multiplier`: the task's metrics, and the exact counts from which pooled metrics over
        several sites are computed (privmed.tasks.counts; no patient's prediction is in them). With
        it: the counts through the Gaussian mechanism of privmed.privacy.noisy_counts (noise drawn
        from `rng` only; the task's private counts in privmed.tasks.counts: each patient weighs 1,
        unbounded figures clipped, non-finite predictions scored as a fixed value, so nothing here
        raises on a patient's data), and the metrics computed from those noisy counts. ({}, {})
        without such data."""
        data = self._split(split)
        if data is None or len(data) == 0:
            return {}, {}
        pred = self.predict(weights, data.images)
        if noise_multiplier is not None:
            return noisy_metrics_and_counts(self.task, pred, data, noise_multiplier, rng)
        if not np.all(np.isfinite(pred)):
            raise TrainingDiverged(
                f"site '{self.name}': the model's outputs on its {split} data are not finite numbers "
                f"(training diverged); {TrainingDiverged.ADVICE}"
            )
        return metrics_and_counts(self.task, pred, data)


@torch.no_grad()
def predict(
    model: nn.Module, weights: Weights, images: np.ndarray, batch_size: int, task: Task | None = None
) -> np.ndarray:
    """float64 predictions of `model` loaded with `weights` on `images` (N, ...): class
    probabilities (N, K) for classification (the default), risk scores (N,) for survival."""
    task = task if task is not None else get_task("classification")
    set_weights(model, weights)
    model.eval()
    dev = next(model.parameters()).device
    x = torch.from_numpy(images)
    out = [task.predict(model(x[i : i + batch_size].to(dev))).cpu() for i in range(0, len(x), batch_size)]
    if not out:
        return np.zeros((0,), dtype=np.float64)
    return torch.cat(out).numpy().astype(np.float64)

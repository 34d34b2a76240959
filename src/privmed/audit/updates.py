"""The model updates a coordinator sees, made by privmed's own sites: what gradient inversion attacks.

A finished run's sites are rebuilt from its config (as the membership audit does,
privmed.audit.membership.load_target); a few of a site's training patients are drawn and the site
trains on them through privmed's `Site` from the weights the coordinator sends, with the local work
the attacker wants to study:

- 'step': one step on a batch of B patients; 'epoch': one local epoch over B patients in mini-batches
  of EPOCH_BATCH (B / EPOCH_BATCH steps);
- without DP: plain SGD at the run's learning rate, no augmentation, no logit adjustment (the
  coordinator writes the run config, so it can ask for this: the most it can learn);
- with DP-SGD: the site's own mechanism (`Site` -> `dp_train`: each patient's gradient clipped to
  privacy.max_grad_norm, Gaussian noise of noise_multiplier x C added, divided by the expected batch
  size), with the noise multiplier privmed's calibration gives the run's sites for the epsilon asked
  for (the run's own plan when it ran with DP-SGD at that epsilon). The B patients are the batch: the
  sampling that would have drawn them is not simulated, only its noise kept, so the attacker sees
  what it would see on a step where these B patients were drawn. The noise comes from a key the
  attacker does not hold;
- under secure aggregation: every site trains the same way on B patients of its own, and the
  coordinator gets only the weighted mean of their updates, by Flower's SecAgg+ exactly as a run
  with federation.secure_aggregation makes it (privmed.federation.transport.InProcessSites).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from privmed.audit.membership import Target
from privmed.catalog import PrivacyMode
from privmed.config import RunConfig, validate_config
from privmed.data.sites import SiteData
from privmed.errors import ConfigError
from privmed.federation.experiment import experiment_from_sites, make_model_factory, plan_experiment
from privmed.federation.facts import SiteProfile
from privmed.federation.site import DPTraining, Site, derive_seed, get_weights
from privmed.federation.strategies import TrainTask, Weights
from privmed.privacy.accountants import Release
from privmed.tasks.base import get_task

VIEWS = ("site", "site-dp", "secure-sum")
LOCAL_WORK = ("step", "epoch")
EPOCH_BATCH = 2  # mini-batch size of a local epoch's steps
SECURE_MIN_SITES = 3


@dataclass(frozen=True)
class Setting:
    """One update the audit attacks: whose (`view`), how many patients per site (`batch`), how much
    local training (`local`), and for 'site-dp' the `epsilon` its noise is calibrated to. A
    'secure-sum' is rebuilt as all the sites' images together, or with `as_one` as a single image
    (an attacker who takes the sum for one image's update)."""

    view: str
    batch: int
    local: str = "step"
    epsilon: float | None = None
    as_one: bool = False

    def __post_init__(self) -> None:
        if self.view not in VIEWS:
            raise ConfigError(f"inversion view: '{self.view}' (allowed: {', '.join(VIEWS)})")
        if self.local not in LOCAL_WORK:
            raise ConfigError(f"inversion local work: '{self.local}' (allowed: {', '.join(LOCAL_WORK)})")
        if not 1 <= self.batch <= 64:
            raise ConfigError(f"--batch: {self.batch}; allowed: 1 to 64 patients")
        if (self.view == "site-dp") != (self.epsilon is not None):
            raise ConfigError(f"inversion view '{self.view}': an epsilon goes with 'site-dp' only")
        if self.as_one and self.view != "secure-sum":
            raise ConfigError(f"inversion view '{self.view}': rebuilding as one image goes with 'secure-sum' only")

    @property
    def local_batch(self) -> int:
        return self.batch if self.local == "step" else min(self.batch, EPOCH_BATCH)

    @property
    def local_steps(self) -> int:
        return math.ceil(self.batch / self.local_batch)

    @property
    def key(self) -> str:
        """A name for audit.json and the image file, e.g. 'site-dp-eps8-b1-step'."""
        view = self.view if self.epsilon is None else f"site-dp-eps{self.epsilon:g}"
        return f"{view}-b{self.batch}-{self.local}" + ("-as-one" if self.as_one else "")


@dataclass
class Observed:
    """What the coordinator saw in one trial, and the truth to score the attack against: the
    images (N, C, H, W) float32 and labels (N,) the sites trained on (N = batch x sites), the
    sites, and the update (one tensor per trainable parameter of the model: new - sent weights;
    under secure aggregation the weighted mean of the sites' updates)."""

    images: torch.Tensor
    labels: torch.Tensor
    sites: list[str]
    update: list[torch.Tensor]


class UpdateMaker:
    """Makes the updates of `target`'s sites from `weights` (the global model the coordinator
    sends: the run's initial weights, or its final model), under a seed of the audit's."""

    def __init__(self, target: Target, weights: Weights, seed: int):
        cfg = target.config
        if target.facts.tabular or target.source.train.images.ndim != 4:
            holds = "a feature table" if target.facts.tabular else "3-D volumes"
            raise ConfigError(f"data.source '{cfg.data.source}': gradient inversion rebuilds 2-D images; "
                              f"this run's data is {holds}")
        if cfg.task != "classification":
            raise ConfigError(f"task: '{cfg.task}'; gradient inversion needs image classification")
        self.target, self.weights, self.seed = target, weights, seed
        self.task = get_task(cfg.task)
        self.model_factory = make_model_factory(cfg, target.facts, self.task)
        self._noise: dict[float, tuple[float, float, str]] = {}

    @property
    def mean_image(self) -> torch.Tensor:
        """The pixel-wise mean of all the sites' training images (1, C, H, W): what an attacker who
        knows only the data's distribution would draw (the floor a reconstruction must beat)."""
        pooled = np.concatenate([sd.train.images for sd in self.target.site_data])
        return torch.from_numpy(pooled.mean(axis=0, keepdims=True).astype(np.float32))

    @property
    def intensity(self) -> tuple[float, float]:
        """The mean over the pooled test set's images (data of the same kind as the sites', which
        no site trains on) of each image's pixel mean and of its pixel standard deviation: the
        attacker's prior on an image's brightness and contrast."""
        test = self.target.source.test.images
        return float(test.mean(axis=(1, 2, 3)).mean()), float(test.std(axis=(1, 2, 3)).mean())

    def model(self) -> torch.nn.Module:
        """The run's model holding the weights sent (what the attacker differentiates)."""
        from privmed.federation.site import set_weights

        m = self.model_factory()
        set_weights(m, self.weights)
        return m

    def observe(self, setting: Setting, trial: int) -> Observed:
        """One trial of `setting`: fresh patients, trained on as the setting says."""
        sites = self.target.site_data
        if setting.view == "secure-sum":
            if len(sites) < SECURE_MIN_SITES:
                raise ConfigError(f"sites.count: {len(sites)}; the secure-sum view needs {SECURE_MIN_SITES} "
                                  "sites or more (secure aggregation's minimum)")
            small = [self._draw(i, setting, trial) for i in range(len(sites))]
            update = self._secure_mean(small, setting, trial)
        else:
            small = [self._draw(0, setting, trial)]
            update = self._site_update(small[0], setting, trial)
        images = torch.from_numpy(np.concatenate([sd.train.images for sd in small]))
        labels = torch.from_numpy(np.concatenate([sd.train.labels for sd in small]).astype(np.int64))
        return Observed(images, labels, [sd.name for sd in small], self._trainable_deltas(update))

    # ------------------------------------------------------------------ the sites
    def _draw(self, site: int, setting: Setting, trial: int) -> SiteData:
        """Site `site` holding only `setting.batch` of its training patients, one item each, drawn
        at random (seed, setting, trial); its validation data as it was."""
        sd = self.target.site_data[site]
        ids = sd.train.patient_ids()
        patients = np.unique(ids)
        if len(patients) < setting.batch:
            raise ConfigError(f"--batch: {setting.batch}; site '{sd.name}' has {len(patients)} training patients")
        rng = np.random.default_rng([self.seed, 0x1DE7, site, setting.batch, trial])
        chosen = rng.choice(len(patients), setting.batch, replace=False)
        items = np.asarray([rng.choice(np.flatnonzero(ids == patients[c])) for c in chosen])
        return SiteData(sd.name, sd.train.subset(items), sd.val)

    def _audit_config(self, setting: Setting, secure: bool) -> RunConfig:
        """The run's config with the local work of `setting`: plain SGD at the run's learning rate,
        no augmentation or logit adjustment, no privacy (DP comes with the site's DPTraining);
        under `secure`, FedAvg with SecAgg+ (the run's SecAgg+ settings where it had them)."""
        d = self.target.config.to_dict()
        d["training"].update(batch_size=setting.local_batch, optimizer="sgd", momentum=0.0,
                             weight_decay=0.0, augment=False, logit_adjustment="off")
        fed = d["federation"]
        fed.update(rounds=1, local_epochs=1, finetune_steps=0,
                   local_steps=1 if setting.local == "step" else None)
        if secure:
            fed.update(strategy="fedavg", secure_aggregation=True, server_lr=None)
        d["privacy"] = {"mode": "none"}
        return validate_config(d, source="the inversion audit's config")

    def _site(self, sd: SiteData, setting: Setting, dp: DPTraining | None) -> Site:
        cfg = self._audit_config(setting, secure=False)
        f = cfg.federation
        return Site(sd, self.model_factory, cfg.training, f.local_epochs, cfg.seed, f.local_steps, dp=dp,
                    task=self.task, rounds=f.rounds)

    def _site_update(self, sd: SiteData, setting: Setting, trial: int) -> Weights:
        dp = None if setting.view == "site" else self._dp_training(setting)
        site = self._site(sd, setting, dp)
        # under DP-SGD the site's secret key drives batches and noise: a seed the attacker lacks
        secret = torch.Generator().manual_seed(derive_seed(self.seed, "inversion-site-key", setting.key, trial))
        trained = site.train(TrainTask(sd.name, self.weights), rnd=1, generator=secret if dp else None)
        return _minus(trained.weights, self.weights)

    def _dp_training(self, setting: Setting) -> DPTraining:
        """DP-SGD as the site would run it for `setting`: the noise multiplier its run's plan gives
        at `setting.epsilon`; every one of the B patients in the one step, or Poisson-sampled at
        rate EPOCH_BATCH / B over the epoch's steps."""
        sigma, clip, mode = self.noise(setting.epsilon)
        q = 1.0 if setting.local == "step" else setting.local_batch / setting.batch
        return DPTraining(Release(sigma, q, setting.local_steps), clip, mode)

    def noise(self, epsilon: float) -> tuple[float, float, str]:
        """(noise multiplier, clipping norm, grad_sample_mode) of the run's first site under DP-SGD
        at `epsilon`: privmed's plan over the run's real sites (their patient counts, rounds, local
        steps and batch size), the run's own when it ran DP-SGD at that epsilon."""
        if epsilon not in self._noise:
            cfg = self.target.config
            p = cfg.privacy
            if not (p.mode == PrivacyMode.DP_SGD and p.epsilon == epsilon):
                d = cfg.to_dict()
                d["privacy"] = {"mode": "dp-sgd", "epsilon": float(epsilon), "delta": p.delta,
                                "max_grad_norm": p.max_grad_norm, "accountant": p.accountant,
                                "grad_sample_mode": p.grad_sample_mode}
                if d["training"]["logit_adjustment"] == "on":
                    d["training"]["logit_adjustment"] = "off"
                d["federation"]["secure_aggregation"] = False
                for key in ("secagg_shares", "secagg_threshold"):
                    d["federation"][key] = None
                cfg = validate_config(d, source="the inversion audit's DP config")
            sites = self.target.site_data
            plan = plan_experiment(cfg, self.target.facts, [SiteProfile.of(sd) for sd in sites])
            release = plan.privacy.release(sites[0].name)
            self._noise[epsilon] = (release.noise_multiplier, cfg.privacy.max_grad_norm, cfg.privacy.grad_sample_mode)
        return self._noise[epsilon]

    def _secure_mean(self, small: list[SiteData], setting: Setting, trial: int) -> Weights:
        """The weighted mean of the sites' updates, as SecAgg+ unmasks it for the coordinator."""
        from privmed.federation.transport import InProcessSites

        cfg = self._audit_config(setting, secure=True)
        exp = experiment_from_sites(cfg, small, self.target.facts)
        sites = InProcessSites(exp)
        try:
            tasks = [TrainTask(sd.name, self.weights) for sd in small]
            out = sites.train_stage(tasks, 1, exp.strategy, f"audit-inversion-{setting.key}-{trial}")
        finally:
            sites.close()
        return out.secure.mean

    def _trainable_deltas(self, update: Weights) -> list[torch.Tensor]:
        """The entries of a state_dict-ordered update that belong to trainable parameters, float32."""
        model = self.model_factory()
        position = {k: i for i, k in enumerate(model.state_dict())}
        return [torch.as_tensor(np.asarray(update[position[n]], dtype=np.float32))
                for n, p in model.named_parameters() if p.requires_grad]


def initial_weights(target: Target) -> Weights:
    """The weights every site trained from in the run's first round (drawn from the run's seed)."""
    cfg = target.config
    return get_weights(make_model_factory(cfg, target.facts, get_task(cfg.task))())


def _minus(a: Weights, b: Weights) -> Weights:
    return [np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64) for x, y in zip(a, b, strict=True)]

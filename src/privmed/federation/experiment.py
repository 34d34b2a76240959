"""Everything a run needs, built and validated from a config before anything is written."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from privmed.config import RunConfig
from privmed.data import SourceData, load_source
from privmed.data.sites import SiteData, pooled_site, split_into_sites
from privmed.federation.client import GuardPolicy, SiteClient, SiteGuard
from privmed.federation.facts import DataFacts, SiteProfile
from privmed.federation.site import DPTraining, Site, derive_seed, get_weights
from privmed.federation.strategies import POOLED_SITE, DPFedAvg, Strategy, Weights, build_strategy
from privmed.errors import ConfigError
from privmed.models import TABULAR_MODELS, build_model, check_model_name, norm_state_mask
from privmed.privacy.dpsgd import validate_model
from privmed.privacy.plan import PrivacyPlan, SiteFacts, make_plan
from privmed.tasks.base import Task, get_task


@dataclass
class Plan:
    """Everything a run decides before training, from the config and the sites' public facts only:
    the task, the model and its initial weights, the strategy and (with privacy) the privacy plan.
    `trainers`: the profiles of those who train (the sites, or one pooled site)."""

    config: RunConfig
    task: Task
    data: DataFacts
    sites: list[SiteProfile]
    trainers: list[SiteProfile]
    strategy: Strategy
    model_factory: Callable[[], nn.Module]
    initial_weights: Weights
    local_steps: int | None  # per training turn (the pooled site does all sites' work)
    privacy: PrivacyPlan | None = None  # None: privacy.mode 'none'


@dataclass
class Experiment:
    """A simulation's run: the plan, and the sites built from the data (a deployment's coordinator
    has the plan only; each hospital builds its own site)."""

    plan: Plan
    source: SourceData
    site_data: list[SiteData]  # the real sites: evaluation is always per real site
    trainers: dict[str, Site]  # who trains: the sites, or one pooled site

    config = property(lambda self: self.plan.config)
    task = property(lambda self: self.plan.task)
    model_factory = property(lambda self: self.plan.model_factory)
    initial_weights = property(lambda self: self.plan.initial_weights)
    privacy = property(lambda self: self.plan.privacy)

    @property
    def strategy(self) -> Strategy:
        return self.plan.strategy

    @property
    def trainer_names(self) -> list[str]:
        return list(self.trainers)

    @property
    def has_validation(self) -> bool:
        """Whether any site holds validation data (data.val_fraction 0 leaves none)."""
        return any(p.n_val for p in self.plan.sites)


def prepare_experiment(cfg: RunConfig, noise: Mapping[str, float] | None = None) -> Experiment:
    """Load and partition the data, plan the run from the sites' public facts (`plan_experiment`)
    and build the sites. `noise`: the noise multipliers a resumed run started with (else calibrated
    from the config). Raises PrivmedError on bad input; writes nothing."""
    check_model_name(cfg.model.name)
    source = load_source(cfg.data, cfg.sites, seed=cfg.seed)
    site_data = split_into_sites(source, cfg.sites, val_fraction=cfg.data.val_fraction, seed=cfg.seed)
    pooled = None

    def pooled_profile() -> SiteProfile:
        nonlocal pooled
        pooled = pooled_site(site_data, POOLED_SITE)
        return SiteProfile.of(pooled)

    plan = plan_experiment(
        cfg, DataFacts.of(source, cfg.data.source), [SiteProfile.of(sd) for sd in site_data],
        pooled=pooled_profile, noise=noise,
    )
    train_on = [pooled] if plan.strategy.pools_data else site_data
    trainers = {sd.name: build_site(plan, sd) for sd in train_on}
    return Experiment(plan, source, site_data, trainers)


def plan_experiment(
    cfg: RunConfig, data: DataFacts, sites: list[SiteProfile],
    pooled: Callable[[], SiteProfile] | None = None, noise: Mapping[str, float] | None = None,
) -> Plan:
    """The run's plan from the config and public facts only (no patient's record): the model (its
    initial weights from the seed), the strategy and the privacy plan over the sites' counts.
    `pooled`: the pooled site's profile, for strategies that pool the data (a simulation only)."""
    check_model_name(cfg.model.name)
    task = get_task(cfg.task)
    _check_model_fits_data(cfg.model.name, data.tabular, data.source)
    if cfg.federation.model_selection == "best-validation" and not any(p.n_val for p in sites):
        raise ConfigError(
            "federation.model_selection: 'best-validation' needs validation data, and "
            f"data.val_fraction is {cfg.data.val_fraction:g}; use 'last' or 'auto'"
        )

    def model_factory() -> nn.Module:
        """A model with the run's initial weights, drawn from the run's seed without touching
        torch's global random state."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, "init"))
            return build_model(
                cfg.model.name,
                in_channels=data.in_channels,
                num_classes=task.n_outputs(data),
                image_size=data.image_size,
                width=cfg.model.width,
            )

    initial = get_weights(model_factory())
    norm = norm_state_mask(model_factory())
    strategy = build_strategy(
        cfg.federation, seed=cfg.seed, local_lr=cfg.training.lr,
        shared=[not m for m in norm] if any(norm) else None,
    )
    if strategy.pools_data and pooled is None:
        raise ConfigError("federation.strategy: 'pooled' puts all data in one place; it has no sites")
    trainers = [pooled()] if strategy.pools_data else sites
    steps = cfg.federation.local_steps
    if steps is not None and strategy.pools_data:
        steps *= len(sites)  # the pooled site does the work of all sites together
    privacy = None
    if cfg.private:
        if cfg.privacy.mode == "dp-sgd":
            validate_model(model_factory())
        privacy = _privacy_plan(cfg, strategy, trainers, steps)
        if noise is not None:
            privacy = privacy.with_noise(noise)
        if cfg.privacy.mode == "central":
            sigma = next(iter(privacy.noise_multipliers().values()))  # one server, one noise
            strategy = DPFedAvg(cfg.privacy.max_grad_norm, sigma, len(sites))
            if cfg.federation.secure_aggregation:
                strategy.rounding_bound = _secagg_rounding_bound(cfg, initial)
    return Plan(cfg, task, data, sites, trainers, strategy, model_factory, initial, steps, privacy)


def build_site(plan: Plan, sd: SiteData) -> Site:
    """The site that trains on `sd`, as `plan` says (its DP-SGD release, under dp-sgd)."""
    cfg = plan.config
    dp = None
    if plan.privacy is not None and cfg.privacy.mode == "dp-sgd":
        dp = DPTraining(plan.privacy.release(sd.name), cfg.privacy.max_grad_norm, cfg.privacy.grad_sample_mode)
    return Site(sd, plan.model_factory, cfg.training, cfg.federation.local_epochs, cfg.seed,
                plan.local_steps, dp=dp, task=plan.task)


def secagg_rounding_bound(entries: int, clipping_range: float, bits: int) -> float:
    """The most SecAgg+'s stochastic rounding can add to the L2 norm of one site's contribution of
    `entries` numbers: each is rounded to a grid of step 2r / 2^bits, off by less than one step."""
    return math.sqrt(entries) * 2 * clipping_range / 2**bits


def _secagg_rounding_bound(cfg: RunConfig, weights: Weights) -> float:
    """Central DP with secure aggregation: the rounding bound, which each site's clip leaves room
    for; ConfigError when it would take more than half of privacy.max_grad_norm."""
    fed, clip = cfg.federation, cfg.privacy.max_grad_norm
    entries = int(sum(w.size for w in weights))
    bound = secagg_rounding_bound(entries, fed.secagg_clipping_range, fed.secagg_quantization_bits)
    if bound > clip / 2:
        need = math.ceil(math.log2(4 * fed.secagg_clipping_range * math.sqrt(entries) / clip))
        raise ConfigError(
            f"federation.secagg_quantization_bits: {fed.secagg_quantization_bits} rounds each site's "
            f"update by up to {bound:.3g} in L2 norm ({entries} entries, secagg_clipping_range "
            f"{fed.secagg_clipping_range:g}), more than half of privacy.max_grad_norm {clip:g}, which the "
            f"central DP noise is calibrated to; allowed: {need} bits or more, or a smaller "
            "secagg_clipping_range"
        )
    return bound


def _check_model_fits_data(model: str, tabular: bool, source: str) -> None:
    if tabular and model not in TABULAR_MODELS:
        raise ConfigError(
            f"model.name: '{model}' takes images, and data.source '{source}' holds a feature table; "
            f"use one of: {', '.join(sorted(TABULAR_MODELS))}"
        )
    if not tabular and model in TABULAR_MODELS:
        raise ConfigError(
            f"model.name: '{model}' takes a feature table, and data.source '{source}' holds images; "
            "use an image model (cnn, dpcnn, resnet18)"
        )


def _privacy_plan(
    cfg: RunConfig, strategy: Strategy, trainers: list[SiteProfile], local_steps: int | None
) -> PrivacyPlan:
    """Noise for every site, fixed for all planned rounds: a site's turns are counted from the
    strategy's own stages, so any strategy (fedavg, cyclic, ...) is accounted as it will run. The
    unit is 'patient' when the training data carries patient ids, 'record' when not (dp-sgd)."""
    names = [p.name for p in trainers]
    turns = dict.fromkeys(names, 0)
    for rnd in range(1, cfg.federation.rounds + 1):
        for stage in strategy.stages(rnd, names):
            for name in stage:
                turns[name] += 1
    facts = {p.name: SiteFacts(p.n_patients, turns[p.name]) for p in trainers}
    # The guarantee is per patient only where every training item names its patient; otherwise
    # each item counts as its own patient and the honest unit is one record.
    return make_plan(
        cfg.privacy, facts,
        batch_size=cfg.training.batch_size,
        local_epochs=cfg.federation.local_epochs,
        local_steps=local_steps,
        patient_ids=all(p.patient_ids for p in trainers),
    )


def prepare_site(cfg: RunConfig, name: str, state_dir: Path | None = None) -> SiteClient:
    """The one site `name` of the run `cfg` describes, as `prepare_experiment` builds it (the same
    partition, model and privacy plan), for a hospital's process in a deployment: its client, with
    its guard kept in `state_dir` (its secret key and ledger; None: in memory only). The budget the
    guard enforces is this config's: the hospital's own."""
    exp = prepare_experiment(cfg)
    if exp.strategy.pools_data:
        raise ConfigError("federation.strategy: 'pooled' puts all data in one place; it has no sites to join")
    if name not in exp.trainers:
        raise ConfigError(f"--site: '{name}' is not a site of this config; its sites: {', '.join(exp.trainers)}")
    guard = SiteGuard.open(name, GuardPolicy.from_plan(exp.privacy, name), state_dir)
    return SiteClient(exp.trainers[name], guard, cfg.seed)

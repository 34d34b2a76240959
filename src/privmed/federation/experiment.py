"""Everything a run needs, built and validated from a config before anything is written."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from privmed.config import RunConfig
from privmed.data import SourceData, load_source
from privmed.data.sites import SiteData, pooled_site, split_into_sites
from privmed.federation.site import Site, derive_seed, get_weights
from privmed.federation.strategies import POOLED_SITE, Strategy, Weights, build_strategy
from privmed.models import build_model, check_model_name


@dataclass
class Experiment:
    config: RunConfig
    source: SourceData
    site_data: list[SiteData]  # the real sites: evaluation is always per real site
    trainers: dict[str, Site]  # who trains: the sites, or one pooled site
    strategy: Strategy
    model_factory: Callable[[], nn.Module]
    initial_weights: Weights

    @property
    def trainer_names(self) -> list[str]:
        return list(self.trainers)


def prepare_experiment(cfg: RunConfig) -> Experiment:
    """Load and partition the data, build the model and the strategy. Raises PrivmedError on bad
    input; writes nothing."""
    check_model_name(cfg.model.name)
    strategy = build_strategy(
        cfg.federation.strategy, cyclic_order=cfg.federation.cyclic_order, seed=cfg.seed
    )
    source = load_source(cfg.data, cfg.sites, seed=cfg.seed)
    site_data = split_into_sites(
        source, cfg.sites, val_fraction=cfg.data.val_fraction, seed=cfg.seed
    )

    def model_factory() -> nn.Module:
        """A model with the run's initial weights, drawn from the run's seed without touching
        torch's global random state."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, "init"))
            return build_model(
                cfg.model.name,
                in_channels=source.in_channels,
                num_classes=source.n_classes,
                image_size=source.image_size,
                width=cfg.model.width,
            )

    initial = get_weights(model_factory())

    train_on = [pooled_site(site_data, POOLED_SITE)] if strategy.pools_data else site_data
    steps = cfg.federation.local_steps
    if steps is not None and strategy.pools_data:
        steps *= len(site_data)  # the pooled site does the work of all sites together
    trainers = {
        sd.name: Site(sd, model_factory, cfg.training, cfg.federation.local_epochs, cfg.seed, steps)
        for sd in train_on
    }
    return Experiment(cfg, source, site_data, trainers, strategy, model_factory, initial)

"""Defaults that follow the data: what a run's plan sets, from the sites' public counts, where the
config is silent.

privmed's fixed defaults (batch 64, one local epoch a round, 20 rounds, the best validation round's
model) were measured on PneumoniaMNIST's 4,708 training images. At a hospital's size they fail: a
site of 100 images takes two optimizer steps a round, 40 in the whole run, and its 15 validation
images make the choice of round a coin toss (issue 27: pooled test AUC 0.640, every image called
the majority class). So, for image classification (2D and 3D) without DP-SGD, each of these where
the config does not name it:

- training.batch_size: 64 where the smallest site holds 256 training items or more, else 32 (64 or
  more), 16 (32 or more) or 8: a site keeps two batches an epoch or more;
- federation.local_epochs: the whole number of epochs nearest to MIN_STEPS optimizer steps a
  round at the median site (one epoch where that takes 14 steps or more: large sites' local work
  is unchanged), so that the rounds do about the same work whatever the size;
- volumes (3D): about VOLUME_STEPS steps a round instead, and VOLUME_ROUNDS rounds where
  federation.rounds is not set (measured below);
- training.lr_schedule cosine with federation.model_selection last: the learning rate falls to near
  0 by the last round, whose model is the result. The last rounds then move the model little, and
  the choice does not rest on a handful of validation images.

Segmentation of a hospital's own volumes (the `nifti` source, in 2D slices) takes the same local
work rule, federation.local_epochs alone (its batch and lr are the task's, measured on the
phantoms): on IXI's ventricles written as three hospitals' NIfTI files, 20 rounds of one local
epoch, the defaults before, gave a test Dice of 0.000, and 3 local epochs (the rule's choice
there) 0.796 (benchmarks/foreign_volumes.py).

DP-SGD has its own defaults (privmed.config.defaults.DP_SGD_DEFAULTS: its batches and steps are
part of the guarantee), and so do the tabular sources and the other dense runs (phantom and IXI
volumes, whose defaults were measured on them; nifti's 3D patches, unmeasured). The plan's config holds
the values chosen, so config.yaml, the sites' setup and the report show what ran.
benchmarks/small_sites.py measures these against the fixed defaults at 50 to 1,500 training items a
site, benchmarks/small_volumes.py on volumes (README: Defaults at a hospital's size).
"""

from __future__ import annotations

import math
import statistics

from privmed.catalog import PrivacyMode
from privmed.config import RunConfig, validate_config
from privmed.federation.facts import DataFacts, SiteProfile

# optimizer steps a round at the median site (PneumoniaMNIST's 3 iid sites, 1,569 images each at
# batch 64, took 25 an epoch under the fixed defaults measured on them)
MIN_STEPS = 20
# Volumes (3D, trained at lr 0.05): 8 steps a round, over 80 rounds where the config names none. On
# VesselMNIST3D at 100 volumes a site (3 seeds, benchmarks/small_volumes.py; mean test AUC, fedavg
# against pooled training on the same volumes, and the test AUC's move over the last 5 rounds):
#   20 rounds x 20 steps: 0.778 against 0.805, moving by 0.026-0.045
#   40 rounds x  8 steps: 0.776 against 0.821, moving by 0.004-0.012
#   80 rounds x  8 steps: 0.813 against 0.823, moving by 0.001 or less (twice the time of 40)
# (server_lr 2 or 3, and lr 0.1, did not help: seed 0 fell to one class at server_lr 2 and 3)
VOLUME_STEPS, VOLUME_ROUNDS = 8, 80


def batch_size_for(n_smallest: int) -> int:
    """The default batch size for sites whose smallest holds `n_smallest` training items."""
    return 64 if n_smallest >= 256 else 32 if n_smallest >= 64 else 16 if n_smallest >= 32 else 8


def local_epochs_for(n_median: float, batch_size: int, steps: int = MIN_STEPS) -> int:
    """Local epochs that take about `steps` optimizer steps at a site of `n_median` items."""
    per_epoch = max(1, math.ceil(n_median / batch_size))
    return max(1, math.floor(steps / per_epoch + 0.5))  # the nearest whole number of epochs


def _may_apply(cfg: RunConfig) -> bool:
    """The config's half of `applies`: classification, or segmentation of NIfTI slices, without
    DP-SGD (the data's half is known once the sites describe their data)."""
    return cfg.privacy.mode != PrivacyMode.DP_SGD and (cfg.task == "classification" or _own_slices(cfg))


def _own_slices(cfg: RunConfig) -> bool:
    """Segmentation that may be of a hospital's own NIfTI volumes in slices: the `nifti` source
    without data.patch, or a deployment's coordinator, whose hospitals name their source."""
    return cfg.task == "segmentation" and cfg.data.source in ("nifti", "sites") and cfg.data.patch is None


def applies(cfg: RunConfig, data: DataFacts) -> bool:
    """Whether the run's defaults follow the data: image classification without DP-SGD; and the
    local work of segmentation on NIfTI slices (SEGMENTATION_KEYS)."""
    if not _may_apply(cfg) or data.tabular:
        return False
    return cfg.task == "classification" or (data.source == "nifti" and data.spatial_dims == 2)


def fit_to_data(cfg: RunConfig, data: DataFacts, sites: list[SiteProfile]) -> RunConfig:
    """`cfg` with the defaults above set where it is silent (as is where none applies, or where it
    sets them all). Only the sites' counts are read: a deployment's coordinator plans the same."""
    if not applies(cfg, data) or not sites:
        return cfg
    fed, training = cfg.federation.model_fields_set, cfg.training.model_fields_set
    counts = [p.n_train for p in sites]
    classification = cfg.task == "classification"  # segmentation: the local work only
    changes: dict[str, dict] = {"federation": {}, "training": {}}
    batch = cfg.training.batch_size
    if classification and "batch_size" not in training:
        batch = changes["training"]["batch_size"] = batch_size_for(min(counts))
    volumes = data.spatial_dims == 3
    if volumes and "rounds" not in fed:
        changes["federation"]["rounds"] = VOLUME_ROUNDS
    if not {"local_epochs", "local_steps"} & fed:
        steps = VOLUME_STEPS if volumes else MIN_STEPS
        changes["federation"]["local_epochs"] = local_epochs_for(statistics.median(counts), batch, steps)
    if classification and "lr_schedule" not in training and "model_selection" not in fed:
        changes["training"]["lr_schedule"] = "cosine"
        changes["federation"]["model_selection"] = "last"
    current = {section: getattr(cfg, section).model_dump(mode="json") for section in changes}
    if all(current[s].get(k) == v for s, values in changes.items() for k, v in values.items()):
        return cfg
    raw = cfg.to_dict()
    for section, values in changes.items():
        raw[section].update(values)
    return validate_config(raw, source="the run's defaults for its data")


FITTED_KEYS = ("training.batch_size", "federation.local_epochs", "training.lr_schedule",
               "federation.model_selection", "federation.rounds")
SEGMENTATION_KEYS = ("federation.local_epochs",)


def left_to_data(cfg: RunConfig) -> set[str]:
    """The dotted keys whose values `fit_to_data` may choose for `cfg` once the sites' counts are
    known (those the config leaves out, where the defaults follow the data): a resumed run's
    config is compared on them after planning, not before."""
    if not _may_apply(cfg):
        return set()
    keys = FITTED_KEYS if cfg.task == "classification" else SEGMENTATION_KEYS
    left = {k for k in keys if k.split(".")[1] not in getattr(cfg, k.split(".")[0]).model_fields_set}
    if "local_steps" in cfg.federation.model_fields_set:
        left.discard("federation.local_epochs")
    return left

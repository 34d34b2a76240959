"""The config's defaults where it is silent, and their filling-in: what a data source, a dense
task, a 3D volume set, a strategy and DP-SGD each set in the raw config (a dict, before
validation) unless the config sets it itself. `fill_run_defaults` applies them all, in order."""

from __future__ import annotations

import copy
from typing import Any

from privmed import catalog
from privmed.catalog import PrivacyMode
from privmed.config.values import (
    DENSE_TASKS,
    PATCH_MODEL,
    SOURCE_SITES,
    SOURCE_TASK,
    SOURCE_TASKS,
    TABULAR_SOURCES,
    TASK_MODEL,
    VOLUME_MODEL,
    is_volume_source,
)

DEFAULT_HOSPITAL_EPSILON = 10.0  # a hospital's budget when its config names none (README: Across machines)

# Under privacy.mode dp-sgd, what the config does not set comes from here rather than from the
# non-private defaults: measured best for DP-SGD on PneumoniaMNIST (benchmarks/dp_pneumonia.py).
# A small model with bounded activations (noise grows with the parameter count, the clipped signal
# does not), large batches, plain SGD (momentum restarted each round only carries noise), one DP step
# per round (the rounds average the sites' noisy gradients, which copes with label skew), no
# augmentation.
DP_SGD_DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"name": "dpcnn"},
    "federation": {"rounds": 200, "local_steps": 1},
    "training": {"batch_size": 256, "optimizer": "sgd", "lr": 0.5, "momentum": 0.0, "augment": False},
}


def _fill_defaults(data: dict, defaults: dict[str, dict[str, Any]], unless: dict[str, str] | None = None) -> dict:
    """A copy of the raw config `data` with each {section: {key: value}} of `defaults` set where the
    config leaves it out (a key named in `unless` stays out where the config itself sets its
    partner key: a default partner, filled in here, does not count)."""
    data = copy.deepcopy(data)
    for section, values in defaults.items():
        node = data.setdefault(section, {})
        if not isinstance(node, dict):
            return data  # the type error is reported by validation
        given = set(node)
        for key, value in values.items():
            if unless and unless.get(key) in given:
                continue
            node.setdefault(key, value)
    return data


# A tabular source's training defaults (with or without DP-SGD), where the config is silent. The
# image defaults (batch 64, SGD with momentum 0.9 at lr 0.01) leave these small tables under-trained:
# a site of 50-200 rows takes one to three steps an epoch. Smaller batches and plain SGD with a
# larger step, measured over 5 seeds on each source's natural sites: Fed-Heart-Disease fedavg
# mean-over-sites accuracy 0.662 -> 0.724 (DP-SGD at epsilon 1: 0.600 -> 0.721); Fed-TCGA-BRCA fedavg
# C-index 0.680 -> 0.811 (benchmarks/defaults.py). A coordinator config with data.source 'sites'
# does not know the source, so these apply only where the config names it. (Each source's
# `defaults` in privmed.catalog.)
SOURCE_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {s.name: s.defaults for s in catalog.SOURCES if s.defaults}

# A dense task's training defaults, where the config is silent (the learning rate goes with the
# default optimizer: a config naming its optimizer keeps the generic one). Segmentation, phantom
# volumes, fedavg 8 rounds: batch 16 at lr 0.05 reached Dice 0.886 (ventricles 0.802), the generic
# batch 64 at lr 0.01 0.632 (0.358), Adam at 1e-3 0.829 (0.699). Reconstruction: Adam at 2e-3 on a
# cosine schedule, as in benchmarks/recon_pilot.py (+5.07 dB over zero-filling at 4x on IXI); at a
# constant 1e-3 pooled training on IXI diverged for a round (benchmarks/results/ixi_reconstruction.md).
# Both score in batches of 16 images: on one CPU thread the cascade predicted 64 IXI slices 2-3x
# slower in one batch of 64 than in batches of 16 or 4 (its activations outgrow the caches). (Each
# task's `defaults` in privmed.catalog.)
TASK_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {t.name: t.defaults for t in catalog.TASKS if t.defaults}

# A 3D MedMNIST set's defaults where the config is silent (without DP-SGD: with it, DP_SGD_DEFAULTS
# apply, the model being VOLUME_MODEL). The image defaults (lr 0.01, one local epoch a round)
# under-train the 3D CNN in 20 rounds: the validation AUC still climbs at the last round. Measured on
# VesselMNIST3D, 3 iid sites, fedavg, 20 rounds, seed 0 (validation AUC of the chosen model / test
# AUC): lr 0.01, 1 epoch -/0.823; lr 0.05, 1 epoch 0.832/0.851; lr 0.05, 2 epochs 0.877/0.897;
# lr 0.1, 2 epochs 0.838/0.860; lr 0.05, 3 epochs 0.890/0.920. Random shifts help (lr 0.05, 2 epochs
# without them: 0.864/0.833); random flips on top of them did not (lr 0.05, 1 epoch: 0.787/0.707).
# (All with cnn3d at width 16; at width 8, its default since for speed, lr 0.05 and 3 epochs gave
# 0.904/0.915 in a third of the time; over seeds 0-2 test AUC 0.895 against 0.915: privmed.models.cnn.)
# The local work and rounds now follow the sites' sizes (privmed.federation.sizing: about 8 steps a
# round over 40 rounds, where the config names neither).
VOLUME_DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"name": VOLUME_MODEL},
    "training": {"lr": 0.05},
}

# What a strategy needs where the config is silent (see RunConfig._strategy_defaults; each
# strategy's `defaults` in privmed.catalog).
STRATEGY_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    s.name: s.defaults for s in catalog.STRATEGIES if s.defaults
}


def source_defaults(data: Any) -> Any:
    """A tabular source sets the task and, unless given, a tabular model ('linear'), its
    natural sites and its training defaults (SOURCE_DEFAULTS)."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), dict):
        return data
    task = SOURCE_TASK.get(data["data"].get("source"))
    if task is None:
        return data
    data = copy.deepcopy(data)
    data.setdefault("task", task)
    model = data.setdefault("model", {})
    if isinstance(model, dict):
        model.setdefault("name", "linear")
    sites = data.setdefault("sites", {})
    if isinstance(sites, dict):  # the hospitals the data was collected at
        sites.setdefault("partition", "natural")
        if sites["partition"] == "natural":
            sites.setdefault("count", SOURCE_SITES[data["data"]["source"]])
    # the learning rate and momentum go with the default optimizer: a config naming its
    # optimizer gets the generic ones
    return _fill_defaults(data, SOURCE_DEFAULTS[data["data"]["source"]],
                          unless={"lr": "optimizer", "momentum": "optimizer"})


def task_defaults(data: Any) -> Any:
    """A source that holds data for dense tasks only (ixi, nifti) sets the task unless given,
    and a dense task sets its model (TASK_MODEL; segmentation on data.patch's 3D patches:
    PATCH_MODEL) unless the config names one."""
    if not isinstance(data, dict):
        return data
    source = data.get("data", {}).get("source") if isinstance(data.get("data"), dict) else None
    task = data.get("task")
    if task is None and source in SOURCE_TASKS and SOURCE_TASKS[source][0] in DENSE_TASKS:
        task = SOURCE_TASKS[source][0]
    if task not in TASK_MODEL:
        return data
    data = copy.deepcopy(data)
    data["task"] = task
    model = data.setdefault("model", {})
    if isinstance(model, dict):
        patches = isinstance(data.get("data"), dict) and data["data"].get("patch") is not None
        model.setdefault("name", PATCH_MODEL if patches and task == "segmentation" else TASK_MODEL[task])
    return _fill_defaults(data, TASK_DEFAULTS.get(task, {}), unless={"lr": "optimizer"})


def volume_defaults(data: Any) -> Any:
    """A source of 3D volumes (a 3D MedMNIST set) gets a 3D model where the config names none
    (VOLUME_MODEL: the 2D default 'cnn' cannot read a volume) and, without DP-SGD, the training
    defaults measured on volumes (VOLUME_DEFAULTS; the learning rate goes with the default
    optimizer)."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), dict):
        return data
    if not is_volume_source(data["data"].get("source"), data["data"].get("name")):
        return data
    privacy = data.get("privacy")
    if isinstance(privacy, dict) and privacy.get("mode") == PrivacyMode.DP_SGD:
        return _fill_defaults(data, {"model": {"name": VOLUME_MODEL}})
    return _fill_defaults(data, VOLUME_DEFAULTS, unless={"lr": "optimizer"})


def strategy_defaults(data: Any) -> Any:
    """Keys the config leaves out that a strategy needs otherwise: SCAFFOLD's control variates
    assume plain local SGD, so under `scaffold` training.optimizer defaults to sgd and
    training.momentum to 0 (values the config sets are kept, and checked)."""
    if not isinstance(data, dict) or not isinstance(data.get("federation"), dict):
        return data
    defaults = STRATEGY_DEFAULTS.get(data["federation"].get("strategy"))
    return _fill_defaults(data, defaults) if defaults else data


def dp_sgd_defaults(data: Any) -> Any:
    """Under privacy.mode dp-sgd, keys the config leaves out take DP_SGD_DEFAULTS (image
    classification only: they were measured there)."""
    if not isinstance(data, dict):
        return data
    source = data.get("data", {}).get("source") if isinstance(data.get("data"), dict) else None
    # a source whose first task is dense (ixi, nifti) means that task where none is named: this
    # runs before task_defaults fills it in
    task = data.get("task") or (SOURCE_TASKS[source][0] if source in SOURCE_TASKS else "classification")
    if source in TABULAR_SOURCES or task != "classification":
        return data
    privacy = data.get("privacy")
    if not (isinstance(privacy, dict) and privacy.get("mode") == PrivacyMode.DP_SGD):
        return data
    defaults = DP_SGD_DEFAULTS
    if source == "medmnist" and is_volume_source(source, data["data"].get("name")):
        # 'dpcnn' is 2D; the DP-ready 3D CNN instead (the other DP defaults were measured on
        # 2D images only)
        defaults = {**defaults, "model": {"name": VOLUME_MODEL}}
    # local_steps is left out where the user chose local_epochs
    return _fill_defaults(data, defaults, unless={"local_steps": "local_epochs"})


def fill_run_defaults(data: Any) -> Any:
    """The raw run config `data` with every default above filled in where it is silent (a copy;
    anything but a dict is returned as is, for validation to report). The order matters, as a
    key is set by the first that fills it: DP-SGD's defaults win over the strategy's, the volume
    set's, the task's and the source's (the order of the five model validators this replaced,
    which pydantic ran last-defined first)."""
    for fill in (dp_sgd_defaults, strategy_defaults, volume_defaults, task_defaults, source_defaults):
        data = fill(data)
    return data

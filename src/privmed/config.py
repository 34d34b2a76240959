"""The typed run config: loaded from YAML once, validated once, then passed around frozen.

Keys are a contract with users and other tools: rename nothing, add freely. Relative paths are
resolved against the current working directory when the data is loaded.
"""

from __future__ import annotations

import copy
import difflib
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from privmed import catalog
from privmed.errors import ConfigError

MEDMNIST_SIZES = (28, 64, 128, 224)
# The 3D MedMNIST sets (volumes, 28 or 64 voxels a side): a config naming one gets a 3D model.
MEDMNIST_VOLUMES = ("organmnist3d", "nodulemnist3d", "adrenalmnist3d", "fracturemnist3d",
                    "vesselmnist3d", "synapsemnist3d")
MEDMNIST_VOLUME_SIZES = (28, 64)
VOLUME_MODEL = "cnn3d"  # the model a volume source gets where the config names none
# nifti's 3D patches (data.patch): each side's range, and the segmentation model they get by default
PATCH_SIDES = (16, 512)
PATCH_MODEL = "unet3d"
# The catalog's tables (privmed.catalog), in the shapes the validators below read.
SOURCE_NAMES = catalog.names(catalog.SOURCES)
TASK_NAMES = catalog.names(catalog.TASKS)
ACCOUNTANTS = catalog.names(catalog.ACCOUNTANTS)
# Which task each tabular source's data is for; image sources serve "classification".
TABULAR_SOURCES = tuple(s.name for s in catalog.SOURCES if s.tabular)
SOURCE_TASK = {s.name: s.task for s in catalog.SOURCES if s.tabular}
SOURCE_SITES = {s.name: s.natural_sites for s in catalog.SOURCES if s.natural_sites}  # their natural sites (hospitals, regions)
# sources whose data.root is required
ROOT_SOURCES = tuple(s.name for s in catalog.SOURCES if s.needs_root)
# Dense tasks (a target image per item) and the sources that hold data for them; the first task
# listed is a source's default. The phantom makes volumes for them when the task asks.
DENSE_TASKS = tuple(t.name for t in catalog.TASKS if t.dense)
SOURCE_TASKS = {s.name: s.tasks for s in catalog.SOURCES if any(t in DENSE_TASKS for t in s.tasks)}
# Each dense task's model where the config names none (privmed.models).
TASK_MODEL = {t.name: t.default_model for t in catalog.TASKS if t.default_model}
STRATEGIES = catalog.names(catalog.STRATEGIES)
ADAPTIVE_STRATEGIES = tuple(s.name for s in catalog.STRATEGIES if s.adaptive)
# Strategies whose server needs only the weighted mean of the sites' updates, which is what secure
# aggregation reveals; the others, and why not.
SECURE_STRATEGIES = tuple(s.name for s in catalog.STRATEGIES if s.secure)
SECURE_REFUSED = {s.name: s.not_secure for s in catalog.STRATEGIES if not s.secure}
# strategies that share no model between sites (nothing to fine-tune, nothing to attack)
UNSHARED_STRATEGIES = tuple(s.name for s in catalog.STRATEGIES if not s.federated)
# strategies privacy.mode central (DP-FedAvg) serves
CENTRAL_STRATEGIES = tuple(s.name for s in catalog.STRATEGIES if s.central_dp)

# federation.aggregator's rules (privmed.federation.robust) and the strategies they serve: those
# that step one shared model from the sites' mean update.
AGGREGATORS = catalog.names(catalog.AGGREGATORS)
ROBUST_STRATEGIES = tuple(s.name for s in catalog.STRATEGIES if s.robust)
# Simulated malicious sites (privmed.federation.adversary); the ones that craft an update.
ATTACKS = catalog.names(catalog.ADVERSARIES)
MODEL_ATTACKS = tuple(a.name for a in catalog.ADVERSARIES if a.crafts_update)


def aggregator_min_sites(rule: str, byzantine: int) -> int:
    """The fewest updates with which aggregation `rule` withstands `byzantine` malicious ones (the
    assumption its guarantee is proved under): median and trimmed mean need an honest majority,
    Krum n >= 2f + 3 (Blanchard et al. 2017), Bulyan n >= 4f + 3 (El Mhamdi et al. 2018)."""
    rules = catalog.by_name(catalog.AGGREGATORS)
    return rules[rule].min_sites(byzantine) if rule in rules else 1


def is_volume_source(source: Any, name: Any) -> bool:
    """Whether data.source / data.name name a source of 3D volumes (a 3D MedMNIST set)."""
    return source == "medmnist" and isinstance(name, str) and name.strip().lower() in MEDMNIST_VOLUMES


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    source: Literal[SOURCE_NAMES] = "phantom"
    name: str | None = Field(None, description="medmnist: which file, e.g. pneumoniamnist")
    root: Path | None = Field(None, description="folder holding the data")
    size: int | None = Field(
        None, ge=8, le=512, description="image side in pixels; medmnist: 28, 64, 128 or 224"
    )
    csv: Path | None = Field(
        None, description="image-folder (optional) / dicom (required): file, label, site, patient"
    )
    val_fraction: float = Field(
        0.15, ge=0, lt=0.5,
        description="per-site validation share (0: no validation data; the last round's model is "
        "the result)",
    )
    test_fraction: float = Field(
        0.2, gt=0, lt=0.5, description="held-out test share, for sources without a test split"
    )
    channels: int | None = Field(
        None, ge=1, le=3, description="image-folder/dicom: 1 (grey) or 3 (RGB); default 1"
    )
    download: bool = Field(True, description="medmnist: download a missing file")
    samples_per_site: int = Field(600, ge=20, le=100_000, description="phantom: images per site")
    volumes_per_site: int = Field(
        6, ge=2, le=1000,
        description="phantom, for segmentation and reconstruction: volumes (patients) per site",
    )
    subjects: list[str] | None = Field(
        None, description="ixi: which subjects to read (default: every one in the folder)"
    )
    slice_step: int = Field(
        1, ge=1, le=16, description="ixi: keep every n-th slice of each volume (2: half the slices, 4 mm apart)"
    )
    test_subjects: int = Field(
        3, ge=1, le=1000,
        description="ixi, nifti: subjects held out as the public test set (by subject, never split)",
    )
    acceleration: float = Field(
        4.0, gt=1, le=16, description="reconstruction: k-space undersampling factor of every scanner "
        "(4: a quarter of the phase-encode lines) and of the test set's"
    )
    accelerations: list[float] | None = Field(
        None, description="reconstruction: one acceleration per site (cycled), instead of data.acceleration"
    )
    class_names: list[str] | None = Field(
        None, description="nifti: the mask's classes, background first (default: class 1, class 2, ...)"
    )
    window: tuple[float, float] | None = Field(
        None, description="nifti: CT intensity window [low, high] in HU, scaled to [0, 1]"
    )
    min_foreground: float = Field(
        0.0, ge=0, lt=1,
        description="nifti: keep only slices (or patches, with data.patch) whose mask covers at least this share",
    )
    patch: list[int] | None = Field(
        None,
        description="nifti: serve 3D patches [D, H, W] (voxels, D along the volume's last axis) instead of "
        "2D slices; each volume (as stored, or resampled by data.spacing) is centre-padded to whole "
        "patches and cut into them (each side 16 to 512: the 3D U-Net halves it four times)",
    )
    spacing: list[float] | None = Field(
        None,
        description="nifti: resample every volume (image trilinear, mask nearest; MONAI's Spacing) to "
        "voxels of [x, y, z] mm along the file's voxel axes, before slicing or cutting patches "
        "(default: voxels as stored)",
    )
    standardize: Literal["auto", "none", "per-site"] = Field(
        "auto",
        description="tabular sources: 'per-site' scales each feature by its mean and standard "
        "deviation over the site's own training rows (applied to the site's training and test "
        "rows); auto: as FLamby does (heart-disease per-site, tcga-brca none)",
    )

    @model_validator(mode="after")
    def _check_source(self) -> "DataConfig":
        if self.source == "sites":
            given = sorted(k for k, f in type(self).model_fields.items()
                           if k not in ("source", "val_fraction") and getattr(self, k) != f.default)
            if given:
                raise ValueError(
                    f"data.source 'sites' names no data (each hospital joins with its own site "
                    f"config), so data.{given[0]} has no meaning here; remove it"
                )
        if self.source == "medmnist":
            if not self.name:
                raise ValueError("data.name is required for source 'medmnist' (e.g. pneumoniamnist)")
            if self.size is not None and self.size not in MEDMNIST_SIZES:
                raise ValueError(
                    f"data.size: {self.size} is not a MedMNIST size; allowed: 28, 64, 128, 224"
                )
            if is_volume_source(self.source, self.name) and self.size not in (None, *MEDMNIST_VOLUME_SIZES):
                raise ValueError(
                    f"data.size: {self.size} is not a size of the 3D MedMNIST set '{self.name}'; "
                    "allowed: 28, 64"
                )
        if self.source in ROOT_SOURCES and self.root is None:
            raise ValueError(f"data.root is required for source '{self.source}'")
        if self.source == "dicom" and self.csv is None:
            raise ValueError("data.csv is required for source 'dicom' (columns file, label[, site, patient])")
        if self.window is not None and not self.window[0] < self.window[1]:
            raise ValueError(f"data.window: [{self.window[0]:g}, {self.window[1]:g}] must be [low, high] with low < high")
        if self.source == "nifti" and self.csv is None:
            raise ValueError("data.csv is required for source 'nifti' (columns image, mask[, site, patient])")
        if self.patch is not None:
            self._check_patch()
        if self.spacing is not None:
            given = f"data.spacing: {list(self.spacing)}"
            if self.source != "nifti":
                raise ValueError(f"{given}: only source 'nifti' resamples volumes (data.source is '{self.source}')")
            if len(self.spacing) != 3 or not all(0 < s <= 100 for s in self.spacing):
                raise ValueError(f"{given} is not a voxel size; allowed: three sides [x, y, z] in mm, each "
                                 "above 0 and at most 100")
        return self

    def _check_patch(self) -> None:
        given = f"data.patch: {list(self.patch)}"
        if self.source != "nifti":
            raise ValueError(f"{given}: only source 'nifti' cuts volumes into patches (data.source is '{self.source}')")
        if len(self.patch) != 3 or not all(PATCH_SIDES[0] <= s <= PATCH_SIDES[1] for s in self.patch):
            raise ValueError(f"{given} is not a patch size; allowed: three sides [D, H, W], each "
                             f"{PATCH_SIDES[0]} to {PATCH_SIDES[1]} voxels")
        if self.size is not None:
            raise ValueError(f"data.size: {self.size} sets a slice's side, and {given} serves patches; "
                             "give one of the two")


class SitesConfig(_Section):
    count: int = Field(3, ge=1, le=1000)
    partition: Literal["natural", "iid", "dirichlet", "quantity"] = "iid"
    alpha: float = Field(0.5, gt=0, le=1e6, description="dirichlet / quantity concentration")
    names: list[str] | None = None
    min_samples: int = Field(
        10, ge=1, description="a site with fewer training samples than this is an error"
    )

    @model_validator(mode="before")
    @classmethod
    def _count_from_names(cls, data: Any) -> Any:
        """sites.names alone sets sites.count."""
        if isinstance(data, dict) and isinstance(data.get("names"), list) and "count" not in data:
            data = {**data, "count": len(data["names"])}
        return data

    @model_validator(mode="after")
    def _check_names(self) -> "SitesConfig":
        if self.names is not None:
            if len(self.names) != self.count:
                raise ValueError(
                    f"sites.names has {len(self.names)} names but sites.count is {self.count}"
                )
            if len(set(self.names)) != len(self.names):
                raise ValueError(f"sites.names must be unique, got {self.names}")
        return self

    def site_names(self) -> list[str]:
        return list(self.names) if self.names else [f"site-{i + 1}" for i in range(self.count)]


class ModelConfig(_Section):
    name: str = Field(
        "cnn",
        description="a model registry name: cnn, dpcnn, resnet18 (2D images); cnn3d, resnet18-3d "
        "(3D volumes: the default for a 3D MedMNIST set is cnn3d); linear, mlp (feature tables)",
    )
    width: int | None = Field(None, ge=4, le=512, description="channels of the first stage")


class FederationConfig(_Section):
    strategy: Literal[STRATEGIES] = Field(
        "fedavg",
        description="fedavg, fedprox (proximal term mu), scaffold (control variates), fedadam / "
        "fedyogi / fedadagrad (adaptive server optimizers), fedbn (normalisation layers stay at "
        "each site), cyclic (the model travels site to site), local (no federation), pooled (all "
        "data in one place)",
    )
    rounds: int = Field(20, ge=1, le=100_000)
    local_epochs: int = Field(1, ge=1, le=1000)
    local_steps: int | None = Field(
        None, ge=1, le=1_000_000,
        description="train a fixed number of batches per site and round instead of local_epochs "
        "(as FLamby does); the pooled strategy then trains local_steps x sites.count batches, "
        "so that it does the same work",
    )
    cyclic_order: Literal["fixed", "shuffled"] = Field(
        "fixed", description="cyclic: visit sites in the configured order, or shuffle every round"
    )
    mu: float = Field(0.01, ge=0, le=1e4, description="fedprox: weight of the proximal term")
    server_lr: float | None = Field(
        None, gt=0, le=100,
        description="the server's learning rate on the averaged update (fedavg, fedprox, scaffold, "
        "fedadam, fedyogi, fedadagrad); default 1 for the averaging strategies (plain FedAvg), "
        "0.01 for the adaptive ones",
    )
    beta1: float = Field(0.9, ge=0, lt=1, description="fedadam/fedyogi/fedadagrad: momentum")
    beta2: float = Field(
        0.999, ge=0, lt=1, description="fedadam/fedyogi: decay of the second moment"
    )
    tau: float = Field(
        1e-8, gt=0, le=10, description="fedadam/fedyogi/fedadagrad: adaptivity (added to sqrt(v))"
    )
    finetune_steps: int = Field(
        0, ge=0, le=1_000_000,
        description="after the last round, each site trains the final model this many local steps "
        "on its own data and is scored on its own test data (personalisation); 0: none",
    )
    model_selection: Literal["auto", "best-validation", "last"] = Field(
        "auto",
        description="which round's model is the result: the one with the best validation AUC, or "
        "the last one (its choice then uses no validation data); auto: best-validation without "
        "privacy, last with privacy.mode dp-sgd or central or without validation data",
    )

    secure_aggregation: bool = Field(
        False,
        description="SecAgg+ (Bell et al. 2020, Flower's implementation): the server learns only "
        "the weighted sum of the sites' updates, never one site's (fedavg, fedprox, fedadam, "
        "fedyogi, fedadagrad, and privacy.mode central; needs 3 sites or more)",
    )
    min_sites: int | None = Field(
        None, ge=1, le=1000,
        description="a round completes with the updates of at least this many sites (the others "
        "died or timed out), else it is retried; default: every site",
    )
    secagg_shares: int | None = Field(
        None, ge=3, le=1000,
        description="secure aggregation: each site's masking secrets are split into this many "
        "Shamir shares, held by its neighbours (default: every site)",
    )
    secagg_threshold: int | None = Field(
        None, ge=2, le=1000,
        description="secure aggregation: shares needed to rebuild a secret, i.e. to remove a "
        "dropped site's masks (a strict majority of secagg_shares and below it; default: the "
        "smallest majority). Sites refuse a smaller one: with it a coordinator that tells sites "
        "different lists of who dropped rebuilds both masks of one site",
    )
    secagg_clipping_range: float = Field(
        8.0, gt=0, le=1e6,
        description="secure aggregation: each entry of a site's weighted update (model change x "
        "its weight share) is clipped to [-r, r] before quantisation",
    )
    secagg_quantization_bits: int = Field(
        22, ge=8, le=28,
        description="secure aggregation: [-r, r] is quantised to 2^bits levels; the sum of the "
        "sites' quantised values must fit in 32 bits (sites x 2^bits <= 2^32)",
    )
    round_timeout: float | None = Field(
        None, gt=0, le=86_400,
        description="Flower runner: seconds to wait for the sites' replies in one step of a round "
        "before counting the missing sites as dropped (default: wait for all)",
    )
    aggregator: Literal[AGGREGATORS] = Field(
        "mean",
        description="how the sites' updates are combined (fedavg, fedprox, fedadam, fedyogi, "
        "fedadagrad): mean (FedAvg's weighted mean), or a rule robust to malicious sites: median "
        "(coordinate-wise), trimmed-mean (cuts `byzantine` values at each end), krum, multi-krum, "
        "bulyan, norm-clip (each update clipped to update_clip, then the mean). The robust rules "
        "need each site's update: not with secure_aggregation, nor with privacy.mode central",
    )
    byzantine: int = Field(
        1, ge=0, le=500,
        description="malicious sites the aggregator must withstand (trimmed-mean, krum, "
        "multi-krum, bulyan); krum needs 2 x byzantine + 3 sites, bulyan 4 x byzantine + 3",
    )
    update_clip: float | None = Field(
        None, gt=0, le=1e9,
        description="aggregator norm-clip: the L2 bound of each site's update (default: the "
        "round's median update norm)",
    )
    round_retries: int = Field(
        2, ge=0, le=100,
        description="a round that ends with fewer than min_sites updates is started again this many "
        "times before the run stops",
    )

    @property
    def effective_server_lr(self) -> float:
        if self.server_lr is not None:
            return self.server_lr
        return 0.01 if self.strategy in ADAPTIVE_STRATEGIES else 1.0


class TrainingConfig(_Section):
    batch_size: int = Field(64, ge=1, le=65_536)
    lr: float = Field(0.01, gt=0, le=10)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    weight_decay: float = Field(0.0, ge=0, lt=1)
    augment: bool = Field(True, description="random flips/shifts of training images")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="the sites' learning rate over the rounds: constant, or cosine (lr in round 1, "
        "falling along half a cosine towards 0 after the last of federation.rounds). A public "
        "function of the round, so it changes no privacy guarantee",
    )
    eval_batch_size: int = Field(512, ge=1)
    device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu",
        description="where sites train and score: cpu (the default; bit-for-bit reproducible), "
        "cuda (a GPU; not with privacy.mode dp-sgd yet), auto (cuda when there is one and the run "
        "is not dp-sgd, else cpu)",
    )
    logit_adjustment: Literal["auto", "on", "off"] = Field(
        "auto",
        description="label skew: each site trains with its logits shifted by the log of its own "
        "label shares less the log of the federation's (logit adjustment / balanced softmax), so "
        "that a site holding mostly one class does not pull the shared model towards it and the "
        "plain logits, which predict, are calibrated to the federation's shares (counted from the "
        "sites' validation data, which evaluation reports anyway; uniform without any). auto: on "
        "for classification unless privacy.mode is dp-sgd (the site's shares are counted from its "
        "training patients, which DP-SGD must not couple)",
    )

    @field_validator("logit_adjustment", mode="before")
    @classmethod
    def _on_off(cls, v: Any) -> Any:
        """YAML reads a bare on / off as true / false: take them as meant."""
        return {True: "on", False: "off"}[v] if isinstance(v, bool) else v


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
VOLUME_DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"name": VOLUME_MODEL},
    "training": {"lr": 0.05},
    "federation": {"local_epochs": 3},
}

# What a strategy needs where the config is silent (see RunConfig._strategy_defaults; each
# strategy's `defaults` in privmed.catalog).
STRATEGY_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    s.name: s.defaults for s in catalog.STRATEGIES if s.defaults
}


class PrivacyConfig(_Section):
    """Differential privacy: `dp-sgd` gives every site's patients an (epsilon, delta) guarantee over
    everything the site releases in the run; `central` gives every site (all its data at once) one
    over the server's noisy averages (DP-FedAvg)."""

    mode: Literal["none", "dp-sgd", "central"] = "none"
    epsilon: float | None = Field(
        None, gt=0, le=1000,
        description="the budget per site; noise is calibrated up front for all planned rounds and "
        "local steps (give this, or noise_multiplier, or both)",
    )
    delta: float = Field(
        1e-5, gt=0, lt=1, description="must be below 1 / (patients at the smallest site)"
    )
    max_grad_norm: float = Field(
        1.0, gt=0, le=1e6,
        description="clipping norm C: of each patient's gradient (dp-sgd), of each site's model "
        "update (central)",
    )
    noise_multiplier: float | None = Field(
        None, gt=0, le=1000,
        description="fix the noise instead of calibrating it to epsilon; the epsilon the run will "
        "spend is then computed and reported (with epsilon also given, it is the budget)",
    )
    accountant: Literal[ACCOUNTANTS] = "prv"
    grad_sample_mode: Literal["ew", "hooks", "functorch", "ghost"] = Field(
        "ew", description="how Opacus computes per-sample gradients (dp-sgd); ew was fastest on CPU"
    )
    scoring_epsilon: float | None = Field(
        None, gt=0, le=1000,
        description="the budget per site for its validation and test patients: every scoring the "
        "sites release (noisy counts) is calibrated to it; default: privacy.epsilon (or, with the "
        "noise fixed, the training epsilon planned)",
    )
    validation_rounds: int | None = Field(
        None, ge=1, le=100_000,
        description="under privacy, the rounds in which the sites score the model on their "
        "validation patients: this many, evenly spaced, the last included (each is a release on "
        "those patients); default: every round up to 20 rounds, else 20",
    )

    @model_validator(mode="after")
    def _check_budget(self) -> "PrivacyConfig":
        if self.mode != "none" and self.epsilon is None and self.noise_multiplier is None:
            raise ValueError(
                f"privacy.mode '{self.mode}' needs privacy.epsilon (the budget per site, e.g. 8) "
                "or privacy.noise_multiplier"
            )
        return self


class AttackConfig(_Section):
    """Simulated malicious sites (privmed.federation.adversary), to measure what the aggregator
    withstands. In-process runs only: a real deployment's hospitals run their own code."""

    kind: Literal[ATTACKS] = Field(
        "none",
        description="sign-flip (-scale x the site's update), scaling (scale x), gaussian (noise of "
        "scale x the update's size), label-flip (train on labels K - 1 - y), little-is-enough "
        "(mean - z x std of the honest updates, Baruch et al. 2019)",
    )
    sites: int | list[str] = Field(
        1, description="how many sites are malicious (the last ones), or their names"
    )
    scale: float = Field(10.0, gt=0, le=1e6, description="sign-flip, scaling, gaussian: the factor")


class OutputConfig(_Section):
    keep_checkpoints: int = Field(2, ge=1, description="round checkpoints kept on disk (newest)")


class RunConfig(_Section):
    name: str | None = None
    seed: int = Field(0, ge=0, le=2**31 - 1)
    task: Literal[TASK_NAMES] = Field(
        "classification",
        description="classification (images), tabular-classification, survival (Cox model, "
        "concordance index), segmentation (a class per pixel: Dice, HD95), reconstruction (MRI "
        "from undersampled k-space: PSNR, SSIM); default: the data source's task",
    )
    data: DataConfig = DataConfig()
    sites: SitesConfig = SitesConfig()
    model: ModelConfig = ModelConfig()
    federation: FederationConfig = FederationConfig()
    training: TrainingConfig = TrainingConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    attack: AttackConfig = AttackConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="before")
    @classmethod
    def _source_defaults(cls, data: Any) -> Any:
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

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
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

    @model_validator(mode="before")
    @classmethod
    def _volume_defaults(cls, data: Any) -> Any:
        """A source of 3D volumes (a 3D MedMNIST set) gets a 3D model where the config names none
        (VOLUME_MODEL: the 2D default 'cnn' cannot read a volume) and, without DP-SGD, the training
        defaults measured on volumes (VOLUME_DEFAULTS; the learning rate goes with the default
        optimizer, local epochs with local epochs rather than local_steps)."""
        if not isinstance(data, dict) or not isinstance(data.get("data"), dict):
            return data
        if not is_volume_source(data["data"].get("source"), data["data"].get("name")):
            return data
        privacy = data.get("privacy")
        if isinstance(privacy, dict) and privacy.get("mode") == "dp-sgd":
            return _fill_defaults(data, {"model": {"name": VOLUME_MODEL}})
        return _fill_defaults(data, VOLUME_DEFAULTS, unless={"lr": "optimizer", "local_epochs": "local_steps"})

    @model_validator(mode="before")
    @classmethod
    def _strategy_defaults(cls, data: Any) -> Any:
        """Keys the config leaves out that a strategy needs otherwise: SCAFFOLD's control variates
        assume plain local SGD, so under `scaffold` training.optimizer defaults to sgd and
        training.momentum to 0 (values the config sets are kept, and checked)."""
        if not isinstance(data, dict) or not isinstance(data.get("federation"), dict):
            return data
        defaults = STRATEGY_DEFAULTS.get(data["federation"].get("strategy"))
        return _fill_defaults(data, defaults) if defaults else data

    @model_validator(mode="before")
    @classmethod
    def _dp_sgd_defaults(cls, data: Any) -> Any:
        """Under privacy.mode dp-sgd, keys the config leaves out take DP_SGD_DEFAULTS (image
        classification only: they were measured there)."""
        if not isinstance(data, dict):
            return data
        source = data.get("data", {}).get("source") if isinstance(data.get("data"), dict) else None
        # a source whose first task is dense (ixi, nifti) means that task where none is named: this
        # validator runs before _task_defaults fills it in
        task = data.get("task") or (SOURCE_TASKS[source][0] if source in SOURCE_TASKS else "classification")
        if source in TABULAR_SOURCES or task != "classification":
            return data
        privacy = data.get("privacy")
        if not (isinstance(privacy, dict) and privacy.get("mode") == "dp-sgd"):
            return data
        defaults = DP_SGD_DEFAULTS
        if source == "medmnist" and is_volume_source(source, data["data"].get("name")):
            # 'dpcnn' is 2D; the DP-ready 3D CNN instead (the other DP defaults were measured on
            # 2D images only)
            defaults = {**defaults, "model": {"name": VOLUME_MODEL}}
        # local_steps is left out where the user chose local_epochs
        return _fill_defaults(data, defaults, unless={"local_steps": "local_epochs"})

    @model_validator(mode="after")
    def _check_task(self) -> "RunConfig":
        source, task = self.data.source, self.task
        wanted = SOURCE_TASK.get(source, "classification")
        if source in SOURCE_TASKS and task not in SOURCE_TASKS[source]:
            raise ValueError(
                f"task: '{task}' does not fit data.source '{source}', which holds data for "
                f"{', '.join(SOURCE_TASKS[source])}"
            )
        if task in DENSE_TASKS and self.sites.partition in ("dirichlet",):
            raise ValueError(
                f"sites.partition: 'dirichlet' deals items by their class, and task '{task}' has no "
                "class per item; use natural, iid or quantity"
            )
        if task != wanted and source not in ("sites", *SOURCE_TASKS):  # sites: the task says what it is
            raise ValueError(
                f"task: '{task}' does not fit data.source '{source}', which holds data for "
                f"'{wanted}'; set task: {wanted} (or leave task out)"
            )
        fed = self.federation
        if fed.strategy == "scaffold" and (self.training.optimizer != "sgd" or self.training.momentum):
            raise ValueError(
                f"federation.strategy 'scaffold' needs plain local SGD (its control variates are "
                f"(start - end) / (steps x lr)): set training.optimizer: sgd and training.momentum: 0 "
                f"(got {self.training.optimizer}, momentum {self.training.momentum:g})"
            )
        if self.training.device == "cuda" and self.privacy.mode == "dp-sgd":
            raise ValueError(
                "training.device: 'cuda' with privacy.mode 'dp-sgd': a site's DP noise and sampling "
                "come from its secret key through a CPU generator, which a GPU step cannot use yet; "
                "use device cpu (or auto) for DP-SGD runs"
            )
        if fed.finetune_steps and fed.strategy in UNSHARED_STRATEGIES:
            raise ValueError(
                f"federation.finetune_steps: fine-tuning personalises a federated model; strategy "
                f"'{fed.strategy}' has none (set finetune_steps: 0)"
            )
        return self

    @model_validator(mode="after")
    def _check_secure_aggregation(self) -> "RunConfig":
        fed, n = self.federation, self.sites.count
        if fed.min_sites is not None and fed.min_sites > n:
            raise ValueError(f"federation.min_sites: {fed.min_sites} is more than sites.count {n}")
        if not fed.secure_aggregation:
            for key in ("secagg_shares", "secagg_threshold"):
                if getattr(fed, key) is not None:
                    raise ValueError(f"federation.{key} needs federation.secure_aggregation: true")
            return self
        if fed.strategy not in SECURE_STRATEGIES:
            raise ValueError(
                f"federation.secure_aggregation: strategy '{fed.strategy}' cannot use it: "
                + SECURE_REFUSED.get(fed.strategy, "")
                + f"; secure aggregation serves {', '.join(SECURE_STRATEGIES)}"
            )
        if n < 3:
            raise ValueError(
                f"federation.secure_aggregation needs 3 sites or more (sites.count is {n}): with 2, "
                "each site could subtract its own update from the sum and learn the other's"
            )
        shares, threshold = self.secagg_shares_threshold
        if shares > n:
            raise ValueError(f"federation.secagg_shares: {shares} is more than sites.count {n}")
        if not (2 <= threshold < shares and 2 * threshold > shares):
            raise ValueError(
                f"federation.secagg_threshold: {threshold} must be at least 2, a strict majority of "
                f"secagg_shares ({shares}: more than {shares / 2:g}) and below it"
            )
        if n * 2**fed.secagg_quantization_bits > 2**32:
            raise ValueError(
                f"federation.secagg_quantization_bits: {fed.secagg_quantization_bits} with {n} sites "
                f"overflows the 32-bit sum; use at most {32 - math.ceil(math.log2(n))}"
            )
        min_sites = fed.min_sites or n
        if min_sites < threshold:
            raise ValueError(
                f"federation.min_sites: {min_sites} is below secagg_threshold {threshold}: a round "
                "with that few sites cannot remove the masks"
            )
        return self

    @property
    def secagg_shares_threshold(self) -> tuple[int, int]:
        """SecAgg+'s share count and reconstruction threshold, defaults filled in: every site holds
        a share, and a majority of the shares rebuilds a secret."""
        fed = self.federation
        shares = fed.secagg_shares or self.sites.count
        threshold = fed.secagg_threshold or max(2, shares // 2 + 1)
        return shares, threshold

    @model_validator(mode="after")
    def _check_privacy(self) -> "RunConfig":
        mode, strategy = self.privacy.mode, self.federation.strategy
        if mode == "central" and strategy not in CENTRAL_STRATEGIES:
            raise ValueError(
                f"privacy.mode 'central' (DP-FedAvg: the server clips and noises the sites' updates) "
                f"needs federation.strategy {' or '.join(repr(s) for s in CENTRAL_STRATEGIES)}, got "
                f"'{strategy}'; use privacy.mode 'dp-sgd'"
            )
        if mode == "dp-sgd" and self.training.logit_adjustment == "on":
            raise ValueError(
                "training.logit_adjustment: 'on' uses each site's label shares, counted from its "
                "training patients: under privacy.mode 'dp-sgd' one patient would then change every "
                "other patient's gradient, which the clipping does not bound; use 'auto' or 'off'"
            )
        if self.training.logit_adjustment == "on" and self.task == "survival":
            raise ValueError("training.logit_adjustment: 'on' shifts class logits; task 'survival' has none")
        if mode == "dp-sgd" and self.task == "survival":
            raise ValueError(
                "privacy.mode 'dp-sgd' cannot protect task 'survival': the Cox partial likelihood "
                "compares each patient with every patient still at risk, so clipping each "
                "patient's gradient does not bound one patient's influence on a step; use "
                "privacy.mode 'central' (each site's update is clipped as a whole)"
            )
        if mode == "central" and self.federation.finetune_steps:
            raise ValueError(
                f"federation.finetune_steps: {self.federation.finetune_steps} with privacy.mode "
                "'central': fine-tuning trains on a site's patients without noise, and its test "
                "scores would leave the site; fine-tune under privacy.mode 'dp-sgd' (planned and "
                "charged as one more release), or set finetune_steps: 0"
            )
        return self

    @model_validator(mode="after")
    def _check_robustness(self) -> "RunConfig":
        fed, att, names = self.federation, self.attack, self.sites.site_names()
        if fed.update_clip is not None and fed.aggregator != "norm-clip":
            raise ValueError(f"federation.update_clip needs federation.aggregator: norm-clip (got '{fed.aggregator}')")
        if fed.aggregator != "mean":
            rule = f"federation.aggregator: '{fed.aggregator}'"
            if fed.strategy not in ROBUST_STRATEGIES:
                raise ValueError(f"{rule} combines updates to one shared model; strategy '{fed.strategy}' "
                                 f"does not (robust rules serve {', '.join(ROBUST_STRATEGIES)})")
            if fed.secure_aggregation:
                raise ValueError(f"{rule} needs each site's update, and secure aggregation reveals only "
                                 "their sum; use aggregator: mean, or secure_aggregation: false")
            if self.privacy.mode == "central":
                raise ValueError(f"{rule}: privacy.mode 'central' calibrates its noise to the sum of "
                                 "updates clipped to privacy.max_grad_norm, which already bounds what one "
                                 "site can do; a robust rule would change what the noise protects")
            need = aggregator_min_sites(fed.aggregator, fed.byzantine)
            have = fed.min_sites or len(names)
            if have < need:
                raise ValueError(f"{rule} withstands federation.byzantine {fed.byzantine} malicious "
                                 f"sites only with {need} sites or more per round; this run has {have}")
        if att.kind == "none":
            return self
        what = f"attack.kind: '{att.kind}'"
        if fed.strategy in UNSHARED_STRATEGIES:
            raise ValueError(f"{what}: strategy '{fed.strategy}' shares no model, so no site can attack it")
        if isinstance(att.sites, int):
            if not 1 <= att.sites < len(names):
                raise ValueError(f"attack.sites: {att.sites}; between 1 and {len(names) - 1} of the "
                                 f"{len(names)} sites can be malicious")
        else:
            unknown = [s for s in att.sites if s not in names]
            if unknown or not att.sites or len(set(att.sites)) != len(att.sites) or len(att.sites) >= len(names):
                raise ValueError(f"attack.sites: {att.sites}; name 1 to {len(names) - 1} distinct "
                                 f"sites of {', '.join(names)}")
        n_bad = att.sites if isinstance(att.sites, int) else len(att.sites)
        if att.kind in MODEL_ATTACKS and fed.secure_aggregation:
            raise ValueError(f"{what}: the simulation crafts the malicious updates as the coordinator "
                             "receives them, and under secure aggregation it receives only their sum; "
                             "label-flip (at the site) works with it")
        if att.kind == "little-is-enough" and n_bad >= len(names) // 2 + 1:
            raise ValueError(f"{what} needs the malicious sites to be a minority; {n_bad} of "
                             f"{len(names)} are not")
        return self

    @property
    def private(self) -> bool:
        return self.privacy.mode != "none"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------- a hospital's own config


DEFAULT_HOSPITAL_EPSILON = 10.0  # a hospital's budget when its config names none (README: Across machines)


class SitePrivacyConfig(_Section):
    """What the hospital allows, whatever a coordinator asks. It fails closed: a config that says
    nothing trains only under a DP mechanism the hospital runs itself, within a finite budget for
    each of its patients (training, validation and test patients each counted in its own ledger),
    and refuses any release its accountant cannot bound."""

    max_epsilon: float | None = Field(
        DEFAULT_HOSPITAL_EPSILON, gt=0, le=1000,
        description="the hospital's budget for each patient over all runs (its own ledger, at its "
        "own delta): its training patients, and its validation and test patients, each group "
        "against it; null: no cap (each release still counted, and unbounded ones refused)",
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta its ledger reports epsilon at")
    accountant: Literal[ACCOUNTANTS] = "prv"
    require_dp: bool = Field(
        True,
        description="take part only under a DP mechanism the hospital runs itself: privacy.mode "
        "dp-sgd, or central as distributed noise added here; false also accepts privacy.mode none "
        "(no guarantee for its patients)",
    )


class SiteConfig(_Section):
    """A hospital's config for `privmed join`: its name in the federation, its own data (one folder
    or table of its own patients, as a run's `data` section), how it splits that data, and its
    privacy budget. Nothing here leaves the hospital but its name and its data's public counts."""

    site: str = Field(..., min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seeds this hospital's own splits")
    data: DataConfig
    privacy: SitePrivacyConfig = SitePrivacyConfig()
    state: Path | None = Field(
        None, description="where its secret key and ledger live (default ~/.privmed/sites/SITE)"
    )

    @model_validator(mode="after")
    def _check_data(self) -> "SiteConfig":
        if self.data.source == "sites":
            raise ValueError("data.source: a hospital's config names its own data (image-folder, "
                             "dicom, ...), not 'sites'")
        return self


def load_site_config(path: Path | str, overrides: list[str] | None = None) -> SiteConfig:
    """Read, override and validate a hospital's YAML config; ConfigError names the bad field."""
    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides or [])
    try:
        return SiteConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("; ".join(_format_error(err, str(path), SiteConfig) for err in e.errors())) from None


# --------------------------------------------------------------------------- loading


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names valid at `loc` (a pydantic error location), for 'did you mean'."""
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _format_error(err: dict, source: str, schema: type[BaseModel] | None = None) -> str:
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc) or "config"
    if err["type"] == "extra_forbidden":
        known = _known_keys(schema or RunConfig, loc)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"{source}: unknown key '{where}'{hint} (allowed here: {', '.join(known)})"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error":
        return f"{source}: {msg}"
    given = err.get("input")
    if isinstance(given, dict):
        return f"{source}: {where}: {msg}"
    return f"{source}: {where}: {msg}, got {given!r}"


def validate_config(raw: dict | RunConfig, source: str = "config") -> RunConfig:
    """A RunConfig from a dict (or a RunConfig, returned as is); ConfigError names the bad field."""
    if isinstance(raw, RunConfig):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("; ".join(_format_error(err, source) for err in e.errors())) from None


def apply_overrides(raw: dict, overrides: list[str], source: str = "--set") -> dict:
    """A copy of `raw` with each 'a.b.c=value' applied; the value is parsed as YAML."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{source}: '{item}' is not of the form key.path=value")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: '{key}': '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = parsed
    return out


def read_yaml(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(raw).__name__}")
    return raw


def load_config(path: Path | str, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a YAML config. `name` defaults to the file's stem."""
    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides or [])
    raw.setdefault("name", path.stem)
    return validate_config(raw, source=str(path))

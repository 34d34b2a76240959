"""One catalog of what privmed has: every data source, task, model, strategy, robust aggregator,
simulated adversary, audit attack and accountant, by name, with what each can do. Plain
dataclasses and the standard library only, so that the config, the CLI's help and the report can
read it without torch.

Everything that lists these names reads them here: the config's accepted values
(privmed.config), the registries (privmed.federation.strategies, privmed.models,
privmed.privacy.accountants, privmed.audit.attacks, the data dispatch in privmed.data, the tasks
in privmed.tasks.base), the report, the privacy statement and the membership audit.
tests/test_catalog.py fails where one of them disagrees with it.

An entry's `impl` (where there is one) is "module:attribute", the code it names, imported only
when asked for (`load`). Adding a strategy is one entry in STRATEGIES and one module whose class
has `from_config(fed, *, seed, local_lr, shared)`.

    strategy("fedbn").personalised       True: every site keeps a model of its own
    names(STRATEGIES)                    ('fedavg', 'fedprox', ...), in the catalog's order
    load("privmed.models.cnn:SmallCNN")  the object an `impl` names
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

# --------------------------------------------------------------------------- privacy modes


class PrivacyMode(StrEnum):
    """How a run protects its patients (`privacy.mode`). A str: it compares equal to its value,
    and it is written to YAML and JSON as that value."""

    NONE = "none"  # no differential privacy
    DP_SGD = "dp-sgd"  # each site trains with DP-SGD: per-patient clipping and noise, its own ledger
    CENTRAL = "central"  # DP-FedAvg: each site's update clipped, noise on the sum (distributed DP)

# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    name: str
    about: str
    impl: str  # the task object (privmed.tasks.base)
    headline: str  # the metric progress bars and tables lead with
    dense: bool = False  # a target image per item: no class per item (no label shares, no dirichlet)
    per_sample: bool = True  # the loss is a mean of per-patient terms: DP-SGD applies
    default_model: str | None = None  # the model where the config names none (None: model.name's default)
    # training defaults where the config is silent ({section: {key: value}}, see config.TASK_DEFAULTS)
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)


TASKS: tuple[Task, ...] = (
    Task("classification", "images, K classes: AUC, accuracy", "privmed.tasks.base:Classification", "auc"),
    Task("tabular-classification", "feature tables; a binary label is one logit (logistic regression)",
         "privmed.tasks.base:TabularClassification", "auc"),
    Task("survival", "one risk score per patient, Cox partial likelihood, concordance index",
         "privmed.tasks.base:Survival", "c_index", per_sample=False),
    # Segmentation, phantom volumes, fedavg 8 rounds: batch 16 at lr 0.05 reached Dice 0.886
    # (ventricles 0.802), the generic batch 64 at lr 0.01 0.632 (0.358), Adam at 1e-3 0.829 (0.699).
    Task("segmentation", "a class per pixel: Dice, HD95", "privmed.tasks.base:Segmentation", "dice",
         dense=True, default_model="unet",
         defaults={"training": {"batch_size": 16, "lr": 0.05, "eval_batch_size": 16}}),
    # Reconstruction: Adam at 2e-3 on a cosine schedule, as in benchmarks/recon_pilot.py (+5.07 dB over
    # zero-filling at 4x on IXI); at a constant 1e-3 pooled training on IXI diverged for a round.
    # Both dense tasks score in batches of 16 images (the cascade's activations outgrow the caches).
    Task("reconstruction", "MRI from undersampled k-space: PSNR, SSIM", "privmed.tasks.base:Reconstruction",
         "psnr", dense=True, default_model="cascade",
         defaults={"training": {"batch_size": 4, "optimizer": "adam", "lr": 2e-3, "lr_schedule": "cosine",
                                "eval_batch_size": 16}}),
)

# --------------------------------------------------------------------------- data sources


@dataclass(frozen=True)
class Source:
    name: str
    about: str
    # the function that loads it: (data, sites, seed, task) -> SourceData; None: the source names
    # no data ('sites': each hospital joins with its own)
    loader: str | None
    # the tasks it holds data for, its default first; () for 'sites', whose task the config says
    tasks: tuple[str, ...]
    tabular: bool = False  # float (N, D) feature tables instead of images
    natural_sites: int | None = None  # the hospitals (regions) its data was collected at
    needs_root: bool = False  # data.root is required
    # whether its items name their patient: "always", "never", "csv" (where data.csv has a patient
    # column; else each item is its own patient), "hospital" (each hospital's own source says)
    patient_ids: str = "always"
    # training defaults where the config is silent ({section: {key: value}}, see config.SOURCE_DEFAULTS)
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)
    # the data keys its loader reads, besides data.source and data.val_fraction (every source's):
    # the config refuses any other data key set to a value of its own
    keys: tuple[str, ...] = ()

    @property
    def task(self) -> str | None:
        """Its default task (None: 'sites')."""
        return self.tasks[0] if self.tasks else None


_DENSE = ("segmentation", "reconstruction")
SOURCES: tuple[Source, ...] = (
    Source("medmnist", "official MedMNIST .npz files, 2D and 3D", "privmed.data:_load_medmnist",
           ("classification",), needs_root=True, patient_ids="never",
           keys=("name", "root", "size", "channels", "download")),
    Source("image-folder", "PNG/JPEG class folders", "privmed.data:_load_image_folder", ("classification",),
           needs_root=True, patient_ids="csv",
           keys=("root", "csv", "size", "channels", "test_fraction", "class_names")),
    Source("dicom", "DICOM files listed in a CSV", "privmed.data:_load_dicom", ("classification",),
           needs_root=True, patient_ids="csv",
           keys=("root", "csv", "size", "channels", "test_fraction", "class_names")),
    Source("phantom", "synthetic images; volumes with masks for the dense tasks", "privmed.data:_load_phantom",
           ("classification",) + _DENSE,
           keys=("size", "channels", "samples_per_site", "volumes_per_site", "acceleration", "accelerations")),
    # Tabular sources: smaller batches and plain SGD with a larger step than the image defaults,
    # measured over 5 seeds on each source's natural sites (benchmarks/defaults.py).
    Source("heart-disease", "UCI heart disease, as FLamby's Fed-Heart-Disease", "privmed.data:_load_heart_disease",
           ("tabular-classification",), tabular=True, natural_sites=4, needs_root=True,
           defaults={"training": {"batch_size": 16, "momentum": 0.0, "lr": 0.05}}, keys=("root", "standardize")),
    Source("tcga-brca", "survival, as FLamby's Fed-TCGA-BRCA", "privmed.data:_load_tcga_brca", ("survival",),
           tabular=True, natural_sites=6, needs_root=True,
           defaults={"training": {"batch_size": 16, "momentum": 0.0, "lr": 0.1}}, keys=("root", "standardize")),
    Source("ixi", "IXI T1 brain volumes with label maps", "privmed.data:_load_ixi", _DENSE, needs_root=True,
           keys=("root", "subjects", "slice_step", "test_subjects", "acceleration", "accelerations")),
    Source("nifti", "NIfTI volumes and masks listed in a CSV", "privmed.data:_load_nifti", ("segmentation",),
           keys=("root", "csv", "size", "class_names", "window", "min_foreground", "patch", "spacing",
                 "test_subjects", "public_test")),
    Source("sites", "no data here: each hospital joins with its own", None, (), patient_ids="hospital"),
)

# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Model:
    name: str
    impl: str  # (in_channels=, num_classes=, image_size=[, width=]) -> nn.Module
    dims: int  # what it takes: 2 images (N, C, H, W), 3 volumes (N, C, D, H, W), 0 tables (N, D)
    dense: bool = False  # outputs an image per item (segmentation, reconstruction)

    @property
    def tabular(self) -> bool:
        return self.dims == 0


MODELS: tuple[Model, ...] = (
    Model("cnn", "privmed.models.cnn:SmallCNN", 2),
    Model("dpcnn", "privmed.models.dpcnn:TemperedSigmoidCNN", 2),
    Model("resnet18", "privmed.models.resnet:resnet18", 2),
    Model("cnn3d", "privmed.models.cnn:small_cnn_3d", 3),
    Model("resnet18-3d", "privmed.models.resnet:resnet18_3d", 3),
    Model("linear", "privmed.models.tabular:linear", 0),
    Model("mlp", "privmed.models.tabular:mlp", 0),
    Model("unet", "privmed.models.unet:unet", 2, dense=True),
    Model("unet3d", "privmed.models.unet:unet3d", 3, dense=True),
    Model("cascade", "privmed.models.cascade:cascade", 2, dense=True),
)

# --------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class Strategy:
    name: str
    impl: str  # the class, with from_config(fed, *, seed, local_lr, shared)
    title: str  # its name in words (the statement)
    # what it does with a site's update, in words ({items}: images or records; the statement)
    how: str
    # the server needs each site's own update, not only their weighted sum (secure aggregation
    # reveals only the sum); `not_secure`: why, in words
    needs_each_update: bool = False
    not_secure: str = ""
    robust: bool = False  # steps one shared model from the sites' mean update: a robust aggregator may replace the mean
    adaptive: bool = False  # an adaptive server optimizer (server_lr defaults to 0.01, not 1)
    personalised: bool = False  # every site keeps a model of its own
    federated: bool = True  # a model is shared between sites (not: local, pooled)
    pools_data: bool = False  # one 'site' holds every site's data
    central_dp: bool = False  # privacy.mode central (DP-FedAvg) serves it
    # who received a site's update and what became of it (the statement); None: averaged into the shared model
    to_whom: str | None = None
    # keys the config leaves out that it needs otherwise ({section: {key: value}})
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)

    @property
    def secure(self) -> bool:
        """Secure aggregation serves it: its server needs only the sites' weighted mean update."""
        return not self.needs_each_update


_S = "privmed.federation.strategies:"
_ADAPTIVE_HOW = "as FedAvg, the coordinator moving the shared model by an adaptive step"
STRATEGIES: tuple[Strategy, ...] = (
    Strategy("fedavg", _S + "FedAvg", "FedAvg",
             "each round every site trains the shared model on its own data and the coordinator averages "
             "the updates, weighted by the sites' numbers of training {items}", robust=True, central_dp=True),
    Strategy("fedprox", _S + "FedProx", "FedProx", "as FedAvg, each site's training held close to the shared model",
             robust=True),
    Strategy("scaffold", _S + "Scaffold", "SCAFFOLD",
             "as FedAvg, with corrections for the differences between the sites' data that the coordinator "
             "computes from the updates", needs_each_update=True,
             not_secure="its server keeps a control variate per site, computed from that site's update",
             # SCAFFOLD's control variates assume plain local SGD
             defaults={"training": {"optimizer": "sgd", "momentum": 0.0}}),
    Strategy("fedadam", _S + "FedAdam", "FedAdam", _ADAPTIVE_HOW, robust=True, adaptive=True),
    Strategy("fedyogi", _S + "FedYogi", "FedYogi", _ADAPTIVE_HOW, robust=True, adaptive=True),
    Strategy("fedadagrad", _S + "FedAdagrad", "FedAdagrad", _ADAPTIVE_HOW, robust=True, adaptive=True),
    Strategy("fedbn", _S + "FedBN", "FedBN",
             "every site keeps its own normalisation layers; the coordinator averages the other layers",
             needs_each_update=True, not_secure="every site keeps its own model, there is no sum to hide behind",
             personalised=True,
             to_whom="the coordinator, which averaged its shared layers with the other sites' and sent the "
                     "average to every site"),
    Strategy("cyclic", _S + "Cyclic", "Cyclic (clinic to clinic)",
             "the model travels from site to site: each site trains the model the previous one handed on, "
             "through the coordinator", needs_each_update=True,
             not_secure="the model travels from one site to the next, so each site's model is seen whole",
             to_whom="the coordinator, which handed it on as it was to the next site to train"),
    Strategy("local", _S + "Local", "Local", "every site trains a model of its own on its own data; nothing is averaged",
             needs_each_update=True, not_secure="nothing is aggregated", personalised=True, federated=False,
             to_whom="the coordinator, which kept it as this site's own model"),
    Strategy("pooled", _S + "Pooled", "Pooled", "all data in one place (a reference run, not a federation)",
             needs_each_update=True, not_secure="all data is in one place", federated=False, pools_data=True),
)

# --------------------------------------------------------------------------- robust aggregators


@dataclass(frozen=True)
class Aggregator:
    """federation.aggregator's rules (privmed.federation.robust). A rule withstands f malicious
    sites among at least `per_byzantine` x f + `base` updates (the assumption its guarantee is
    proved under)."""

    name: str
    about: str
    per_byzantine: int = 0
    base: int = 1

    @property
    def robust(self) -> bool:
        """A rule robust to malicious sites, which needs each site's update (not the mean's sum)."""
        return self.name != "mean"

    def min_sites(self, byzantine: int) -> int:
        return self.per_byzantine * byzantine + self.base


AGGREGATORS: tuple[Aggregator, ...] = (
    Aggregator("mean", "FedAvg's weighted mean"),
    Aggregator("median", "coordinate-wise median (honest majority)", 2, 1),
    Aggregator("trimmed-mean", "cuts `byzantine` values at each end (honest majority)", 2, 1),
    Aggregator("krum", "Blanchard et al. 2017: n >= 2f + 3", 2, 3),
    Aggregator("multi-krum", "Blanchard et al. 2017: n >= 2f + 3", 2, 3),
    Aggregator("bulyan", "El Mhamdi et al. 2018: n >= 4f + 3", 4, 3),
    Aggregator("norm-clip", "each update clipped to update_clip, then the mean"),
)

# --------------------------------------------------------------------------- simulated adversaries


@dataclass(frozen=True)
class Adversary:
    """attack.kind: simulated malicious sites (privmed.federation.adversary)."""

    name: str
    about: str
    crafts_update: bool = False  # crafts the update the coordinator receives (not with secure aggregation)


ADVERSARIES: tuple[Adversary, ...] = (
    Adversary("none", "no malicious site"),
    Adversary("sign-flip", "-scale x the site's update", crafts_update=True),
    Adversary("scaling", "scale x the site's update", crafts_update=True),
    Adversary("gaussian", "noise of scale x the update's size", crafts_update=True),
    Adversary("label-flip", "trains on labels K - 1 - y, at the site"),
    Adversary("little-is-enough", "mean - z x std of the honest updates (Baruch et al. 2019)", crafts_update=True),
)

# --------------------------------------------------------------------------- audit attacks

FINAL_MODEL = "the final shared model, as a black box: its outputs (class probabilities) on inputs of its choice"
SHADOW_ASSUMPTION = (
    "knows the training recipe (the run's config) and holds patients of the same distribution, "
    "on which it trains shadow runs of the federation"
)


@dataclass(frozen=True)
class AuditAttack:
    """An attack of `privmed audit` (privmed.audit.attacks). Membership attacks (`score` names
    their scoring function) run by default; the others only when named."""

    name: str
    title: str
    sees: str
    assumes: str | None = None  # membership attacks: what the attacker assumes
    score: str | None = None  # membership attacks: (AttackData) -> one score per candidate
    needs_shadows: bool = False
    needs_population: bool = False

    @property
    def membership(self) -> bool:
        return self.score is not None


_A = "privmed.audit.attacks:"
AUDIT_ATTACKS: tuple[AuditAttack, ...] = (
    AuditAttack("loss", "Loss threshold (Yeom et al. 2018)", FINAL_MODEL,
                "knows each patient's label; scores by the model's loss on the patient", _A + "_loss"),
    AuditAttack("lira-online", "LiRA, online (Carlini et al. 2022)", FINAL_MODEL,
                SHADOW_ASSUMPTION + "; each patient asked about is in half of the shadow runs",
                _A + "_lira_online", needs_shadows=True),
    AuditAttack("lira-offline", "LiRA, offline (Carlini et al. 2022)", FINAL_MODEL,
                SHADOW_ASSUMPTION + "; uses only the shadow runs without the patient", _A + "_lira_offline",
                needs_shadows=True),
    AuditAttack("rmia", "RMIA (Zarifzadeh et al. 2024)", FINAL_MODEL,
                SHADOW_ASSUMPTION + " (its reference models), and a population sample of patients "
                "that no model trained on", _A + "_rmia", needs_shadows=True, needs_population=True),
    AuditAttack("inversion", "Gradient inversion (Geiping et al. 2020): images rebuilt from a site's update",
                "the coordinator: one site's update (plain or DP-SGD), or under secure aggregation only the "
                "sum of all sites'"),
    AuditAttack("canaries",
                "Gradient canaries (white box): a lower bound on epsilon from one run's updates (Steinke et al. 2023)",
                "the coordinator: one site's update every round (white box)"),
    # on the final model, but it trains the run again: run when named
    AuditAttack("input-canaries",
                "Input canaries (black box): a lower bound on epsilon from one run's final model (Steinke et al. 2023)",
                "the final shared model only, its outputs on mislabelled images (black box)"),
    # on the final model, but tabular only: run when named
    AuditAttack("attribute", "Attribute inference on a tabular model (Fredrikson et al. 2014)",
                "the final shared model, as a black box"),
)

# --------------------------------------------------------------------------- accountants


@dataclass(frozen=True)
class Accountant:
    name: str
    about: str
    impl: str  # (history, delta) -> epsilon


ACCOUNTANTS: tuple[Accountant, ...] = (
    Accountant("prv", "privacy random variables (Opacus' PRV accountant)", "privmed.privacy.accountants:_prv"),
    Accountant("rdp", "Rényi DP (Opacus' RDP accountant)", "privmed.privacy.accountants:_rdp"),
    Accountant("pld", "privacy loss distributions (dp-accounting's PLD accountant)", "privmed.privacy.accountants:_pld"),
)

# --------------------------------------------------------------------------- reading it


def names(entries: tuple) -> tuple[str, ...]:
    """The entries' names, in the catalog's order (which the config's error messages list)."""
    return tuple(e.name for e in entries)


def by_name(entries: tuple) -> dict[str, Any]:
    return {e.name: e for e in entries}


def _get(entries: tuple, name: str) -> Any:
    for e in entries:
        if e.name == name:
            return e
    raise KeyError(name)


def task(name: str) -> Task:
    return _get(TASKS, name)


def source(name: str) -> Source:
    return _get(SOURCES, name)


def model(name: str) -> Model:
    return _get(MODELS, name)


def strategy(name: str) -> Strategy:
    return _get(STRATEGIES, name)


def aggregator(name: str) -> Aggregator:
    return _get(AGGREGATORS, name)


def adversary(name: str) -> Adversary:
    return _get(ADVERSARIES, name)


def audit_attack(name: str) -> AuditAttack:
    return _get(AUDIT_ATTACKS, name)


def accountant(name: str) -> Accountant:
    return _get(ACCOUNTANTS, name)


def load(impl: str) -> Any:
    """The object an entry's `impl` ("module:attribute") names, its module imported now."""
    module, _, attr = impl.partition(":")
    return getattr(importlib.import_module(module), attr)

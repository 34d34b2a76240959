"""The config's accepted values and the facts its defaults and rules read: the catalog's tables
(privmed.catalog) in the shapes the validators use, and the sizes a data source allows."""

from __future__ import annotations

from typing import Any

from privmed import catalog

MEDMNIST_SIZES = (28, 64, 128, 224)
# The 3D MedMNIST sets (volumes, 28 or 64 voxels a side): a config naming one gets a 3D model.
MEDMNIST_VOLUMES = ("organmnist3d", "nodulemnist3d", "adrenalmnist3d", "fracturemnist3d",
                    "vesselmnist3d", "synapsemnist3d")
MEDMNIST_VOLUME_SIZES = (28, 64)
VOLUME_MODEL = "cnn3d"  # the model a volume source gets where the config names none
# nifti's 3D patches (data.patch): each side's range, and the segmentation model they get by default
PATCH_SIDES = (16, 512)
PATCH_MODEL = "unet3d"
# The catalog's tables (privmed.catalog), in the shapes the schema, defaults and rules read.
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


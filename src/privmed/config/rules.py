"""The config's cross-field rules: checks that read more than one field (of a section, or of the
whole run), each raising ValueError with a one-line message naming the field, the value given and
what is allowed (pydantic turns it into the validation error that privmed.config.loading reports).

What a strategy, source, task, aggregator or attack can do is read from privmed.catalog; a name
stands here only where the message is about that one name (SCAFFOLD's plain SGD, MedMNIST's sizes,
the Cox likelihood of 'survival', ...). The schema's validators call these on a validated section
or run: `cfg` is a privmed.config.schema.RunConfig, `data` a DataConfig and so on (not imported,
as the schema imports this module)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from privmed import catalog
from privmed.catalog import PrivacyMode
from privmed.config.values import (
    MEDMNIST_SIZES,
    MEDMNIST_VOLUME_SIZES,
    PATCH_SIDES,
    ROOT_SOURCES,
    SOURCE_TASK,
    SOURCE_TASKS,
    aggregator_min_sites,
    is_volume_source,
)
from privmed.errors import unknown_name

# --------------------------------------------------------------------------- sections


def check_data(data: Any) -> None:
    """The data section (DataConfig): what its source requires and allows."""
    if catalog.source(data.source).loader is None:  # names no data: each hospital brings its own
        given = sorted(k for k, f in type(data).model_fields.items()
                       if k not in ("source", "val_fraction") and getattr(data, k) != f.default)
        if given:
            raise ValueError(
                f"data.source '{data.source}' names no data (each hospital joins with its own site "
                f"config), so data.{given[0]} has no meaning here; remove it"
            )
    if data.source == "medmnist":
        _check_medmnist(data)
    if data.source in ROOT_SOURCES and data.root is None:
        raise ValueError(f"data.root is required for source '{data.source}'")
    if data.source == "dicom" and data.csv is None:
        raise ValueError("data.csv is required for source 'dicom' (columns file, label[, site, patient])")
    if data.window is not None and not data.window[0] < data.window[1]:
        raise ValueError(f"data.window: [{data.window[0]:g}, {data.window[1]:g}] must be [low, high] with low < high")
    if data.source == "nifti" and data.csv is None:
        raise ValueError("data.csv is required for source 'nifti' (columns image, mask[, site, patient])")
    if data.patch is not None:
        _check_patch(data)
    if data.spacing is not None:
        _check_spacing(data)
    if data.class_names is not None:
        _check_class_names(data)
    _check_keys_apply(data)


# data keys that a source reads for some of its tasks only (the phantom's images or volumes, k-space)
TASK_DATA_KEYS = {
    "samples_per_site": ("classification",),
    "volumes_per_site": ("segmentation", "reconstruction"),
    "acceleration": ("reconstruction",),
    "accelerations": ("reconstruction",),
}


def source_reads(source: str, task: str | None = None) -> set[str]:
    """The data keys that source `source` reads (catalog.Source.keys, and the ones every source
    has); for `task`, without those only other tasks read (TASK_DATA_KEYS)."""
    keys = {"source", "val_fraction", *catalog.source(source).keys}
    if task is not None:
        keys = {k for k in keys if task in TASK_DATA_KEYS.get(k, (task,))}
    return keys


def _check_keys_apply(data: Any) -> None:
    """A data key its source does not read (catalog.Source.keys), set to a value of its own, is
    refused rather than silently ignored."""
    reads = source_reads(data.source)
    for key, spec in type(data).model_fields.items():
        value = getattr(data, key)
        if key not in reads and value != spec.default:
            shown = [str(v) for v in value] if isinstance(value, (list, tuple)) else (
                str(value) if isinstance(value, Path) else value)
            raise ValueError(f"data.{key}: {shown!r} does not apply to source '{data.source}', which reads "
                             f"only data.{', data.'.join(sorted(reads))}; remove it")


def _check_class_names(data: Any) -> None:
    given = f"data.class_names: {list(data.class_names)}"
    named = [s.name for s in catalog.SOURCES if "class_names" in s.keys]  # the catalog's list
    if data.source not in named:
        raise ValueError(f"{given}: source '{data.source}' names its own classes; data.class_names applies "
                         f"to {', '.join(named)}")
    if len(data.class_names) < 2 or len(set(data.class_names)) < len(data.class_names) or not all(
            n.strip() for n in data.class_names):
        raise ValueError(f"{given}: name at least 2 classes, each once and none empty")


def _check_medmnist(data: Any) -> None:
    if not data.name:
        raise ValueError("data.name is required for source 'medmnist' (e.g. pneumoniamnist)")
    if data.size is not None and data.size not in MEDMNIST_SIZES:
        raise ValueError(
            f"data.size: {data.size} is not a MedMNIST size; allowed: 28, 64, 128, 224"
        )
    if is_volume_source(data.source, data.name) and data.size not in (None, *MEDMNIST_VOLUME_SIZES):
        raise ValueError(
            f"data.size: {data.size} is not a size of the 3D MedMNIST set '{data.name}'; "
            "allowed: 28, 64"
        )


def _check_patch(data: Any) -> None:
    given = f"data.patch: {list(data.patch)}"
    if data.source != "nifti":
        raise ValueError(f"{given}: only source 'nifti' cuts volumes into patches (data.source is '{data.source}')")
    if len(data.patch) != 3 or not all(PATCH_SIDES[0] <= s <= PATCH_SIDES[1] for s in data.patch):
        raise ValueError(f"{given} is not a patch size; allowed: three sides [D, H, W], each "
                         f"{PATCH_SIDES[0]} to {PATCH_SIDES[1]} voxels")
    if data.size is not None:
        raise ValueError(f"data.size: {data.size} sets a slice's side, and {given} serves patches; "
                         "give one of the two")


def _check_spacing(data: Any) -> None:
    given = f"data.spacing: {list(data.spacing)}"
    if data.source != "nifti":
        raise ValueError(f"{given}: only source 'nifti' resamples volumes (data.source is '{data.source}')")
    if len(data.spacing) != 3 or not all(0 < s <= 100 for s in data.spacing):
        raise ValueError(f"{given} is not a voxel size; allowed: three sides [x, y, z] in mm, each "
                         "above 0 and at most 100")


def check_site_names(sites: Any) -> None:
    """The sites section (SitesConfig): its names, one per site and each once."""
    if sites.names is not None:
        if len(sites.names) != sites.count:
            raise ValueError(
                f"sites.names has {len(sites.names)} names but sites.count is {sites.count}"
            )
        if len(set(sites.names)) != len(sites.names):
            raise ValueError(f"sites.names must be unique, got {sites.names}")


def check_budget(privacy: Any) -> None:
    """The privacy section (PrivacyConfig): a DP mode needs a budget or a fixed noise."""
    if privacy.mode != PrivacyMode.NONE and privacy.epsilon is None and privacy.noise_multiplier is None:
        raise ValueError(
            f"privacy.mode '{privacy.mode}' needs privacy.epsilon (the budget per site, e.g. 8) "
            "or privacy.noise_multiplier"
        )


def check_site_data(site: Any) -> None:
    """A hospital's config (SiteConfig) names data of its own."""
    if catalog.source(site.data.source).loader is None:
        raise ValueError("data.source: a hospital's config names its own data (image-folder, "
                         f"dicom, ...), not '{site.data.source}'")


# --------------------------------------------------------------------------- the whole run


def check_run(cfg: Any) -> None:
    """Every rule across the run's sections (RunConfig), in this order: the first broken one is
    the one reported."""
    check_task(cfg)
    check_secure_aggregation(cfg)
    check_privacy(cfg)
    check_robustness(cfg)
    check_attack(cfg)
    check_model(cfg)


def check_task(cfg: Any) -> None:
    """The task against the data source, the partition, the strategy, the device and fine-tuning."""
    source, task = cfg.data.source, cfg.task
    wanted = SOURCE_TASK.get(source, "classification")
    if source in SOURCE_TASKS and task not in SOURCE_TASKS[source]:
        raise ValueError(
            f"task: '{task}' does not fit data.source '{source}', which holds data for "
            f"{', '.join(SOURCE_TASKS[source])}"
        )
    if catalog.task(task).dense and cfg.sites.partition in ("dirichlet",):
        raise ValueError(
            f"sites.partition: 'dirichlet' deals items by their class, and task '{task}' has no "
            "class per item; use natural, iid or quantity"
        )
    # a source that names no data (sites): the task says what it is
    if task != wanted and catalog.source(source).tasks and source not in SOURCE_TASKS:
        raise ValueError(
            f"task: '{task}' does not fit data.source '{source}', which holds data for "
            f"'{wanted}'; set task: {wanted} (or leave task out)"
        )
    fed, training = cfg.federation, cfg.training
    if fed.strategy == "scaffold" and (training.optimizer != "sgd" or training.momentum):
        raise ValueError(
            f"federation.strategy 'scaffold' needs plain local SGD (its control variates are "
            f"(start - end) / (steps x lr)): set training.optimizer: sgd and training.momentum: 0 "
            f"(got {training.optimizer}, momentum {training.momentum:g})"
        )
    if training.device == "cuda" and cfg.privacy.mode == PrivacyMode.DP_SGD:
        raise ValueError(
            "training.device: 'cuda' with privacy.mode 'dp-sgd': a site's DP noise and sampling "
            "come from its secret key through a CPU generator, which a GPU step cannot use yet; "
            "use device cpu (or auto) for DP-SGD runs"
        )
    if fed.finetune_steps and not catalog.strategy(fed.strategy).federated:
        raise ValueError(
            f"federation.finetune_steps: fine-tuning personalises a federated model; strategy "
            f"'{fed.strategy}' has none (set finetune_steps: 0)"
        )


def check_secure_aggregation(cfg: Any) -> None:
    """min_sites, and secure aggregation's strategy, site count, shares, threshold and bits."""
    fed, n = cfg.federation, cfg.sites.count
    if fed.min_sites is not None and fed.min_sites > n:
        raise ValueError(f"federation.min_sites: {fed.min_sites} is more than sites.count {n}")
    if not fed.secure_aggregation:
        for key in ("secagg_shares", "secagg_threshold"):
            if getattr(fed, key) is not None:
                raise ValueError(f"federation.{key} needs federation.secure_aggregation: true")
        return
    strategy = catalog.strategy(fed.strategy)
    if not strategy.secure:
        served = ", ".join(s.name for s in catalog.STRATEGIES if s.secure)
        raise ValueError(
            f"federation.secure_aggregation: strategy '{fed.strategy}' cannot use it: "
            + strategy.not_secure + f"; secure aggregation serves {served}"
        )
    if n < 3:
        raise ValueError(
            f"federation.secure_aggregation needs 3 sites or more (sites.count is {n}): with 2, "
            "each site could subtract its own update from the sum and learn the other's"
        )
    shares, threshold = cfg.secagg_shares_threshold
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


def check_privacy(cfg: Any) -> None:
    """The privacy mode against the strategy, logit adjustment, the task and fine-tuning."""
    mode, strategy = cfg.privacy.mode, cfg.federation.strategy
    if mode == PrivacyMode.CENTRAL and not catalog.strategy(strategy).central_dp:
        served = " or ".join(repr(s.name) for s in catalog.STRATEGIES if s.central_dp)
        raise ValueError(
            f"privacy.mode 'central' (DP-FedAvg: the server clips and noises the sites' updates) "
            f"needs federation.strategy {served}, got '{strategy}'; use privacy.mode 'dp-sgd'"
        )
    if mode == PrivacyMode.DP_SGD and cfg.training.logit_adjustment == "on":
        raise ValueError(
            "training.logit_adjustment: 'on' uses each site's label shares, counted from its "
            "training patients: under privacy.mode 'dp-sgd' one patient would then change every "
            "other patient's gradient, which the clipping does not bound; use 'auto' or 'off'"
        )
    if cfg.training.logit_adjustment == "on" and cfg.task == "survival":
        raise ValueError("training.logit_adjustment: 'on' shifts class logits; task 'survival' has none")
    if mode == PrivacyMode.DP_SGD and cfg.task == "survival":
        raise ValueError(
            "privacy.mode 'dp-sgd' cannot protect task 'survival': the Cox partial likelihood "
            "compares each patient with every patient still at risk, so clipping each "
            "patient's gradient does not bound one patient's influence on a step; use "
            "privacy.mode 'central' (each site's update is clipped as a whole)"
        )
    if mode == PrivacyMode.CENTRAL and cfg.federation.finetune_steps:
        raise ValueError(
            f"federation.finetune_steps: {cfg.federation.finetune_steps} with privacy.mode "
            "'central': fine-tuning trains on a site's patients without noise, and its test "
            "scores would leave the site; fine-tune under privacy.mode 'dp-sgd' (planned and "
            "charged as one more release), or set finetune_steps: 0"
        )


def check_robustness(cfg: Any) -> None:
    """federation.aggregator (and update_clip): a robust rule needs each site's update of one
    shared model, and enough sites per round for the malicious ones it must withstand."""
    fed = cfg.federation
    if fed.update_clip is not None and fed.aggregator != "norm-clip":
        raise ValueError(f"federation.update_clip needs federation.aggregator: norm-clip (got '{fed.aggregator}')")
    if not catalog.aggregator(fed.aggregator).robust:
        return
    rule = f"federation.aggregator: '{fed.aggregator}'"
    if not catalog.strategy(fed.strategy).robust:
        served = ", ".join(s.name for s in catalog.STRATEGIES if s.robust)
        raise ValueError(f"{rule} combines updates to one shared model; strategy '{fed.strategy}' "
                         f"does not (robust rules serve {served})")
    if fed.secure_aggregation:
        raise ValueError(f"{rule} needs each site's update, and secure aggregation reveals only "
                         "their sum; use aggregator: mean, or secure_aggregation: false")
    if cfg.privacy.mode == PrivacyMode.CENTRAL:
        raise ValueError(f"{rule}: privacy.mode 'central' calibrates its noise to the sum of "
                         "updates clipped to privacy.max_grad_norm, which already bounds what one "
                         "site can do; a robust rule would change what the noise protects")
    need = aggregator_min_sites(fed.aggregator, fed.byzantine)
    have = fed.min_sites or len(cfg.sites.site_names())
    if have < need:
        raise ValueError(f"{rule} withstands federation.byzantine {fed.byzantine} malicious "
                         f"sites only with {need} sites or more per round; this run has {have}")


def check_attack(cfg: Any) -> None:
    """attack: simulated malicious sites need a shared model, a minority of named sites, and
    (where they craft the update the coordinator receives) no secure aggregation."""
    fed, att, names = cfg.federation, cfg.attack, cfg.sites.site_names()
    if att.kind == "none":
        return
    what = f"attack.kind: '{att.kind}'"
    if not catalog.strategy(fed.strategy).federated:
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
    if catalog.adversary(att.kind).crafts_update and fed.secure_aggregation:
        raise ValueError(f"{what}: the simulation crafts the malicious updates as the coordinator "
                         "receives them, and under secure aggregation it receives only their sum; "
                         "label-flip (at the site) works with it")
    if att.kind == "little-is-enough" and n_bad >= len(names) // 2 + 1:
        raise ValueError(f"{what} needs the malicious sites to be a minority; {n_bad} of "
                         f"{len(names)} are not")


def check_model(cfg: Any) -> None:
    """model.name: a model of the catalog whose output fits the task (an image per item for a
    dense task, one prediction per item for the others). Whether it takes the data's kind (a
    table, images, volumes) is known only once the data is loaded (privmed.federation.experiment)."""
    name, task = cfg.model.name, catalog.task(cfg.task)
    models = catalog.by_name(catalog.MODELS)
    if name not in models:
        raise ValueError(unknown_name("model.name", "model", name, models))
    dense = sorted(m.name for m in catalog.MODELS if m.dense)
    if task.dense and not models[name].dense:
        raise ValueError(f"model.name: '{name}' outputs one prediction per item, and task '{task.name}' "
                         f"needs one per pixel; use one of: {', '.join(dense)}")
    if not task.dense and models[name].dense:
        raise ValueError(f"model.name: '{name}' outputs an image, and task '{task.name}' needs one "
                         "prediction per item; use an image or tabular model (cnn, resnet18, linear, ...)")

"""The typed run config's schema: one pydantic model per section, each field with its type, range,
default and meaning, and a hospital's own config (`SiteConfig`). The defaults a section's
neighbours imply are filled in by privmed.config.defaults and the rules across fields are checked
by privmed.config.rules, both called from the validators here.

Keys are a contract with users and other tools: rename nothing, add freely. Relative paths are
resolved against the current working directory when the data is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from privmed.catalog import PrivacyMode
from privmed.config import rules
from privmed.config.defaults import DEFAULT_HOSPITAL_EPSILON, fill_run_defaults
from privmed.config.values import (
    ACCOUNTANTS,
    ADAPTIVE_STRATEGIES,
    AGGREGATORS,
    ATTACKS,
    SOURCE_NAMES,
    STRATEGIES,
    TASK_NAMES,
)


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
    public_test: bool = Field(
        False,
        description="nifti: the rows marked split 'test' form one public test set that the "
        "coordinator holds and scores itself; default: each stays the test set of the site its row "
        "names, scored at that site (rows without a site column are public either way)",
    )
    acceleration: float = Field(
        4.0, gt=1, le=16, description="reconstruction: k-space undersampling factor of every scanner "
        "(4: a quarter of the phase-encode lines) and of the test set's"
    )
    accelerations: list[float] | None = Field(
        None, description="reconstruction: one acceleration per site (cycled), instead of data.acceleration"
    )
    class_names: list[str] | None = Field(
        None, description="the classes, in label order: image-folder and dicom, the federation's agreed "
        "classes, so that a hospital holding only some of them can join (default: the folders' or labels' "
        "sorted names); nifti, the mask's classes, background first (default: class 1, class 2, ...)"
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
    def _check(self) -> "DataConfig":
        rules.check_data(self)
        return self


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
    def _check(self) -> "SitesConfig":
        rules.check_site_names(self)
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
    local_epochs: int = Field(
        1, ge=1, le=1000,
        description="local epochs a round; image classification and segmentation of nifti slices "
        "without DP-SGD, where neither this nor local_steps is set: the nearest whole number to 20 "
        "steps a round at the median site (privmed.federation.sizing)",
    )
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
        "privacy, last with privacy.mode dp-sgd or central or without validation data. Image "
        "classification without DP-SGD, where neither this nor training.lr_schedule is set: last, "
        "with a cosine schedule (privmed.federation.sizing)",
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
    batch_size: int = Field(
        64, ge=1, le=65_536,
        description="image classification without DP-SGD, where not set: 64, or less where the "
        "smallest site holds under 256 training items (privmed.federation.sizing)",
    )
    lr: float = Field(0.01, gt=0, le=10)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    weight_decay: float = Field(0.0, ge=0, lt=1)
    augment: bool = Field(True, description="random flips/shifts of training images")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="the sites' learning rate over the rounds: constant, or cosine (lr in round 1, "
        "falling along half a cosine towards 0 after the last of federation.rounds). A public "
        "function of the round, so it changes no privacy guarantee. Image classification without "
        "DP-SGD, where neither this nor federation.model_selection is set: cosine",
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



class PrivacyConfig(_Section):
    """Differential privacy: `dp-sgd` gives every site's patients an (epsilon, delta) guarantee over
    everything the site releases in the run; `central` gives every site (all its data at once) one
    over the server's noisy averages (DP-FedAvg)."""

    mode: PrivacyMode = PrivacyMode.NONE
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
    def _check(self) -> "PrivacyConfig":
        rules.check_budget(self)
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
    def _defaults(cls, data: Any) -> Any:
        """What the config leaves out and its source, task, volumes, strategy or privacy mode
        implies (privmed.config.defaults)."""
        return fill_run_defaults(data)

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        rules.check_run(self)
        return self

    @property
    def secagg_shares_threshold(self) -> tuple[int, int]:
        """SecAgg+'s share count and reconstruction threshold, defaults filled in: every site holds
        a share, and a majority of the shares rebuilds a secret."""
        fed = self.federation
        shares = fed.secagg_shares or self.sites.count
        threshold = fed.secagg_threshold or max(2, shares // 2 + 1)
        return shares, threshold

    @property
    def private(self) -> bool:
        return self.privacy.mode != PrivacyMode.NONE

    def to_dict(self) -> dict[str, Any]:
        """The config as YAML and JSON write it (plain values: the privacy mode as its string)."""
        return self.model_dump(mode="json")

    def shown(self) -> dict[str, Any]:
        """`to_dict` as a run shows it (config.yaml, summary.json, the report): see `shown`."""
        return shown(self.to_dict())


def shown(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict without the data keys that its source does not read for its task. Those stay
    at their defaults (validation refuses others where the source reads none), so nothing is lost:
    loading the result gives the same config."""
    data, task = config.get("data"), config.get("task")
    if not isinstance(data, dict) or not isinstance(data.get("source"), str):
        return config
    try:
        reads = rules.source_reads(data["source"], task if isinstance(task, str) else None)
    except KeyError:  # an unknown source: shown as it is (validation names it)
        return config
    return {**config, "data": {k: v for k, v in data.items() if k in reads}}


# --------------------------------------------------------------------------- a hospital's own config


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
    def _check(self) -> "SiteConfig":
        rules.check_site_data(self)
        return self

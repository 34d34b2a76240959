"""Everything a run needs, built and validated from a config before anything is written."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

import torch
from torch import nn

from privmed.catalog import PrivacyMode
from privmed.config import RunConfig, SiteConfig, SitesConfig, validate_config
from privmed.data import ImageSet, SourceData, load_source
from privmed.data.sites import SiteData, own_site, pooled_site, split_into_sites
from privmed.federation.adversary import Adversary, adversary_for
from privmed.federation.facts import DataFacts, SiteProfile, reference_label_shares
from privmed.federation.guard import LedgerTerms
from privmed.federation.robust import with_aggregator
from privmed.federation.sizing import fit_to_data
from privmed.federation.site import DPTraining, Site, derive_seed, get_weights
from privmed.federation.strategies import POOLED_SITE, DPFedAvg, Strategy, Weights, build_strategy
from privmed.errors import ConfigError, PrivmedError
from privmed.models import build_model, models_for, norm_state_mask, spatial_dims
from privmed.privacy.accountants import Release
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
    # the federation's label shares from the sites' validation counts (reference_label_shares):
    # what logit adjustment calibrates to; None: uniform (no validation data, or survival)
    label_shares: tuple[float, ...] | None = None

    def setup_for(self, site: str) -> SiteSetup:
        """What `site` needs to train and score for this run (public: it travels to the site):
        under privacy, the releases it is asked to make (a training turn's, the fine-tuning turn's,
        central mode's noise share and clipping norm) and the scoring plan. A site that only
        scores (its data pooled elsewhere) gets the scoring plan alone."""
        release = finetune = clip = scoring = None
        plan = self.privacy
        if plan is not None:
            scoring = None if plan.scoring is None else plan.scoring.to_dict()
            if site in plan.sites:
                r = plan.release(site)
                release = (r.noise_multiplier, r.sample_rate, r.steps)
                f = plan.sites[site].finetune
                finetune = None if f is None else (f.noise_multiplier, f.sample_rate, f.steps)
                if plan.mode == PrivacyMode.CENTRAL:
                    clip = self.strategy.secure_clip if self.config.federation.secure_aggregation else plan.max_grad_norm
        return SiteSetup(self.config.to_dict(), self.data.to_dict(), self.local_steps, release, self.label_shares,
                         finetune, scoring, clip, validated=self.config)


@dataclass(frozen=True)
class SiteSetup:
    """A run's public settings as a site needs them, from the coordinator's plan: the run config
    (which names no patient), the data's agreed shape, the steps per turn and, under DP-SGD, the
    release each training turn makes (noise multiplier, sample rate, steps). The site trains as
    it says and counts that release in its own ledger, against its own budget; and the federation's
    label shares, which logit adjustment calibrates to."""

    config: dict
    data: dict
    local_steps: int | None
    release: tuple[float, float, int] | None  # dp-sgd: a training turn; central: a round's noise share
    label_shares: tuple[float, ...] | None = None
    finetune: tuple[float, float, int] | None = None  # dp-sgd: the fine-tuning turn
    scoring: dict | None = None  # privmed.privacy.plan.ScoringPlan.to_dict()
    clip: float | None = None  # central: the norm each site clips its update to
    # `config` as validated, once: the plan's own (a simulation), or the hospital's check of what
    # the coordinator sent, on first use (not part of the setup: not sent, compared or hashed)
    validated: RunConfig | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> str:
        return json.dumps(
            {"config": self.config, "data": self.data, "local_steps": self.local_steps,
             "release": None if self.release is None else list(self.release),
             "label_shares": None if self.label_shares is None else list(self.label_shares),
             "finetune": None if self.finetune is None else list(self.finetune),
             "scoring": self.scoring, "clip": self.clip},
            sort_keys=True, allow_nan=False,
        )

    @classmethod
    def from_json(cls, text: str) -> SiteSetup:
        d = json.loads(text)
        r, shares, f = d.get("release"), d.get("label_shares"), d.get("finetune")
        clip = d.get("clip")
        return cls(d["config"], d["data"], d.get("local_steps"),
                   None if r is None else (float(r[0]), float(r[1]), int(r[2])),
                   None if shares is None else tuple(float(x) for x in shares),
                   None if f is None else (float(f[0]), float(f[1]), int(f[2])),
                   d.get("scoring"), None if clip is None else float(clip))

    @property
    def digest(self) -> str:
        """SHA-256 of the whole setup: every reply of the site is bound to it."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def run_config(self) -> RunConfig:
        """The run config, validated once: at the hospital's edge for a setup it received."""
        if self.validated is None:
            object.__setattr__(self, "validated", validate_config(self.config, source="the coordinator's run config"))
        return self.validated


@dataclass
class Experiment:
    """A run as the coordinator holds it: the plan, and a public held-out test set when it holds
    one (a benchmark's official test split that no site owns; None when the sites hold the test
    data). A simulation also holds its sites: their data and the training sites built from it (a
    deployment's coordinator has none: each hospital builds its own)."""

    plan: Plan
    public_test: ImageSet | None = None
    site_data: list[SiteData] = field(default_factory=list)  # the real sites (simulation only)
    trainers: dict[str, Site] = field(default_factory=dict)  # who trains: the sites, or one pooled site
    hospitals: dict[str, SiteConfig] = field(default_factory=dict)  # sites given by their own configs

    config = property(lambda self: self.plan.config)
    task = property(lambda self: self.plan.task)
    model_factory = property(lambda self: self.plan.model_factory)
    initial_weights = property(lambda self: self.plan.initial_weights)
    privacy = property(lambda self: self.plan.privacy)
    data = property(lambda self: self.plan.data)

    @property
    def strategy(self) -> Strategy:
        return self.plan.strategy

    @property
    def adversary(self) -> Adversary | None:
        """The simulated malicious sites (config `attack`), or None."""
        return adversary_for(self.config.attack, self.site_names, self.config.seed)

    @property
    def trainer_names(self) -> list[str]:
        return [p.name for p in self.plan.trainers]

    @property
    def site_names(self) -> list[str]:
        """The real sites (evaluation is always per real site)."""
        return [p.name for p in self.plan.sites]

    @property
    def has_validation(self) -> bool:
        """Whether any site holds validation data (data.val_fraction 0 leaves none)."""
        return any(p.n_val for p in self.plan.sites)

    def site_terms(self, name: str) -> tuple[LedgerTerms, bool]:
        """What site `name` guards itself with: its ledger's terms and whether it requires DP. A
        hospital given by its own config keeps its own; a simulated site has this run's budget."""
        profile = next(p for p in self.plan.sites + self.plan.trainers if p.name == name)
        hospital = self.hospitals.get(name)
        if hospital is None:
            return LedgerTerms.from_plan(self.privacy, profile.patient_ids), False
        return LedgerTerms.for_hospital(hospital.privacy, profile.patient_ids), hospital.privacy.require_dp


def prepare_experiment(
    cfg: RunConfig, noise: Mapping[str, float] | None = None, hospitals: list[SiteConfig] | None = None,
) -> Experiment:
    """Load and partition the data (or, with `hospitals`, load each hospital's own data as its own
    config says), plan the run from the sites' public facts (`plan_experiment`) and build the
    sites. `noise`: the noise multipliers a resumed run started with (else calibrated from the
    config). Raises PrivmedError on bad input; writes nothing."""
    source, site_data, facts = simulated_sites(cfg, hospitals)
    exp = experiment_from_sites(cfg, site_data, facts, source, noise)
    exp.hospitals = {h.site: h for h in hospitals or []}
    return exp


def experiment_from_sites(
    cfg: RunConfig, site_data: list[SiteData], facts: DataFacts, source: SourceData | None = None,
    noise: Mapping[str, float] | None = None,
) -> Experiment:
    """A simulation over the sites' data as given (`prepare_experiment` partitions a source into
    them; an audit's shadow runs give their own): the plan from their public facts, and the
    sites built as it says. `source`: where a test split that no site owns comes from."""
    pooled = None

    def pooled_profile() -> SiteProfile:
        nonlocal pooled
        pooled = pooled_site(site_data, POOLED_SITE)
        return SiteProfile.of(pooled)

    plan = plan_experiment(cfg, facts, [SiteProfile.of(sd) for sd in site_data], pooled=pooled_profile, noise=noise)
    train_on = [pooled] if plan.strategy.pools_data else site_data
    adversary = adversary_for(cfg.attack, [sd.name for sd in site_data], cfg.seed)
    if adversary is not None:  # label-flip: the malicious sites train on corrupted labels
        train_on = [adversary.poison(sd, plan.data.n_classes) for sd in train_on]
    trainers = {sd.name: build_site(plan, sd) for sd in train_on}
    # the sites' own test data makes the pooled test figure; a source's test split that no site
    # owns (a benchmark's official test set) is public, and the coordinator scores it itself
    public_test = None if source is None or all(sd.test is not None for sd in site_data) else source.test
    return Experiment(plan, public_test, site_data, trainers)


def simulated_sites(
    cfg: RunConfig, hospitals: list[SiteConfig] | None = None,
) -> tuple[SourceData | None, list[SiteData], DataFacts]:
    """(the loaded source, each site's data, the data's public facts) of a simulation: the config's
    source partitioned into its sites, or with `hospitals` each hospital's own data (no source)."""
    if hospitals:
        site_data, facts = hospital_sites(cfg, hospitals)
        return None, site_data, facts
    if cfg.data.source == "sites":
        raise ConfigError(
            "data.source: 'sites' names no data: the hospitals hold it. Run it with --runner flower "
            "(each hospital joins with its own site config), or simulate them here with "
            "--hospital SITE_CONFIG for each"
        )
    source = load_source(cfg.data, cfg.sites, seed=cfg.seed, task=cfg.task)
    site_data = split_into_sites(source, cfg.sites, val_fraction=cfg.data.val_fraction, seed=cfg.seed)
    return source, site_data, DataFacts.of(source, cfg.data.source)


def remote_experiment(
    cfg: RunConfig, described: Mapping[str, dict], noise: Mapping[str, float] | None = None,
) -> Experiment:
    """A deployment's run, planned from what the connected sites said of themselves (their counts
    and their data's shape): the coordinator loads no patient data. Only a rehearsal config that
    names a public data source whose test split no site owns (a benchmark's official test set) has
    the coordinator load that source, for its test split."""
    if not described:
        raise PrivmedError("no site described itself; nothing to plan")
    if cfg.attack.kind != "none":
        raise ConfigError(
            f"attack.kind: '{cfg.attack.kind}' simulates malicious sites, in process only (privmed run "
            "without --runner flower): in a deployment each hospital runs its own code"
        )
    try:
        profiles = [SiteProfile.from_dict({**d, "name": name}) for name, d in described.items()]
        facts = DataFacts.agreed({name: DataFacts.from_dict(d["data"]) for name, d in described.items()})
    except KeyError as e:
        raise PrivmedError(f"a site's description lacks {e} (is it running an older privmed?)") from None
    plan = plan_experiment(cfg, facts, profiles, noise=noise)
    public_test = None
    if cfg.data.source != "sites" and not all(p.n_test for p in profiles):
        public_test = load_source(cfg.data, cfg.sites, seed=cfg.seed, task=cfg.task).test
    return Experiment(plan, public_test)


def hospital_sites(cfg: RunConfig, hospitals: list[SiteConfig]) -> tuple[list[SiteData], DataFacts]:
    """Each hospital's SiteData from its own config (as `privmed join` loads it), and the data
    facts they agree on; ConfigError when the run's sites do not match them."""
    names = [h.site for h in hospitals]
    if len(set(names)) != len(names):
        raise ConfigError(f"--hospital: two site configs name the same site ({', '.join(names)})")
    if cfg.sites.names is not None and sorted(cfg.sites.names) != sorted(names):
        raise ConfigError(f"sites.names: {cfg.sites.names} do not match the hospitals' configs ({', '.join(names)})")
    if cfg.sites.count != len(names):
        raise ConfigError(f"sites.count: {cfg.sites.count}, but {len(names)} hospitals' configs were given")
    if cfg.sites.names is not None:  # in the config's order, as a deployment's coordinator orders them
        hospitals = sorted(hospitals, key=lambda h: cfg.sites.names.index(h.site))
    site_data, facts = [], {}
    for h in hospitals:
        sd, f = load_own_site(h)
        site_data.append(sd)
        facts[h.site] = f
    try:
        agreed = DataFacts.agreed(facts)
    except PrivmedError as e:
        raise ConfigError(str(e)) from None
    return site_data, agreed


def load_own_site(h: SiteConfig) -> tuple[SiteData, DataFacts]:
    """A hospital's own data, split as its config says, and its public facts (described by the
    hospital's name and the kind of source, never by where the data lies at the hospital)."""
    source = load_source(h.data, SitesConfig(count=1), seed=h.seed)
    facts = DataFacts.of(source, h.data.source)
    kind = "SYNTHETIC " if source.synthetic else ""
    facts = replace(facts, description=f"{kind}{h.data.source} data of hospital '{h.site}'",
                    citation="" if source.synthetic else f"data of hospital '{h.site}': cite it as the hospital asks")
    return own_site(h.site, source, val_fraction=h.data.val_fraction, seed=h.seed), facts


def plan_experiment(
    cfg: RunConfig, data: DataFacts, sites: list[SiteProfile],
    pooled: Callable[[], SiteProfile] | None = None, noise: Mapping[str, float] | None = None,
) -> Plan:
    """The run's plan from the config and public facts only (no patient's record): the model (its
    initial weights from the seed), the strategy and the privacy plan over the sites' counts.
    `pooled`: the pooled site's profile, for strategies that pool the data (a simulation only).
    Where the config is silent, the training defaults follow the sites' counts (fit_to_data): the
    plan's config holds the values chosen."""
    cfg = fit_to_data(cfg, data, sites)
    task = get_task(cfg.task, data)
    _check_model_fits_data(cfg.model.name, data, task.dense)
    if cfg.federation.model_selection == "best-validation" and not any(p.n_val for p in sites):
        raise ConfigError(
            "federation.model_selection: 'best-validation' needs validation data, and "
            f"data.val_fraction is {cfg.data.val_fraction:g}; use 'last' or 'auto'"
        )
    model_factory = make_model_factory(cfg, data, task)
    initial = get_weights(model_factory())
    norm = norm_state_mask(model_factory())
    strategy = with_aggregator(build_strategy(
        cfg.federation, seed=cfg.seed, local_lr=cfg.training.lr,
        shared=[not m for m in norm] if any(norm) else None,
    ), cfg.federation)
    if strategy.pools_data and pooled is None:
        raise ConfigError("federation.strategy: 'pooled' puts all data in one place; it has no sites")
    trainers = [pooled()] if strategy.pools_data else sites
    steps = cfg.federation.local_steps
    if steps is not None and strategy.pools_data:
        steps *= len(sites)  # the pooled site does the work of all sites together
    privacy = None
    if cfg.private:
        if cfg.privacy.mode == PrivacyMode.DP_SGD:
            validate_model(model_factory())
        privacy = _privacy_plan(cfg, strategy, trainers, steps, initial)
        if noise is not None:
            privacy = privacy.with_noise(noise)
        if cfg.privacy.mode == PrivacyMode.CENTRAL:
            sigma = next(iter(privacy.noise_multipliers().values()))  # one server, one noise
            strategy = DPFedAvg(cfg.privacy.max_grad_norm, sigma, len(sites))
            if cfg.federation.secure_aggregation:
                strategy.rounding_bound = _secagg_rounding_bound(cfg, initial)
    shares = None if task.name == "survival" or task.dense else reference_label_shares(sites, data.n_classes)
    return Plan(cfg, task, data, sites, trainers, strategy, model_factory, initial, steps, privacy, shares)


def make_model_factory(cfg: RunConfig, data: DataFacts, task: Task) -> Callable[[], nn.Module]:
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

    return model_factory


def build_site(plan: Plan, sd: SiteData) -> Site:
    """The site that trains on `sd` in a simulation, built as a hospital builds its own: from the
    public setup the plan gives that site (`site_from_setup`)."""
    return site_from_setup(plan.setup_for(sd.name), sd, plan.data)


def scoring_site(plan: Plan, sd: SiteData) -> Site:
    """A site that only scores models on `sd`'s validation and test data (the real sites of a run
    whose training is pooled), built from the public setup the plan gives it."""
    return site_from_setup(plan.setup_for(sd.name), sd, plan.data, trains=False)


def site_from_setup(setup: SiteSetup, sd: SiteData, own: DataFacts, trains: bool = True) -> Site:
    """The site on `sd` as the coordinator's `setup` says: the one way a site is built, by a
    hospital in a deployment and for each site of a simulation. `trains` False: a site that only
    scores (no steps, no DP-SGD release, no label shares). ConfigError when the run's data shape is
    not that of the site's data (`own`), or a DP-SGD setup names no release."""
    cfg = setup.run_config()
    data = DataFacts.from_dict(setup.data)
    try:
        DataFacts.agreed({"the run": data, sd.name: own})
    except PrivmedError as e:
        raise ConfigError(str(e)) from None
    task = get_task(cfg.task, data)
    model_factory = make_model_factory(cfg, data, task)
    if not trains:
        return Site(sd, model_factory, cfg.training, cfg.federation.local_epochs, cfg.seed, task=task)
    return Site(sd, model_factory, cfg.training, cfg.federation.local_epochs, cfg.seed, setup.local_steps,
                dp=_dp_training(cfg, setup), task=task, label_shares=setup.label_shares,
                rounds=cfg.federation.rounds)


def _dp_training(cfg: RunConfig, setup: SiteSetup) -> DPTraining | None:
    """How the site trains under DP-SGD, from the release the setup names (None in another mode)."""
    if cfg.privacy.mode != PrivacyMode.DP_SGD:
        return None
    if setup.release is None:
        raise ConfigError("privacy.mode 'dp-sgd', but the coordinator's setup names no release")
    return DPTraining(Release(*setup.release), cfg.privacy.max_grad_norm, cfg.privacy.grad_sample_mode)


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


_KINDS = {0: "a feature table", 2: "images", 3: "3-D volumes"}


def _check_model_fits_data(model: str, data: DataFacts, dense: bool = False) -> None:
    """ConfigError when model.name takes another kind of data (table, images, volumes) than the
    source holds, naming the models that fit."""
    takes, holds = spatial_dims(model), data.spatial_dims
    if takes != holds:
        shape = "" if data.tabular else f" ({'x'.join(str(s) for s in data.image_shape)})"
        raise ConfigError(
            f"model.name: '{model}' takes {_KINDS[takes]}, and data.source '{data.source}' holds "
            f"{_KINDS.get(holds, f'{holds}-D data')}{shape}; use one of: {', '.join(models_for(holds, dense))}"
        )


def _privacy_plan(
    cfg: RunConfig, strategy: Strategy, trainers: list[SiteProfile], local_steps: int | None, initial: Weights,
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
        finetune_steps=cfg.federation.finetune_steps,
        scorings=planned_scorings(cfg, strategy, initial),
    )


def validation_rounds(cfg: RunConfig) -> list[int]:
    """The rounds whose models the sites score on their validation patients: every round without
    privacy; under privacy privacy.validation_rounds of them (default: every round up to 20, else
    20), evenly spaced and ending with the last round, since each scoring is a release."""
    rounds = cfg.federation.rounds
    if not cfg.private:
        return list(range(1, rounds + 1))
    k = min(rounds, cfg.privacy.validation_rounds or 20)
    return sorted({math.ceil(i * rounds / k) for i in range(1, k + 1)})


def planned_scorings(cfg: RunConfig, strategy: Strategy, weights: Weights) -> dict[str, int]:
    """How many scorings of each split a site releases in the run: its validation patients once in
    each validation round (its own model's, or the shared one's), its test patients once per model
    at the end (every model that has a key visits every site's test patients), and once more for
    the fine-tuned model."""
    keys = [k for k in strategy.init_state(weights, cfg.sites.site_names()) if not k.startswith("_")]
    return {"val": len(validation_rounds(cfg)), "test": len(keys) + (1 if cfg.federation.finetune_steps else 0)}

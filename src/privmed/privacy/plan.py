"""A run's privacy plan: for every site, the DP release it makes each time it trains (noise multiplier,
sample rate, steps) and how often it trains, fixed before the first round.

    plan = make_plan(cfg.privacy, sites={name: SiteFacts(...)}, batch_size=..., ...)
    plan.release(site)   the Release one training turn of `site` makes
    plan.new_ledger()    an empty PrivacyLedger with the run's budget

dp-sgd (Abadi et al. 2016): the unit is a patient of the site when the data names each item's patient,
else one record (an image, or a table row): a source without patient ids treats each item as its own
patient, so the guarantee is then per record only. A turn is `steps` DP-SGD steps with units (patients
or records) Poisson-sampled at rate q = batch_size / units. Noise is calibrated per site, so that after
every planned turn the site has spent at most epsilon (sites of different sizes get different noise).

central (DP-FedAvg, McMahan et al. 2018, as distributed DP): the unit is a whole site; each round
every site clips its update to C and adds Gaussian noise of std sigma x C from its own secret key
before the update leaves it, so the coordinator never sees an unnoised update. Each site's ledger
charges its own share alone, a Gaussian mechanism with sensitivity C per round (sample rate 1): that
is what a coordinator that cheats can isolate (see the README on SecAgg+). The sum of m shares carries
noise sqrt(m) x sigma x C, which is what a coordinator that follows the protocol sees under secure
aggregation (`honest_epsilon`).

Scoring (`ScoringPlan`): each time a site scores a model on its validation or test patients it
releases noisy counts, a Gaussian mechanism over that split's patients; the noise is calibrated so
that the planned scorings of each split spend at most privacy.scoring_epsilon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Mapping

from privmed.catalog import PrivacyMode
from privmed.errors import ConfigError
from privmed.privacy.accountants import Release, epsilon_spent
from privmed.privacy.calibration import check_delta, noise_for_epsilon
from privmed.privacy.figures import format_budget, format_epsilon
from privmed.privacy.ledger import PrivacyLedger
from privmed.privacy.noisy_counts import scoring_noise

if TYPE_CHECKING:  # the config and DP-SGD (torch, opacus) stay unloaded for `privmed privacy plan`
    from privmed.config import PrivacyConfig

# The units each mode may protect, the weaker claim first: dp-sgd one record, or a patient when the
# data names each item's patient; central a whole site.
UNITS = {PrivacyMode.DP_SGD: ("record", "patient"), PrivacyMode.CENTRAL: ("site",)}
MECHANISMS = {
    PrivacyMode.DP_SGD: "DP-SGD (Poisson-sampled Gaussian)",
    PrivacyMode.CENTRAL: "distributed DP-FedAvg (each site clips its update and adds its own Gaussian noise)",
}
SCORING_MECHANISM = "noisy counts (Gaussian mechanism on each split's counts)"


NO_PRIVACY = (
    "No differential privacy (privacy.mode: none): the model and its updates may reveal the "
    "patients they were trained on, and the scores may reveal the validation and test patients."
)
_PUBLIC = (
    "Not covered, public and released as they are: each site's numbers of {counted} (its FedAvg "
    "weight) and of validation and test {items}, its data's shape and classes, and when its replies "
    "arrive. The DP noise and sampling come from each site's own secret key, never from the run's "
    "public seed."
)
_UNSCORED = (
    "Not covered: what each site computed from its validation and test patients (its scores and "
    "the counts pooled scores are summed from), released as computed, without noise. "
)
_AGAINST = (
    "against everything the site released from them during the run: every model update of every "
    "round (and a fine-tuning turn), and so the final model. It holds against the coordinator, even "
    "one that sends crafted weights, other setups or repeated requests, against the other sites and "
    "against anyone who gets the model. "
)
_TRAINING = {  # by unit of privacy
    "patient": (
        "Each site's training patients have ({epsilon}, {delta})-differential privacy (the unit is "
        "one patient, with all of their images) " + _AGAINST
    ),
    # Group privacy: (eps, delta)-DP for one record gives (k eps, k e^((k-1) eps) delta) for k records.
    "record": (
        "Each site's training records have ({epsilon}, {delta})-differential privacy (the unit is one "
        "image/record: the source gives no patient ids, so each is treated as its own patient; a "
        "patient with k images or records has only the group guarantee (k x epsilon, "
        "k x e^((k-1) x epsilon) x delta)) " + _AGAINST
    ),
    "site": (
        "Each site, as a whole (all of its patients together), has ({epsilon}, {delta})-differential "
        "privacy against everything it released during the run: its update leaves it each round "
        "clipped and with its own share of Gaussian noise, so this holds against anyone who sees it, "
        "the coordinator included, even one that deviates from the protocol. "
    ),
}
_HONEST = (
    "Under secure aggregation a coordinator that follows the protocol sees only the sum of at least "
    "{min_sites} sites' updates, which carries their noise shares together: against it each site has "
    "({honest}, {delta})-differential privacy. "
)
_SCORED = {
    "patient": (
        "Each site's validation and test patients have ({scoring}, {delta})-differential privacy (the "
        "unit is one patient) against every scoring the site released: noisy counts, one Gaussian "
        "release per scoring within the run's quota. "
    ),
    "record": (
        "Each site's validation and test records have ({scoring}, {delta})-differential privacy (the "
        "unit is one image/record) against every scoring the site released: noisy counts, one "
        "Gaussian release per scoring within the run's quota. "
    ),
}


def guarantee_statement(
    mode: str, epsilon: str = "epsilon", delta: str = "delta", unit: str | None = None,
    scoring: str | None = None, honest: str | None = None, min_sites: int | None = None,
    scoring_unit: str | None = None,
) -> str:
    """What the guarantee of `mode` covers for its unit of privacy ('patient', 'record' or 'site';
    None: the mode's weaker claim, 'record' for dp-sgd), in words, with the figures as given: pass
    every epsilon through `format_epsilon`, so it reads no lower than the ledger's. `scoring`: the
    validation and test patients' epsilon (None: their scores were released without noise, as by
    a run made before scorings had a mechanism), per `scoring_unit` ('patient' or 'record'; default:
    the training unit's, 'patient' under central); `honest` (central under secure aggregation): each
    site's epsilon against a coordinator that follows the protocol and sums `min_sites` sites."""
    if mode == PrivacyMode.NONE:
        return NO_PRIVACY
    if mode not in UNITS:
        raise ValueError(f"guarantee_statement: mode {str(mode)!r} is not one of none, {', '.join(UNITS)}")
    unit = UNITS[mode][0] if unit is None else unit
    if unit not in UNITS[mode]:
        raise ValueError(
            f"guarantee_statement: unit {unit!r} is not allowed under mode {str(mode)!r} "
            f"(allowed: {', '.join(UNITS[mode])})"
        )
    text = _TRAINING[unit].format(epsilon=epsilon, delta=delta)
    if honest is not None:
        text += _HONEST.format(honest=honest, delta=delta, min_sites=min_sites)
    if scoring is None:
        text += _UNSCORED
    else:
        scoring_unit = scoring_unit or ("record" if unit == "record" else "patient")
        text += _SCORED[scoring_unit].format(scoring=scoring, delta=delta)
    records = unit == "record" or scoring_unit == "record"
    return text + _PUBLIC.format(counted="training records" if records else "training patients and images",
                                 items="records" if records else "images")


@dataclass(frozen=True)
class SiteFacts:
    """What planning needs to know about a training site."""

    n_patients: int  # distinct patients in its training data (items, when the data names no patients)
    turns: int  # how many times it trains over the planned rounds


@dataclass(frozen=True)
class SitePlan:
    n_patients: int
    turns: int
    release: Release  # what one training turn releases (central: one round's noise share)
    planned_epsilon: float  # after all `turns` (and the fine-tuning turn)
    finetune: Release | None = None  # dp-sgd: the fine-tuning turn after the last round

    def to_dict(self) -> dict:
        return {
            "n_patients": self.n_patients,
            "turns": self.turns,
            "noise_multiplier": self.release.noise_multiplier,
            "sample_rate": self.release.sample_rate,
            "steps": self.release.steps,
            **({} if self.finetune is None else {"finetune_steps": self.finetune.steps}),
            "planned_epsilon": self.planned_epsilon,
        }


@dataclass(frozen=True)
class ScoringPlan:
    """How the sites' scorings are released: per split ('val', 'test'), how many scorings each
    site makes in the run and the noise multiplier of each (a Gaussian mechanism on the split's
    counts, whose sensitivity to one patient the counts' mechanism defines), calibrated so that a
    site's planned scorings of one split spend at most `epsilon` on its patients."""

    epsilon: float
    releases: dict[str, int]
    noise: dict[str, float]

    def release(self, split: str) -> Release:
        return Release(self.noise[split], 1.0, 1)

    def to_dict(self) -> dict:
        return {"mechanism": SCORING_MECHANISM, "epsilon": self.epsilon, "releases": dict(self.releases),
                "noise_multiplier": dict(self.noise)}

    @classmethod
    def from_dict(cls, d: Mapping) -> ScoringPlan:
        return cls(float(d["epsilon"]), {k: int(v) for k, v in d["releases"].items()},
                   {k: float(v) for k, v in d["noise_multiplier"].items()})


@dataclass(frozen=True)
class PrivacyPlan:
    mode: str
    delta: float
    accountant: str
    max_grad_norm: float
    budget: float  # the ledger's budget: privacy.epsilon, or (noise fixed) the largest planned epsilon
    sites: dict[str, SitePlan]
    calibrated: bool  # True: noise was calibrated to privacy.epsilon
    unit: str  # what one guarantee protects: 'patient', 'record' (no patient ids) or 'site' (central)
    scoring: ScoringPlan | None = None  # the validation and test patients' releases

    @property
    def mechanism(self) -> str:
        return MECHANISMS[self.mode]

    def release(self, site: str) -> Release:
        return self.sites[site].release

    def noise_multipliers(self) -> dict[str, float]:
        return {s: p.release.noise_multiplier for s, p in self.sites.items()}

    def new_ledger(self) -> PrivacyLedger:
        return PrivacyLedger(
            self.budget, self.delta, self.accountant, sites=list(self.sites),
            unit=self.unit, mechanism=self.mechanism,
        )

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "unit": self.unit,
            "mechanism": self.mechanism,
            "delta": self.delta,
            "accountant": self.accountant,
            "max_grad_norm": self.max_grad_norm,
            "budget_epsilon": self.budget,
            "calibrated": self.calibrated,
            "sites": {s: p.to_dict() for s, p in self.sites.items()},
            **({} if self.scoring is None else {"scoring": self.scoring.to_dict()}),
        }

    def honest_epsilon(self, min_sites: int) -> float:
        """central: the epsilon of each site when the coordinator follows the protocol and sees only
        the sum of at least `min_sites` sites' noisy updates (secure aggregation): noise
        sqrt(min_sites) x sigma x C on a sum that one site moves by at most C."""
        if self.mode != PrivacyMode.CENTRAL:
            raise ValueError("honest_epsilon: only central mode adds noise shares")
        return max(
            epsilon_spent([Release(p.release.noise_multiplier * math.sqrt(min_sites), 1.0, p.release.steps * p.turns)],
                          self.delta, self.accountant)
            for p in self.sites.values()
        )

    def with_noise(self, noise: Mapping[str, float]) -> PrivacyPlan:
        """This plan with the noise a run was started with (a resumed run keeps its noise even when
        federation.rounds was raised: the extra rounds then meet the ledger's budget)."""
        if set(noise) != set(self.sites):
            raise ConfigError(
                f"--resume: the run's privacy plan covers sites {sorted(noise)}, not {sorted(self.sites)}"
            )
        sites = {
            s: replace(p, release=replace(p.release, noise_multiplier=float(noise[s])),
                       finetune=None if p.finetune is None else replace(p.finetune, noise_multiplier=float(noise[s])))
            for s, p in self.sites.items()
        }
        return replace(self, sites=sites)


def sample_rate_and_steps(
    n_patients: int, batch_size: int, local_epochs: int, local_steps: int | None
) -> tuple[float, int]:
    """DP-SGD's Poisson rate q = batch_size / patients (at most 1) and the steps of one training turn:
    `local_steps`, or `local_epochs` passes of 1/q expected steps each (rounded up)."""
    q = min(1.0, batch_size / n_patients)
    steps = local_steps if local_steps is not None else math.ceil(local_epochs / q - 1e-9)
    return q, int(steps)


def make_plan(
    privacy: PrivacyConfig,
    sites: Mapping[str, SiteFacts],
    *,
    batch_size: int,
    local_epochs: int,
    local_steps: int | None,
    patient_ids: bool = False,
    finetune_steps: int = 0,
    scorings: Mapping[str, int] | None = None,
) -> PrivacyPlan:
    """The plan for `privacy.mode` ('dp-sgd' or 'central'); ConfigError (naming the field and the
    figures) when delta is too large for the sites, the target epsilon is unreachable, or a fixed
    noise multiplier would spend more than privacy.epsilon.

    `patient_ids`: whether the training data names each item's patient (SiteFacts.n_patients then
    counts patients). It sets dp-sgd's unit: 'patient' if so, else 'record', the weaker claim, which
    is also the default so that nothing claims per-patient privacy it was not told it has.

    `finetune_steps` (dp-sgd): one more turn of that many steps after the last round, planned and
    calibrated with the rounds. `scorings`: per split, the scorings each site releases in the run
    (None: no scoring plan)."""
    mode = privacy.mode
    if mode not in UNITS:
        raise ValueError(f"no privacy plan for mode {str(mode)!r}")
    if not sites:
        raise ValueError("no sites to plan for")
    dp_sgd = mode == PrivacyMode.DP_SGD
    unit = ("patient" if patient_ids else "record") if dp_sgd else "site"
    _check_delta(privacy.delta, unit, sites)
    finetune = finetune_steps if dp_sgd else 0
    releases = _releases(privacy, sites, batch_size=batch_size, local_epochs=local_epochs,
                         local_steps=local_steps, finetune=finetune)
    plans = {
        name: SitePlan(
            n_patients=facts.n_patients,
            turns=facts.turns,
            release=releases[name],
            planned_epsilon=_planned(releases[name], facts.turns, privacy, finetune),
            finetune=(replace(releases[name], steps=finetune_steps) if dp_sgd and finetune_steps else None),
        )
        for name, facts in sites.items()
    }
    budget = _budget(privacy, plans)
    scoring = None
    if scorings is not None:
        scoring = scoring_plan(privacy.scoring_epsilon or budget, privacy.delta, scorings, privacy.accountant)
    return PrivacyPlan(
        mode=mode,
        delta=privacy.delta,
        accountant=privacy.accountant,
        max_grad_norm=privacy.max_grad_norm,
        budget=budget,
        sites=plans,
        calibrated=privacy.noise_multiplier is None,
        unit=unit,
        scoring=scoring,
    )


def _releases(
    privacy: PrivacyConfig, sites: Mapping[str, SiteFacts], *, batch_size: int, local_epochs: int,
    local_steps: int | None, finetune: int,
) -> dict[str, Release]:
    """Each site's release of one turn: privacy.noise_multiplier (ConfigError below dp-sgd's floor)
    or the noise calibrated to privacy.epsilon over the site's turns and `finetune` more steps (sites
    of equal sample rate and steps share one calibration; dp-sgd never below its floor)."""
    from privmed.privacy.exact import MIN_NOISE_MULTIPLIER

    dp_sgd = privacy.mode == PrivacyMode.DP_SGD
    releases: dict[str, Release] = {}
    calibrated: dict[tuple[float, int], float] = {}  # sites of equal size share one calibration
    for name, facts in sites.items():
        if dp_sgd:
            q, steps = sample_rate_and_steps(facts.n_patients, batch_size, local_epochs, local_steps)
        else:
            q, steps = 1.0, 1  # every site in every round; one Gaussian release of the sum per round
        total = steps * facts.turns + finetune
        if privacy.noise_multiplier is not None:
            sigma = privacy.noise_multiplier
            if dp_sgd and sigma < MIN_NOISE_MULTIPLIER:
                raise ConfigError(
                    f"privacy.noise_multiplier: {sigma:g} is below {MIN_NOISE_MULTIPLIER:g}, the least a "
                    "site accepts under dp-sgd (its noise sampler's finite support would tell patients "
                    "apart); allowed: >= 0.2"
                )
        else:
            if (q, total) not in calibrated:
                calibrated[q, total] = noise_for_epsilon(
                    privacy.epsilon, privacy.delta, q, total, privacy.accountant
                )
                if dp_sgd:  # a budget met with less noise still gets the floor
                    calibrated[q, total] = max(calibrated[q, total], MIN_NOISE_MULTIPLIER)
            sigma = calibrated[q, total]
        releases[name] = Release(sigma, q, steps)
    return releases


def _budget(privacy: PrivacyConfig, plans: dict[str, SitePlan]) -> float:
    """privacy.epsilon, once no site's plan spends more (ConfigError naming the site that spends
    most and the noise it would need); without a target epsilon, the most a site plans to spend."""
    if privacy.epsilon is None:
        return max(p.planned_epsilon for p in plans.values())
    budget = privacy.epsilon
    over = {s: p for s, p in plans.items() if p.planned_epsilon > budget}
    if over:
        site, p = max(over.items(), key=lambda kv: kv[1].planned_epsilon)
        r = p.release
        total_steps = r.steps * p.turns + (p.finetune.steps if p.finetune else 0)
        need = noise_for_epsilon(budget, privacy.delta, r.sample_rate, total_steps, privacy.accountant)
        raise ConfigError(
            f"privacy.noise_multiplier: {r.noise_multiplier:g} would spend epsilon "
            f"{format_epsilon(p.planned_epsilon, 4)} at site '{site}' ({p.turns} turns of {r.steps} "
            f"steps at sample rate {r.sample_rate:.4g}), past privacy.epsilon {format_budget(budget)}; "
            f"allowed: a noise multiplier >= {format_epsilon(need, 4)}, fewer rounds or steps, or a "
            "larger epsilon"
        )
    return budget


def scoring_plan(epsilon: float, delta: float, releases: Mapping[str, int], accountant: str) -> ScoringPlan:
    """The noise of each split's scorings: `releases[split]` Gaussian releases of its counts (each
    patient in every one: sample rate 1) spend at most `epsilon` at `delta`. A split with no
    planned scoring gets no noise entry (and a site refuses to score it)."""
    noise = {split: scoring_noise(epsilon, delta, n, accountant) for split, n in releases.items() if n > 0}
    return ScoringPlan(float(epsilon), {s: int(n) for s, n in releases.items() if n > 0}, noise)


def _planned(release: Release, turns: int, privacy: PrivacyConfig, finetune_steps: int = 0) -> float:
    total = Release(release.noise_multiplier, release.sample_rate, release.steps * turns + finetune_steps)
    return epsilon_spent([total], privacy.delta, privacy.accountant)


def _check_delta(delta: float, unit: str, sites: Mapping[str, SiteFacts]) -> None:
    if unit != "site":
        name, facts = min(sites.items(), key=lambda kv: kv[1].n_patients)
        check_delta(delta, facts.n_patients, f"{unit}s at the smallest site, '{name}'")
    else:
        check_delta(delta, len(sites), "sites")

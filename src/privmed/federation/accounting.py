"""The coordinator's privacy accounting around the round loop: what each round will release (from
the plan), refusing rounds past the budget before they start, charging a round before any site is
asked to train (write-ahead), recording what the sites report, and the summary of the guarantee.
Every epsilon here is the ledger's; the sites keep and enforce ledgers of their own
(privmed.federation.client)."""

from __future__ import annotations

import warnings

from privmed.catalog import PrivacyMode
from privmed.federation.experiment import Experiment
from privmed.federation.records import PrivacySummary
from privmed.privacy.accountants import Release
from privmed.privacy.figures import format_epsilon
from privmed.privacy.ledger import BudgetExceeded, PrivacyLedger
from privmed.privacy.plan import NO_PRIVACY, guarantee_statement


def planned_releases(exp: Experiment, rnd: int) -> dict[str, list[Release]]:
    """The DP releases round `rnd` will make, per site (one per training turn)."""
    planned: dict[str, list[Release]] = {}
    for stage in exp.strategy.stages(rnd, exp.trainer_names):
        for site in stage:
            planned.setdefault(site, []).append(exp.privacy.release(site))
    return planned


def refuse_rounds_past_budget(exp: Experiment, ledger: PrivacyLedger, first: int, last: int) -> None:
    """BudgetExceeded, before anything is written, if rounds first..last would take a site past its
    budget (a resumed run whose federation.rounds was raised past what the budget was planned for),
    naming the first round that would and the rounds the budget allows."""

    def planned(upto: int) -> dict[str, list[Release]]:
        out: dict[str, list[Release]] = {}
        for rnd in range(first, upto + 1):
            for site, releases in planned_releases(exp, rnd).items():
                out.setdefault(site, []).extend(releases)
        return out

    def fits(upto: int) -> bool:
        try:
            ledger.check_round(planned(upto), first)
            return True
        except BudgetExceeded:
            return False

    if first > last or fits(last):
        return
    lo, hi = first - 1, last  # rounds up to lo fit (those done), up to hi do not; epsilon only grows
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    try:
        ledger.check_round(planned(hi), first)
    except BudgetExceeded as e:
        detail = str(e).split(": ", 1)[1]
    raise BudgetExceeded(
        f"federation.rounds: {last} is past the privacy budget: round {hi} refused before it starts "
        f"({ledger.accountant} accountant, delta {ledger.delta:g}): counting rounds {first}-{hi}, {detail}; "
        f"allowed: federation.rounds <= {lo} (round {first - 1} completed)"
    )


def charge(ledger: PrivacyLedger, rnd: int, planned: dict[str, list[Release]]) -> None:
    """Count round `rnd` for every planned site before any site is asked to train (the caller
    saves the ledger file then). A site that drops out, a round given up, a coordinator that dies
    after some sites released their updates: none leaves a ledger that claims less than was
    released. A site that was sent its instructions is charged whether its update arrived or not.
    --resume starts from the last checkpoint's ledger and counts the round once when it completes:
    it re-releases the identical updates (each site replays or re-draws them from its key)."""
    for site, releases in planned.items():
        if len(releases) != 1:
            raise NotImplementedError(f"round {rnd}: site '{site}' trained {len(releases)} times")
        r = releases[0]
        ledger.record(site, rnd, r.noise_multiplier, r.sample_rate, r.steps)


def record_reported(
    ledger: PrivacyLedger, rnd: int, made: dict[str, list[Release]], planned: dict[str, list[Release]]
) -> None:
    """The ledger counts what the sites report they released (each site holds its own ledger and
    may follow its own config): a release other than the one charged before the round replaces
    it there, with a warning, and may spend more than the plan (the site's own budget still binds
    it). A site charged that reported nothing (dropped) stays charged as planned."""
    for site, releases in made.items():
        if releases == planned.get(site):
            continue
        if len(releases) != 1:
            raise NotImplementedError(f"round {rnd}: site '{site}' trained {len(releases)} times")
        warnings.warn(
            f"round {rnd}: site '{site}' reports it released {releases[0]}, the plan had "
            f"{planned.get(site)}; the privacy ledger counts what the site reports", stacklevel=2,
        )
        ledger.replace(site, rnd, releases[0])


def privacy_summary(exp: Experiment, ledger: PrivacyLedger | None) -> PrivacySummary:
    """What the run's guarantee is, from the ledger: every epsilon here is the ledger's, and `unit`
    what one guarantee protects ('patient', 'record' when the data names no patients, or 'site')."""
    plan = exp.privacy
    if plan is None:
        return PrivacySummary(mode=PrivacyMode.NONE, epsilon=None, statement=NO_PRIVACY)
    spent = {site: ledger.epsilon(site) for site in ledger.sites}
    epsilon = max(spent.values())
    scored = sorted(set(ledger.scored_sites) | set(exp.site_names))
    scoring = {site: {split: ledger.scoring_epsilon(site, split) for split in ("val", "test")} for site in scored}
    scoring_epsilon = max((e for per in scoring.values() for e in per.values()), default=0.0)
    scoring_unit = "patient" if all(p.patient_ids for p in exp.plan.sites) else "record"
    honest = min_sites = None
    if plan.mode == PrivacyMode.CENTRAL and exp.config.federation.secure_aggregation:
        min_sites = exp.config.federation.min_sites or len(exp.site_names)
        honest = plan.honest_epsilon(min_sites)
    # Rounded up: the statement must never claim a smaller epsilon than the ledger backs.
    statement = guarantee_statement(
        plan.mode, format_epsilon(epsilon), f"{plan.delta:g}", plan.unit,
        scoring=None if plan.scoring is None else format_epsilon(scoring_epsilon),
        honest=None if honest is None else format_epsilon(honest), min_sites=min_sites, scoring_unit=scoring_unit,
    )
    return PrivacySummary(
        mode=PrivacyMode(plan.mode),
        unit=plan.unit,
        mechanism=plan.mechanism,
        epsilon=epsilon,
        delta=plan.delta,
        accountant=plan.accountant,
        budget_epsilon=plan.budget,
        sites=spent,
        max_grad_norm=plan.max_grad_norm,
        plan=plan.to_dict()["sites"],
        # the validation and test patients' line: per site and split, from the scorings released
        scoring=None if plan.scoring is None else {
            **plan.scoring.to_dict(), "unit": scoring_unit, "epsilon": scoring_epsilon, "sites": scoring,
        },
        honest_secure_epsilon=honest,
        honest_min_sites=min_sites if honest is not None else None,
        statement=statement,
    )


def secure_summary(exp: Experiment) -> dict | None:
    fed = exp.config.federation
    if not fed.secure_aggregation:
        return None
    shares, threshold = exp.config.secagg_shares_threshold
    return {
        "protocol": "SecAgg+ (Flower)",
        "shares": shares,
        "threshold": threshold,
        "clipping_range": fed.secagg_clipping_range,
        "quantization_bits": fed.secagg_quantization_bits,
        "statement": "the coordinator received only the weighted sum of the sites' updates each "
        "round (masked, quantised); sample counts travel in the clear"
        + ("" if exp.config.private else ", and so do training metrics (loss, time)"),
    }

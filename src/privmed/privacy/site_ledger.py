"""A site's own privacy ledger: every DP release the site made, in any run, against the budget of
its own config. The site consults it before it trains or scores; the coordinator's ledger only
records what sites report.

Two lines, for two disjoint groups of the site's patients:

- training patients: every DP-SGD training turn (and fine-tuning, and a central-mode round's noise
  share) the site released;
- validation and test patients: every scoring release (noisy counts of one split), composed per
  split (a patient is in one split, so the line's epsilon is the larger of the two).

    ledger = SiteLedger(site, budget_epsilon, delta, accountant, unit)
    ledger.find(run, round, purpose)          the training release already made for that request, or None
    ledger.check(release, what)               epsilon after one more release; BudgetExceeded past the budget
    ledger.add(SiteRelease(run, round, purpose, digest, noise, rate, steps))
    ledger.find_scoring(run, round, split, key) / check_scoring(split, release, what) / add_scoring(...)
    ledger.bind_run(run, terms, what)         a run's privacy terms, fixed the first time the run is seen

Releases of every run compose: the budget is the site's, over everything it ever released from one
state directory, and applies to each line. A release whose epsilon the accountant cannot bound (no
noise) is refused whatever the budget. Pure bookkeeping over `epsilon_spent`; `save`/`load` write one
JSON file atomically (owner-only).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from privmed.errors import PrivmedError
from privmed.io import write_json
from privmed.privacy.accountants import Release, epsilon_spent
from privmed.privacy.figures import format_epsilon
from privmed.privacy.ledger import BudgetExceeded, LedgerError

SITE_LEDGER_FILE = "site_ledger.json"  # in the site's state directory
SCORED_SPLITS = ("val", "test")


class SiteRefused(PrivmedError):
    """A site refused an instruction (past its budget, a round already released differently, a
    purpose its privacy mode does not allow); the reason is the message."""


@dataclass(frozen=True)
class SiteRelease:
    """One release computed from the site's training patients."""

    run: str
    round: int
    purpose: str  # 'train' (a round's turn), 'finetune', 'central' (a central-mode round's noise share)
    digest: str  # of everything that shaped it (privmed.federation.instructions.release_digest)
    noise_multiplier: float
    sample_rate: float
    steps: int

    @property
    def release(self) -> Release:
        return Release(self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class ScoringRelease:
    """One scoring of one split (noisy counts of its validation or test patients): a Gaussian
    mechanism with this noise multiplier over the split's patients, each patient in it once."""

    run: str
    round: int
    split: str  # 'val' or 'test'
    model_key: str
    digest: str
    noise_multiplier: float

    @property
    def release(self) -> Release:
        return Release(self.noise_multiplier, 1.0, 1)


class SiteLedger:
    def __init__(self, site: str, budget_epsilon: float, delta: float, accountant: str, unit: str,
                 releases: list[SiteRelease] | None = None, scorings: list[ScoringRelease] | None = None,
                 runs: dict[str, str] | None = None):
        self.site, self.budget_epsilon, self.delta = site, float(budget_epsilon), float(delta)
        self.accountant, self.unit = accountant, unit
        self.releases: list[SiteRelease] = list(releases or [])
        self.scorings: list[ScoringRelease] = list(scorings or [])
        self.runs: dict[str, str] = dict(runs or {})  # run id -> digest of its privacy terms

    # ------------------------------------------------------------------ training patients
    @property
    def epsilon(self) -> float:
        """Epsilon spent on the training patients over every recorded release (epsilon_spent
        memoises the accountant)."""
        return epsilon_spent([r.release for r in self.releases], self.delta, self.accountant)

    def find(self, run: str, rnd: int, purpose: str) -> SiteRelease | None:
        return next((r for r in self.releases if (r.run, r.round, r.purpose) == (run, rnd, purpose)), None)

    def check(self, release: Release, what: str) -> float:
        """Epsilon after one more `release`; BudgetExceeded (naming `what`, the figures) past the
        budget, or when the accountant cannot bound it (no noise)."""
        after = epsilon_spent([r.release for r in self.releases] + [release], self.delta, self.accountant)
        self._refuse_past_budget(after, self.epsilon, release, what, "its training patients")
        return after

    def add(self, entry: SiteRelease) -> None:
        if self.find(entry.run, entry.round, entry.purpose) is not None:
            raise LedgerError(
                f"site ledger of '{self.site}': run {entry.run} round {entry.round} is already recorded"
            )
        self.releases.append(entry)

    def releases_of(self, run: str) -> list[tuple[int, Release]]:
        return [(r.round, r.release) for r in self.releases if r.run == run and r.purpose == "train"]

    # ------------------------------------------------------------------ validation and test patients
    def scoring_epsilon(self, split: str | None = None) -> float:
        """Epsilon spent on the patients of `split` ('val' or 'test') by every scoring release;
        None: the larger of the two (each patient is in one split)."""
        if split is None:
            return max(self.scoring_epsilon(s) for s in SCORED_SPLITS)
        return epsilon_spent([s.release for s in self.scorings if s.split == split], self.delta, self.accountant)

    def find_scoring(self, run: str, rnd: int, split: str, model_key: str) -> ScoringRelease | None:
        return next((s for s in self.scorings if (s.run, s.round, s.split, s.model_key) == (run, rnd, split, model_key)), None)

    def scorings_of(self, run: str, split: str) -> list[ScoringRelease]:
        return [s for s in self.scorings if s.run == run and s.split == split]

    def check_scoring(self, split: str, release: Release, what: str) -> float:
        """Epsilon of the `split` patients after one more scoring `release`; BudgetExceeded past the
        budget or unbounded."""
        before = [s.release for s in self.scorings if s.split == split]
        after = epsilon_spent(before + [release], self.delta, self.accountant)
        spent = epsilon_spent(before, self.delta, self.accountant)
        group = {"val": "its validation patients", "test": "its test patients"}[split]
        self._refuse_past_budget(after, spent, release, what, group)
        return after

    def add_scoring(self, entry: ScoringRelease) -> None:
        if self.find_scoring(entry.run, entry.round, entry.split, entry.model_key) is not None:
            raise LedgerError(f"site ledger of '{self.site}': scoring of {entry.split} for model "
                              f"'{entry.model_key}' in run {entry.run} round {entry.round} is already recorded")
        self.scorings.append(entry)

    # ------------------------------------------------------------------ a whole run, before it starts
    def check_run(self, turn: Release, rounds: int, extra: list[Release], what: str) -> None:
        """Before a run's first release: BudgetExceeded when the whole run it was set up for
        (`rounds` training turns `turn`, then `extra`: a fine-tuning turn) would take its training
        patients past the budget, saying how many of those rounds it can still afford."""
        after, affordable = self.afford(turn, rounds, extra)
        if not math.isfinite(after) or after <= self.budget_epsilon:
            return  # an unbounded release is refused, with its own words, when it is asked for
        plus = " and a fine-tuning turn" if extra else ""
        afford = (f"it can afford the {rounds} rounds but not the fine-tuning turn too" if affordable == rounds else
                  f"it can afford {affordable} such round{'s' if affordable != 1 else ''}")
        raise BudgetExceeded(
            f"site '{self.site}' refused {what}: the whole run it was set up for, {rounds} rounds "
            f"(noise multiplier {turn.noise_multiplier:g}, sample rate {turn.sample_rate:.4g}, {turn.steps} "
            f"steps each){plus}, would bring the epsilon of its training patients from "
            f"{format_epsilon(self.epsilon, 4)} to {format_epsilon(after, 4)}, past its budget "
            f"{self.budget_epsilon:g} (delta {self.delta:g}, {self.accountant} accountant); {afford}: "
            "ask for fewer rounds or more noise"
        )

    def afford(self, turn: Release, rounds: int, extra: list[Release]) -> tuple[float, int]:
        """(the training patients' epsilon after `rounds` turns `turn` and `extra`, the most of
        those rounds the budget allows, 0 to `rounds`), counted on what the ledger has spent."""
        spent = [r.release for r in self.releases]
        after = epsilon_spent(spent + [turn] * rounds + extra, self.delta, self.accountant)
        if after <= self.budget_epsilon:
            return after, rounds
        return after, _most(lambda k: epsilon_spent(spent + [turn] * k, self.delta, self.accountant)
                            <= self.budget_epsilon, rounds)

    def check_run_scoring(self, split: str, release: Release, count: int, what: str) -> None:
        """Before a run's first release: BudgetExceeded when the `count` scorings of `split` the
        run's plan counts would take those patients past the budget."""
        before = [s.release for s in self.scorings if s.split == split]
        after = epsilon_spent(before + [release] * count, self.delta, self.accountant)
        if not math.isfinite(after) or after <= self.budget_epsilon:
            return
        group = {"val": "its validation patients", "test": "its test patients"}[split]
        raise BudgetExceeded(
            f"site '{self.site}' refused {what}: the run's {count} scorings of {group} (noise multiplier "
            f"{release.noise_multiplier:g} each) would bring their epsilon from "
            f"{format_epsilon(self.scoring_epsilon(split), 4)} to {format_epsilon(after, 4)}, past its budget "
            f"{self.budget_epsilon:g} (delta {self.delta:g}, {self.accountant} accountant): ask for a smaller "
            "privacy.scoring_epsilon or fewer privacy.validation_rounds"
        )

    # ------------------------------------------------------------------ runs
    def bind_run(self, run: str, terms: str, what: str) -> bool:
        """Fix run `run`'s privacy terms (a digest of the setup's privacy parameters) the first
        time the run is seen; SiteRefused when a later setup under the same run id changes them.
        Returns True when the run was new (the caller saves the ledger)."""
        seen = self.runs.get(run)
        if seen is None:
            self.runs[run] = terms
            return True
        if seen != terms:
            raise SiteRefused(
                f"site '{self.site}' refused {what}: run {run} was set up before with other privacy "
                "parameters (noise, clipping, sampling, steps or scoring), and a run keeps the ones "
                "it started with; start a new run"
            )
        return False

    # ------------------------------------------------------------------ shared
    def _refuse_past_budget(self, after: float, before: float, release: Release, what: str, group: str) -> None:
        detail = (f"(noise multiplier {release.noise_multiplier:g}, sample rate {release.sample_rate:.4g}, "
                  f"{release.steps} steps)")
        if not math.isfinite(after):
            raise BudgetExceeded(
                f"site '{self.site}' refused {what}: its accountant cannot bound this release {detail} "
                f"for {group} (allowed: a noise multiplier > 0)"
            )
        if after > self.budget_epsilon:
            raise BudgetExceeded(
                f"site '{self.site}' refused {what}: it has spent epsilon {format_epsilon(before, 4)} on "
                f"{group} and this release {detail} would bring it to {format_epsilon(after, 4)}, past "
                f"its budget {self.budget_epsilon:g} (delta {self.delta:g}, {self.accountant} accountant)"
            )

    def to_dict(self) -> dict:
        return {
            "site": self.site, "unit": self.unit, "accountant": self.accountant, "delta": self.delta,
            "budget_epsilon": self.budget_epsilon, "epsilon": self.epsilon,
            "scoring_epsilon": {s: self.scoring_epsilon(s) for s in SCORED_SPLITS},
            "releases": [asdict(r) for r in self.releases],
            "scorings": [asdict(s) for s in self.scorings],
            "runs": self.runs,
        }

    @classmethod
    def from_dict(cls, data: dict) -> SiteLedger:
        try:
            releases = [SiteRelease(**r) for r in data["releases"]]
            scorings = [ScoringRelease(**s) for s in data.get("scorings", [])]
            budget = data["budget_epsilon"]  # null: no cap (JSON has no infinity)
            return cls(data["site"], math.inf if budget is None else budget, data["delta"], data["accountant"],
                       data["unit"], releases, scorings, dict(data.get("runs", {})))
        except (KeyError, TypeError) as e:
            raise LedgerError(f"site ledger: malformed ({type(e).__name__}: {e})") from None

    def save(self, path: Path) -> None:
        write_json(Path(path), self.to_dict(), private=True)

    @classmethod
    def load(cls, path: Path) -> SiteLedger:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, LedgerError) as e:
            raise LedgerError(f"site ledger {path}: cannot be read ({e})") from None


def _most(fits, limit: int) -> int:  # noqa: ANN001 - fits(k) -> bool, true for k up to some k*
    """The largest k in 0..limit with fits(k) (fits(0) is taken as true; fits is monotone)."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo

"""A site's own privacy ledger: every DP release the site made, in any run, against the budget of
its own config. The site consults it before it trains; the coordinator's ledger only records what
sites report.

    ledger = SiteLedger(site, budget_epsilon, delta, accountant, unit)
    ledger.find(run, round, purpose)          the release already made for that request, or None
    ledger.check(release, what)               epsilon after one more release; BudgetExceeded past the budget
    ledger.add(SiteRelease(run, round, purpose, digest, noise, rate, steps))
    ledger.releases_of(run)                   [(round, Release)] of one run (to compare with the coordinator's)

Releases of every run compose: the budget is the site's, over everything it ever released from one
state directory. Pure bookkeeping over `epsilon_spent`; `save`/`load` write one JSON file atomically.
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


@dataclass(frozen=True)
class SiteRelease:
    run: str
    round: int
    purpose: str
    digest: str  # of the instruction answered (privmed.federation.instructions.Instruction.digest)
    noise_multiplier: float
    sample_rate: float
    steps: int

    @property
    def release(self) -> Release:
        return Release(self.noise_multiplier, self.sample_rate, self.steps)


class SiteLedger:
    def __init__(self, site: str, budget_epsilon: float, delta: float, accountant: str, unit: str,
                 releases: list[SiteRelease] | None = None):
        self.site, self.budget_epsilon, self.delta = site, float(budget_epsilon), float(delta)
        self.accountant, self.unit = accountant, unit
        self.releases: list[SiteRelease] = list(releases or [])

    @property
    def epsilon(self) -> float:
        """Epsilon spent over every recorded release (epsilon_spent memoises the accountant)."""
        return epsilon_spent([r.release for r in self.releases], self.delta, self.accountant)

    def find(self, run: str, rnd: int, purpose: str) -> SiteRelease | None:
        return next((r for r in self.releases if (r.run, r.round, r.purpose) == (run, rnd, purpose)), None)

    def check(self, release: Release, what: str) -> float:
        """Epsilon after one more `release`; BudgetExceeded (naming `what`, the figures) past the budget."""
        after = epsilon_spent([r.release for r in self.releases] + [release], self.delta, self.accountant)
        if after > self.budget_epsilon:
            raise BudgetExceeded(
                f"site '{self.site}' refused {what}: it has spent epsilon {format_epsilon(self.epsilon, 4)} "
                f"and this release (noise multiplier {release.noise_multiplier:g}, sample rate "
                f"{release.sample_rate:.4g}, {release.steps} steps) would bring it to "
                f"{format_epsilon(after, 4)}, past "
                f"its budget {self.budget_epsilon:g} (delta {self.delta:g}, {self.accountant} accountant)"
            )
        return after

    def add(self, entry: SiteRelease) -> None:
        if self.find(entry.run, entry.round, entry.purpose) is not None:
            raise LedgerError(
                f"site ledger of '{self.site}': run {entry.run} round {entry.round} is already recorded"
            )
        self.releases.append(entry)

    def releases_of(self, run: str) -> list[tuple[int, Release]]:
        return [(r.round, r.release) for r in self.releases if r.run == run and r.purpose == "train"]

    def to_dict(self) -> dict:
        return {
            "site": self.site, "unit": self.unit, "accountant": self.accountant, "delta": self.delta,
            "budget_epsilon": self.budget_epsilon, "epsilon": self.epsilon,
            "releases": [asdict(r) for r in self.releases],
        }

    @classmethod
    def from_dict(cls, data: dict) -> SiteLedger:
        try:
            releases = [SiteRelease(**r) for r in data["releases"]]
            budget = data["budget_epsilon"]  # null: no cap (JSON has no infinity)
            return cls(data["site"], math.inf if budget is None else budget, data["delta"], data["accountant"],
                       data["unit"], releases)
        except (KeyError, TypeError) as e:
            raise LedgerError(f"site ledger: malformed ({type(e).__name__}: {e})") from None

    def save(self, path: Path) -> None:
        write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: Path) -> SiteLedger:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            raise LedgerError(f"site ledger {path}: cannot be read ({e})") from None


class SiteRefused(PrivmedError):
    """A site refused an instruction (past its budget, a round already released differently, a
    purpose its privacy mode does not allow); the reason is the message."""

"""The privacy ledger: per site, every DP release (round, noise, sample rate, steps) and the epsilon spent.

Pure bookkeeping: the runner asks `check_round` before a round (which refuses it if any site would pass
its budget), `record`s each site's release after it, and `save`s the ledger to privacy_ledger.json in the
run directory. `truncate` rewinds it to a checkpoint's round on resume, so nothing is counted twice.
"""

from __future__ import annotations

import json
import numbers
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from privmed.errors import PrivmedError
from privmed.io import write_json
from privmed.privacy.accountants import (
    Release,
    check_accountant_name,
    check_delta_range,
    check_epsilon_range,
    epsilon_spent,
)
from privmed.privacy.figures import format_budget, format_epsilon

LEDGER_FILE = "privacy_ledger.json"
UNIT = "patient"  # DP-SGD's unit when the data names patients; the run's plan always says which
MECHANISM = "DP-SGD (Poisson-sampled Gaussian)"
# patient: DP-SGD over data with patient ids; record: DP-SGD over data without them (each image or row
# its own patient); site: central DP (DP-FedAvg) protects a whole site.
UNITS = ("patient", "record", "site")
_CACHE_SIZE = 256


@dataclass(frozen=True)
class LedgerRelease:
    """One DP release a site made in one round, as privacy_ledger.json's `releases` hold it: the
    noise multiplier (noise std / clipping norm), the sample rate (0-1) and the number of steps."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int

    @property
    def release(self) -> Release:
        return Release(self.noise_multiplier, self.sample_rate, self.steps)

    def to_json(self) -> dict:
        return {"round": self.round, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "steps": self.steps}

    @classmethod
    def from_json(cls, d: Mapping) -> LedgerRelease:
        """KeyError or TypeError when `d` is not one (PrivacyLedger.from_dict names the file)."""
        return cls(d["round"], d["noise_multiplier"], d["sample_rate"], d["steps"])


class BudgetExceeded(PrivmedError):
    """A round would push a site past its privacy budget; it was refused before it started."""


class LedgerError(PrivmedError):
    """The ledger would count a release twice, or a ledger file is inconsistent."""


class PrivacyLedger:
    """Per-site DP releases against one epsilon budget at one delta, accounted by `accountant`."""

    def __init__(
        self,
        budget_epsilon: float,
        delta: float,
        accountant: str = "prv",
        sites: Sequence[str] = (),
        unit: str = UNIT,
        mechanism: str = MECHANISM,
    ) -> None:
        check_epsilon_range(budget_epsilon)
        check_delta_range(delta)
        check_accountant_name(accountant)
        if unit not in UNITS:
            raise LedgerError(f"privacy ledger: unit {unit!r} is not one of {', '.join(map(repr, UNITS))}")
        self.budget_epsilon = float(budget_epsilon)
        self.delta = float(delta)
        self.accountant = accountant
        self.unit, self.mechanism = unit, mechanism
        self._releases: dict[str, list[tuple[int, Release]]] = {str(s): [] for s in sites}
        # the fine-tuning turn after the last round (dp-sgd), per site; and every scoring of a
        # site's validation or test patients: (round, split, noise multiplier)
        self._finetune: dict[str, Release] = {}
        self._scorings: dict[str, list[tuple[int, str, float]]] = {}
        # Epsilon by exact history, so a round checked then recorded is computed once, and a value can
        # never outlive a record or truncate.
        self._cache: OrderedDict[tuple[Release, ...], float] = OrderedDict()

    @property
    def sites(self) -> list[str]:
        return list(self._releases)

    def releases(self, site: str) -> list[tuple[int, Release]]:
        """[(round, release)] for `site`, in round order."""
        return list(self._site(site))

    def records(self, site: str) -> list[LedgerRelease]:
        """`site`'s releases as the ledger file holds them, in round order."""
        return [LedgerRelease(r, rel.noise_multiplier, rel.sample_rate, rel.steps) for r, rel in self._site(site)]

    def epsilon(self, site: str) -> float:
        """Epsilon `site` has spent on its training patients over all its recorded releases (and
        its fine-tuning turn)."""
        ft = self._finetune.get(site)
        return self._epsilon(tuple(r for _, r in self._site(site)) + (() if ft is None else (ft,)))

    def record_finetune(self, site: str, release: Release) -> None:
        """The fine-tuning turn `site` was asked for after the last round (charged before it runs)."""
        self._site(site)
        if site in self._finetune:
            raise LedgerError(f"privacy ledger: site '{site}' already has its fine-tuning turn recorded")
        self._finetune[site] = release

    def finetune(self, site: str) -> Release | None:
        return self._finetune.get(site)

    def record_scoring(self, site: str, round: int, split: str, noise_multiplier: float) -> None:
        """One scoring of `site`'s `split` patients ('val' or 'test') in `round`: a Gaussian
        release of noisy counts with this noise multiplier."""
        if split not in ("val", "test"):
            raise LedgerError(f"privacy ledger: scoring split {split!r} is not 'val' or 'test'")
        self._scorings.setdefault(str(site), []).append((int(round), split, float(noise_multiplier)))

    @property
    def scored_sites(self) -> list[str]:
        """The sites with scorings recorded (under a pooled strategy, the real sites, which do not train)."""
        return list(self._scorings)

    def scorings(self, site: str, split: str | None = None) -> list[tuple[int, str, float]]:
        return [s for s in self._scorings.get(site, []) if split is None or s[1] == split]

    def scoring_epsilon(self, site: str, split: str | None = None) -> float:
        """Epsilon spent on `site`'s patients of `split` by its scorings; None: the larger of the
        validation and test patients' (each patient is in one split)."""
        if split is None:
            return max(self.scoring_epsilon(site, s) for s in ("val", "test"))
        return self._epsilon(tuple(Release(sigma, 1.0, 1) for _, sp, sigma in self.scorings(site, split)))

    def check_round(
        self, planned: Mapping[str, Release | Sequence[Release]], round: int
    ) -> dict[str, float]:
        """Epsilon each planned site would reach after `round`; BudgetExceeded if any would pass the
        budget (naming each such site and the figures). Records nothing."""
        refusals, after = [], {}
        for site, plan in planned.items():
            plan = [plan] if isinstance(plan, Release) else list(plan)
            history = self._releases.get(site, [])
            if history and round <= history[-1][0]:
                raise LedgerError(
                    f"privacy ledger: site '{site}' already has releases up to round {history[-1][0]}; "
                    f"round {round} would be counted twice"
                )
            spent = self._epsilon(tuple(r for _, r in history))
            after[site] = self._epsilon(tuple(r for _, r in history) + tuple(plan))
            if after[site] > self.budget_epsilon:
                counts = Counter(plan)
                what = ", ".join(
                    f"{f'{n} x ' if n > 1 else ''}noise multiplier {r.noise_multiplier:g}, sample rate "
                    f"{r.sample_rate:g}, {r.steps} step{'s' if r.steps != 1 else ''}"
                    for r, n in counts.items()
                )
                # Rounded up, like every epsilon shown: "would bring it to 3.999" must not read 3.998.
                refusals.append(
                    f"site '{site}' has spent epsilon {format_epsilon(spent, 4)} and this round ({what}) "
                    f"would bring it to {format_epsilon(after[site], 4)}, past its budget "
                    f"{format_budget(self.budget_epsilon)}"
                )
        if refusals:
            context = f"delta {self.delta:g}, {self.accountant} accountant"
            raise BudgetExceeded(f"round {round} refused ({context}): " + "; ".join(refusals))
        return after

    def record(self, site: str, round: int, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Add the release `site` made in `round` (rounds strictly increase per site)."""
        if not isinstance(round, numbers.Integral) or isinstance(round, bool) or round < 0:
            raise ValueError(f"round must be an integer >= 0, got {round!r}")
        round = int(round)
        release = Release(noise_multiplier, sample_rate, steps)
        history = self._releases.setdefault(str(site), [])
        if history and round <= history[-1][0]:
            recorded = any(r == round for r, _ in history)
            seen = "is already recorded" if recorded else "comes before the last one"
            raise LedgerError(
                f"privacy ledger: round {round} for site '{site}' {seen} "
                f"(recorded rounds end at {history[-1][0]}); a release is never counted twice"
            )
        history.append((round, release))

    def replace(self, site: str, round: int, release: Release) -> None:
        """Put `release` in place of what `site` has recorded for `round` (the ledger was charged
        with the planned release before the round; the site reported another)."""
        history = self._site(site)
        at = [i for i, (r, _) in enumerate(history) if r == round]
        if not at:
            raise LedgerError(f"privacy ledger: site '{site}' has no release in round {round} to replace")
        history[at[0]] = (round, release)

    def truncate(self, last_round: int) -> None:
        """Drop every release after `last_round` (resuming from that round's checkpoint)."""
        for site, history in self._releases.items():
            self._releases[site] = [(r, rel) for r, rel in history if r <= last_round]
        for site, scorings in self._scorings.items():
            self._scorings[site] = [s for s in scorings if s[0] <= last_round]

    def to_dict(self) -> dict:
        return {
            "unit": self.unit,
            "mechanism": self.mechanism,
            "accountant": self.accountant,
            "delta": self.delta,
            "budget_epsilon": self.budget_epsilon,
            "sites": {
                site: {
                    "epsilon": self.epsilon(site),
                    "releases": [record.to_json() for record in self.records(site)],
                    **({} if site not in self._finetune else {"finetune": {
                        "noise_multiplier": self._finetune[site].noise_multiplier,
                        "sample_rate": self._finetune[site].sample_rate, "steps": self._finetune[site].steps}}),
                    **({} if site not in self._scorings else {
                        "scoring_epsilon": {sp: self.scoring_epsilon(site, sp) for sp in ("val", "test")},
                        "scorings": [{"round": r, "split": sp, "noise_multiplier": sigma}
                                     for r, sp, sigma in self._scorings[site]],
                    }),
                }
                for site, history in self._releases.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> PrivacyLedger:
        """The ledger `to_dict` wrote; epsilons are recomputed from the releases, not trusted."""
        try:
            if data["unit"] not in UNITS:
                raise LedgerError(
                    f"privacy ledger: unit {data['unit']!r} is not one of {', '.join(map(repr, UNITS))}"
                )
            ledger = cls(
                data["budget_epsilon"], data["delta"], data["accountant"], sites=list(data["sites"]),
                unit=data["unit"], mechanism=data["mechanism"],
            )
            for site, entry in data["sites"].items():
                for rel in map(LedgerRelease.from_json, entry["releases"]):
                    ledger.record(site, rel.round, rel.noise_multiplier, rel.sample_rate, rel.steps)
                if "finetune" in entry:
                    f = entry["finetune"]
                    ledger.record_finetune(site, Release(f["noise_multiplier"], f["sample_rate"], f["steps"]))
                for sc in entry.get("scorings", []):
                    ledger.record_scoring(site, sc["round"], sc["split"], sc["noise_multiplier"])
        except (KeyError, TypeError, AttributeError) as e:
            raise LedgerError(f"privacy ledger: malformed ({type(e).__name__}: {e})") from None
        return ledger

    def save(self, path: Path) -> None:
        """Write the ledger as JSON, atomically (a reader sees the old file or the new one)."""
        write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: Path) -> PrivacyLedger:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LedgerError(f"privacy ledger {path}: cannot be read ({e})") from None
        return cls.from_dict(data)

    def _site(self, site: str) -> list[tuple[int, Release]]:
        if site not in self._releases:
            known = ", ".join(self._releases) or "none"
            raise LedgerError(f"privacy ledger: unknown site '{site}' (known: {known})")
        return self._releases[site]

    def _epsilon(self, history: tuple[Release, ...]) -> float:
        if history in self._cache:
            self._cache.move_to_end(history)
            return self._cache[history]
        eps = epsilon_spent(history, self.delta, self.accountant)
        self._cache[history] = eps
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return eps

"""What one stage of a round gives back, in any runner (in-process or Flower), and how it fails."""

from __future__ import annotations

from dataclasses import dataclass, field

from privmed.federation.strategies import SecureSum, SiteUpdate


@dataclass
class StageOutcome:
    updates: list[SiteUpdate]  # plain aggregation: each site's update; secure: reports, no weights
    secure: SecureSum | None = None  # secure aggregation: the weighted mean of the contributions
    dropped: list[str] = field(default_factory=list)  # sites that failed or did not answer in time

    @property
    def sites(self) -> list[str]:
        return [u.site for u in self.updates]


class StageFailed(RuntimeError):
    """A stage ended with too few sites (below min_sites, or too few for secure aggregation)."""

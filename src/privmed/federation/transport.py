"""Where the sites train. The round loop (privmed.federation.runner) hands each stage's training
instructions to a `Sites` object and gets back what the strategy may see:

- `InProcessSites`: every site in this process (the default runner);
- `privmed.federation.flower.coordinator.FlowerSites`: sites on other machines, over Flower.

Under secure aggregation both run Flower's SecAgg+ and return only the weighted mean of the sites'
contributions; otherwise each site's update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from privmed.federation.strategies import SecureStrategy, SecureSum, SiteUpdate, TrainTask

if TYPE_CHECKING:
    from privmed.federation.experiment import Experiment


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


def required_sites(exp: Experiment, planned: int) -> int:
    """How many of a stage's `planned` sites must answer for it to count (federation.min_sites;
    default: all of them)."""
    return min(exp.config.federation.min_sites or planned, planned)


class Sites(Protocol):
    def train_stage(self, tasks: list[TrainTask], rnd: int, secure: SecureStrategy | None) -> StageOutcome: ...

    def finetune(self, task: TrainTask, rnd: int, steps: int) -> SiteUpdate: ...

    def close(self) -> None: ...


class InProcessSites:
    """The experiment's sites, trained one after another in this process."""

    def __init__(self, exp: Experiment):
        self.exp = exp
        self._grid = None

    def train_stage(self, tasks: list[TrainTask], rnd: int, secure: SecureStrategy | None) -> StageOutcome:
        if secure is None:
            return StageOutcome([self.exp.trainers[t.site].train(t, rnd) for t in tasks])
        from privmed.federation.flower import secagg

        grid, node_of = self._local_grid()
        with secagg.in_process_identity():
            total = secure_round(self.exp, grid, node_of, tasks, rnd, secure)
        return StageOutcome(total.reports, secure=total)

    def finetune(self, task: TrainTask, rnd: int, steps: int) -> SiteUpdate:
        return self.exp.trainers[task.site].train(task, rnd, steps=steps, purpose="finetune")

    def close(self) -> None:
        self._grid = None

    def _local_grid(self):  # noqa: ANN202
        """A Flower LocalGrid with one node per site (node ids 1001, 1002, ... in site order)."""
        if self._grid is None:
            from privmed.federation.flower.secagg import LocalGrid
            from privmed.federation.flower.site_app import make_client_app
            from privmed.federation.flower.site_service import SiteEndpoint

            node_of, apps = {}, {}
            for i, (name, site) in enumerate(self.exp.trainers.items()):
                endpoint = SiteEndpoint(site, self.exp.config.seed)
                node_of[name] = 1001 + i
                apps[1001 + i] = make_client_app(lambda _ctx, e=endpoint: e)
            self._grid = (LocalGrid(apps), node_of)
        return self._grid


def secure_round(exp: Experiment, grid, node_of: dict[str, int], tasks: list[TrainTask], rnd: int,  # noqa: ANN001
                 secure: SecureStrategy, timeout: float | None = None, planned: int | None = None) -> SecureSum:
    """One stage under SecAgg+ with the run's settings (shared by both runners). `tasks`: the
    reachable sites' instructions, of `planned` in the stage (default: all reachable)."""
    from privmed.federation.flower.secagg import secure_stage

    cfg = exp.config
    shares, threshold = cfg.secagg_shares_threshold
    return secure_stage(
        grid, node_of, tasks, rnd, cfg.federation, shares, threshold,
        n_samples={name: site.n_train for name, site in exp.trainers.items()},
        weighting=secure.secure_weighting, clip=secure.secure_clip, timeout=timeout,
        min_sites=required_sites(exp, planned or len(tasks)),
    )

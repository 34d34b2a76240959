"""Where the sites train. The round loop (privmed.federation.runner) hands each stage's training
instructions to a `Sites` object and gets back what the strategy may see:

- `InProcessSites`: every site in this process (the default runner);
- `privmed.federation.flower.coordinator.FlowerSites`: sites on other machines, over Flower.

Under secure aggregation both run Flower's SecAgg+ and return only the weighted mean of the sites'
contributions; otherwise each site's update.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

from privmed.federation.client import SiteClient
from privmed.federation.guard import SiteGuard
from privmed.federation.policy import GuardPolicy
from privmed.federation.site import Site
from privmed.federation.experiment import scoring_site
from privmed.federation.instructions import Instruction, ScoreRequest, Scores
from privmed.federation.stages import StageFailed, StageOutcome
from privmed.federation.strategies import SecureStrategy, SecureSum, TrainTask

__all__ = ["InProcessSites", "Sites", "StageFailed", "StageOutcome", "required_sites", "secure_round"]

if TYPE_CHECKING:
    from privmed.federation.experiment import Experiment


def required_sites(exp: Experiment, planned: int) -> int:
    """How many of a stage's `planned` sites must answer for it to count (federation.min_sites;
    default: all of them)."""
    return min(exp.config.federation.min_sites or planned, planned)


class Sites(Protocol):
    def train_stage(
        self, tasks: list[TrainTask], rnd: int, secure: SecureStrategy | None, run: str
    ) -> StageOutcome: ...

    def finetune(self, task: TrainTask, rnd: int, steps: int, run: str) -> dict:
        """The site fine-tunes `task.weights` for `steps` batches and scores the result on its own
        test data: its metrics ({} without test data); the fine-tuned model stays at the site."""
        ...

    def score(self, requests: list[ScoreRequest], rnd: int, run: str) -> dict[tuple[str, str], Scores]:
        """Each answered request's scores, by (site, model key): per split, the site's metrics and
        counts (privmed.federation.evaluation); a site that does not answer is left out."""
        ...

    def close(self) -> None: ...


def site_client(exp: Experiment, site: Site, private: Path | None) -> SiteClient:
    """`site` as its hospital would run it: its own guard, kept under `private`/sites/NAME (a
    simulation's stand-in for each hospital's own storage) or in memory, its budget the run's (or
    a hospital's own when its config was given), and the policy of the run's setup for it."""
    terms, require_dp = exp.site_terms(site.name)
    guard = SiteGuard.open(site.name, terms, None if private is None else private / "sites" / site.name)
    setup = exp.plan.setup_for(site.name)
    return SiteClient(site, guard, GuardPolicy.from_setup(setup, require_dp), exp.config.seed, setup.digest)


class InProcessSites:
    """The experiment's sites, trained one after another in this process. `private`: where their
    keys and ledgers are kept (None: in memory, for this process only)."""

    def __init__(self, exp: Experiment, private: Path | None = None):
        self.exp = exp
        self.clients = {name: site_client(exp, site, private) for name, site in exp.trainers.items()}
        # who scores: the training sites, or (pooling) each real site with its own data
        self.scorers = self.clients if not exp.strategy.pools_data else {
            sd.name: site_client(exp, scoring_site(exp.plan, sd), private) for sd in exp.site_data
        }
        self._grid = None

    def train_stage(
        self, tasks: list[TrainTask], rnd: int, secure: SecureStrategy | None, run: str
    ) -> StageOutcome:
        if secure is None:
            return StageOutcome([self.clients[t.site].train(Instruction(t, rnd, run=run)) for t in tasks])
        from privmed.federation.flower import secagg

        grid, node_of = self._local_grid()
        with secagg.in_process_identity():
            total = secure_round(self.exp, grid, node_of, tasks, rnd, secure, run)
        return StageOutcome(total.reports, secure=total)

    def finetune(self, task: TrainTask, rnd: int, steps: int, run: str) -> dict:
        return self.clients[task.site].finetune(Instruction(task, rnd, run=run, steps=steps, purpose="finetune"))

    def score(self, requests: list[ScoreRequest], rnd: int, run: str) -> dict[tuple[str, str], Scores]:
        return {(r.site, r.model_key): self.scorers[r.site].score(r.weights, r.splits, rnd, run, r.model_key)
                for r in requests}

    def close(self) -> None:
        self._grid = None

    def _local_grid(self):  # noqa: ANN202
        """A Flower LocalGrid with one node per site (node ids 1001, 1002, ... in site order)."""
        if self._grid is None:
            from privmed.federation.flower.secagg import LocalGrid
            from privmed.federation.flower.site_app import make_client_app
            from privmed.federation.flower.site_service import SiteEndpoint

            node_of, apps = {}, {}
            for i, (name, client) in enumerate(self.clients.items()):
                endpoint = SiteEndpoint(client)
                node_of[name] = 1001 + i
                apps[1001 + i] = make_client_app(lambda _ctx, e=endpoint: e)
            self._grid = (LocalGrid(apps), node_of)
        return self._grid


def secure_round(exp: Experiment, grid, node_of: dict[str, int], tasks: list[TrainTask], rnd: int,  # noqa: ANN001
                 secure: SecureStrategy, run: str, timeout: float | None = None,
                 planned: int | None = None, on_stage: Callable[[str], None] | None = None) -> SecureSum:
    """One stage under SecAgg+ with the run's settings (shared by both runners). `tasks`: the
    reachable sites' instructions, of `planned` in the stage (default: all reachable). `on_stage`:
    told as each of SecAgg+'s stages begins, in words."""
    from privmed.federation.flower.secagg import secure_stage

    cfg = exp.config
    shares, threshold = cfg.secagg_shares_threshold
    return secure_stage(
        grid, node_of, tasks, rnd, run, cfg.federation, shares, threshold,
        n_samples={p.name: p.n_train for p in exp.plan.trainers},
        weighting=secure.secure_weighting, clip=secure.secure_clip, timeout=timeout,
        min_sites=required_sites(exp, planned or len(tasks)), on_stage=on_stage,
    )

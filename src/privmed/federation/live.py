"""What a run's live dashboard shows, kept as the run goes (privmed.dashboard serves it).

    live = LiveState()                        # or LiveState(sink=...): each new snapshot handed on
    privmed.run(cfg, out, live=live)          # the round loop tells it of every event
    live.snapshot()                           # from any thread: a JSON-ready dict

It holds only what the coordinator already holds: the sites' names and public counts, which sites
were asked to train and which answered, each round's pooled scores, and the privacy ledger's
epsilon per site against its budget. Never patient data, never a model. Every epsilon is the
ledger's, rounded UP (privmed.privacy.figures) and shown with its unit of privacy.

The events come from the run's own thread; `snapshot` may be called from any other (the
dashboard's HTTP server): the state is copied out whole, under a lock, as JSON text.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import threading
from typing import TYPE_CHECKING, Callable

from privmed.privacy.figures import format_budget, format_epsilon, unit_note
from privmed.privacy.ledger import BudgetExceeded
from privmed.privacy.site_ledger import SiteRefused
from privmed.federation.stages import StageFailed
from privmed.tasks.names import metric_label

if TYPE_CHECKING:
    from privmed.federation.experiment import Experiment
    from privmed.federation.instructions import ScoreRequest, Scores
    from privmed.federation.run_state import RunState
    from privmed.federation.stages import StageOutcome
    from privmed.federation.strategies import SecureStrategy, TrainTask
    from privmed.federation.transport import Sites
    from privmed.privacy.ledger import PrivacyLedger

SCHEMA = 1
KEEP_EVENTS = 50  # dropped sites and refusals shown, newest last


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _number(x) -> float | None:  # noqa: ANN001
    """A score as JSON can carry it (None for a missing or undefined one)."""
    return None if x is None or not isinstance(x, (int, float)) or math.isnan(x) else float(x)


def empty_snapshot(runner: str = "in-process") -> dict:
    """The snapshot before any run has started."""
    return {
        "schema": SCHEMA, "updated": _now(), "runner": runner, "status": "waiting",
        "run": None, "round": 0, "stage": "waiting for a run", "privacy": None,
        "hospitals": [], "rounds": [], "dropped": [], "refused": [], "error": None,
    }


class LiveState:
    """The dashboard's picture of one run. `sink`: called with each new snapshot (the Flower
    ServerApp writes it to a file the coordinator's dashboard reads); it runs on the run's thread."""

    def __init__(self, sink: Callable[[dict], None] | None = None, runner: str = "in-process"):
        self._lock = threading.Lock()
        self._sink = sink
        self._ledger: PrivacyLedger | None = None
        self._data = empty_snapshot(runner)
        self._text = json.dumps(self._data)

    # ------------------------------------------------------------------ reading (any thread)
    @property
    def over(self) -> bool:
        """Whether the run has ended (finished, failed or stopped)."""
        return self.snapshot()["status"] in ("finished", "failed", "stopped")

    def snapshot(self) -> dict:
        return json.loads(self.snapshot_json())

    def snapshot_json(self) -> str:
        with self._lock:
            return self._text

    # ------------------------------------------------------------------ events (the run's thread)
    def preparing(self) -> None:
        """The run is being set up: its data loaded (in-process) and its privacy planned."""
        self._data.update(status="starting", stage="loading the data and planning the run")
        self._publish()

    def connecting(self, sites: list[str], name: str | None = None) -> None:
        """The coordinator waits for the sites to say who they are (the Flower runner)."""
        self._data.update(status="connecting", stage=f"waiting for {len(sites)} hospitals to connect",
                          run={"name": name or "run"})
        self._data["hospitals"] = [_hospital(s) for s in sites]
        self._publish()

    def started(self, exp: Experiment, state: RunState) -> None:
        """The run is planned (resumed runs: from their checkpoint's round and history)."""
        cfg = exp.config
        plan = exp.privacy
        self._ledger = None if state.privacy is None else state.privacy.ledger
        headline = exp.task.headline
        self._data.update(
            status="running", round=state.round, error=None,
            stage="starting" if not state.round else f"resuming after round {state.round}",
            run={
                "name": cfg.name or "run", "task": cfg.task, "strategy": exp.strategy.name,
                "rounds": cfg.federation.rounds, "metric": headline, "metric_label": metric_label(headline),
                "synthetic": bool(exp.data.synthetic),
                "secure_aggregation": bool(cfg.federation.secure_aggregation),
            },
            privacy=None if plan is None else {
                "mode": plan.mode, "unit": plan.unit, "unit_note": unit_note(plan.unit),
                "delta": f"{plan.delta:g}", "accountant": plan.accountant,
                "budget": format_budget(plan.budget),
            },
        )
        profiles = {p.name: p for p in exp.plan.sites}
        trainers = {p.name: p for p in exp.plan.trainers}
        old = {h["name"]: h for h in self._data["hospitals"]}
        planned = {**profiles, **trainers}
        self._data["hospitals"] = [  # a planned site has said what it holds: it is online
            {**_hospital(name), **old.get(name, {}), "online": True, "trains": name in trainers,
             "n_train": p.n_train, "n_patients": p.n_patients, "patient_ids": p.patient_ids}
            for name, p in planned.items()
        ] + [h for name, h in old.items() if name not in planned]  # expected, never connected
        self._data["rounds"] = [_round_row(row.to_json(), headline) for row in state.history]
        for row in state.history:
            self._trained(row.round, [h["name"] for h in self._data["hospitals"] if h["trains"]])
        self._publish()

    def stage(self, rnd: int, what: str, sites: list[str] = (), training: bool = False) -> None:
        self._data.update(round=rnd, stage=what + (f" at {', '.join(sites)}" if sites else ""))
        for h in self._data["hospitals"]:
            if training and h["name"] in sites:
                h["state"] = "training"
        self._publish()

    def stage_done(self, rnd: int, answered: list[str], dropped: list[str], trained: bool) -> None:
        for h in self._data["hospitals"]:
            if h["name"] in answered:
                h.update(online=True, state="idle")
            elif h["name"] in dropped:
                h.update(online=False, state="dropped")
                if trained:
                    h["dropped"] += 1
        if trained:
            self._trained(rnd, answered)
            self._events("dropped", [{"round": rnd, "site": s} for s in dropped])
        self._publish()

    def round_done(self, row: dict) -> None:
        headline = (self._data["run"] or {}).get("metric", "auc")
        self._data["rounds"].append(_round_row(row, headline))
        self._data.update(round=row["round"], stage=f"round {row['round']} done")
        self._publish()

    def refused(self, rnd: int, by: str, reason: str) -> None:
        """A request refused: by a site (its guard said no) or by the coordinator (its ledger)."""
        for h in self._data["hospitals"]:
            if by == "site" and f"'{h['name']}'" in reason:  # a site's refusal names it
                h["refused"] += 1
        self._events("refused", [{"round": rnd, "by": by, "reason": reason}])
        self._publish()

    def ended(self, error: BaseException | None) -> None:
        """The run finished (error None), failed, or was stopped."""
        if error is None:
            self._data.update(status="finished", stage="finished")
        elif isinstance(error, KeyboardInterrupt):
            self._data.update(status="stopped", stage="stopped (interrupted)")
        else:
            if isinstance(error, BudgetExceeded):
                self.refused(self._data["round"] + 1, "coordinator", str(error))
            self._data.update(status="failed", stage="failed", error=f"{type(error).__name__}: {error}")
        for h in self._data["hospitals"]:
            if h["state"] == "training":
                h["state"] = "idle"
        self._publish()

    # ------------------------------------------------------------------ inside
    def _trained(self, rnd: int, sites: list[str]) -> None:
        for h in self._data["hospitals"]:
            if h["name"] in sites:
                h["last_round"] = max(rnd, h["last_round"] or 0)

    def _events(self, key: str, new: list[dict]) -> None:
        self._data[key] = (self._data[key] + new)[-KEEP_EVENTS:]

    def _publish(self) -> None:
        if self._ledger is not None:
            self._spent(self._ledger)
        self._data["updated"] = _now()
        text = json.dumps(self._data, allow_nan=False)
        with self._lock:
            self._text = text
        if self._sink is not None:
            self._sink(json.loads(text))

    def _spent(self, ledger: PrivacyLedger) -> None:
        """Each site's epsilon as the ledger counts it now (a round is charged before it starts),
        rounded up; the bar's length from the rounded figure, so it never shows less either."""
        for h in self._data["hospitals"]:
            if h["name"] not in ledger.sites:
                continue
            text = format_epsilon(ledger.epsilon(h["name"]))
            h["epsilon"] = text
            h["spent"] = min(1.0, float(text) / ledger.budget_epsilon) if ledger.budget_epsilon > 0 else 1.0


def _hospital(name: str) -> dict:
    return {"name": name, "online": False, "trains": True, "state": "idle", "last_round": None,
            "n_train": None, "n_patients": None, "patient_ids": None, "epsilon": None, "spent": None,
            "dropped": 0, "refused": 0}


def _round_row(row: dict, headline: str) -> dict:
    """What the dashboard shows of a metrics row: the pooled headline scores, the time, the mean
    training loss the sites reported (none under DP), who dropped out."""
    losses = [v for v in (row.get("train_loss") or {}).values() if _number(v) is not None]
    return {
        "round": row["round"],
        "seconds": _number(row.get("seconds")),
        "val": _number((row.get("val") or {}).get(headline)),
        "test": _number((row.get("test") or {}).get(headline)),
        "train_loss": sum(losses) / len(losses) if losses else None,
        "dropped": list(row.get("dropped") or []),
        "attempts": row.get("attempts", 1),
    }


class LiveSites:
    """A `Sites` transport that tells `live` of each stage: which sites are asked to train or
    score, which answered, which dropped out or refused. Everything else goes to `inner`."""

    def __init__(self, inner: Sites, live: LiveState):
        self.inner, self.live = inner, live

    def train_stage(self, tasks: list[TrainTask], rnd: int, secure: SecureStrategy | None, run: str) -> StageOutcome:
        names = [t.site for t in tasks]
        self.live.stage(rnd, f"round {rnd}: training", names, training=True)
        try:
            outcome = self.inner.train_stage(tasks, rnd, secure, run)
        except SiteRefused as e:
            self.live.refused(rnd, "site", str(e))
            raise
        except StageFailed as e:  # too few sites reachable: the round loop may start the round again
            self.live.stage(rnd, f"round {rnd}: stage failed ({e})")
            raise
        self.live.stage_done(rnd, outcome.sites, outcome.dropped, trained=True)
        return outcome

    def finetune(self, task: TrainTask, rnd: int, steps: int, run: str) -> dict:
        self.live.stage(rnd, "fine-tuning the final model", [task.site])
        try:
            return self.inner.finetune(task, rnd, steps, run)
        except SiteRefused as e:
            self.live.refused(rnd, "site", str(e))
            raise

    def score(self, requests: list[ScoreRequest], rnd: int, run: str) -> dict[tuple[str, str], Scores]:
        asked = sorted({r.site for r in requests})
        self.live.stage(rnd, f"round {rnd}: scoring", asked)
        out = self.inner.score(requests, rnd, run)
        answered = sorted({site for site, _ in out})
        self.live.stage_done(rnd, answered, [s for s in asked if s not in answered], trained=False)
        return out

    def close(self) -> None:
        self.inner.close()

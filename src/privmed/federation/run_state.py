"""What a run has done so far: the typed state the round loop carries and every checkpoint holds.

    state = RunState.fresh(exp)                      # round 0
    state = RunState.from_checkpoint(run_dir.load_latest())
    run_dir.save_checkpoint(state.to_checkpoint(cfg), state.history, keep=...)

A checkpoint is plain data (numbers, strings, lists of numpy arrays), so it loads with torch's
weights_only=True; the layout is the one privmed has always written, so older run directories
resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from privmed.config import RunConfig
from privmed.federation.experiment import Experiment
from privmed.federation.records import MetricsRow
from privmed.federation.strategies import State, Weights
from privmed.privacy.ledger import PrivacyLedger


@dataclass
class Best:
    """A model key's selected model so far: its round, selection score and weights."""

    round: int
    score: float
    weights: Weights


@dataclass
class PrivacyState:
    noise: dict[str, float]  # the noise multipliers the run started with (kept on --resume)
    ledger: PrivacyLedger  # the coordinator's ledger: what the sites reported


@dataclass
class RunState:
    round: int  # rounds completed
    models: State  # the strategy's state after `round`
    best: dict[str, Best] = field(default_factory=dict)  # model key -> selected so far
    history: list[MetricsRow] = field(default_factory=list)  # metrics.jsonl's rows
    wall_seconds: float = 0.0
    train_seconds: float = 0.0  # waiting for the sites' training, as the coordinator saw it
    sample_gradient_steps: int = 0
    privacy: PrivacyState | None = None

    @classmethod
    def fresh(cls, exp: Experiment) -> RunState:
        plan = exp.privacy
        return cls(
            round=0,
            models=exp.strategy.init_state(exp.initial_weights, exp.trainer_names),
            privacy=None if plan is None else PrivacyState(plan.noise_multipliers(), plan.new_ledger()),
        )

    def to_checkpoint(self, cfg: RunConfig) -> dict:
        return {
            "privacy": None if self.privacy is None else {
                "noise": self.privacy.noise, "ledger": self.privacy.ledger.to_dict(),
            },
            "round": self.round,
            "models": self.models,
            "best": {k: {"round": b.round, "score": b.score, "weights": b.weights} for k, b in self.best.items()},
            "history": [row.to_json() for row in self.history],
            "wall_seconds": self.wall_seconds,
            "train_seconds": self.train_seconds,
            "sample_gradient_steps": self.sample_gradient_steps,
            "config": cfg.to_dict(),
        }

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> RunState:
        p = ckpt["privacy"]
        return cls(
            round=int(ckpt["round"]),
            models=ckpt["models"],
            best={k: Best(int(b["round"]), float(b["score"]), b["weights"]) for k, b in ckpt["best"].items()},
            history=[MetricsRow.from_json(row, "checkpoint") for row in ckpt["history"]],
            wall_seconds=float(ckpt["wall_seconds"]),
            train_seconds=float(ckpt["train_seconds"]),
            sample_gradient_steps=int(ckpt["sample_gradient_steps"]),
            privacy=None if p is None else PrivacyState(
                {k: float(v) for k, v in p["noise"].items()}, PrivacyLedger.from_dict(p["ledger"])
            ),
        )

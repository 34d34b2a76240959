"""What a cheating coordinator holds in the red-team tests: the endpoint a hospital's `privmed join`
answers (`SiteEndpoint` over the hospital built from its own config, exactly what the relay of its
SuperNode reaches), the run's honest setup as a coordinator plans it, and Flower's own message
records to talk to it. Nothing here goes around the hospital's guard.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from privmed.config import load_config, load_site_config
from privmed.federation.experiment import SiteSetup, make_model_factory, remote_experiment
from privmed.federation.facts import DataFacts
from privmed.federation.flower import messages as M
from privmed.federation.flower.site_service import SiteEndpoint
from privmed.federation.hospital import Hospital
from privmed.federation.instructions import Instruction
from privmed.federation.strategies import TrainTask
from privmed.tasks.base import get_task

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "configs" / "deploy"


def hospital(state: Path, config: Path = DEPLOY / "hospital-a.yaml", **overrides) -> Hospital:
    """The hospital `config` describes (the shipped hospital-a: DP required, budget 10), its state
    (key, ledger) in `state`, as `privmed join --state STATE` builds it."""
    sets = [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    return Hospital.from_config(load_site_config(config, sets), state)


def honest_setup(h: Hospital, **overrides) -> SiteSetup:
    """The setup the shipped coordinator config plans for `h` (three hospitals like it)."""
    sets = [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    cfg = load_config(DEPLOY / "coordinator.yaml", sets)
    described = {name: {**h.describe(), "site": name} for name in cfg.sites.names}
    return remote_experiment(cfg, described).plan.setup_for(h.name)


def altered(setup: SiteSetup, noise_factor: float = 1.0, training: dict | None = None, **privacy) -> SiteSetup:
    """`setup` as a cheating coordinator rewrites it: the noise multiplier of its release scaled,
    and privacy (or `training`) settings of its config replaced."""
    d = json.loads(setup.to_json())
    cfg = copy.deepcopy(d["config"])
    cfg["privacy"].update(privacy)
    cfg["training"].update(training or {})
    r = d["release"]
    release = None if r is None else (r[0] * noise_factor, r[1], r[2])
    return SiteSetup(cfg, d["data"], d["local_steps"], release, setup.label_shares, setup.finetune,
                     setup.scoring, setup.clip)


def set_up(endpoint: SiteEndpoint, setup: SiteSetup) -> None:
    endpoint.setup(M.encode_setup(setup.to_json()))


def train(endpoint: SiteEndpoint, weights: list[np.ndarray], rnd: int, run: str = "run-1", **kw) -> list[np.ndarray]:
    """The weights the hospital sends back for round `rnd` (SiteRefused when it refuses)."""
    ins = Instruction(TrainTask(endpoint.name, weights), rnd, run=run, **kw)
    content, _ = endpoint.train(M.encode_instruction(ins))
    return M.decode_update(content).weights


def score(endpoint: SiteEndpoint, weights: list[np.ndarray], rnd: int, split: str = "test", run: str = "run-1",
          key: str = "global") -> tuple[dict, dict]:
    """The (metrics, counts) the hospital answers a scoring request with."""
    reply = endpoint.evaluate(M.encode_score_request(endpoint.name, key, weights, (split,), rnd, run))
    return M.decode_score_reply(reply)[2][split]


def initial_weights(h: Hospital, setup: SiteSetup) -> list[np.ndarray]:
    """The run's initial model, as the coordinator sends it (the hospital is not told anything)."""
    cfg = setup.run_config()
    facts = DataFacts.from_dict(setup.data)
    model = make_model_factory(cfg, facts, get_task(cfg.task, facts))()
    return [v.detach().numpy().copy() for v in model.state_dict().values()]


def finetune(endpoint: SiteEndpoint, weights: list[np.ndarray], rnd: int, steps: int, run: str = "run-1") -> dict:
    """The test metrics the hospital answers a fine-tuning instruction with."""
    ins = Instruction(TrainTask(endpoint.name, weights), rnd, run=run, steps=steps, purpose="finetune")
    content, _ = endpoint.train(M.encode_instruction(ins))
    return M.decode_scores(content)[1]

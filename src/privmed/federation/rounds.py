"""One round of training through the sites: the strategy's stages in turn, each stage's
instructions to the sites (`Sites`: in process or over Flower) and their updates folded into the
strategy's state; a round whose stage ends with too few sites is started again, then given up."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import replace

import numpy as np
from tqdm import tqdm

from privmed.catalog import PrivacyMode
from privmed.errors import TrainingDiverged
from privmed.federation.experiment import Experiment
from privmed.federation.strategies import State
from privmed.federation.transport import Sites, StageFailed, required_sites
from privmed.privacy.accountants import Release


class RoundFailed(RuntimeError):
    """A round could not complete after its retries; the run stops (resume it later)."""


def train_round(
    exp: Experiment, sites: Sites, models: State, rnd: int, run: str, bar: tqdm | None
) -> tuple[State, dict, dict[str, list[Release]]]:
    """Train one round; returns the new state, its metrics, and the DP releases each site made
    (what the sites report, under dp-sgd; the server's noisy sums, under central).
    StageFailed when a stage ends with fewer than min_sites sites."""
    strategy, cfg, losses, steps, train_s = exp.strategy, exp.config, {}, 0, 0.0
    secure = strategy if cfg.federation.secure_aggregation else None
    releases: dict[str, list[Release]] = {}
    dropped: list[str] = []
    for stage in strategy.stages(rnd, exp.trainer_names):
        if bar is not None:
            bar.set_postfix_str(f"round {rnd}: training at {', '.join(stage)}")
        started = time.perf_counter()
        tasks = strategy.configure(models, stage)
        outcome = sites.train_stage(tasks, rnd, secure, run)
        if exp.adversary is not None and outcome.secure is None:  # a simulation's malicious sites
            outcome = replace(outcome, updates=exp.adversary.tamper(tasks, outcome.updates, rnd))
        # as the coordinator saw it: under privacy the sites keep their own timings (they follow
        # the batch sizes drawn), and the wait for a stage is all the coordinator learns
        train_s += time.perf_counter() - started
        need = required_sites(exp, len(stage))
        if len(outcome.updates) < need:
            raise StageFailed(
                f"round {rnd}: {len(outcome.updates)} of {len(stage)} sites answered "
                f"({', '.join(outcome.dropped) or 'none'} dropped), federation.min_sites is {need}"
            )
        dropped += outcome.dropped
        for upd in outcome.updates:
            losses[upd.site] = upd.metrics.get("train_loss", math.nan)
            steps += upd.metrics["sample_gradient_steps"]
            if upd.release is not None:
                releases.setdefault(upd.site, []).append(upd.release)
            elif exp.privacy is not None and exp.privacy.mode == PrivacyMode.CENTRAL:
                releases.setdefault(upd.site, []).append(exp.privacy.release(upd.site))
            if upd.metrics.get("secagg_clipped"):
                warnings.warn(
                    f"round {rnd}: site '{upd.site}' had {upd.metrics['secagg_clipped']} update "
                    f"entries outside federation.secagg_clipping_range "
                    f"({cfg.federation.secagg_clipping_range:g}); they were clipped before "
                    "quantisation: raise the range", stacklevel=2,
                )
        if outcome.secure is not None:
            models = strategy.aggregate_secure(models, outcome.secure, rnd)
        else:
            models = strategy.aggregate(models, outcome.updates, rnd)
    _check_finite(models, rnd)
    info = {"train_loss": losses, "sample_gradient_steps": steps, "train_seconds": train_s}
    if dropped:
        info["dropped"] = dropped
    return models, info, releases


def _check_finite(models: State, rnd: int) -> None:
    """TrainingDiverged when a round left a model (not the strategy's bookkeeping) with a weight
    that is not a finite number: scoring it would only fail later, with a worse message."""
    for key, weights in models.items():
        if key.startswith("_"):
            continue
        if not all(np.all(np.isfinite(w)) for w in weights if np.issubdtype(np.asarray(w).dtype, np.floating)):
            raise TrainingDiverged(
                f"round {rnd}: model '{key}' has weights that are not finite numbers (training "
                f"diverged); {TrainingDiverged.ADVICE}"
            )


def train_round_retrying(
    exp: Experiment, sites: Sites, models: State, rnd: int, run: str, bar: tqdm | None
) -> tuple[State, dict, dict[str, list[Release]]]:
    """`_train_round`, started again up to federation.round_retries times when a stage fails.
    A retry sends the same instructions, and a site answers an instruction it already answered
    with the same reply (its cached release, or the same draws from its key), counted once."""
    retries = exp.config.federation.round_retries
    for attempt in range(retries + 1):
        try:
            models, info, releases = train_round(exp, sites, models, rnd, run, bar)
            if attempt:
                info["attempts"] = attempt + 1
            return models, info, releases
        except StageFailed as e:
            if attempt == retries:
                raise RoundFailed(
                    f"{e}; gave up after {retries + 1} attempts. Every completed round is in the "
                    "run directory: start the missing sites and continue with --resume"
                ) from None
            warnings.warn(f"{e}; starting round {rnd} again (attempt {attempt + 2})", stacklevel=2)
    raise AssertionError("unreachable")

"""Which model a run returns: the last round's, or the best on validation data so far (per model
key), and how that choice is said in words."""

from __future__ import annotations

import math

from privmed.federation.evaluation import SELECTION, SELECTION_LAST, SELECTION_LOCAL
from privmed.federation.experiment import Experiment
from privmed.federation.run_state import Best, RunState
from privmed.federation.strategies import GLOBAL, State
from privmed.tasks.names import metric_label


def selects_last(exp: Experiment) -> bool:
    """Whether the run's result is its last round's model (see federation.model_selection)."""
    cfg = exp.config
    choice = cfg.federation.model_selection
    return choice == "last" or (choice == "auto" and (cfg.private or not exp.has_validation))


def selection_text(exp: Experiment, local: bool) -> str:
    """How the run's result was chosen, in words."""
    if selects_last(exp):
        return SELECTION_LAST
    metric = {"c_index": "concordance index"}.get(exp.task.headline, metric_label(exp.task.headline))
    return (SELECTION_LOCAL if local else SELECTION).format(metric=metric)


def update_best(state: RunState, scores: dict[str, float], models: State, rnd: int, keep_last: bool) -> None:
    """Keep round `rnd`'s model of each key that scores higher than the best so far (earliest
    round on ties), or every one when `keep_last`. A best with a NaN score (a round that was not
    scored) gives way to any later round."""
    for key, score in scores.items():
        best = state.best.get(key)
        if keep_last or best is None or math.isnan(best.score) or score > best.score:
            state.best[key] = Best(rnd, score, models[key])


def best_rounds(best: dict[str, Best]) -> dict:
    """The metrics row's fields naming the selected rounds so far."""
    if GLOBAL in best:
        return {"best_round": best[GLOBAL].round}
    return {"best_round": None, "best_round_per_site": {k: v.round for k, v in best.items()}}

"""Scoring the models a strategy holds: per site (validation, own test) and on the pooled test.

The model used for the final test score is chosen on validation data only: each model key's
selection score is the task's headline metric (AUC, or the concordance index for survival) on the
validation data of the sites it serves (pooled), or minus the validation loss where that is
undefined. Without validation data, the last round's model is the result.

A site's test data, when the source says which site each test item comes from, scores the model on
that site's patients; the unweighted mean of those scores over sites is FLamby's headline figure
(`test_mean_over_sites`), reported beside the pooled test score.
"""

from __future__ import annotations

import math

import numpy as np

from privmed.data.base import ImageSet
from privmed.federation.experiment import Experiment
from privmed.federation.site import predict
from privmed.federation.strategies import GLOBAL, State, Weights

SELECTION = "highest validation {metric} over all sites' validation data (pooled), earliest round on ties"
SELECTION_LOCAL = "each site's model: highest {metric} on that site's own validation data"
SELECTION_LAST = "the last round's model (no validation data plays a part in the choice)"


def model_keys(state: State) -> list[str]:
    """The keys of `state` that hold models (the rest, '_'-prefixed, is strategy bookkeeping)."""
    return [k for k in state if not k.startswith("_")]


class Evaluator:
    def __init__(self, exp: Experiment):
        self.exp = exp
        self.task = exp.task
        self.model = exp.model_factory()
        self.bs = exp.config.training.eval_batch_size

    def predict(self, weights: Weights, images: np.ndarray) -> np.ndarray:
        return predict(self.model, weights, images, self.bs, self.task)

    def score(self, weights: Weights, data: ImageSet) -> dict:
        """The task's metrics of `weights` on `data` ({} when `data` is empty)."""
        if len(data) == 0:
            return {}
        return self.task.metrics(self.predict(weights, data.images), data)

    def evaluate(self, models: State) -> tuple[dict, dict[str, float]]:
        """(metrics row fields, selection score per model key) for the models in `models`."""
        if GLOBAL in models:
            return self._evaluate_global(models[GLOBAL])
        return self._evaluate_local({k: models[k] for k in model_keys(models)})

    def _evaluate_global(self, w: Weights) -> tuple[dict, dict[str, float]]:
        sites = {}
        for sd in self.exp.site_data:
            sites[sd.name] = {"val": self.score(w, sd.val)}
            if sd.test is not None:
                sites[sd.name]["test"] = self.score(w, sd.test)
        val = self.score(w, ImageSet.concat([sd.val for sd in self.exp.site_data]))
        test = self.score(w, self.exp.source.test)
        row = {"val": val, "test": test, "test_mean_over_sites": _mean_site_test(sites), "sites": sites}
        return row, {GLOBAL: self.task.selection_score(val)}

    def _evaluate_local(self, models: State) -> tuple[dict, dict[str, float]]:
        sites, scores = {}, {}
        test_set = self.exp.source.test
        for sd in self.exp.site_data:
            w = models[sd.name]
            val = self.score(w, sd.val)
            sites[sd.name] = {"val": val, "test_pooled": self.score(w, test_set)}
            if sd.test is not None:
                sites[sd.name]["test"] = self.score(w, sd.test)
            scores[sd.name] = self.task.selection_score(val)
        val = mean_metrics([s["val"] for s in sites.values()])
        test = mean_metrics([s["test_pooled"] for s in sites.values()])
        row = {"val": val, "test": test, "test_mean_over_sites": _mean_site_test(sites), "sites": sites}
        return row, scores


def _mean_site_test(sites: dict) -> dict:
    """Unweighted mean over sites of each site's own test scores ({} if no site has test data)."""
    return mean_metrics([s["test"] for s in sites.values() if s.get("test")])


def mean_metrics(rows: list[dict]) -> dict:
    """Unweighted mean of each metric over `rows` (NaN-aware; counts `n` and `events` summed).
    Empty rows (no data) are skipped; {} when none is left."""
    rows = [r for r in rows if r]
    if not rows:
        return {}
    out = {}
    for k in rows[0]:
        vals = np.array([r[k] for r in rows], dtype=np.float64)
        if k in ("n", "events"):
            out[k] = int(vals.sum())
        else:
            out[k] = float(np.nanmean(vals)) if np.any(~np.isnan(vals)) else math.nan
    return out

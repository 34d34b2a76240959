"""Scoring the models a strategy holds: per site (validation, own test) and on the pooled test.

The model used for the final test score is chosen on validation data only: each model key's
selection score is its AUC on the validation data of the sites it serves (pooled), or minus the
validation loss where AUC is undefined.
"""

from __future__ import annotations

import math

import numpy as np

from privmed.federation.experiment import Experiment
from privmed.federation.site import predict
from privmed.federation.strategies import GLOBAL, State, Weights
from privmed.tasks.classification import classification_metrics

SELECTION = "highest validation AUC over all sites' validation data (pooled), earliest round on ties"
SELECTION_LOCAL = "each site's model: highest AUC on that site's own validation data"
SELECTION_LAST = "the last round's model (no validation data plays a part in the choice)"


class Evaluator:
    def __init__(self, exp: Experiment):
        self.exp = exp
        self.model = exp.model_factory()
        self.bs = exp.config.training.eval_batch_size

    def probs(self, weights: Weights, images: np.ndarray) -> np.ndarray:
        return predict(self.model, weights, images, self.bs)

    def evaluate(self, models: State) -> tuple[dict, dict[str, float]]:
        """(metrics row fields, selection score per model key) for the models in `models`."""
        if GLOBAL in models:
            return self._evaluate_global(models[GLOBAL])
        return self._evaluate_local(models)

    def _evaluate_global(self, w: Weights) -> tuple[dict, dict[str, float]]:
        sites, val_p, val_y = {}, [], []
        for sd in self.exp.site_data:
            p = self.probs(w, sd.val.images)
            val_p.append(p)
            val_y.append(sd.val.labels)
            sites[sd.name] = {"val": classification_metrics(p, sd.val.labels)}
            if sd.test is not None:
                pt = self.probs(w, sd.test.images)
                sites[sd.name]["test"] = classification_metrics(pt, sd.test.labels)
        val = classification_metrics(np.concatenate(val_p), np.concatenate(val_y))
        test_set = self.exp.source.test
        test = classification_metrics(self.probs(w, test_set.images), test_set.labels)
        return {"val": val, "test": test, "sites": sites}, {GLOBAL: selection_score(val)}

    def _evaluate_local(self, models: State) -> tuple[dict, dict[str, float]]:
        sites, scores = {}, {}
        test_set = self.exp.source.test
        for sd in self.exp.site_data:
            w = models[sd.name]
            val = classification_metrics(self.probs(w, sd.val.images), sd.val.labels)
            pooled = classification_metrics(self.probs(w, test_set.images), test_set.labels)
            sites[sd.name] = {"val": val, "test_pooled": pooled}
            if sd.test is not None:
                sites[sd.name]["test"] = classification_metrics(
                    self.probs(w, sd.test.images), sd.test.labels
                )
            scores[sd.name] = selection_score(val)
        val = mean_metrics([s["val"] for s in sites.values()])
        test = mean_metrics([s["test_pooled"] for s in sites.values()])
        return {"val": val, "test": test, "sites": sites}, scores


def selection_score(val: dict) -> float:
    return val["auc"] if not math.isnan(val["auc"]) else -val["loss"]


def mean_metrics(rows: list[dict]) -> dict:
    """Unweighted mean of each metric over `rows` (NaN-aware; `n` summed)."""
    out = {}
    for k in rows[0]:
        vals = np.array([r[k] for r in rows], dtype=np.float64)
        if k == "n":
            out[k] = int(vals.sum())
        else:
            out[k] = float(np.nanmean(vals)) if np.any(~np.isnan(vals)) else math.nan
    return out

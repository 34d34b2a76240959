"""Scoring the models a strategy holds, at the sites: each site scores them on its own validation
and test patients and returns its metrics and the counts pooled figures are merged from; no
patient's prediction leaves a site.

    evaluator = Evaluator(exp, sites)          # sites: the runner's transport (privmed.federation.transport)
    row, scores = evaluator.evaluate(models, rnd, run)

Pooled figures (`val`, and `test` when the sites hold the test data) are computed from the sum of
the sites' counts (privmed.tasks.counts): exact for accuracy, loss, calibration and counts; the
AUC of scores rounded to a fine grid; for survival, the concordance over pairs of patients of one
site and the Cox loss with risk sets per site. A public held-out test set that no site owns (a
benchmark's official test split) is scored by the coordinator itself, from predictions.

Under privacy every scoring is a release on the scored patients (noisy counts, in the sites'
ledgers): the sites score the models on their validation patients only in the run's validation
rounds (`validation_rounds`), and on their test patients once, at the end (the selected models).

The model used for the final test score is chosen on validation data only: each model key's
selection score is the task's headline metric (AUC, or the concordance index for survival) on the
validation data of the sites it serves (pooled), or minus the validation loss where that is
undefined. Without validation data, the last round's model is the result.

A site's own test scores average, unweighted, into FLamby's headline figure
(`test_mean_over_sites`), reported beside the pooled test score.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from privmed.catalog import PrivacyMode
from privmed.errors import TrainingDiverged
from privmed.federation.experiment import Experiment, validation_rounds
from privmed.federation.instructions import SPLITS, ScoreRequest, Scores
from privmed.federation.site import predict, resolve_device
from privmed.federation.strategies import GLOBAL, State, Weights
from privmed.federation.transport import Sites
from privmed.privacy.ledger import PrivacyLedger
from privmed.tasks.counts import merge_counts
from privmed.tasks.base import metrics_and_counts

SELECTION = "highest validation {metric} over all sites' validation data (pooled), earliest round on ties"
SELECTION_LOCAL = "each site's model: highest {metric} on that site's own validation data"
SELECTION_LAST = "the last round's model (no validation data plays a part in the choice)"


def model_keys(state: State) -> list[str]:
    """The keys of `state` that hold models (the rest, '_'-prefixed, is strategy bookkeeping)."""
    return [k for k in state if not k.startswith("_")]


def pooled_test_source(exp: Experiment) -> str:
    """Where the pooled test figure comes from, in words (summary.json's `evaluation`)."""
    if exp.public_test is not None:
        return (f"a public held-out test set of {len(exp.public_test)} items that no site owns, "
                "scored by the coordinator")
    how = {
        "survival": "the concordance over pairs of patients of one site (and the Cox loss with "
                    "risk sets per site), from the sites' counts",
    }.get(exp.task.name, "the sites' counts summed (the AUC of scores rounded to a fine grid)")
    return f"each site's own test patients, scored at the site: {how}"


class Evaluator:
    def __init__(self, exp: Experiment, sites: Sites):
        self.exp, self.sites = exp, sites
        self.task = exp.task
        cfg = exp.config
        self.model = exp.model_factory().to(resolve_device(cfg.training, cfg.privacy.mode == PrivacyMode.DP_SGD))
        self.bs = exp.config.training.eval_batch_size
        self.rounds = set(validation_rounds(cfg))
        # each round's scoring: validation and test patients, or under privacy validation only
        self.splits = ("val",) if cfg.private else SPLITS
        # the coordinator's ledger, which records each scoring release the sites answered (the
        # runner sets it under privacy)
        self.ledger: PrivacyLedger | None = None

    def _scored(self, got: dict[tuple[str, str], Scores], rnd: int) -> dict[tuple[str, str], Scores]:
        """Record in the coordinator's ledger each split a site answered with counts (a release on
        those patients); returns `got`."""
        plan = self.exp.privacy.scoring if self.exp.privacy is not None else None
        if self.ledger is not None and plan is not None:
            for (site, _), scores in got.items():
                for split, (_, counts) in scores.items():
                    if counts and split in plan.noise:
                        self.ledger.record_scoring(site, rnd, split, plan.noise[split])
        return got

    # ------------------------------------------------------------------ the public test set
    def predict(self, weights: Weights, images: np.ndarray) -> np.ndarray:
        return predict(self.model, weights, images, self.bs, self.task)

    def score_public(self, weights: Weights) -> tuple[dict, dict, np.ndarray | None]:
        """(metrics, counts, predictions) of `weights` on the public test set (({}, {}, None)
        without one)."""
        data = self.exp.public_test
        if data is None or len(data) == 0:
            return {}, {}, None
        pred = self.predict(weights, data.images)
        if not np.all(np.isfinite(pred)):
            raise TrainingDiverged(
                "the model's outputs on the public test set are not finite numbers (training "
                f"diverged); {TrainingDiverged.ADVICE}"
            )
        return (*metrics_and_counts(self.task, pred, data), pred)

    # ------------------------------------------------------------------ at the sites
    def evaluate(self, models: State, rnd: int = 0, run: str = "") -> tuple[dict, dict[str, float]]:
        """(metrics row fields, selection score per model key) for the models in `models`; a round
        that is not a validation round (under privacy) is not scored: empty fields, NaN scores."""
        if rnd and rnd not in self.rounds:
            return {"val": {}, "test": {}, "sites": {}, "scored": False}, {k: math.nan for k in model_keys(models)}
        try:
            if GLOBAL in models:
                return self._evaluate_global(models[GLOBAL], rnd, run)
            return self._evaluate_local({k: models[k] for k in model_keys(models)}, rnd, run)
        except TrainingDiverged as e:
            raise TrainingDiverged(f"round {rnd}: {e}") from None

    def pooled_test(self, key: str, weights: Weights, rnd: int, run: str) -> tuple[dict, dict, np.ndarray | None, dict]:
        """(metrics, counts, predictions or None, each site's own test metrics) of one model on the
        pooled test data: the public test set, or every site's own test patients (merged from
        their counts)."""
        if self.exp.public_test is not None:
            return (*self.score_public(weights), {})
        holders = self._with_test()
        got = self._scored(self.sites.score([ScoreRequest(s, key, weights, ("test",)) for s in holders], rnd, run), rnd)
        counts = merge_counts([scores["test"][1] for scores in got.values()])
        if len(got) < len(holders):
            missing = sorted(set(holders) - {s for s, _ in got})
            warnings.warn(f"the pooled test figure of model '{key}' leaves out {', '.join(missing)} "
                          "(did not answer)", stacklevel=2)
        per_site = {s: scores["test"][0] for (s, _), scores in got.items() if scores["test"][0]}
        return self.task.metrics_from_counts(counts), counts, None, per_site

    def _with_test(self) -> list[str]:
        return [p.name for p in self.exp.plan.sites if p.n_test]

    def _evaluate_global(self, w: Weights, rnd: int, run: str) -> tuple[dict, dict[str, float]]:
        names = self.exp.site_names
        got = self._scored(self.sites.score([ScoreRequest(s, GLOBAL, w, self.splits) for s in names], rnd, run), rnd)
        sites, val_counts, test_counts = {}, [], []
        for s in names:
            scores = got.get((s, GLOBAL))
            if scores is None:  # the site is gone: its row is empty, the pooled figures leave it out
                sites[s] = {"val": {}}
                continue
            sites[s] = {"val": scores["val"][0]}
            val_counts.append(scores["val"][1])
            if scores.get("test", ({}, {}))[0]:
                sites[s]["test"] = scores["test"][0]
                test_counts.append(scores["test"][1])
        val = self.task.metrics_from_counts(merge_counts(val_counts))
        if self.exp.public_test is not None:
            test = self.score_public(w)[0]
        else:
            test = self.task.metrics_from_counts(merge_counts(test_counts))
        row = {"val": val, "test": test, "test_mean_over_sites": _mean_site_test(sites), "sites": sites,
               **_unscored(names, got)}
        return row, {GLOBAL: self.task.selection_score(val)}

    def _evaluate_local(self, models: State, rnd: int, run: str) -> tuple[dict, dict[str, float]]:
        """Each site's own model on its own patients; and on the pooled test data (the public
        test set, or every site's test patients: each model visits every site with test data)."""
        names = self.exp.site_names
        requests = [ScoreRequest(s, s, models[s], self.splits) for s in names]
        public = self.exp.public_test is not None
        tests = "test" in self.splits  # under privacy the test patients are scored at the end only
        if tests and not public:
            requests += [ScoreRequest(other, s, models[s], ("test",))
                         for s in names for other in self._with_test() if other != s]
        got = self._scored(self.sites.score(requests, rnd, run), rnd)
        sites, scores = {}, {}
        for s in names:
            own = got.get((s, s), {"val": ({}, {}), "test": ({}, {})})
            own.setdefault("test", ({}, {}))
            if public:
                pooled = self.score_public(models[s])[0]
            elif tests:
                parts = [own["test"][1]] + [got[(o, s)]["test"][1] for o in self._with_test()
                                            if o != s and (o, s) in got]
                pooled = self.task.metrics_from_counts(merge_counts(parts))
            else:
                pooled = {}
            sites[s] = {"val": own["val"][0], "test_pooled": pooled}
            if own["test"][0]:
                sites[s]["test"] = own["test"][0]
            scores[s] = self.task.selection_score(own["val"][0])
        val = mean_metrics([s["val"] for s in sites.values()])
        test = mean_metrics([s["test_pooled"] for s in sites.values()])
        row = {"val": val, "test": test, "test_mean_over_sites": _mean_site_test(sites), "sites": sites,
               **_unscored(names, got)}
        return row, scores


def _unscored(names: list[str], got: dict) -> dict:
    """The metrics row's note of sites that did not answer a scoring request (none: no field)."""
    answered = {s for s, _ in got}
    missing = [s for s in names if s not in answered]
    return {"unscored": missing} if missing else {}


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


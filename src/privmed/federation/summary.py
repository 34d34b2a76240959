"""The end of a run: the selected models scored, per site and pooled; fine-tuning at the sites when
asked; and summary.json, predictions.npz and model.pt written (with a run directory)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from privmed._version import __version__
from privmed.federation.accounting import privacy_summary, secure_summary
from privmed.federation.evaluation import Evaluator, mean_metrics, pooled_test_source
from privmed.federation.experiment import Experiment
from privmed.federation.records import Summary
from privmed.federation.run_state import RunState
from privmed.federation.rundir import RunDir
from privmed.federation.selection import selection_text, selects_last
from privmed.federation.site import set_weights
from privmed.federation.strategies import GLOBAL, TrainTask
from privmed.federation.transport import Sites
from privmed.privacy.ledger import LEDGER_FILE
from privmed.privacy.outlook import outlook_warnings
from privmed.tasks.usefulness import usefulness_warnings


@dataclass
class RunResult:
    summary: dict  # summary.json's content (Summary.to_json(); NaN where the file has null)
    models: dict[str, nn.Module]  # model key ('global', or a site for `local`) -> selected model
    predictions: dict[str, np.ndarray]  # 'labels' and 'probs:<key>' on the pooled test set

    @property
    def model(self) -> nn.Module:
        """The selected global model (for `local`, the first site's)."""
        return self.models.get(GLOBAL) or next(iter(self.models.values()))


@dataclass
class _Selected:
    """The selected models and what was scored of them."""

    models: dict[str, nn.Module]
    predictions: dict[str, np.ndarray] | None  # on the public test set, when the coordinator has one
    counts: dict[str, dict]  # model key -> its pooled test counts
    test: dict[str, dict]  # model key -> its pooled test metrics
    rounds: dict[str, int]  # model key -> selected round
    site_rows: dict[str, dict]


def finish(
    exp: Experiment, state: RunState, evaluator: Evaluator, run_dir: RunDir | None, sites: Sites, run: str
) -> RunResult:
    sel = _selected(exp, state, evaluator, run)
    local = GLOBAL not in state.best
    test_scores, val_scores = _headline_scores(exp, state, sel, local)
    finetuned = None if local else _finetune(exp, state, sel.site_rows, sites, run, run_dir)
    summary = _summary(exp, state, sel, local, test_scores, val_scores, finetuned)
    if run_dir is not None:
        if state.privacy is not None:  # with the final scorings (and fine-tuning) counted
            state.privacy.ledger.save(run_dir.path / LEDGER_FILE)
        run_dir.finish(summary, sel.predictions, _model_file(exp, sel), sel.counts)
    return RunResult(summary=summary.to_json(), models=sel.models, predictions=sel.predictions or {})


def _selected(exp: Experiment, state: RunState, evaluator: Evaluator, run: str) -> _Selected:
    """Each selected model built and scored on the pooled test data (its predictions when the
    coordinator holds a public test set, its counts in any case), and each site's row (its counts
    and the scores of the model that serves it, from the metrics row of the selected round)."""
    task, public = exp.task, exp.public_test
    history = {row.round: row for row in state.history}
    predictions: dict[str, np.ndarray] | None = None
    if public is not None:
        predictions = {"labels": public.labels}
        if public.time is not None:
            predictions["time"] = public.time
        if task.dense:  # a few test slices for the report's pictures (the test set is public)
            idx = task.examples(public)
            predictions.update(example_index=idx, example_input=task.shown_input(public.images[idx]),
                               example_target=task.stored(public.target[idx], target=True))
    site_rows = {p.name: {"n_train": p.n_train, "n_val": p.n_val, "n_test": p.n_test} for p in exp.plan.sites}
    models: dict[str, nn.Module] = {}
    rounds: dict[str, int] = {}
    counts: dict[str, dict] = {}
    test: dict[str, dict] = {}
    for key, best in state.best.items():
        test[key], counts[key], pred, per_site = evaluator.pooled_test(key, best.weights, state.round, run)
        if predictions is not None and pred is not None:
            predictions[f"{task.prediction}:{key}"] = task.stored(pred)
        model = exp.model_factory()
        set_weights(model, best.weights)
        models[key] = model.eval()
        rounds[key] = best.round
        for name, scores in history[best.round].sites.items():
            if key == GLOBAL or key == name:
                site_rows[name].update(scores)
                if key != GLOBAL:
                    site_rows[name]["best_round"] = best.round
        for name, metrics in per_site.items():  # under privacy each site's test scores come from here
            if key == GLOBAL or key == name:
                site_rows[name].setdefault("test", metrics)
    return _Selected(models, predictions, {k: c for k, c in counts.items() if c}, test, rounds, site_rows)


def _headline_scores(exp: Experiment, state: RunState, sel: _Selected, local: bool) -> tuple[dict, dict]:
    """(pooled test scores, validation scores) of the result."""
    if not state.best:
        return {}, {}
    if local:
        pooled = [sel.test[k] for k in state.best]
        # every site's model scored the same pooled test patients: their counts are not summed
        test = {**mean_metrics(pooled), **{k: pooled[0][k] for k in ("n", "events") if k in pooled[0]}}
        return test, mean_metrics([sel.site_rows[k]["val"] for k in state.best])
    history = {row.round: row for row in state.history}
    return sel.test[GLOBAL], history[sel.rounds[GLOBAL]].val


def _finetune(exp: Experiment, state: RunState, site_rows: dict, sites: Sites, run: str,
              run_dir: RunDir | None) -> dict | None:
    """federation.finetune_steps: each site trains the selected global model that many steps on its
    own training data (seeded apart from the rounds) and scores the result on its own test data
    (`sites[name]["test_finetuned"]`); the fine-tuned models never leave the sites. Under DP-SGD
    the turn is the one the privacy plan counts, charged in the ledger before any site is asked
    (and the score is a release on the test patients). Returns the unweighted mean over sites, or
    None when no fine-tuning was asked for."""
    steps = exp.config.federation.finetune_steps
    if not steps or GLOBAL not in state.best:
        return None
    if state.privacy is not None:
        for name in exp.site_names:
            state.privacy.ledger.record_finetune(name, exp.privacy.sites[name].finetune)
        if run_dir is not None:
            state.privacy.ledger.save(run_dir.path / LEDGER_FILE)
    weights = state.best[GLOBAL].weights
    scoring = None if exp.privacy is None else exp.privacy.scoring
    for name in exp.site_names:  # the sites score their fine-tuned models; only the metrics come back
        site_rows[name]["test_finetuned"] = sites.finetune(TrainTask(name, weights), state.round, steps, run)
        if scoring is not None and site_rows[name]["test_finetuned"] and "test" in scoring.noise:
            state.privacy.ledger.record_scoring(name, state.round, "test", scoring.noise["test"])
    return mean_metrics([site_rows[name]["test_finetuned"] for name in exp.site_names])


def _summary(
    exp: Experiment, state: RunState, sel: _Selected, local: bool, test_scores: dict, val_scores: dict,
    finetuned: dict | None,
) -> Summary:
    cfg, data = exp.config, exp.data
    return Summary(
        name=cfg.name,
        task=cfg.task,
        strategy=cfg.federation.strategy,
        rounds_completed=state.round,
        rounds_planned=cfg.federation.rounds,
        best_round=None if local else sel.rounds.get(GLOBAL),
        selection=selection_text(exp, local),
        # the rule, typed (federation.model_selection resolved): "best-validation" makes the result
        # depend on the validation scores, which no privacy guarantee covers
        selection_rule="last" if selects_last(exp) else "best-validation",
        test=test_scores,
        evaluation={
            "test": pooled_test_source(exp),
            "sites": "each site scores the models on its own validation and test patients and returns "
                     "its metrics and counts; no patient's prediction leaves a site",
        },
        test_mean_over_sites=mean_metrics([r.get("test", {}) for r in sel.site_rows.values()]),
        test_finetuned_mean_over_sites=finetuned,
        val=val_scores,
        sites=sel.site_rows,
        wall_seconds=state.wall_seconds,
        train_seconds=state.train_seconds,
        sample_gradient_steps=state.sample_gradient_steps,
        privacy=privacy_summary(exp, None if state.privacy is None else state.privacy.ledger),
        secure_aggregation=secure_summary(exp),
        data={
            "source": cfg.data.source,
            "synthetic": data.synthetic,
            "description": data.description,
            "citation": data.citation,
            "class_names": list(data.class_names),
            "image_shape": list(data.image_shape),
            "tabular": data.tabular,
            "feature_names": list(data.feature_names),
            "n_test": len(exp.public_test) if exp.public_test is not None else sum(p.n_test for p in exp.plan.sites),
        },
        model={
            "name": cfg.model.name,
            "parameters": int(sum(p.size for p in exp.initial_weights)),
        },
        seed=cfg.seed,
        privmed_version=__version__,
        warnings=usefulness_warnings(cfg.task, test_scores, None if local else sel.counts.get(GLOBAL),
                                     data.class_names, private=exp.privacy is not None)
        + outlook_warnings(exp.privacy, cfg.federation.rounds),
    )


def _model_file(exp: Experiment, sel: _Selected) -> dict:
    cfg, data = exp.config, exp.data
    return {
        "config": cfg.to_dict(),
        "model_args": {
            "name": cfg.model.name,
            "in_channels": data.in_channels,
            "num_classes": exp.task.n_outputs(data),
            "image_size": data.image_size,
            "width": cfg.model.width,
        },
        "class_names": list(data.class_names),
        "state_dicts": {k: m.state_dict() for k, m in sel.models.items()},
        "best_round": sel.rounds,
    }

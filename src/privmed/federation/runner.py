"""The in-process runner: every site in this process, rounds driven one after another.

    result = run_in_process(exp, run_dir=RunDir(...) or None, resume=False, progress=True)

Each round: the strategy plans stages, sites train, the strategy aggregates, the models are scored,
and (with a run directory) a checkpoint is written. All randomness is derived from (seed, round,
site), so a run resumed from round r's checkpoint continues exactly as the uninterrupted run did.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn
from tqdm import tqdm

from privmed import __version__, io
from privmed.federation.evaluation import SELECTION, SELECTION_LOCAL, Evaluator, mean_metrics
from privmed.federation.experiment import Experiment
from privmed.federation.rundir import RunDir
from privmed.federation.site import set_weights
from privmed.federation.strategies import GLOBAL, State
from privmed.tasks.classification import classification_metrics


@dataclass
class RunResult:
    summary: dict
    models: dict[str, nn.Module]  # model key ('global', or a site for `local`) -> selected model
    predictions: dict[str, np.ndarray]  # 'labels' and 'probs:<key>' on the pooled test set

    @property
    def model(self) -> nn.Module:
        """The selected global model (for `local`, the first site's)."""
        return self.models.get(GLOBAL) or next(iter(self.models.values()))


def _fresh_state(exp: Experiment) -> dict[str, Any]:
    return {
        "round": 0,
        "models": exp.strategy.init_state(exp.initial_weights, exp.trainer_names),
        "best": {},  # model key -> {"round", "score", "weights"}
        "history": [],
        "wall_seconds": 0.0,
        "train_seconds": 0.0,
        "sample_gradient_steps": 0,
    }


def _train_round(exp: Experiment, models: State, rnd: int, bar: tqdm | None) -> tuple[State, dict]:
    strategy, losses, steps, train_s = exp.strategy, {}, 0, 0.0
    for stage in strategy.stages(rnd, exp.trainer_names):
        updates = []
        for task in strategy.configure(models, stage):
            if bar is not None:
                bar.set_postfix_str(f"round {rnd}: training at {task.site}")
            upd = exp.trainers[task.site].train(task, rnd)
            losses[task.site] = upd.metrics["train_loss"]
            steps += upd.metrics["sample_gradient_steps"]
            train_s += upd.metrics["train_seconds"]
            updates.append(upd)
        models = strategy.aggregate(models, updates)
    return models, {"train_loss": losses, "sample_gradient_steps": steps, "train_seconds": train_s}


def run_in_process(
    exp: Experiment, run_dir: RunDir | None = None, resume: bool = False, progress: bool = False
) -> RunResult:
    cfg = exp.config
    state = (run_dir.load_latest() if (run_dir and resume) else None) or _fresh_state(exp)
    if run_dir is not None:
        run_dir.start(cfg)
        if state["history"]:  # resumed: metrics.jsonl may lag its checkpoint by one write
            io.write_jsonl(run_dir.path / "metrics.jsonl", state["history"])
    evaluator = Evaluator(exp)
    rounds = cfg.federation.rounds
    bar = tqdm(
        total=rounds, initial=state["round"], desc=f"{cfg.name or 'run'} [{exp.strategy.name}]",
        unit="round", disable=not progress, dynamic_ncols=True,
    )
    try:
        for rnd in range(state["round"] + 1, rounds + 1):
            t0 = time.perf_counter()
            models, train_info = _train_round(exp, state["models"], rnd, bar if progress else None)
            scores_row, scores = evaluator.evaluate(models)
            for key, score in scores.items():
                best = state["best"].get(key)
                if best is None or score > best["score"]:
                    state["best"][key] = {"round": rnd, "score": score, "weights": models[key]}
            state["sample_gradient_steps"] += train_info["sample_gradient_steps"]
            state["train_seconds"] += train_info["train_seconds"]
            seconds = time.perf_counter() - t0
            state["wall_seconds"] += seconds
            row = {
                "round": rnd,
                "seconds": seconds,
                "train_seconds": train_info["train_seconds"],
                "sample_gradient_steps": state["sample_gradient_steps"],
                "train_loss": train_info["train_loss"],
                **scores_row,
                **_best_rounds(state["best"]),
            }
            state["history"].append(row)
            state["models"], state["round"] = models, rnd
            if run_dir is not None:
                run_dir.save_checkpoint(
                    {**state, "config": cfg.to_dict()}, keep=cfg.output.keep_checkpoints
                )
            bar.set_postfix_str(
                f"val AUC {_fmt(row['val']['auc'])}, test AUC {_fmt(row['test']['auc'])}"
            )
            bar.update(1)
    finally:
        bar.close()
    return _finish(exp, state, evaluator, run_dir)


def _best_rounds(best: dict) -> dict:
    if GLOBAL in best:
        return {"best_round": best[GLOBAL]["round"]}
    return {"best_round": None, "best_round_per_site": {k: v["round"] for k, v in best.items()}}


def _fmt(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"


def _finish(exp: Experiment, state: dict, evaluator: Evaluator, run_dir: RunDir | None) -> RunResult:
    cfg, test = exp.config, exp.source.test
    history = {row["round"]: row for row in state["history"]}
    predictions: dict[str, np.ndarray] = {"labels": test.labels}
    models: dict[str, nn.Module] = {}
    site_rows: dict[str, dict] = {}
    for sd in exp.site_data:
        site_rows[sd.name] = {
            "n_train": len(sd.train),
            "n_val": len(sd.val),
            "n_test": 0 if sd.test is None else len(sd.test),
        }
    best_rounds = {}
    for key, best in state["best"].items():
        probs = evaluator.probs(best["weights"], test.images)
        predictions[f"probs:{key}"] = probs.astype(np.float32)
        model = exp.model_factory()
        set_weights(model, best["weights"])
        models[key] = model.eval()
        row = history[best["round"]]
        best_rounds[key] = best["round"]
        for name, scores in row["sites"].items():
            if key == GLOBAL or key == name:
                site_rows[name].update(scores)
                if key != GLOBAL:
                    site_rows[name]["best_round"] = best["round"]

    local = GLOBAL not in state["best"]
    if not state["best"]:
        test_scores, val_scores = {}, {}
    elif local:
        test_scores = mean_metrics([site_rows[k]["test_pooled"] for k in state["best"]])
        val_scores = mean_metrics([site_rows[k]["val"] for k in state["best"]])
    else:
        test_scores = classification_metrics(predictions["probs:global"].astype(np.float64), test.labels)
        val_scores = history[best_rounds[GLOBAL]]["val"]

    src = exp.source
    summary = {
        "name": cfg.name,
        "task": cfg.task,
        "strategy": cfg.federation.strategy,
        "rounds_completed": state["round"],
        "rounds_planned": cfg.federation.rounds,
        "best_round": None if local else best_rounds.get(GLOBAL),
        "selection": SELECTION_LOCAL if local else SELECTION,
        "test": test_scores,
        "val": val_scores,
        "sites": site_rows,
        "wall_seconds": state["wall_seconds"],
        "train_seconds": state["train_seconds"],
        "sample_gradient_steps": state["sample_gradient_steps"],
        "data": {
            "source": cfg.data.source,
            "synthetic": src.synthetic,
            "description": src.description,
            "citation": src.citation,
            "class_names": list(src.class_names),
            "image_shape": list(src.train.images.shape[1:]),
            "n_test": len(test),
        },
        "model": {
            "name": cfg.model.name,
            "parameters": int(sum(p.size for p in exp.initial_weights)),
        },
        "seed": cfg.seed,
        "privmed_version": __version__,
    }
    if run_dir is not None:
        model_file = {
            "config": cfg.to_dict(),
            "model_args": {
                "name": cfg.model.name,
                "in_channels": src.in_channels,
                "num_classes": src.n_classes,
                "image_size": src.image_size,
                "width": cfg.model.width,
            },
            "class_names": list(src.class_names),
            "state_dicts": {k: m.state_dict() for k, m in models.items()},
            "best_round": best_rounds,
        }
        run_dir.finish(summary, predictions, model_file)
    return RunResult(summary=summary, models=models, predictions=predictions)

"""The in-process runner: every site in this process, rounds driven one after another.

    result = run_in_process(exp, run_dir=RunDir(...) or None, resume=False, progress=True)

Each round: the strategy plans stages, sites train, the strategy aggregates, the models are scored,
and (with a run directory) a checkpoint is written. Public randomness comes from (seed, round,
site), and the sites' DP randomness from their secret keys (kept under RUN_DIR/private), so a run
resumed from round r's checkpoint continues exactly as the uninterrupted run did.
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn
from tqdm import tqdm

from privmed import __version__, io
from privmed.errors import RunDirError
from privmed.federation.evaluation import (
    SELECTION,
    SELECTION_LAST,
    SELECTION_LOCAL,
    Evaluator,
    mean_metrics,
)
from privmed.federation.experiment import Experiment
from privmed.federation.rundir import RunDir
from privmed.federation.site import set_weights
from privmed.federation.strategies import GLOBAL, DPFedAvg, State, TrainTask
from privmed.federation.transport import InProcessSites, Sites, StageFailed, required_sites
from privmed.privacy.accountants import Release
from privmed.privacy.ledger import LEDGER_FILE, BudgetExceeded, PrivacyLedger
from privmed.privacy.plan import NO_PRIVACY, guarantee_statement
from privmed.privacy.secret import SecretKey


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
    plan = exp.privacy
    return {
        "privacy": None if plan is None else {
            "noise": plan.noise_multipliers(), "ledger": plan.new_ledger().to_dict()
        },
        "round": 0,
        "models": exp.strategy.init_state(exp.initial_weights, exp.trainer_names),
        "best": {},  # model key -> {"round", "score", "weights"}
        "history": [],
        "wall_seconds": 0.0,
        "train_seconds": 0.0,
        "sample_gradient_steps": 0,
    }


def _planned_releases(exp: Experiment, rnd: int) -> dict[str, list[Release]]:
    """The DP releases round `rnd` will make, per site (one per training turn)."""
    planned: dict[str, list[Release]] = {}
    for stage in exp.strategy.stages(rnd, exp.trainer_names):
        for site in stage:
            planned.setdefault(site, []).append(exp.privacy.release(site))
    return planned


class RoundFailed(RuntimeError):
    """A round could not complete after its retries; the run stops (resume it later)."""


def _train_round(
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
        outcome = sites.train_stage(strategy.configure(models, stage), rnd, secure, run)
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
            if "release" in upd.metrics:
                releases.setdefault(upd.site, []).append(upd.metrics["release"])
            elif exp.privacy is not None and exp.privacy.mode == "central":
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
    info = {"train_loss": losses, "sample_gradient_steps": steps, "train_seconds": train_s}
    if dropped:
        info["dropped"] = dropped
    return models, info, releases


def _train_round_retrying(
    exp: Experiment, sites: Sites, models: State, rnd: int, run: str, bar: tqdm | None
) -> tuple[State, dict, dict[str, list[Release]]]:
    """`_train_round`, started again up to federation.round_retries times when a stage fails.
    A retry sends the same instructions, and a site answers an instruction it already answered
    with the same reply (its cached release, or the same draws from its key), counted once."""
    retries = exp.config.federation.round_retries
    for attempt in range(retries + 1):
        try:
            models, info, releases = _train_round(exp, sites, models, rnd, run, bar)
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


def run_in_process(
    exp: Experiment, run_dir: RunDir | None = None, resume: bool = False, progress: bool = False,
    sites: Sites | None = None,
) -> RunResult:
    """Run the experiment's rounds. `sites`: where the sites train (default: in this process;
    the Flower runner passes its own)."""
    if sites is None:
        sites = InProcessSites(exp, private=None if run_dir is None else run_dir.private())
    try:
        return _run(exp, sites, run_dir, resume, progress)
    finally:
        sites.close()


def _run(exp: Experiment, sites: Sites, run_dir: RunDir | None, resume: bool, progress: bool) -> RunResult:
    cfg = exp.config
    state = (run_dir.load_latest() if (run_dir and resume) else None) or _fresh_state(exp)
    ledger = None
    if exp.privacy is not None:
        if state["privacy"]["noise"] != exp.privacy.noise_multipliers():
            raise RunDirError(
                f"--resume: the run was started with noise multipliers {state['privacy']['noise']}, "
                f"but this experiment plans {exp.privacy.noise_multipliers()} (prepare it with noise=...)"
            )
        ledger = PrivacyLedger.from_dict(state["privacy"]["ledger"])
        _refuse_rounds_past_budget(exp, ledger, state["round"] + 1, cfg.federation.rounds)
    if run_dir is not None:
        run_dir.start(cfg)
    run = run_dir.run_id() if run_dir is not None else secrets.token_hex(8)
    if isinstance(exp.strategy, DPFedAvg):  # the server's noise: from its own secret key
        exp.strategy.noise_key = (
            SecretKey.generate() if run_dir is None
            else SecretKey.load_or_create(run_dir.private() / "coordinator" / "secret.key")
        )
    if run_dir is not None:
        if state["history"]:  # resumed: metrics.jsonl may lag its checkpoint by one write
            io.write_jsonl(run_dir.path / "metrics.jsonl", state["history"])
        if ledger is not None:  # and the ledger file may count a round it lacks (written ahead)
            ledger.save(run_dir.path / LEDGER_FILE)
    keep_last = _selects_last(exp)
    evaluator = Evaluator(exp)
    rounds = cfg.federation.rounds
    bar = tqdm(
        total=rounds, initial=state["round"], desc=f"{cfg.name or 'run'} [{exp.strategy.name}]",
        unit="round", disable=not progress, dynamic_ncols=True,
    )
    try:
        for rnd in range(state["round"] + 1, rounds + 1):
            t0 = time.perf_counter()
            epsilon = planned = None
            if ledger is not None:  # refuse the round before it starts if a site would pass its budget
                planned = _planned_releases(exp, rnd)
                try:
                    epsilon = ledger.check_round(planned, rnd)
                except BudgetExceeded as e:
                    done = f"round {state['round']}" if state["round"] else "no round"
                    raise BudgetExceeded(f"{e}. The run stops here; {done} completed.") from None
                _charge(ledger, rnd, planned)
                if run_dir is not None:  # write-ahead: counted before any site is asked to train
                    ledger.save(run_dir.path / LEDGER_FILE)
            try:
                models, train_info, releases = _train_round_retrying(
                    exp, sites, state["models"], rnd, run, bar if progress else None
                )
            except RoundFailed as e:
                if ledger is None or run_dir is None:
                    raise
                raise RoundFailed(
                    f"{e}. The run's privacy ledger counts round {rnd} for every site (some may have "
                    "released their updates); --resume counts it once"
                ) from None
            if ledger is not None:
                _record_reported(ledger, rnd, releases, planned)
                if run_dir is not None:
                    ledger.save(run_dir.path / LEDGER_FILE)
                state["privacy"]["ledger"] = ledger.to_dict()
            scores_row, scores = evaluator.evaluate(models)
            for key, score in scores.items():
                best = state["best"].get(key)
                if keep_last or best is None or score > best["score"]:
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
                **{k: train_info[k] for k in ("dropped", "attempts") if k in train_info},
                **({} if epsilon is None else {"epsilon": epsilon}),
                **scores_row,
                **_best_rounds(state["best"]),
            }
            state["history"].append(row)
            state["models"], state["round"] = models, rnd
            if run_dir is not None:
                run_dir.save_checkpoint(
                    {**state, "config": cfg.to_dict()}, keep=cfg.output.keep_checkpoints
                )
            bar.set_postfix_str(_progress(exp, row))
            bar.update(1)
    finally:
        bar.close()
    return _finish(exp, state, evaluator, run_dir, sites, run)


def _refuse_rounds_past_budget(exp: Experiment, ledger: PrivacyLedger, first: int, last: int) -> None:
    """BudgetExceeded, before anything is written, if rounds first..last would take a site past its
    budget (a resumed run whose federation.rounds was raised past what the budget was planned for),
    naming the first round that would and the rounds the budget allows."""

    def planned(upto: int) -> dict[str, list[Release]]:
        out: dict[str, list[Release]] = {}
        for rnd in range(first, upto + 1):
            for site, releases in _planned_releases(exp, rnd).items():
                out.setdefault(site, []).extend(releases)
        return out

    def fits(upto: int) -> bool:
        try:
            ledger.check_round(planned(upto), first)
            return True
        except BudgetExceeded:
            return False

    if first > last or fits(last):
        return
    lo, hi = first - 1, last  # rounds up to lo fit (those done), up to hi do not; epsilon only grows
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    try:
        ledger.check_round(planned(hi), first)
    except BudgetExceeded as e:
        detail = str(e).split(": ", 1)[1]
    raise BudgetExceeded(
        f"federation.rounds: {last} is past the privacy budget: round {hi} refused before it starts "
        f"({ledger.accountant} accountant, delta {ledger.delta:g}): counting rounds {first}-{hi}, {detail}; "
        f"allowed: federation.rounds <= {lo} (round {first - 1} completed)"
    )


def _charge(ledger: PrivacyLedger, rnd: int, planned: dict[str, list[Release]]) -> None:
    """Count round `rnd` for every planned site before any site is asked to train (the caller
    saves the ledger file then). A site that drops out, a round given up, a coordinator that dies
    after some sites released their updates: none leaves a ledger that claims less than was
    released. A site that was sent its instructions is charged whether its update arrived or not.
    --resume starts from the last checkpoint's ledger and counts the round once when it completes:
    it re-releases the identical updates (each site replays or re-draws them from its key)."""
    for site, releases in planned.items():
        if len(releases) != 1:
            raise NotImplementedError(f"round {rnd}: site '{site}' trained {len(releases)} times")
        r = releases[0]
        ledger.record(site, rnd, r.noise_multiplier, r.sample_rate, r.steps)


def _record_reported(
    ledger: PrivacyLedger, rnd: int, made: dict[str, list[Release]], planned: dict[str, list[Release]]
) -> None:
    """The ledger counts what the sites report they released (each site holds its own ledger and
    may follow its own config): a release other than the one charged before the round replaces
    it there, with a warning, and may spend more than the plan (the site's own budget still binds
    it). A site charged that reported nothing (dropped) stays charged as planned."""
    for site, releases in made.items():
        if releases == planned.get(site):
            continue
        if len(releases) != 1:
            raise NotImplementedError(f"round {rnd}: site '{site}' trained {len(releases)} times")
        warnings.warn(
            f"round {rnd}: site '{site}' reports it released {releases[0]}, the plan had "
            f"{planned.get(site)}; the privacy ledger counts what the site reports", stacklevel=2,
        )
        ledger.replace(site, rnd, releases[0])


def _privacy_summary(exp: Experiment, state: dict) -> dict:
    """What the run's guarantee is, from the ledger: every epsilon here is the ledger's, and `unit`
    what one guarantee protects ('patient', 'record' when the data names no patients, or 'site')."""
    from privmed.privacy.figures import format_epsilon

    plan = exp.privacy
    if plan is None:
        return {"mode": "none", "epsilon": None, "statement": NO_PRIVACY}
    ledger = PrivacyLedger.from_dict(state["privacy"]["ledger"])
    spent = {site: ledger.epsilon(site) for site in ledger.sites}
    epsilon = max(spent.values())
    return {
        "mode": plan.mode,
        "unit": plan.unit,
        "mechanism": plan.mechanism,
        "epsilon": epsilon,
        "delta": plan.delta,
        "accountant": plan.accountant,
        "budget_epsilon": plan.budget,
        "sites": spent,
        "max_grad_norm": plan.max_grad_norm,
        "plan": plan.to_dict()["sites"],
        # Rounded up: the statement must never claim a smaller epsilon than the ledger backs.
        "statement": guarantee_statement(plan.mode, format_epsilon(epsilon), f"{plan.delta:g}", plan.unit),
    }


def _secure_summary(exp: Experiment) -> dict | None:
    fed = exp.config.federation
    if not fed.secure_aggregation:
        return None
    shares, threshold = exp.config.secagg_shares_threshold
    return {
        "protocol": "SecAgg+ (Flower)",
        "shares": shares,
        "threshold": threshold,
        "clipping_range": fed.secagg_clipping_range,
        "quantization_bits": fed.secagg_quantization_bits,
        "statement": "the coordinator received only the weighted sum of the sites' updates each "
        "round (masked, quantised); sample counts travel in the clear"
        + ("" if exp.config.private else ", and so do training metrics (loss, time)"),
    }


def _selection(exp: Experiment, local: bool) -> str:
    """How the run's result was chosen, in words."""
    if _selects_last(exp):
        return SELECTION_LAST
    metric = {"auc": "AUC", "c_index": "concordance index"}.get(exp.task.headline, exp.task.headline)
    return (SELECTION_LOCAL if local else SELECTION).format(metric=metric)


def _finetune(
    exp: Experiment, state: dict, evaluator: Evaluator, site_rows: dict, sites: Sites, run: str
) -> dict | None:
    """federation.finetune_steps: each site trains the selected global model that many steps on its
    own training data (seeded apart from the rounds), and its own test data scores the result
    (`sites[name]["test_finetuned"]`). Returns the unweighted mean over sites, or None when no
    fine-tuning was asked for."""
    steps = exp.config.federation.finetune_steps
    if not steps or GLOBAL not in state["best"]:
        return None
    weights = state["best"][GLOBAL]["weights"]
    for sd in exp.site_data:
        update = sites.finetune(TrainTask(sd.name, weights), state["round"], steps, run)
        site_rows[sd.name]["test_finetuned"] = (
            {} if sd.test is None else evaluator.score(update.weights, sd.test)
        )
    return mean_metrics([site_rows[sd.name]["test_finetuned"] for sd in exp.site_data])


def _selects_last(exp: Experiment) -> bool:
    """Whether the run's result is its last round's model (see federation.model_selection)."""
    cfg = exp.config
    choice = cfg.federation.model_selection
    return choice == "last" or (choice == "auto" and (cfg.private or not exp.has_validation))


def _progress(exp: Experiment, row: dict) -> str:
    """The progress bar's note: the headline metric on validation and test data."""
    metric = exp.task.headline
    label = {"auc": "AUC", "c_index": "C-index"}.get(metric, metric)
    parts = [] if not row["val"] else [f"val {label} {_fmt(row['val'][metric])}"]
    if row["test"]:
        parts.append(f"test {label} {_fmt(row['test'][metric])}")
    return ", ".join(parts)


def _best_rounds(best: dict) -> dict:
    if GLOBAL in best:
        return {"best_round": best[GLOBAL]["round"]}
    return {"best_round": None, "best_round_per_site": {k: v["round"] for k, v in best.items()}}


def _fmt(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"


def _finish(
    exp: Experiment, state: dict, evaluator: Evaluator, run_dir: RunDir | None, sites: Sites, run: str
) -> RunResult:
    cfg, test, task = exp.config, exp.source.test, exp.task
    history = {row["round"]: row for row in state["history"]}
    predictions: dict[str, np.ndarray] = {"labels": test.labels}
    if test.time is not None:
        predictions["time"] = test.time
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
        pred = evaluator.predict(best["weights"], test.images)
        predictions[f"{task.prediction}:{key}"] = pred.astype(np.float32)
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
        pooled = [site_rows[k]["test_pooled"] for k in state["best"]]
        # every site's model scored the same pooled test patients: their counts are not summed
        test_scores = {**mean_metrics(pooled), **{k: pooled[0][k] for k in ("n", "events") if k in pooled[0]}}
        val_scores = mean_metrics([site_rows[k]["val"] for k in state["best"]])
    else:
        test_scores = task.metrics(predictions[f"{task.prediction}:global"].astype(np.float64), test)
        val_scores = history[best_rounds[GLOBAL]]["val"]
    finetuned = _finetune(exp, state, evaluator, site_rows, sites, run) if not local else None

    src = exp.source
    summary = {
        "name": cfg.name,
        "task": cfg.task,
        "strategy": cfg.federation.strategy,
        "rounds_completed": state["round"],
        "rounds_planned": cfg.federation.rounds,
        "best_round": None if local else best_rounds.get(GLOBAL),
        "selection": _selection(exp, local),
        "test": test_scores,
        "test_mean_over_sites": mean_metrics([r.get("test", {}) for r in site_rows.values()]),
        **({} if finetuned is None else {"test_finetuned_mean_over_sites": finetuned}),
        "val": val_scores,
        "sites": site_rows,
        "wall_seconds": state["wall_seconds"],
        "train_seconds": state["train_seconds"],
        "sample_gradient_steps": state["sample_gradient_steps"],
        "privacy": _privacy_summary(exp, state),
        "secure_aggregation": _secure_summary(exp),
        "data": {
            "source": cfg.data.source,
            "synthetic": src.synthetic,
            "description": src.description,
            "citation": src.citation,
            "class_names": list(src.class_names),
            "image_shape": list(src.train.images.shape[1:]),
            "tabular": src.tabular,
            "feature_names": list(src.feature_names),
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
                "num_classes": task.n_outputs(src),
                "image_size": src.image_size,
                "width": cfg.model.width,
            },
            "class_names": list(src.class_names),
            "state_dicts": {k: m.state_dict() for k, m in models.items()},
            "best_round": best_rounds,
        }
        run_dir.finish(summary, predictions, model_file)
    return RunResult(summary=summary, models=models, predictions=predictions)

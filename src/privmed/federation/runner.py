"""The round loop, in any runner: rounds driven one after another through a `Sites` transport (every
site in this process by default; over Flower from the ServerApp).

    result = run_in_process(exp, run_dir=RunDir(...) or None, resume=False, progress=True)

Each round: the coordinator's ledger is charged (privmed.federation.accounting), the sites train
(privmed.federation.rounds), the models are scored (privmed.federation.evaluation), the selected
model is kept (privmed.federation.selection) and, with a run directory, a checkpoint of the typed
run state (privmed.federation.run_state) is written; at the end privmed.federation.summary writes
the result. Public randomness comes from (seed, round, site), and the sites' DP randomness from
their secret keys (kept under RUN_DIR/private), so a run resumed from round r's checkpoint
continues exactly as the uninterrupted run did.
"""

from __future__ import annotations

import datetime as _dt
import math
import secrets
import time

from tqdm import tqdm

from privmed.errors import RunDirError
from privmed.federation import accounting
from privmed.federation.evaluation import Evaluator
from privmed.federation.experiment import Experiment
from privmed.federation.live import LiveSites, LiveState
from privmed.federation.records import MetricsRow
from privmed.federation.rounds import RoundFailed, train_round_retrying
from privmed.federation.run_state import RunState
from privmed.federation.rundir import RunDir
from privmed.federation.selection import best_rounds, selects_last, update_best
from privmed.federation.summary import RunResult, finish
from privmed.federation.transport import InProcessSites, Sites
from privmed.privacy.ledger import LEDGER_FILE, BudgetExceeded
from privmed.tasks.names import metric_label

__all__ = ["RoundFailed", "RunResult", "run_in_process"]


def run_in_process(
    exp: Experiment, run_dir: RunDir | None = None, resume: bool = False, progress: bool = False,
    sites: Sites | None = None, live: LiveState | None = None,
) -> RunResult:
    """Run the experiment's rounds. `sites`: where the sites train (default: in this process;
    the Flower runner passes its own). `live`: told of every event, for a live dashboard."""
    if sites is None:
        sites = InProcessSites(exp, private=None if run_dir is None else run_dir.private())
    try:
        if live is None:
            return _run(exp, sites, run_dir, resume, progress)
        try:
            result = _run(exp, LiveSites(sites, live), run_dir, resume, progress, live)
        except BaseException as e:
            live.ended(e)
            raise
        live.ended(None)
        return result
    finally:
        sites.close()


def _run(
    exp: Experiment, sites: Sites, run_dir: RunDir | None, resume: bool, progress: bool,
    live: LiveState | None = None,
) -> RunResult:
    cfg = exp.config
    state = _open(exp, run_dir, resume)
    if live is not None:
        live.started(exp, state)
    run = run_dir.run_id() if run_dir is not None else secrets.token_hex(8)
    evaluator = Evaluator(exp, sites)
    evaluator.ledger = None if state.privacy is None else state.privacy.ledger
    bar = tqdm(
        total=cfg.federation.rounds, initial=state.round, desc=f"{cfg.name or 'run'} [{exp.strategy.name}]",
        unit="round", disable=not progress, dynamic_ncols=True,
    )
    try:
        for rnd in range(state.round + 1, cfg.federation.rounds + 1):
            row = _round(exp, state, sites, evaluator, run_dir, run, rnd, bar if progress else None)
            bar.set_postfix_str(_progress(exp, row))
            bar.update(1)
            if live is not None:
                live.round_done(row.to_json())
    finally:
        bar.close()
    if live is not None:
        live.stage(state.round, "the selected model: final scores")
    return finish(exp, state, evaluator, run_dir, sites, run)


def _open(exp: Experiment, run_dir: RunDir | None, resume: bool) -> RunState:
    """The state to start from (the newest checkpoint, when resuming), checked against the
    experiment's privacy plan and budget before anything is written; then the run directory is
    started, and its metrics and ledger files brought in line with that state."""
    ckpt = run_dir.load_latest() if (run_dir and resume) else None
    state = RunState.from_checkpoint(ckpt) if ckpt else RunState.fresh(exp)
    if state.privacy is not None:
        if state.privacy.noise != exp.privacy.noise_multipliers():
            raise RunDirError(
                f"--resume: the run was started with noise multipliers {state.privacy.noise}, "
                f"but this experiment plans {exp.privacy.noise_multipliers()} (prepare it with noise=...)"
            )
        accounting.refuse_rounds_past_budget(exp, state.privacy.ledger, state.round + 1, exp.config.federation.rounds)
    if run_dir is not None:
        run_dir.start(exp.config)
        if state.history:  # resumed: metrics.jsonl may lag its checkpoint by one write
            run_dir.write_metrics(state.history)
        if state.privacy is not None:  # and the ledger file may count a round it lacks (written ahead)
            state.privacy.ledger.save(run_dir.path / LEDGER_FILE)
    return state


def _round(
    exp: Experiment, state: RunState, sites: Sites, evaluator: Evaluator, run_dir: RunDir | None, run: str,
    rnd: int, bar: tqdm | None,
) -> MetricsRow:
    """Round `rnd`: charged, trained, scored, kept; returns its metrics row."""
    t0 = time.perf_counter()
    ledger = None if state.privacy is None else state.privacy.ledger
    epsilon = planned = None
    if ledger is not None:  # refuse the round before it starts if a site would pass its budget
        planned = accounting.planned_releases(exp, rnd)
        try:
            epsilon = ledger.check_round(planned, rnd)
        except BudgetExceeded as e:
            done = f"round {state.round}" if state.round else "no round"
            raise BudgetExceeded(f"{e}. The run stops here; {done} completed.") from None
        accounting.charge(ledger, rnd, planned)
        if run_dir is not None:  # write-ahead: counted before any site is asked to train
            ledger.save(run_dir.path / LEDGER_FILE)
    try:
        models, train_info, releases = train_round_retrying(exp, sites, state.models, rnd, run, bar)
    except RoundFailed as e:
        if ledger is None or run_dir is None:
            raise
        raise RoundFailed(
            f"{e}. The run's privacy ledger counts round {rnd} for every site (some may have "
            "released their updates); --resume counts it once"
        ) from None
    if ledger is not None:
        accounting.record_reported(ledger, rnd, releases, planned)
        if run_dir is not None:
            ledger.save(run_dir.path / LEDGER_FILE)
    _die_here_in_tests(DIE_IN_ROUND, rnd)
    scores_row, scores = evaluator.evaluate(models, rnd, run)
    update_best(state, scores, models, rnd, keep_last=selects_last(exp))
    state.sample_gradient_steps += train_info["sample_gradient_steps"]
    state.train_seconds += train_info["train_seconds"]
    seconds = time.perf_counter() - t0
    state.wall_seconds += seconds
    row = MetricsRow(
        round=rnd,
        # when the round completed (UTC, the coordinator's clock): what a site's privacy statement
        # says of when its releases left it
        finished=_utc_now(),
        seconds=seconds,
        train_seconds=train_info["train_seconds"],
        sample_gradient_steps=state.sample_gradient_steps,
        train_loss=train_info["train_loss"],
        dropped=train_info.get("dropped"),
        attempts=train_info.get("attempts"),
        epsilon=epsilon,
        **scores_row,
        **best_rounds(state.best),
    )
    state.history.append(row)
    state.models, state.round = models, rnd
    if run_dir is not None:
        run_dir.save_checkpoint(state.to_checkpoint(exp.config), state.history,
                                keep=exp.config.output.keep_checkpoints)
    _die_here_in_tests(DIE_AFTER_ROUND, rnd)
    return row


# Test-only crash points (tests/test_resume.py, tests/test_privacy_runs.py): a test kills a run at an
# exact moment by setting one of these in the run's environment, instead of sleeping and guessing.
# Unset (always, outside the tests) they do nothing.
DIE_AFTER_ROUND = "PRIVMED_TEST_DIE_AFTER_ROUND"  # N: right after round N's checkpoint is written
DIE_IN_ROUND = "PRIVMED_TEST_DIE_IN_ROUND"  # N: in round N once the sites have trained and the ledger
# counted what they reported, before the round is scored or checkpointed (a crash mid-round)


def _die_here_in_tests(variable: str, rnd: int) -> None:
    """TEST ONLY. Kill this process with SIGKILL, as a crash or `kill -9` would (no cleanup, no
    exception handler, no flush), when the environment variable `variable` names round `rnd`."""
    import os
    import signal

    if os.environ.get(variable) == str(rnd):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def _utc_now() -> str:
    """The time now, UTC, to the second, as ISO 8601 ("2025-11-28T16:51:21+00:00")."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _progress(exp: Experiment, row: MetricsRow) -> str:
    """The progress bar's note: the headline metric on validation and test data."""
    metric = exp.task.headline
    label = metric_label(metric)
    parts = [] if not row.val else [f"val {label} {_fmt(row.val[metric])}"]
    if row.test:
        parts.append(f"test {label} {_fmt(row.test[metric])}")
    return ", ".join(parts)


def _fmt(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"

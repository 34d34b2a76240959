"""What one site released in a run, as the run's files record it: the rows of the privacy
statement's "what left the site, to whom and when" table (privmed.report.statement). Its public
facts before round 1 (summary.json), each run of rounds in which it sent the same things
(metrics.jsonl: who trained, dropped or scored; the privacy ledger: each DP-SGD release), rounds
the ledger charged that never completed, and the end of the run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from privmed.privacy.accountants import Release
from privmed.report.words import NA, as_dict, as_int, fmt_number, fmt_span, get, num, utc_time

if TYPE_CHECKING:
    from privmed.report.statement import StatementFiles

COORDINATOR = "the coordinator"
TO_WHOM = {  # strategy -> who received a site's update, and what became of it
    "cyclic": "the coordinator, which handed it on as it was to the next site to train",
    "local": "the coordinator, which kept it as this site's own model",
    "fedbn": "the coordinator, which averaged its shared layers with the other sites' and sent "
             "the average to every site",
}
AVERAGED = "the coordinator, which averaged it with the other sites' into the shared model"


@dataclass(frozen=True)
class _Turn:
    """What the site did in one round, as the run's files record it."""

    trained: bool  # its update reached the coordinator
    dropped: bool  # asked to train, its reply did not arrive
    release: Release | None  # the DP-SGD release the ledger counts for it
    loss: bool  # it sent its training loss
    val_n: Any  # validation items it scored (None: it sent no validation scores)
    test_n: Any
    pooled: bool  # its own model was scored on the pooled test data (personalised strategies)
    unscored: bool  # did not answer the round's scoring request


def released_rows(f: StatementFiles, items: str) -> list[dict]:
    """Rows of (when, [(what the site sent, to whom)]): its public facts before round 1, each run
    of rounds in which it sent the same things, rounds the ledger charged that never completed,
    and the end of the run. Consecutive things sent to the same party share one cell."""
    rows = [_facts_row(f, items)]
    releases = dict(f.ledger.releases(f.site)) if f.ledger is not None and f.site in f.ledger.sites else {}
    for first, last, turn in _runs_of_rounds(f, releases):
        rows.append(_round_row(f, first, last, turn, items))
    done = {row["round"] for row in f.metrics}
    for rnd in sorted(r for r in releases if r not in done):
        rows.append(_row(f"Round {rnd}", "", [(
            f"the privacy ledger counts a release in round {rnd}, charged before the round started; "
            "metrics.jsonl records no end of that round, so its update may or may not have left the "
            "site (the ledger counts it either way)", COORDINATOR)]))
    end = _end_row(f, items)
    return rows + ([end] if end else [])


def _row(when: str, dates: str, sent: list[tuple[str, str]]) -> dict:
    """A table row: `sent` as cells of (things sent, to whom), one cell per run of the same party."""
    cells: list[dict] = []
    for what, to in sent:
        if cells and cells[-1]["to"] == to:
            cells[-1]["what"].append(what)
        else:
            cells.append({"what": [what], "to": to})
    return {"when": when, "dates": dates, "cells": cells}


def _facts_row(f: StatementFiles, items: str) -> dict:
    site = as_dict(get(f.summary, "sites", f.site))
    to = "the coordinator, to plan the run"
    if not site:
        return _row("Before round 1", "", [(
            f"its public facts (its numbers of training, validation and test {items}, the data's "
            "shape and classes): their values are in summary.json, which is missing", to)])
    patients = num(get(f.summary, "privacy", "plan", f.site, "n_patients"))
    train = f"{as_int(site.get('n_train'))} training {items}"
    if patients is not None and get(f.summary, "privacy", "unit") == "patient":
        train += f" of {as_int(patients)} patients"
    sent = [(f"its counts: {train}, {as_int(site.get('n_val'))} validation and "
             f"{as_int(site.get('n_test'))} test {items}", to)]
    shape, classes = get(f.summary, "data", "image_shape"), get(f.summary, "data", "class_names")
    if isinstance(shape, list) and shape:
        data = f"the shape of its data ({' × '.join(str(x) for x in shape)})"
        if isinstance(classes, list) and classes:
            data += f" and its classes ({', '.join(map(str, classes))})"
        sent.append((data, to))
    return _row("Before round 1", "", sent)


def _runs_of_rounds(f: StatementFiles, releases: dict[int, Release]) -> list[tuple[int, int, _Turn]]:
    """(first round, last round, what the site did) for each run of consecutive rounds in which
    it did the same."""
    out: list[tuple[int, int, _Turn]] = []
    private = f.mode != "none"
    for row in f.metrics:
        rnd, s = row["round"], f.site
        scores = as_dict(get(row, "sites", s))
        turn = _Turn(
            trained=s in as_dict(row.get("train_loss")),
            dropped=s in (row.get("dropped") or []),
            release=releases.get(rnd),
            loss=s in as_dict(row.get("train_loss")) and not private,
            val_n=get(scores, "val", "n") if as_dict(scores.get("val")) else None,
            test_n=get(scores, "test", "n") if as_dict(scores.get("test")) else None,
            pooled="test_pooled" in scores,
            unscored=s in (row.get("unscored") or []),
        )
        if out and out[-1][2] == turn and out[-1][1] == rnd - 1:
            out[-1] = (out[-1][0], rnd, turn)
        else:
            out.append((rnd, rnd, turn))
    return out


def _round_row(f: StatementFiles, first: int, last: int, t: _Turn, items: str) -> dict:
    when = f"Round {first}" if first == last else f"Rounds {first}–{last}"
    times = [utc_time(row.get("finished")) for row in f.metrics if first <= row["round"] <= last]
    times = [x for x in times if x is not None]
    sent: list[tuple[str, str]] = []
    if t.trained:
        sent.append((_update_words(f, t, items), _to_whom(f)))
    elif t.dropped:
        sent.append(("nothing: it was asked to train, and its reply did not reach the coordinator"
                     + ("; the ledger counts the release all the same" if t.release else ""), COORDINATOR))
    if t.loss:
        sent.append(("its mean training loss", COORDINATOR))
    sent += _score_words(f, t, items)
    if not sent:
        sent.append(("nothing: the site took no part in these rounds", ""))
    return _row(when, fmt_span(times) if times else "", sent)


def _update_words(f: StatementFiles, t: _Turn, items: str) -> str:
    n = num(get(f.summary, "sites", f.site, "n_train"))
    clip = fmt_number(get(f.summary, "privacy", "max_grad_norm"))
    words = "its model update"
    if f.mode == "central":  # the ledger's release is the coordinator's noise, not the site's
        noise = "" if t.release is None else f" of multiplier {fmt_number(t.release.noise_multiplier)}"
        words += (f" each round; the update was clipped to norm {clip} and the coordinator added "
                  f"Gaussian noise{noise} to the sum of all sites' updates")
    elif t.release is not None:
        r = t.release
        words += (f" after {r.steps} DP-SGD step{'s' if r.steps != 1 else ''} each round (patients "
                  f"sampled at rate {fmt_number(r.sample_rate)}, each one's influence clipped to "
                  f"{clip}, Gaussian noise of multiplier {fmt_number(r.noise_multiplier)} added)")
    else:
        words += " each round"
    return words + f", and its number of training {items}" + (f" ({as_int(n)})" if n is not None else "")


def _score_words(f: StatementFiles, t: _Turn, items: str) -> list[tuple[str, str]]:
    out = []
    model = "its own model" if f.strategy in ("local", "fedbn") else "the round's shared model"
    parts = [f"{as_int(n)} {split}" for n, split in ((t.val_n, "validation"), (t.test_n, "test"))
             if n is not None]
    if parts:
        out.append((f"the scores of {model} on its {' and '.join(parts)} {items}, with the counts "
                    "behind them, as computed", COORDINATOR))
    if t.pooled and not f.public_test:
        out.append(("its own model, to be scored", "the other sites with test data, which scored "
                    "it on their test patients"))
    if t.unscored:
        out.append(("no scores: it did not answer the round's scoring request", COORDINATOR))
    return out


def _to_whom(f: StatementFiles) -> str:
    secure = as_dict(get(f.summary, "secure_aggregation"))
    if secure:
        return (f"the coordinator, which by secure aggregation ({secure.get('protocol', NA)}) saw "
                "only the sum of all sites' updates, never this site's alone; its count went in the clear")
    who = TO_WHOM.get(f.strategy, AVERAGED)
    if f.mode == "central":
        who += "; it saw this site's update before it clipped it and added the noise"
    return who


def _end_row(f: StatementFiles, items: str) -> dict | None:
    s = f.summary
    if s is None:
        return None
    site = as_dict(get(s, "sites", f.site))
    to = "the coordinator, who keeps the final model (model.pt) and may share it"
    sent = []
    if num(site.get("n_test")) and not f.public_test:
        sent.append((f"the scores of the final model on its {as_int(site.get('n_test'))} test {items}, "
                     "with the counts behind them", to))
    if as_dict(site.get("test_finetuned")):
        steps = as_int(get(f.config, "federation", "finetune_steps"))
        sent.append((f"the scores of the final model after {steps} more training steps on its own "
                     f"training {items} (that model stayed at the site)", to))
    return _row("End of the run", "", sent or [("nothing more", to)])

"""What one site released in a run, as the run's files record it: the rows of the privacy
statement's "what left the site, to whom and when" table (privmed.report.statement). Its public
facts before round 1 (summary.json), each run of rounds in which it sent the same things
(metrics.jsonl: who trained, dropped or scored; the privacy ledger: each DP-SGD release), rounds
the ledger charged that never completed, and the end of the run. And which of the inversion
audit's attacked updates is the kind this run released (`released_inversion`), so that a line
about inversion speaks of what the run sent, not of a setting it never used."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from privmed import catalog
from privmed.catalog import PrivacyMode
from privmed.report.words import NA, as_dict, as_int, fmt_number, fmt_span, get, num, utc_time

if TYPE_CHECKING:  # for annotations only: the report imports this module without torch
    from privmed.privacy.accountants import Release
    from privmed.report.statement_files import StatementFiles

COORDINATOR = "the coordinator"
# strategy -> who received a site's update, and what became of it (privmed.catalog: `to_whom`;
# the others average it, AVERAGED)
TO_WHOM = {s.name: s.to_whom for s in catalog.STRATEGIES if s.to_whom}
# strategies that keep one model per site
PERSONALISED = tuple(s.name for s in catalog.STRATEGIES if s.personalised)
AVERAGED = "the coordinator, which averaged it with the other sites' into the shared model"
_SAME_NOISE = 1e-9  # relative: a setting's noise multiplier counts as the run's within rounding


@dataclass(frozen=True)
class ReleasedInversion:
    """The update a run's sites released, as the inversion audit names its kind (`view`: 'site-dp',
    'secure-sum' or 'site'), in words; and the attacked setting that stands for it (`key`, its
    audit.json entry `setting`): of the settings of that kind, at no more noise than the run's own,
    the one rebuilt best (highest mean PSNR). key None: the audit attacked no such update."""

    view: str
    words: str
    key: str | None = None
    setting: dict | None = None

    def to_dict(self) -> dict:
        return {"view": self.view, "words": self.words, "setting": self.key}


def released_view(mode: str | None, secure: bool) -> tuple[str, str]:
    """(the inversion audit's view, in words) of what a run with privacy.mode `mode` and secure
    aggregation `secure` sent the coordinator: one site's DP-SGD update under DP-SGD (with secure
    aggregation the coordinator saw only their sum, which shows no more), the secure sum, else
    one site's update as it was."""
    if mode == PrivacyMode.DP_SGD:
        words = "one site's DP-SGD update, with the run's own noise"
        if secure:
            words += " (the coordinator saw only the secure sum of such updates, which shows no more)"
        return "site-dp", words
    if secure:
        return "secure-sum", "the secure sum of the sites' updates, all the coordinator saw of them"
    if mode == PrivacyMode.CENTRAL:
        return "site", ("one site's update without noise (central DP adds its noise after the "
                        "coordinator has seen the update)")
    return "site", "one site's update in the clear (the run had no differential privacy)"


def released_inversion(inversion: Any, mode: str | None, secure: bool,
                       noise: dict[str, float] | None = None) -> ReleasedInversion:
    """Which of an inversion audit's settings (audit.json's "inversion") stands for what the run
    released: those of `released_view`'s kind that ran; under DP-SGD only those whose noise
    multiplier is at most the run's (`noise`: the run's per site, as summary.json's plan gives
    them; the attacked site's, else the smallest), the closest to it kept (as much information as
    the run released, or more). Of these, the one with the highest mean PSNR."""
    view, words = released_view(mode, secure)
    settings = {str(k): as_dict(r) for k, r in as_dict(as_dict(inversion).get("settings")).items()}
    ran = {k: r for k, r in settings.items() if r.get("view") == view and num(get(r, "psnr", "mean")) is not None}
    if view == "site-dp":
        ran = _as_noisy_as_released(ran, noise or {})
    if not ran:
        return ReleasedInversion(view, words)
    key = max(ran, key=lambda k: num(get(ran[k], "psnr", "mean")))
    return ReleasedInversion(view, words, key, ran[key])


def released_inversion_of_run(inversion: Any, summary: Any, config: Any = None) -> ReleasedInversion:
    """`released_inversion` for the run whose summary.json (and config.yaml, for the privacy mode
    of an unfinished run) are given: its privacy mode, secure aggregation and noise per site."""
    privacy = as_dict(get(summary, "privacy"))
    noise = {str(site): as_dict(p).get("noise_multiplier") for site, p in as_dict(privacy.get("plan")).items()}
    mode = privacy.get("mode") or get(config, "privacy", "mode")
    return released_inversion(inversion, mode, bool(get(summary, "secure_aggregation")), noise)


def _as_noisy_as_released(ran: dict[str, dict], noise: dict[str, float]) -> dict[str, dict]:
    """The DP-SGD settings with no more noise than the run released at the attacked site, those
    closest to it; {} when the run recorded no noise multiplier."""
    def ceiling(r: dict) -> float | None:
        own = num(noise.get(str(r.get("site"))))
        known = [x for x in map(num, noise.values()) if x is not None]
        return own if own is not None else (min(known) if known else None)

    fits = {}
    for k, r in ran.items():
        sigma, top = num(r.get("noise_multiplier")), ceiling(r)
        if sigma is not None and top is not None and sigma <= top * (1 + _SAME_NOISE):
            fits[k] = sigma
    if not fits:
        return {}
    closest = max(fits.values())
    return {k: ran[k] for k, s in fits.items() if s >= closest * (1 - _SAME_NOISE)}


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


def released_rows(f: StatementFiles, items: str, units: str | None = None) -> list[dict]:
    """Rows of (when, [(what the site sent, to whom)]): its public facts before round 1, each run
    of rounds in which it sent the same things, rounds the ledger charged that never completed,
    and the end of the run. Consecutive things sent to the same party share one cell. `items`:
    what the data holds (images, records); `units`: the page's unit of privacy, plural (default
    `items`; 'patients' on a page whose unit is the patient)."""
    units = units or items
    rows = [_facts_row(f, items, units)]
    releases = dict(f.ledger.releases(f.site)) if f.ledger is not None and f.site in f.ledger.sites else {}
    for first, last, turn in _runs_of_rounds(f, releases):
        rows.append(_round_row(f, first, last, turn, items, units))
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


def _facts_row(f: StatementFiles, items: str, units: str) -> dict:
    site = as_dict(get(f.summary, "sites", f.site))
    to = "the coordinator, to plan the run"
    if not site:
        return _row("Before round 1", "", [(
            f"its public facts (its numbers of training, validation and test {items}, the data's "
            "shape and classes): their values are in summary.json, which is missing", to)])
    patients = num(get(f.summary, "privacy", "plan", f.site, "n_patients"))
    train = f"{as_int(site.get('n_train'))} training {items}"
    if patients is not None and units == "patients":  # the page counts patients: theirs first
        train = f"{as_int(patients)} training patients ({as_int(site.get('n_train'))} {items})"
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
    private = f.mode != PrivacyMode.NONE
    for row in f.metrics:
        rnd, s = row["round"], f.site
        scores = as_dict(get(row, "sites", s))
        turn = _Turn(
            trained=s in as_dict(row.get("train_loss")),
            dropped=s in (row.get("dropped") or []),
            release=releases.get(rnd),
            loss=s in as_dict(row.get("train_loss")) and not private,
            # how many it scored: its public counts (under privacy the scores' own n is noisy)
            val_n=get(f.summary, "sites", s, "n_val") if as_dict(scores.get("val")) else None,
            test_n=get(f.summary, "sites", s, "n_test") if as_dict(scores.get("test")) else None,
            pooled="test_pooled" in scores,
            unscored=s in (row.get("unscored") or []),
        )
        if out and out[-1][2] == turn and out[-1][1] == rnd - 1:
            out[-1] = (out[-1][0], rnd, turn)
        else:
            out.append((rnd, rnd, turn))
    return out


def _round_row(f: StatementFiles, first: int, last: int, t: _Turn, items: str, units: str) -> dict:
    when = f"Round {first}" if first == last else f"Rounds {first}–{last}"
    times = [utc_time(row.get("finished")) for row in f.metrics if first <= row["round"] <= last]
    times = [x for x in times if x is not None]
    sent: list[tuple[str, str]] = []
    if t.trained:
        sent.append((_update_words(f, t, items, units), _to_whom(f)))
    elif t.dropped:
        sent.append(("nothing: it was asked to train, and its reply did not reach the coordinator"
                     + ("; the ledger counts the release all the same" if t.release else ""), COORDINATOR))
    if t.loss:
        sent.append(("its mean training loss", COORDINATOR))
    sent += _score_words(f, t, items, units)
    if not sent:
        sent.append(("nothing: the site took no part in these rounds", ""))
    return _row(when, fmt_span(times) if times else "", sent)


def _update_words(f: StatementFiles, t: _Turn, items: str, units: str) -> str:
    n = num(get(f.summary, "sites", f.site, "n_train"))
    clip = fmt_number(get(f.summary, "privacy", "max_grad_norm"))
    words = "its model update"
    if f.mode == PrivacyMode.CENTRAL:  # the ledger's release is the site's own noise share
        noise = "" if t.release is None else f" of multiplier {fmt_number(t.release.noise_multiplier)}"
        words += (f" each round, clipped to norm {clip} and with Gaussian noise{noise} added by the "
                  "site itself before it left")
    elif t.release is not None:
        r = t.release
        words += (f" after {r.steps} DP-SGD step{'s' if r.steps != 1 else ''} each round ({units} "
                  f"sampled at rate {fmt_number(r.sample_rate)}, each one's influence clipped to "
                  f"{clip}, Gaussian noise of multiplier {fmt_number(r.noise_multiplier)} added)")
    else:
        words += " each round"
    return words + f", and its number of training {items}" + (f" ({as_int(n)})" if n is not None else "")


def _score_words(f: StatementFiles, t: _Turn, items: str, units: str) -> list[tuple[str, str]]:
    out = []
    model = "its own model" if f.strategy in PERSONALISED else "the round's shared model"
    parts = [f"{as_int(n)} {split}" for n, split in ((t.val_n, "validation"), (t.test_n, "test"))
             if n is not None]
    if parts:
        how = (", as noisy counts (releases the second guarantee counts)"
               if f.mode != PrivacyMode.NONE else ", with the counts behind them, as computed")
        out.append((f"the scores of {model} on its {' and '.join(parts)} {items}{how}", COORDINATOR))
    if t.pooled and not f.public_test:
        out.append(("its own model, to be scored", "the other sites with test data, which scored "
                    f"it on their test {units}"))
    if t.unscored:
        out.append(("no scores: it did not answer the round's scoring request", COORDINATOR))
    return out


def _to_whom(f: StatementFiles) -> str:
    secure = as_dict(get(f.summary, "secure_aggregation"))
    if secure:
        return (f"the coordinator, masked by secure aggregation ({secure.get('protocol', NA)}): one "
                "that follows the protocol unmasks only the sum of the sites' updates, but one that "
                "deviates can isolate this site's (the guarantee does not count on the masking); its "
                "count went in the clear")
    who = TO_WHOM.get(f.strategy, AVERAGED)
    if f.mode == PrivacyMode.CENTRAL:
        who += "; it received this site's update already clipped and noised by the site"
    return who


def _end_row(f: StatementFiles, items: str) -> dict | None:
    s = f.summary
    if s is None:
        return None
    site = as_dict(get(s, "sites", f.site))
    to = "the coordinator, who keeps the final model (model.pt) and may share it"
    sent = []
    if num(site.get("n_test")) and not f.public_test:
        how = ("as noisy counts (a release the second guarantee counts)" if f.mode != PrivacyMode.NONE
               else "with the counts behind them")
        sent.append((f"the scores of the final model on its {as_int(site.get('n_test'))} test {items}, {how}", to))
    if as_dict(site.get("test_finetuned")):
        steps = as_int(get(f.config, "federation", "finetune_steps"))
        how = {PrivacyMode.DP_SGD: f", a DP-SGD turn its ledger counts, and those scores as noisy counts of its test {items}",
               PrivacyMode.NONE: ""}.get(f.mode, f", and those scores as noisy counts of its test {items}")
        sent.append((f"the scores of the final model after {steps} more training steps on its own "
                     f"training {items} (that model stayed at the site){how}", to))
    return _row("End of the run", "", sent or [("nothing more", to)])

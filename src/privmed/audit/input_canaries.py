"""An empirical epsilon from one training run with input canaries (black box): Steinke, Nasr and
Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023, with mislabelled images as
in their black-box experiments.

The auditor re-runs the target's config with m canary patients added to one site. Canary i is a
real image that no site trains on (from the pooled test split, then, when m exceeds it, from the
sites' validation items) with a wrong label: one of the other classes, drawn at random. Each canary
is included with probability 1/2, independently (S_i), as a patient of its own (its own patient
id), so an included one is sampled into DP-SGD's batches, clipped and noised like any patient of
the site (without DP: trained on as any patient, local_epochs passes). The attacker sees only the
final model the run releases, as a black box, and scores canary i by the log-odds the model gives
its canary label, log p / (1 - p): a model that learnt the wrong label trained on the canary.
privmed.audit.epsilon turns the scores into a lower bound on the epsilon of the site's guarantee at
95% confidence. Under DP-SGD that bound must never exceed the epsilon the run claims.

The canaries change no figure of the run's plan. The plan (each site's DP release: noise
multiplier, sample rate, steps) is made from the sites' own counts, as the target's was, before
the canaries join; the site then trains its own patients and the included canaries with that
release, so the site's ledger counts the very release the run claims and the accountant covers a
canary as any patient sampled at that rate. The site's public counts stay its own patients' as
well (`Site.counts`): FedAvg weighs its update by them, and DP-SGD divides its noisy sum by sample
rate x its own patients, as the gradient canaries' hook does (privmed.audit.canaries). Were they
the counts with the canaries, every update would be scaled by how many canaries were included,
which is not the mechanism the accountant analyses.

Black box is weaker than white box: the attacker sees one model after all rounds, not every
update, and one mislabelled image moves that model little. Its bound is expected to sit well below
the gradient canaries' on the same run (Steinke et al. report small black-box bounds even without
DP); it measures what leaks to someone who is given only the model.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from privmed.audit import mia
from privmed.audit.canaries import canary_site
from privmed.audit.epsilon import audit_from_scores
from privmed.audit.membership import Target, logits_of
from privmed.data.base import ImageSet
from privmed.errors import ConfigError
from privmed.federation.experiment import Experiment, build_site, experiment_from_sites
from privmed.federation.runner import run_in_process
from privmed.tasks.base import Classification, get_task

TITLE = "Input canaries, one run (Steinke et al. 2023)"
SEES = "the final shared model only: its outputs on the canaries (black box)"
ASSUMES = ("adds its own canary patients to the site, each with probability 1/2: real images no site "
           "trains on, each with a wrong label drawn at random; knows the canaries and their labels")
DRAWN_FROM = "the pooled test split, then the sites' validation items: images no site trains on"
PATIENT_PREFIX = "audit-canary-"


def canary_pool(target: Target) -> ImageSet:
    """The images canaries are made of, in the order they are used: the pooled test split, then
    every site's validation items (no site trains on either)."""
    parts = [target.source.test, *(sd.val for sd in target.site_data)]
    parts = [p for p in parts if p is not None and len(p)]
    return ImageSet(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))


def draw_input_canaries(
    pool: ImageSet, m: int, n_test: int, n_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index into `pool` (m,), canary label (m,), included (m,) bool): m distinct items, the first
    `n_test` of the pool (the test split) used before the rest, each relabelled with one of the
    other `n_classes` - 1 classes at random and included with probability 1/2."""
    if m > len(pool):
        raise ConfigError(f"--canaries: {m}; the run's test split and validation items hold only "
                          f"{len(pool)} images to make canaries of")
    rng = np.random.default_rng([seed, 0x1C4A])
    order = np.concatenate([rng.permutation(n_test), n_test + rng.permutation(len(pool) - n_test)])
    pick = order[:m]
    labels = (pool.labels[pick] + rng.integers(1, n_classes, size=m)) % n_classes
    return pick, labels.astype(np.int64), rng.random(m) < 0.5


def _canary_patients(train: ImageSet, site: str, images: np.ndarray, labels: np.ndarray) -> ImageSet:
    """`images` as training items of `site` beside `train`, each its own patient (ids
    audit-canary-<i>, where the site names its patients)."""
    patient = None
    if train.patient is not None:
        patient = np.asarray([f"{PATIENT_PREFIX}{i}" for i in range(len(labels))], dtype=object)
        clash = np.intersect1d(patient.astype(str), train.patient.astype(str))
        if len(clash):
            raise ConfigError(f"site '{site}' already has a patient '{clash[0]}'; the canaries' ids would clash")
    where = None if train.site is None else np.full(len(labels), site, dtype=object)
    return ImageSet(images, labels, site=where, patient=patient)


def canary_experiment(target: Target, site: str, images: np.ndarray, labels: np.ndarray) -> Experiment:
    """The target's run, planned from its own sites' counts, with `images` (labelled `labels`) added
    to `site`'s training data as patients of their own: the included canaries. The site keeps its
    own counts and its plan's release (see the module docstring)."""
    cfg = target.config
    exp = experiment_from_sites(cfg, target.site_data, target.facts, target.source)  # the run's own plan
    exp.public_test = None  # nothing is scored that the audit does not need
    own = exp.trainers.get(site)
    if own is None:
        raise ConfigError(f"federation.strategy '{cfg.federation.strategy}': no site trains on its own; "
                          "the canary audit needs a site's training")
    canaries = _canary_patients(own.data.train, site, images, labels)
    trainer = build_site(exp.plan, replace(own.data, train=ImageSet.concat([own.data.train, canaries])))
    trainer.counts = own.counts
    exp.trainers[site] = trainer
    return exp


def input_canary_audit(
    target: Target, m: int = 1000, seed: int = 0, site: str | None = None, beta: float = 0.05
) -> dict:
    """Re-run `target`'s config with `m` mislabelled input canaries at `site` (default: the first)
    and return the empirical epsilon that the final model's outputs on them give, with what the
    attacker saw and assumed."""
    cfg = target.config
    site = canary_site(target, m, site)
    if not isinstance(get_task(cfg.task), Classification):
        raise ConfigError(f"task '{cfg.task}': input canaries are mislabelled items; the task has no class "
                          "per item (allowed: classification, tabular-classification)")
    if target.facts.n_classes < 2:
        raise ConfigError(f"the data has {target.facts.n_classes} class; input canaries need a wrong label")
    start = time.perf_counter()
    pool = canary_pool(target)
    n_test = len(target.source.test)
    pick, labels, included = draw_input_canaries(pool, m, n_test, target.facts.n_classes, seed)
    inc = np.flatnonzero(included)
    exp = canary_experiment(target, site, pool.images[pick[inc]], labels[inc])
    model = run_in_process(exp).model  # the model the run releases
    scores = mia.true_class_confidence(logits_of(model, pool.images[pick]), labels)
    privacy = target.summary.get("privacy") or {}
    delta = privacy.get("delta") or 0.0
    sites = privacy.get("sites") if isinstance(privacy.get("sites"), dict) else {}
    claimed = sites.get(site, privacy.get("epsilon"))  # the site's own epsilon, what a canary there has
    stats = audit_from_scores(scores, included, delta=delta, beta=beta, seed=seed)
    separation = mia.membership_metrics(scores, included, seed=seed)  # descriptive only: not the bound
    return {
        "title": TITLE, "view": "black box", "sees": SEES, "assumes": ASSUMES, "site": site, "canaries": m,
        "included": int(included.sum()), "drawn_from": DRAWN_FROM, "from_test": int((pick < n_test).sum()),
        "score": "log-odds of the canary's wrong label, log p / (1 - p), from the final model",
        "epsilon_lower": stats["epsilon_lower"], "confidence": 1 - beta, "delta": delta,
        "claimed_epsilon": claimed,
        "guesses": stats["r"], "correct": stats["v"],
        # how far the scores separate the trained canaries from the others (after the fact, with
        # their inclusion): a weak separation is why a black-box bound stays near 0
        "roc_auc": separation["roc_auc"], "roc_auc_ci": separation["roc_auc_ci"],
        "seconds": round(time.perf_counter() - start, 1),
    }

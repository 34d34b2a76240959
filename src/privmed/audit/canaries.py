"""An empirical epsilon from one training run with gradient canaries (white box): Steinke, Nasr and
Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023, with Dirac canaries
(a gradient on one coordinate) as in their white-box experiments.

The auditor re-runs the target's config with m canary patients added to one site. Canary i is a
patient whose gradient is always C e_j(i): norm C (the clipping norm, privacy.max_grad_norm) on one
coordinate j(i) of the model's parameters, distinct for every canary. Each canary is included with
probability 1/2, independently (S_i); an included one joins each step's batch as any patient does
(DP-SGD: with the run's sampling rate; plain training: about once an epoch) and its gradient enters
the step as a patient's would (after DP-SGD's clipping, so the noise and the accountant treat it
as one more patient). The attacker is the coordinator without secure aggregation: it sees the
site's update every round, and scores canary i by how far those updates moved coordinate j(i)
down (-sum over rounds of Δ_r[j(i)]). privmed.audit.epsilon turns the scores into a lower bound on
the epsilon of the site's guarantee at 95% confidence. Under DP-SGD that bound must never exceed the
epsilon the run claims; without DP the canaries stand out and the bound is large.

The canaries are auditor's patients: they change no count the run's plan is made from (the DP
release, noise multiplier and sampling rate, stays the run's).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from privmed.audit.epsilon import audit_from_scores
from privmed.audit.membership import Target
from privmed.errors import ConfigError
from privmed.federation.experiment import experiment_from_sites
from privmed.federation.runner import run_in_process

TITLE = "Gradient canaries, one run (Steinke et al. 2023)"
SEES = ("the coordinator without secure aggregation: one site's model update every round, "
        "as numbers (white box)")
ASSUMES = ("adds its own canary patients to the site, each with probability 1/2, whose gradient is C "
           "on one coordinate; knows which coordinates")


@dataclass
class GradientCanaries:
    """m Dirac canaries on a model's trainable parameters: canary i sits on parameter `param[i]`
    (index among the site's trainable parameters) at flat position `flat[i]`; `included` (m,) says
    which ones train; `clip`: their gradient's norm C. Called as a Site's audit_hook."""

    param: np.ndarray  # (m,) int
    flat: np.ndarray  # (m,) int
    included: np.ndarray  # (m,) bool
    clip: float
    rng: np.random.Generator  # which included canaries join each step

    @classmethod
    def draw(cls, params: list[nn.Parameter], m: int, clip: float, seed: int) -> GradientCanaries:
        """m distinct coordinates drawn uniformly over `params`, and who is included (p = 1/2)."""
        sizes = np.array([p.numel() for p in params])
        if m > sizes.sum():
            raise ConfigError(f"--canaries: {m}; the model has only {int(sizes.sum())} parameters to put them on")
        rng = np.random.default_rng([seed, 0xCA7A])
        pos = np.sort(rng.choice(int(sizes.sum()), size=m, replace=False))
        param = np.searchsorted(np.cumsum(sizes), pos, side="right")
        flat = pos - np.concatenate([[0], np.cumsum(sizes)])[param]
        return cls(param, flat, rng.random(m) < 0.5, float(clip), np.random.default_rng([seed, 0xCA7B]))

    @torch.no_grad()
    def __call__(self, params: list[nn.Parameter], rate: float, divisor: float) -> None:
        idx = np.flatnonzero(self.included)
        for i in idx[self.rng.random(len(idx)) < rate]:
            grad = params[self.param[i]].grad
            if grad is not None:
                grad.view(-1)[self.flat[i]] += self.clip / divisor


def canary_site(target: Target, m: int, site: str | None) -> str:
    """The site `m` canaries join (default: the first of the run's); ConfigError for a site the run
    does not have, or fewer than 2 canaries. Cheap: `privmed audit` checks it before any attack."""
    names = [sd.name for sd in target.site_data]
    site = site or names[0]
    if site not in names:
        raise ConfigError(f"--site: '{site}' is not a site of this run (its sites: {', '.join(names)})")
    if m < 2:
        raise ConfigError(f"--canaries: {m}; the audit needs at least 2")
    return site


def canary_audit(target: Target, m: int = 1000, seed: int = 0, site: str | None = None, beta: float = 0.05) -> dict:
    """Re-run `target`'s config with `m` gradient canaries at `site` (default: the first) and return
    the empirical epsilon they give, with what the attacker saw and assumed."""
    cfg = target.config
    site = canary_site(target, m, site)
    start = time.perf_counter()
    exp = experiment_from_sites(cfg, target.site_data, target.facts, target.source)
    exp.public_test = None  # nothing is scored that the audit does not need
    trainer = exp.trainers.get(site)
    if trainer is None:
        raise ConfigError(f"federation.strategy '{cfg.federation.strategy}': no site trains on its own; "
                          "the canary audit needs a site's update")
    params = [p for _, p in trainer._params]
    positions = [pos for pos, _ in trainer._params]
    canaries = GradientCanaries.draw(params, m, cfg.privacy.max_grad_norm, seed)
    trainer.audit_hook = canaries
    moved = np.zeros(m)
    train = trainer.train

    def train_and_watch(task, rnd, *args, **kwargs):  # noqa: ANN001, ANN202
        update = train(task, rnd, *args, **kwargs)
        for k in np.unique(canaries.param):  # what the coordinator sees: the site's update
            sel = canaries.param == k
            j = positions[k]
            change = np.asarray(update.weights[j], np.float64).ravel() - np.asarray(task.weights[j], np.float64).ravel()
            moved[sel] += change[canaries.flat[sel]]
        return update

    trainer.train = train_and_watch  # the audit watches this one instance; nothing else changes
    run_in_process(exp)
    privacy = target.summary.get("privacy") or {}
    delta = privacy.get("delta") or 0.0
    sites = privacy.get("sites") if isinstance(privacy.get("sites"), dict) else {}
    claimed = sites.get(site, privacy.get("epsilon"))  # the site's own epsilon, what a canary there has
    stats = audit_from_scores(-moved, canaries.included, delta=delta, beta=beta, seed=seed)
    return {
        "title": TITLE, "view": "white box", "sees": SEES, "assumes": ASSUMES, "site": site, "canaries": m,
        "included": int(canaries.included.sum()), "clip": cfg.privacy.max_grad_norm,
        "epsilon_lower": stats["epsilon_lower"], "confidence": 1 - beta, "delta": delta,
        "claimed_epsilon": claimed,
        "guesses": stats["r"], "correct": stats["v"],
        "seconds": round(time.perf_counter() - start, 1),
    }




"""A hospital as the federation sees it, in any runner: it trains and scores when instructed, and
guards its patients' privacy itself, against a coordinator that may send anything.

    guard = SiteGuard.open(name, LedgerTerms(...), state_dir)     # its key and ledger (one per state)
    client = SiteClient(site, guard, GuardPolicy.from_setup(setup, require_dp), seed, setup.digest)
    update = client.train(Instruction(task, rnd, run=...))         # SiteRefused when the guard says no
    scores = client.score(weights, ("val",), rnd, run, model_key)   # noisy counts under privacy
    reply = client.contribute(Instruction(task, rnd, run=..., secure=True, ...))   # SecAgg+ input

`SiteGuard` (privmed.federation.guard) is what the site keeps to itself (in a deployment, in the
hospital's own state directory; in a simulation, under RUN_DIR/private): its secret key, from which
all its DP randomness derives; its own ledger, with the budget of its own config, one line for its
training patients and one for its validation and test patients; and its last release, so that a
retried instruction gets the very same reply. `GuardPolicy` (privmed.federation.policy) is what one
run asks of it (from the run's setup) and what the site accepts. Under secure aggregation the client
replies with its contribution to the secure sum (`contribute`, privmed.federation.secure); the
platform only transports it.

Every reply computed from patients is bound to a digest of everything that shaped it (the
instruction's weights, round, run and purpose, and the run's whole setup: config, noise, sampling,
clipping, learning rate, label shares). Its DP randomness derives from that digest, and the ledger
keeps the digest with the release: each (run, round) is released once; only the very same request
again (a retry, or a round re-run after --resume) gets the same reply, charged once. Before anything
touches a patient the site refuses:

- a run whose privacy mode its policy does not accept (by default only DP it runs itself: DP-SGD, or
  central mode as a noise share it adds here), or a noise multiplier of 0, or any release its own
  accountant cannot bound or that would take it past its budget;
- a purpose other than training a round, or fine-tuning under DP-SGD as the plan counts it;
- weights that are not finite, or not of the run's model (count, shapes, dtypes);
- another request for a (run, round) it already released, and a run id it has seen with other
  privacy parameters;
- scoring past the plan's quota (one scoring of a split per round and model, as many as the plan
  counts), a split other than validation or test, or a run in a private mode without a scoring plan.

Under any privacy mode, nothing computed from training patients outside the mechanism leaves the
site: the training loss and the time training took stay here.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from privmed.federation.facts import SiteProfile
from privmed.federation.guard import (
    CACHE_FILE, KEY_FILE, LEDGER_FILE, LOCK_FILE, LedgerTerms, SiteGuard, SiteStateError, lock_state,
)
from privmed.federation.instructions import Instruction, described, release_digest, scoring_digest
from privmed.federation.policy import GuardPolicy
from privmed.federation.secure import SecureContribution, reported_clipping, secure_contribution
from privmed.federation.site import Site, derive_seed
from privmed.federation.strategies import GLOBAL, SiteUpdate, contribution
from privmed.privacy.site_ledger import SCORED_SPLITS, SiteRefused

# what the site's guard and policy were imported from before they had modules of their own
__all__ = [
    "CACHE_FILE", "KEY_FILE", "LEDGER_FILE", "LOCK_FILE", "PUBLIC_METRICS", "GuardPolicy", "LedgerTerms",
    "SecureContribution", "SiteClient", "SiteGuard", "SiteStateError", "lock_state",
]

# metrics a site's update may carry under a privacy mode: public figures and the release itself
PUBLIC_METRICS = ("sample_gradient_steps", "optimizer_steps")


class SiteClient:
    """One hospital's side of every runner, with no platform in it: `train(instruction)` through its
    guard, `score(weights, splits, ...)` on its own validation and test patients (metrics and
    mergeable counts, noisy under privacy), `finetune(instruction)` (metrics only) and
    `describe()` (its public counts)."""

    def __init__(self, site: Site, guard: SiteGuard, policy: GuardPolicy, seed: int, setup_digest: str = ""):
        self.site, self.guard, self.policy, self.seed = site, guard, policy, seed
        self.setup_digest = setup_digest

    @property
    def name(self) -> str:
        return self.site.name

    def describe(self) -> dict:
        """The site's public facts: its name and counts (privmed.federation.facts.SiteProfile)."""
        return {"site": self.site.name, **SiteProfile.of(self.site.data).to_dict()}

    def train(self, ins: Instruction) -> SiteUpdate:
        if ins.task.site != self.site.name:
            raise SiteRefused(f"site '{self.site.name}' got an instruction for site '{ins.task.site}'")
        with self.guard.lock:
            release = self.policy.check_training(self.name, ins)
            self._check_weights(ins.task.weights, ins.task.correction)
            digest = release_digest(ins, self.setup_digest)
            if release is not None:
                cached = self.guard.admit(ins, digest, release)
                if cached is not None:
                    return cached
                self.guard.bind_run(ins.run, self.policy, described(ins))
            steps = ins.steps if ins.purpose == "finetune" else None
            generator = self.guard.generator(digest) if self.policy.dp_sgd else None
            update = self.site.train(ins.task, ins.rnd, steps=steps, purpose=ins.purpose, generator=generator)
            if self.policy.central:
                update = self._noise_share(ins, update, digest)
            update = self._released(update)
            if release is not None:
                self.guard.record(ins, digest, update, release)
            return update

    def finetune(self, ins: Instruction) -> dict:
        """Fine-tune as instructed (purpose 'finetune': under DP-SGD the turn the plan counts,
        charged) and score the result on the site's own test data: only its metrics leave the site
        (under privacy, from noisy counts); the fine-tuned model stays."""
        update = self.train(ins)
        return self.score(update.weights, ("test",), ins.rnd, ins.run, f"finetuned:{self.name}")["test"][0]

    def score(self, weights: list, splits: tuple[str, ...], rnd: int = 0, run: str = "",
              model_key: str = GLOBAL) -> dict[str, tuple[dict, dict]]:
        """Per split ('val', 'test'): the metrics of `weights` on the site's own patients of that
        split and the counts pooled figures are merged from (({}, {}) without such data). Under
        privacy both come from noisy counts (privmed.privacy.noisy_counts), one release per split,
        round and model, within the plan's quota and the site's budget."""
        with self.guard.lock:
            for split in splits:
                if split not in SCORED_SPLITS:
                    raise SiteRefused(f"site '{self.name}' refused scoring split '{split}': it scores only "
                                      f"its {' and '.join(SCORED_SPLITS)} patients, never its training patients")
            self._check_weights(weights)
            if not self.policy.private:
                if self.policy.require_dp:
                    raise SiteRefused(f"site '{self.name}' refused scoring for run {run or '?'}: its own "
                                      "config takes part only under DP, and this run's privacy.mode is 'none'")
                return {split: self.site.score(weights, split) for split in splits}
            return {split: self._score_private(weights, split, rnd, run, model_key) for split in splits}

    def _score_private(self, weights: list, split: str, rnd: int, run: str, model_key: str) -> tuple[dict, dict]:
        if not self.site.holds(split):
            return {}, {}
        digest = scoring_digest(run, rnd, split, model_key, weights, self.setup_digest)
        self.guard.bind_run(run, self.policy, f"scoring in round {rnd}")
        new = self.guard.admit_scoring(self.policy, run, rnd, split, model_key, digest)
        noise = self.policy.scoring.noise[split]
        scores = self.site.score(weights, split, noise_multiplier=noise,
                                 rng=self.guard.numpy_generator("score", digest))
        if new:
            self.guard.record_scoring(run, rnd, split, model_key, digest, noise)
        return scores

    def contribute(self, ins: Instruction) -> SecureContribution:
        """Train as `ins` says (through the guard, as `train`) and reply with the site's
        contribution to the secure sum: its change clipped to `ins.clip` (under central mode the
        change the site already clipped and noised), its weight, and the seed of SecAgg+'s
        rounding. SiteRefused as `train`."""
        update = self.train(ins)
        arrays, weight, clipped = secure_contribution(ins, update, noised=self.policy.central)
        update = reported_clipping(ins, update, clipped, private=self.policy.private)
        return SecureContribution(update, arrays, weight, self.secagg_seed(ins))

    def secagg_seed(self, ins: Instruction) -> int:
        """The 63-bit seed of SecAgg+'s stochastic rounding for this reply."""
        if not self.policy.private:
            return derive_seed(self.seed, "secagg", ins.rnd, self.name)
        return self.guard.key.legacy_seed("secagg", release_digest(ins, self.setup_digest))

    # ------------------------------------------------------------------ helpers
    def _check_weights(self, weights: list, correction: list | None = None) -> None:
        """SiteRefused, before any patient is touched, when `weights` (and a SCAFFOLD correction)
        are not the run's model: the count, shapes and dtypes of its state, every entry finite."""
        try:
            self.site.check_weights(weights)
            if correction is not None:
                self.site.check_weights(correction, what="correction")
        except ValueError as e:
            raise SiteRefused(f"site '{self.name}' refused the request: {e}") from None

    def _noise_share(self, ins: Instruction, update: SiteUpdate, digest: str) -> SiteUpdate:
        """Central mode: the update as it leaves the site, its change clipped to the setup's norm
        and Gaussian noise of std noise multiplier x that norm added to every float entry, drawn
        from the site's key (a change that is not finite counts as none)."""
        sent = ins.task.weights
        change = contribution(sent, update.weights, self.policy.clip)
        if not all(np.all(np.isfinite(c)) for c in change):
            change = [np.zeros_like(c) for c in change]
        rng = self.guard.numpy_generator("central", digest)
        std = self.policy.release.noise_multiplier * self.policy.clip
        weights = []
        for w, c in zip(sent, change):
            w = np.asarray(w)
            if np.issubdtype(w.dtype, np.floating):
                w = (w.astype(np.float64) + c + rng.normal(0.0, std, size=c.shape)).astype(w.dtype)
            weights.append(w)
        return replace(update, weights=weights, release=self.policy.release)

    def _released(self, update: SiteUpdate) -> SiteUpdate:
        """What of `update` may leave the site: under a privacy mode only the weights, the public
        counts and the release (no training loss, no timing)."""
        if not self.policy.private:
            return update
        metrics = {k: v for k, v in update.metrics.items() if k in PUBLIC_METRICS}
        metrics["train_loss"] = math.nan
        return replace(update, metrics=metrics)

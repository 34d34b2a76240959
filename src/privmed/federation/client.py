"""A hospital as the federation sees it, in any runner: it trains and scores when instructed, and
guards its patients' privacy itself, against a coordinator that may send anything.

    guard = SiteGuard.open(name, LedgerTerms(...), state_dir)     # its key and ledger (one per state)
    client = SiteClient(site, guard, GuardPolicy.from_setup(setup, require_dp), seed, setup.digest)
    update = client.train(Instruction(task, rnd, run=...))         # SiteRefused when the guard says no
    scores = client.score(weights, ("val",), rnd, run, model_key)   # noisy counts under privacy

`SiteGuard` is what the site keeps to itself (in a deployment, in the hospital's own state
directory; in a simulation, under RUN_DIR/private): its secret key, from which all its DP randomness
derives; its own ledger, with the budget of its own config, one line for its training patients and
one for its validation and test patients; and its last release, so that a retried instruction gets
the very same reply. `GuardPolicy` is what one run asks of it (from the run's setup) and what the
site accepts.

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

import hashlib
import math
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from privmed import io
from privmed.config import SitePrivacyConfig
from privmed.errors import PrivmedError
from privmed.federation.facts import SiteProfile
from privmed.federation.instructions import Instruction, release_digest, scoring_digest
from privmed.federation.site import Site, derive_seed
from privmed.federation.strategies import GLOBAL, SiteUpdate, contribution
from privmed.privacy.accountants import Release
from privmed.privacy.dpsgd import MAX_NOISE_MULTIPLIER, MIN_NOISE_MULTIPLIER
from privmed.privacy.ledger import BudgetExceeded, LedgerError
from privmed.privacy.plan import PrivacyPlan, ScoringPlan
from privmed.privacy.secret import SecretKey
from privmed.privacy.site_ledger import (
    SCORED_SPLITS, SITE_LEDGER_FILE, ScoringRelease, SiteLedger, SiteRefused, SiteRelease,
)

KEY_FILE = "secret.key"
LEDGER_FILE = SITE_LEDGER_FILE
CACHE_FILE = "last_release.pt"
# metrics a site's update may carry under a privacy mode: public figures and the release itself
PUBLIC_METRICS = ("sample_gradient_steps", "optimizer_steps", "release")


class SiteStateError(PrivmedError):
    """A site's state directory cannot be used safely (its ledger lost, another process on it)."""


@dataclass(frozen=True)
class LedgerTerms:
    """What the site's own ledger counts against: its budget (per patient, for each line), delta,
    accountant, and the unit its training guarantee protects."""

    budget_epsilon: float = math.inf
    delta: float = 1e-5
    accountant: str = "prv"
    unit: str = "patient"

    @classmethod
    def for_hospital(cls, own: SitePrivacyConfig, patient_ids: bool) -> LedgerTerms:
        """A hospital's terms: its own config's, whatever the coordinator planned."""
        return cls(math.inf if own.max_epsilon is None else own.max_epsilon, own.delta, own.accountant,
                   "patient" if patient_ids else "record")

    @classmethod
    def from_plan(cls, plan: PrivacyPlan | None, patient_ids: bool) -> LedgerTerms:
        """A simulated site's terms: the run's budget (a site of a run without privacy keeps a
        ledger that never counts anything)."""
        unit = "patient" if patient_ids else "record"
        if plan is None:
            return cls(unit=unit)
        return cls(plan.budget, plan.delta, plan.accountant, unit)


@dataclass(frozen=True)
class GuardPolicy:
    """What one run asks of the site (from the run's setup) and whether the site accepts it."""

    mode: str = "none"  # "none", "dp-sgd" or "central"
    release: Release | None = None  # dp-sgd: one training turn; central: one round's noise share
    finetune: Release | None = None  # dp-sgd: the fine-tuning turn the plan counts
    scoring: ScoringPlan | None = None  # how scorings are released (None: exact, without privacy)
    clip: float | None = None  # central: the norm the site clips its update to
    max_grad_norm: float = 1.0  # dp-sgd: the clipping norm of each patient's gradient
    grad_sample_mode: str = "ew"
    rounds: int = 0  # the run's planned rounds: what a scoring request's round may be
    require_dp: bool = False  # take part only under DP the site runs itself

    @classmethod
    def from_setup(cls, setup, require_dp: bool) -> GuardPolicy:  # noqa: ANN001 - a SiteSetup
        """The policy for the run `setup` describes (privmed.federation.experiment.SiteSetup)."""
        privacy = setup.config.get("privacy", {})
        fed = setup.config.get("federation", {})
        return cls(
            mode=privacy.get("mode", "none"),
            release=None if setup.release is None else Release(*setup.release),
            finetune=None if setup.finetune is None else Release(*setup.finetune),
            scoring=None if setup.scoring is None else ScoringPlan.from_dict(setup.scoring),
            clip=setup.clip,
            max_grad_norm=float(privacy.get("max_grad_norm", 1.0)),
            grad_sample_mode=str(privacy.get("grad_sample_mode", "ew")),
            rounds=int(fed.get("rounds", 0)),
            require_dp=require_dp,
        )

    @property
    def private(self) -> bool:
        return self.mode != "none"

    @property
    def dp_sgd(self) -> bool:
        return self.mode == "dp-sgd"

    def terms(self) -> str:
        """A digest of the run's privacy parameters: a run id keeps the ones it was first seen with."""
        scoring = None if self.scoring is None else sorted(self.scoring.noise.items())
        fields = (self.mode, self.release, self.finetune, scoring, self.clip, self.max_grad_norm,
                  self.grad_sample_mode)
        return hashlib.sha256(repr(fields).encode()).hexdigest()

    def check_training(self, site: str, ins: Instruction) -> Release | None:
        """The release training for `ins` makes (None without privacy); SiteRefused when this
        policy does not allow it."""
        where = _what(ins)
        if not self.private:
            if self.require_dp:
                raise SiteRefused(
                    f"site '{site}' refused {where}: its own config (privacy.require_dp, the default) "
                    "takes part only under DP it runs itself (privacy.mode dp-sgd, or central), and "
                    "this run's privacy.mode is 'none'"
                )
            return None
        if self.mode == "central":
            if ins.purpose != "train":
                raise SiteRefused(f"site '{site}' refused {where}: under privacy.mode central it only "
                                  "trains for the rounds (its update leaves it clipped and noised)")
            if self.release is None or self.clip is None or not self.clip > 0:
                raise SiteRefused(f"site '{site}' refused {where}: privacy.mode central, but the setup "
                                  "names no noise share and clipping norm for the site to add its noise")
            return self.release
        if ins.purpose == "train":
            release = self.release
        elif ins.purpose == "finetune" and self.finetune is not None and ins.steps == self.finetune.steps:
            release = self.finetune
        else:
            raise SiteRefused(
                f"site '{site}' refused {where}: under privacy.mode dp-sgd it trains only for the rounds "
                "and the fine-tuning turn its privacy plan counts"
            )
        if release is None:
            raise SiteRefused(f"site '{site}' refused {where}: privacy.mode dp-sgd, but the setup "
                              "names no release")
        if release.noise_multiplier and not MIN_NOISE_MULTIPLIER <= release.noise_multiplier <= MAX_NOISE_MULTIPLIER:
            raise SiteRefused(
                f"site '{site}' refused {where}: noise multiplier {release.noise_multiplier:g} (allowed: "
                f"{MIN_NOISE_MULTIPLIER:g} to {MAX_NOISE_MULTIPLIER:g}; below {MIN_NOISE_MULTIPLIER:g} the "
                "noise sampler's finite support would tell patients apart)"
            )
        return release


class SiteGuard:
    """A site's key, ledger and last release; `state_dir` None keeps them in memory only. One
    guard per state directory: every run and setup of the site goes through it (one release at a
    time)."""

    def __init__(self, site: str, key: SecretKey, ledger: SiteLedger, state_dir: Path | None):
        self.site, self.key, self.ledger, self.state_dir = site, key, ledger, state_dir
        self.lock = threading.RLock()
        self._cache: tuple[str, SiteUpdate] | None = None

    @classmethod
    def open(cls, site: str, terms: LedgerTerms, state_dir: Path | None = None) -> SiteGuard:
        """The guard kept in `state_dir` (owner-only; created with a new key and an empty ledger
        the first time). SiteStateError when the directory holds a key but its ledger is missing
        or unreadable: the site's history and budget would be gone, so it refuses to go on."""
        if state_dir is None:
            ledger = SiteLedger(site, terms.budget_epsilon, terms.delta, terms.accountant, terms.unit)
            return cls(site, SecretKey.generate(), ledger, None)
        state_dir = Path(state_dir)
        _private_dir(state_dir)
        key_path, ledger_path = state_dir / KEY_FILE, state_dir / LEDGER_FILE
        if key_path.exists():
            key = SecretKey.load(key_path)
            if not ledger_path.exists():
                raise SiteStateError(
                    f"{ledger_path}: missing, beside this site's key {key_path}: the ledger of everything "
                    "the site released is gone, so it cannot keep its budget; restore the file from a "
                    "backup, or (knowing its history is lost) start a new state directory"
                )
            try:
                ledger = SiteLedger.load(ledger_path)
            except LedgerError as e:
                raise SiteStateError(f"{e}; the site refuses to train or score without its ledger") from None
            if ledger.site != site:
                raise SiteStateError(f"{ledger_path}: the ledger of site '{ledger.site}', not '{site}'")
        else:
            key = SecretKey.load_or_create(key_path)
            ledger = SiteLedger(site, terms.budget_epsilon, terms.delta, terms.accountant, terms.unit)
        # the budget, delta and accountant are the site's config's now; epsilons are recomputed
        ledger.budget_epsilon, ledger.delta, ledger.accountant = terms.budget_epsilon, terms.delta, terms.accountant
        ledger.unit = terms.unit
        ledger.save(ledger_path)
        guard = cls(site, key, ledger, state_dir)
        guard._load_cache()
        return guard

    # ------------------------------------------------------------------ randomness
    def generator(self, digest: str) -> torch.Generator:
        """The torch generator of one training release (Poisson batches, augmentation, DP noise)."""
        return self.key.torch_generator("train", digest)

    def numpy_generator(self, purpose: str, digest: str) -> np.random.Generator:
        return self.key.numpy_generator(purpose, digest)

    # ------------------------------------------------------------------ training
    def bind_run(self, run: str, policy: GuardPolicy, what: str) -> None:
        if self.ledger.bind_run(run, policy.terms(), what):
            self._save_ledger()

    def admit(self, ins: Instruction, digest: str, release: Release) -> SiteUpdate | None:
        """The cached reply when the request with this digest was answered before; None when the
        site may train for it; SiteRefused otherwise."""
        where = _what(ins)
        done = self.ledger.find(ins.run, ins.rnd, ins.purpose)
        if done is not None:
            if done.digest != digest:
                raise SiteRefused(
                    f"site '{self.site}' refused {where}: it already released that round for other "
                    "weights or settings, and a second release of one round would let the two replies "
                    "be compared"
                )
            if self._cache is not None and self._cache[0] == digest:
                return self._cache[1]
            return None  # the same request, reply no longer cached: the key replays it exactly
        try:
            self.ledger.check(release, where)
        except BudgetExceeded as e:
            raise SiteRefused(str(e)) from None
        return None

    def record(self, ins: Instruction, digest: str, update: SiteUpdate, release: Release) -> None:
        """Count the release in the site's ledger and keep the reply, before it leaves the site
        (both written atomically: the reply first, so a counted release always has its reply)."""
        if self.ledger.find(ins.run, ins.rnd, ins.purpose) is not None:
            return  # replayed identically: counted once
        self._cache = (digest, update)
        if self.state_dir is not None:
            io.torch_save(self.state_dir / CACHE_FILE, _update_to_file(digest, update), private=True)
        self.ledger.add(SiteRelease(ins.run, ins.rnd, ins.purpose, digest, release.noise_multiplier,
                                    release.sample_rate, release.steps))
        self._save_ledger()

    # ------------------------------------------------------------------ scoring
    def admit_scoring(self, policy: GuardPolicy, run: str, rnd: int, split: str, model_key: str,
                      digest: str) -> bool:
        """True when this scoring is new (to be charged by `record_scoring`), False when it repeats
        one already released with the same digest; SiteRefused past the quota or the budget."""
        where = f"scoring {split} for model '{model_key}' in round {rnd} of run {run or '?'}"
        done = self.ledger.find_scoring(run, rnd, split, model_key)
        if done is not None:
            if done.digest != digest:
                raise SiteRefused(
                    f"site '{self.site}' refused {where}: it already scored that split in that round "
                    "for other weights or settings (one scoring per round and model)"
                )
            return False
        plan = policy.scoring
        if plan is None or split not in plan.noise:
            raise SiteRefused(f"site '{self.site}' refused {where}: this run's scoring plan has no "
                              f"release for its {split} patients")
        if not 1 <= rnd <= policy.rounds:
            raise SiteRefused(f"site '{self.site}' refused {where}: the run has rounds 1 to {policy.rounds}")
        made = len(self.ledger.scorings_of(run, split))
        if made >= plan.releases[split]:
            raise SiteRefused(f"site '{self.site}' refused {where}: it has released the {made} scorings "
                              f"of its {split} patients this run's plan counts")
        try:
            self.ledger.check_scoring(split, plan.release(split), where)
        except BudgetExceeded as e:
            raise SiteRefused(str(e)) from None
        return True

    def record_scoring(self, run: str, rnd: int, split: str, model_key: str, digest: str, noise: float) -> None:
        self.ledger.add_scoring(ScoringRelease(run, rnd, split, model_key, digest, noise))
        self._save_ledger()

    def _save_ledger(self) -> None:
        if self.state_dir is not None:
            self.ledger.save(self.state_dir / LEDGER_FILE)

    def _load_cache(self) -> None:
        path = None if self.state_dir is None else self.state_dir / CACHE_FILE
        if path is not None and path.exists():
            self._cache = _update_from_file(torch.load(path, weights_only=True))


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
                self.guard.bind_run(ins.run, self.policy, _what(ins))
            steps = ins.steps if ins.purpose == "finetune" else None
            generator = self.guard.generator(digest) if self.policy.dp_sgd else None
            update = self.site.train(ins.task, ins.rnd, steps=steps, purpose=ins.purpose, generator=generator)
            if self.policy.mode == "central":
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
        metrics = {**update.metrics, "release": self.policy.release}
        return replace(update, weights=weights, metrics=metrics)

    def _released(self, update: SiteUpdate) -> SiteUpdate:
        """What of `update` may leave the site: under a privacy mode only the weights, the public
        counts and the release (no training loss, no timing)."""
        if not self.policy.private:
            return update
        metrics = {k: v for k, v in update.metrics.items() if k in PUBLIC_METRICS}
        metrics["train_loss"] = math.nan
        return SiteUpdate(update.site, update.weights, update.n_samples, update.model_key, metrics)


LOCK_FILE = "join.lock"


def lock_state(state_dir: Path):  # noqa: ANN201 - the open lock file, held while it stays open
    """Take the state directory for this process alone (one `privmed join` per state: two would
    overwrite each other's ledger); SiteStateError naming the directory and the holder's pid when
    another process has it. The lock lasts until the returned file is closed or the process ends."""
    import fcntl

    state_dir = Path(state_dir).expanduser()
    _private_dir(state_dir)
    path = state_dir / LOCK_FILE
    f = open(path, "a+", encoding="ascii")  # noqa: SIM115 - held open for the process's life
    os.chmod(path, 0o600)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise SiteStateError(
            f"{state_dir}: another privmed join (pid {holder}) is using this state directory; one "
            "process per hospital state (its key and ledger), stop the other one first"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def _what(ins: Instruction) -> str:
    """An instruction in a refusal: "round 3 of run R", or "'finetune' for round 3 of run R"."""
    where = f"round {ins.rnd} of run {ins.run or '?'}"
    return where if ins.purpose == "train" else f"'{ins.purpose}' for {where}"


def _private_dir(path: Path) -> None:
    """Create `path` owner-only (0700), or make it so."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _update_to_file(digest: str, u: SiteUpdate) -> dict:
    r = u.metrics.get("release")
    metrics = {k: v for k, v in u.metrics.items() if k != "release"}
    return {
        "digest": digest, "site": u.site, "n_samples": u.n_samples, "model_key": u.model_key,
        "weights": [torch.from_numpy(np.ascontiguousarray(w)) for w in u.weights],
        "metrics": metrics,
        "release": None if r is None else [r.noise_multiplier, r.sample_rate, r.steps],
    }


def _update_from_file(d: dict) -> tuple[str, SiteUpdate]:
    metrics = dict(d["metrics"])
    if d["release"] is not None:
        sigma, q, steps = d["release"]
        metrics["release"] = Release(float(sigma), float(q), int(steps))
    weights = [w.numpy() for w in d["weights"]]
    return d["digest"], SiteUpdate(d["site"], weights, int(d["n_samples"]), d["model_key"], metrics)

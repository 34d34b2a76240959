"""A hospital as the federation sees it, in any runner: it trains when instructed, and guards its
patients' privacy itself.

    client = SiteClient(site, SiteGuard.open(name, privacy, state_dir), seed)
    update = client.train(Instruction(task, rnd, run=...))   # SiteRefused when the guard says no

`SiteGuard` is what the site keeps to itself (in a deployment, in the hospital's own state
directory; in a simulation, under RUN_DIR/private): its secret key, from which all its DP randomness
derives; its own ledger, with the budget of its own config; and its last release, so that a retried
instruction gets the very same reply. Under DP-SGD, before training it refuses

- any purpose other than training for a round (fine-tuning, ...: the plan counts only rounds);
- an instruction for a round of a run it already released with other inputs (same noise, other
  weights: subtracting the two replies would cancel the noise);
- a release that would take it past its budget.

An instruction identical to one already answered gets the cached reply back, charged once.
Under any privacy mode, nothing computed from training patients outside the mechanism leaves the
site: the training loss and the time training took stay here.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from privmed import io
from privmed.config import SitePrivacyConfig
from privmed.federation.facts import SiteProfile
from privmed.federation.instructions import Instruction
from privmed.federation.site import Site, derive_seed
from privmed.federation.strategies import SiteUpdate
from privmed.privacy.accountants import Release
from privmed.privacy.ledger import BudgetExceeded
from privmed.privacy.plan import PrivacyPlan
from privmed.privacy.secret import SecretKey
from privmed.privacy.site_ledger import SITE_LEDGER_FILE, SiteLedger, SiteRefused, SiteRelease

KEY_FILE = "secret.key"
LEDGER_FILE = SITE_LEDGER_FILE
CACHE_FILE = "last_release.pt"
# metrics a site's update may carry under a privacy mode: public figures and the release itself
PUBLIC_METRICS = ("sample_gradient_steps", "optimizer_steps", "release")


@dataclass(frozen=True)
class GuardPolicy:
    """The site's own privacy settings (from its own config and privacy plan)."""

    mode: str  # "none", "dp-sgd" or "central"
    release: Release | None = None  # dp-sgd: what one training turn releases
    budget_epsilon: float = math.inf
    delta: float = 0.0
    accountant: str = "prv"
    unit: str = "patient"
    require_dp: bool = False  # refuse to train without DP-SGD

    @classmethod
    def from_plan(cls, plan: PrivacyPlan | None, site: str) -> GuardPolicy:
        """The policy of `site` under `plan` (None: no privacy), its budget the run's."""
        if plan is None:
            return cls("none")
        return cls(plan.mode, plan.release(site) if plan.mode == "dp-sgd" else None, plan.budget,
                   plan.delta, plan.accountant, plan.unit)

    @classmethod
    def for_hospital(cls, mode: str, release: Release | None, own: SitePrivacyConfig,
                     patient_ids: bool) -> GuardPolicy:
        """A hospital's policy for a run in `mode` whose training turns each make `release`: its
        budget, delta and accountant are its own config's, whatever the coordinator planned."""
        return cls(mode, release if mode == "dp-sgd" else None,
                   math.inf if own.max_epsilon is None else own.max_epsilon, own.delta, own.accountant,
                   "patient" if patient_ids else "record", own.require_dp)

    @property
    def private(self) -> bool:
        return self.mode != "none"

    @property
    def dp_sgd(self) -> bool:
        return self.mode == "dp-sgd"


class SiteGuard:
    """A site's key, ledger and last release; `state_dir` None keeps them in memory only."""

    def __init__(self, site: str, policy: GuardPolicy, key: SecretKey, ledger: SiteLedger | None,
                 state_dir: Path | None):
        self.site, self.policy, self.key, self.ledger, self.state_dir = site, policy, key, ledger, state_dir
        self._cache: tuple[str, SiteUpdate] | None = None

    @classmethod
    def open(cls, site: str, policy: GuardPolicy, state_dir: Path | None = None) -> SiteGuard:
        """The guard kept in `state_dir` (created, with a new key, the first time)."""
        key = SecretKey.load_or_create(state_dir / KEY_FILE) if state_dir else SecretKey.generate()
        ledger = None
        if policy.dp_sgd:
            path = None if state_dir is None else state_dir / LEDGER_FILE
            if path is not None and path.exists():
                ledger = SiteLedger.load(path)
                ledger.budget_epsilon = policy.budget_epsilon  # the site's budget is its config's, now
            else:
                ledger = SiteLedger(site, policy.budget_epsilon, policy.delta, policy.accountant, policy.unit)
        guard = cls(site, policy, key, ledger, state_dir)
        guard._load_cache()
        return guard

    # ------------------------------------------------------------------ before training
    def admit(self, ins: Instruction) -> SiteUpdate | None:
        """The cached reply when `ins` was answered before; None when the site may train for it;
        SiteRefused otherwise."""
        where = f"round {ins.rnd} of run {ins.run or '?'}"
        if self.policy.require_dp and not self.policy.dp_sgd:
            raise SiteRefused(
                f"site '{self.site}' refused {where}: its own config (privacy.require_dp) trains only "
                f"under privacy.mode dp-sgd, and this run's is '{self.policy.mode}'"
            )
        if not self.policy.dp_sgd:
            return None
        if ins.purpose != "train":
            raise SiteRefused(
                f"site '{self.site}' refused '{ins.purpose}' for {where}: under privacy.mode dp-sgd it "
                "trains only for the rounds its privacy plan counts (purpose 'train')"
            )
        done = self.ledger.find(ins.run, ins.rnd, ins.purpose)
        if done is not None:
            if done.digest != ins.digest():
                raise SiteRefused(
                    f"site '{self.site}' refused {where}: it already released that round for other "
                    "weights or settings, and a second release of one round would let the two replies "
                    "be compared"
                )
            if self._cache is not None and self._cache[0] == done.digest:
                return self._cache[1]
            return None  # identical instruction, reply no longer cached: the key replays it exactly
        try:
            self.ledger.check(self.policy.release, where)
        except BudgetExceeded as e:
            raise SiteRefused(str(e)) from None
        return None

    def generator(self, ins: Instruction) -> torch.Generator | None:
        """The generator for this release's DP randomness under DP-SGD (Poisson batches, noise,
        augmentation); None otherwise: the site's training randomness then protects nothing (under
        central DP the server's noise does) and comes from the public seed."""
        if not self.policy.dp_sgd:
            return None
        return self.key.torch_generator("train", ins.run, ins.rnd, ins.purpose, ins.task.model_key)

    def secagg_seed(self, ins: Instruction, public_seed: int) -> int:
        """The 63-bit seed of SecAgg+'s stochastic rounding for this reply."""
        if not self.policy.private:
            return derive_seed(public_seed, "secagg", ins.rnd, self.site)
        return self.key.legacy_seed("secagg", ins.run, ins.rnd, ins.purpose)

    # ------------------------------------------------------------------ after training
    def released(self, update: SiteUpdate) -> SiteUpdate:
        """What of `update` may leave the site: under a privacy mode only the weights, the public
        counts and the release (no training loss, no timing)."""
        if not self.policy.private:
            return update
        metrics = {k: v for k, v in update.metrics.items() if k in PUBLIC_METRICS}
        metrics["train_loss"] = math.nan
        return SiteUpdate(update.site, update.weights, update.n_samples, update.model_key, metrics)

    def record(self, ins: Instruction, update: SiteUpdate) -> None:
        """Count the release in the site's ledger and keep the reply, before it leaves the site
        (both written atomically: the reply first, so a counted release always has its reply)."""
        if not self.policy.dp_sgd:
            return
        if self.ledger.find(ins.run, ins.rnd, ins.purpose) is not None:
            return  # replayed identically: counted once
        r = update.metrics["release"]
        digest = ins.digest()
        self._cache = (digest, update)
        if self.state_dir is not None:
            io.torch_save(self.state_dir / CACHE_FILE, _update_to_file(digest, update))
        self.ledger.add(SiteRelease(ins.run, ins.rnd, ins.purpose, digest, r.noise_multiplier,
                                    r.sample_rate, r.steps))
        if self.state_dir is not None:
            self.ledger.save(self.state_dir / LEDGER_FILE)

    def _load_cache(self) -> None:
        path = None if self.state_dir is None else self.state_dir / CACHE_FILE
        if path is not None and path.exists():
            self._cache = _update_from_file(torch.load(path, weights_only=True))


class SiteClient:
    """One hospital's side of every runner, with no platform in it: `train(instruction)` through its
    guard, `score(weights, splits)` on its own validation and test patients (metrics and mergeable
    counts), `finetune(instruction)` (metrics only) and `describe()` (its public counts)."""

    def __init__(self, site: Site, guard: SiteGuard, seed: int):
        self.site, self.guard, self.seed = site, guard, seed
        self._lock = threading.Lock()  # one training at a time

    @property
    def name(self) -> str:
        return self.site.name

    def describe(self) -> dict:
        """The site's public facts: its name and counts (privmed.federation.facts.SiteProfile)."""
        return {"site": self.site.name, **SiteProfile.of(self.site.data).to_dict()}

    def train(self, ins: Instruction) -> SiteUpdate:
        if ins.task.site != self.site.name:
            raise SiteRefused(f"site '{self.site.name}' got an instruction for site '{ins.task.site}'")
        with self._lock:
            cached = self.guard.admit(ins)
            if cached is not None:
                return cached
            update = self.site.train(ins.task, ins.rnd, steps=ins.steps, purpose=ins.purpose,
                                     generator=self.guard.generator(ins))
            update = self.guard.released(update)
            self.guard.record(ins, update)
            return update

    def finetune(self, ins: Instruction) -> dict:
        """Fine-tune as instructed (purpose 'finetune'; refused under DP-SGD) and score the result on
        the site's own test data: only the metrics leave the site, the fine-tuned model stays."""
        update = self.train(ins)
        return self.score(update.weights, ("test",))["test"][0]

    def score(self, weights: list, splits: tuple[str, ...]) -> dict[str, tuple[dict, dict]]:
        """Per split ('val', 'test'): the metrics of `weights` on the site's own patients of that
        split and the counts pooled figures are merged from (({}, {}) without such data). Neither
        touches the training patients, so no guard is asked; the guarantee names them as released."""
        with self._lock:
            return {split: self.site.score(weights, split) for split in splits}

    def secagg_seed(self, ins: Instruction) -> int:
        return self.guard.secagg_seed(ins, self.seed)


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

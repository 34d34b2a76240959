"""What a site keeps to itself, in any runner: `SiteGuard`, its secret key, its own ledger and its
last release, kept in its state directory (a hospital's own; in a simulation RUN_DIR/private/sites/
NAME) or in memory.

    guard = SiteGuard.open(name, LedgerTerms(...), state_dir)     # its key and ledger (one per state)
    guard.admit(ins, digest, release) ... guard.record(ins, digest, update, release)

Every DP draw of the site derives from its key and the digest of the request (privmed.federation.
instructions); its ledger has the budget of its own config, one line for its training patients and
one for its validation and test patients; its last reply is kept, so that a retried instruction gets
the very same reply, charged once. `lock_state` keeps a state directory to one process.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from privmed import io
from privmed.config import SitePrivacyConfig
from privmed.errors import PrivmedError
from privmed.federation.instructions import Instruction, described
from privmed.federation.policy import GuardPolicy
from privmed.federation.strategies import SiteUpdate
from privmed.privacy.accountants import Release
from privmed.privacy.ledger import BudgetExceeded, LedgerError
from privmed.privacy.plan import PrivacyPlan
from privmed.privacy.secret import SecretKey
from privmed.privacy.site_ledger import (
    SITE_LEDGER_FILE, ScoringRelease, SiteLedger, SiteRefused, SiteRelease,
)

KEY_FILE = "secret.key"
LEDGER_FILE = SITE_LEDGER_FILE
CACHE_FILE = "last_release.pt"


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
        """Fix the privacy terms of run `run`. The first time the site sees the run, before its
        first release, the whole planned run is checked against the budget: a run it cannot
        afford to the end is refused now, not in its last affordable round."""
        if run not in self.ledger.runs:
            try:
                self._check_whole_run(policy, what)
            except BudgetExceeded as e:
                raise SiteRefused(str(e)) from None
        if self.ledger.bind_run(run, policy.terms(), what):
            self._save_ledger()

    def _check_whole_run(self, policy: GuardPolicy, what: str) -> None:
        if policy.release is not None and policy.rounds > 0:
            extra = [policy.finetune] if policy.finetune is not None else []
            self.ledger.check_run(policy.release, policy.rounds, extra, what)
        if policy.scoring is not None:
            for split, count in sorted(policy.scoring.releases.items()):
                if split in policy.scoring.noise and count > 0:
                    self.ledger.check_run_scoring(split, policy.scoring.release(split), count, what)

    def admit(self, ins: Instruction, digest: str, release: Release) -> SiteUpdate | None:
        """The cached reply when the request with this digest was answered before; None when the
        site may train for it; SiteRefused otherwise."""
        where = described(ins)
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


def _private_dir(path: Path) -> None:
    """Create `path` owner-only (0700), or make it so."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _update_to_file(digest: str, u: SiteUpdate) -> dict:
    r = u.release
    return {
        "digest": digest, "site": u.site, "n_samples": u.n_samples, "model_key": u.model_key,
        "weights": [torch.from_numpy(np.ascontiguousarray(w)) for w in u.weights],
        "metrics": u.metrics,
        "release": None if r is None else [r.noise_multiplier, r.sample_rate, r.steps],
    }


def _update_from_file(d: dict) -> tuple[str, SiteUpdate]:
    release = None
    if d["release"] is not None:
        sigma, q, steps = d["release"]
        release = Release(float(sigma), float(q), int(steps))
    weights = [w.numpy() for w in d["weights"]]
    return d["digest"], SiteUpdate(d["site"], weights, int(d["n_samples"]), d["model_key"], dict(d["metrics"]),
                                   release)

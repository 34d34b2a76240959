"""A hospital in a deployment: its own data, its own state, and the site each run asks for.

    hospital = Hospital.from_config(load_site_config("hospital-a.yaml"))   # its own folder only
    hospital.describe()            # its public counts and its data's shape: all the coordinator learns
    hospital.setup(setup)          # a run's public settings (privmed.federation.experiment.SiteSetup)
    hospital.client.train(ins)     # as privmed.federation.client.SiteClient, through its guard

The hospital loads nothing but the data its own config names, splits it itself (seeded by its own
seed and name), and builds the site a run needs from the coordinator's setup: the model, the
training settings and, under DP-SGD, the release each turn makes. Its guard counts every release in
its own ledger against its own budget (`privacy.max_epsilon` of its config), whatever the
coordinator planned.

`Hospital.rehearsal(cfg, name)` stands in for one site of a simulation config (every party derives
its part of one shared source; a rehearsal on public data), its budget the config's.
"""

from __future__ import annotations

import math
import threading
from dataclasses import replace
from pathlib import Path

from privmed.config import RunConfig, SiteConfig, SitePrivacyConfig
from privmed.data.sites import SiteData
from privmed.errors import ConfigError, PrivmedError
from privmed.federation.client import SiteClient
from privmed.federation.experiment import (
    SiteSetup, load_own_site, plan_experiment, simulated_sites, site_from_setup,
)
from privmed.federation.facts import DataFacts, SiteProfile
from privmed.federation.guard import LedgerTerms, SiteGuard
from privmed.federation.policy import GuardPolicy


class NoSetup(PrivmedError):
    """A training or scoring request arrived before the run's setup."""


class Hospital:
    def __init__(self, data: SiteData, facts: DataFacts, privacy: SitePrivacyConfig,
                 state_dir: Path | None = None):
        self.data, self.facts, self.privacy, self.state_dir = data, facts, privacy, state_dir
        self._client: SiteClient | None = None
        self._setup_digest: str | None = None
        self._lock = threading.Lock()
        # its key and ledger, one for every run it takes part in (SiteStateError now, not at the
        # first request, when its state cannot be used)
        self.guard = SiteGuard.open(data.name, LedgerTerms.for_hospital(privacy, self.profile.patient_ids), state_dir)

    @classmethod
    def from_config(cls, cfg: SiteConfig, state_dir: Path | None = None) -> Hospital:
        """The hospital its own config describes (its data loaded and split here; DataError or
        ConfigError, naming the file or field, when it cannot be)."""
        data, facts = load_own_site(cfg)
        return cls(data, facts, cfg.privacy, state_dir)

    @classmethod
    def rehearsal(cls, cfg: RunConfig, name: str, state_dir: Path | None = None) -> Hospital:
        """Site `name` of the simulation config `cfg`, partitioned as `prepare_experiment` does it,
        its budget this config's (as the run's ledger has it)."""
        if cfg.data.source == "sites":
            raise ConfigError("data.source: 'sites' names no data; a hospital joins with its own site "
                              "config: privmed join SITE_CONFIG")
        if cfg.federation.strategy == "pooled":
            raise ConfigError("federation.strategy: 'pooled' puts all data in one place; it has no sites to join")
        _, site_data, facts = simulated_sites(cfg)
        sd = next((s for s in site_data if s.name == name), None)
        if sd is None:
            raise ConfigError(f"--site: '{name}' is not a site of this config; its sites: "
                              f"{', '.join(s.name for s in site_data)}")
        # its budget: the run's (privacy.epsilon, or with the noise fixed the epsilon planned), and
        # a config under DP-SGD trains only under DP-SGD
        p, budget = cfg.privacy, None
        if cfg.private:
            budget = plan_experiment(cfg, facts, [SiteProfile.of(s) for s in site_data]).privacy.budget
        cap = SitePrivacyConfig.model_fields["max_epsilon"].metadata  # a budget past the config's cap: no cap
        limit = next((m.le for m in cap if getattr(m, "le", None) is not None), math.inf)
        own = SitePrivacyConfig(max_epsilon=budget if budget is None or budget <= limit else None,
                                delta=p.delta, accountant=p.accountant, require_dp=cfg.private)
        return cls(sd, facts, own, state_dir)

    @property
    def name(self) -> str:
        return self.data.name

    @property
    def profile(self) -> SiteProfile:
        return SiteProfile.of(self.data)

    def describe(self) -> dict:
        """What the coordinator learns of this hospital: its name, its counts and its data's shape
        and classes (no patient's record)."""
        return {"site": self.name, **self.profile.to_dict(), "data": self.facts.to_dict()}

    def setup(self, setup: SiteSetup) -> SiteClient:
        """The site for the run `setup` describes (built once per setup; a new setup replaces it,
        and shares the hospital's one guard: a run id it has seen keeps its privacy parameters)."""
        digest = setup.digest
        with self._lock:
            if self._client is not None and digest == self._setup_digest:
                return self._client
            setup = replace(setup, validated=None)  # the hospital's edge: it checks what it received
            cfg = setup.run_config()
            site = site_from_setup(setup, self.data, self.facts)
            policy = GuardPolicy.from_setup(setup, self.privacy.require_dp)
            self._client = SiteClient(site, self.guard, policy, cfg.seed, digest)
            self._setup_digest = digest
            return self._client

    @property
    def client(self) -> SiteClient:
        """The site of the current run; NoSetup before the coordinator sent one."""
        if self._client is None:
            raise NoSetup(f"site '{self.name}' has no run set up yet: the coordinator sends the run's "
                          "setup before its first instruction")
        return self._client

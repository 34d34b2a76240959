"""What one run asks of a site, and whether the site accepts it: `GuardPolicy`, made from the run's
public setup (privmed.federation.experiment.SiteSetup) and the site's own `require_dp`.

    policy = GuardPolicy.from_setup(setup, require_dp)
    release = policy.check_training(site, instruction)   # SiteRefused when the site says no

A site accepts by default only DP it runs itself (DP-SGD, or central mode as a noise share it adds
itself), with a noise multiplier its sampler can draw exactly, and only the purposes its privacy
plan counts (privmed.federation.client says what else the site refuses).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from privmed.catalog import PrivacyMode
from privmed.federation.instructions import Instruction, described
from privmed.privacy.accountants import Release
from privmed.privacy.dpsgd import MAX_NOISE_MULTIPLIER, MIN_NOISE_MULTIPLIER
from privmed.privacy.plan import ScoringPlan
from privmed.privacy.site_ledger import SiteRefused


@dataclass(frozen=True)
class GuardPolicy:
    """What one run asks of the site (from the run's setup) and whether the site accepts it."""

    mode: PrivacyMode = PrivacyMode.NONE
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
            mode=PrivacyMode(privacy.get("mode", PrivacyMode.NONE)),
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
        return self.mode != PrivacyMode.NONE

    @property
    def dp_sgd(self) -> bool:
        return self.mode == PrivacyMode.DP_SGD

    @property
    def central(self) -> bool:
        return self.mode == PrivacyMode.CENTRAL

    def terms(self) -> str:
        """A digest of the run's privacy parameters: a run id keeps the ones it was first seen with."""
        scoring = None if self.scoring is None else sorted(self.scoring.noise.items())
        # the mode as its plain string: ledgers bound runs to this digest before the mode was an enum
        fields = (str(self.mode), self.release, self.finetune, scoring, self.clip, self.max_grad_norm,
                  self.grad_sample_mode)
        return hashlib.sha256(repr(fields).encode()).hexdigest()

    def check_training(self, site: str, ins: Instruction) -> Release | None:
        """The release training for `ins` makes (None without privacy); SiteRefused when this
        policy does not allow it."""
        where = described(ins)
        if not self.private:
            if self.require_dp:
                raise SiteRefused(
                    f"site '{site}' refused {where}: its own config (privacy.require_dp, the default) "
                    "takes part only under DP it runs itself (privacy.mode dp-sgd, or central), and "
                    "this run's privacy.mode is 'none'"
                )
            return None
        if self.central:
            return self._central_release(site, where, ins)
        return self._dp_sgd_release(site, where, ins)

    def _central_release(self, site: str, where: str, ins: Instruction) -> Release:
        """Central mode: the round's noise share, for training a round only."""
        if ins.purpose != "train":
            raise SiteRefused(f"site '{site}' refused {where}: under privacy.mode central it only "
                              "trains for the rounds (its update leaves it clipped and noised)")
        if self.release is None or self.clip is None or not self.clip > 0:
            raise SiteRefused(f"site '{site}' refused {where}: privacy.mode central, but the setup "
                              "names no noise share and clipping norm for the site to add its noise")
        return self.release

    def _dp_sgd_release(self, site: str, where: str, ins: Instruction) -> Release:
        """DP-SGD: a round's training turn or the fine-tuning turn the plan counts, with a noise
        multiplier the site's sampler draws exactly."""
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

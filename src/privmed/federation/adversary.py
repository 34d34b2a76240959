"""Malicious hospitals, simulated (`attack:` in a run config): some sites send the coordinator a
crafted update instead of the one their training produced, or train on corrupted labels. A test of
the defences in privmed.federation.robust, never part of a real deployment.

    sign-flip         Δ' = -scale × Δ: the site pushes the model the other way, `scale` times harder
    scaling           Δ' = scale × Δ: a boosted update (model replacement)
    gaussian          Δ' ~ N(0, (scale × rms(Δ))²) per entry: noise of `scale` times the update's size
    label-flip        the site trains honestly on labels y -> K - 1 - y (a data-poisoning attack)
    little-is-enough  Δ' = μ - z σ per entry (Baruch et al. 2019), μ, σ the mean and standard
                      deviation of every site's honest update this stage and z the largest shift
                      that a majority still lies beyond: z = Φ⁻¹((n - s) / n), s = ⌊n/2 + 1⌋ - f.
                      It stays inside the honest spread, where distance-based rules look.

Δ is a site's model change (its trained weights minus the weights it was sent). The attackers are
omniscient and collude: little-is-enough sees every site's honest update (the strongest variant).
Their randomness comes from the run's public seed: the attack is part of the experiment, not a
patient's protection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from privmed.config import ATTACKS, MODEL_ATTACKS, AttackConfig
from privmed.data.sites import SiteData
from privmed.federation.site import derive_seed
from privmed.federation.strategies import SiteUpdate, TrainTask, Weights, contribution, is_float



def little_is_enough_z(n: int, f: int) -> float:
    """Baruch et al.'s z for n sites of which f are malicious: the malicious sites need
    s = ⌊n/2 + 1⌋ - f honest sites to lie on their side of the mean for a majority, and the
    share of a normal population beyond μ - zσ is (n - s) / n."""
    from scipy.stats import norm

    s = math.floor(n / 2 + 1) - f
    return float(norm.ppf((n - s) / n))


def _apply(sent: Weights, delta: Weights) -> Weights:
    """sent + delta, cast back to each entry's dtype."""
    return [np.asarray(np.asarray(x, np.float64) + d).astype(np.asarray(x).dtype, copy=False) for x, d in zip(sent, delta)]


@dataclass(frozen=True)
class Adversary:
    """Which sites are malicious and what they do. `seed`: the run's public seed."""

    kind: str
    sites: tuple[str, ...]
    scale: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS or self.kind == "none":
            raise ValueError(f"unknown attack {self.kind!r} (known: {', '.join(ATTACKS[1:])})")

    def poison(self, sd: SiteData, n_classes: int) -> SiteData:
        """A malicious site's data as it trains on it: label-flip turns every training label y into
        K - 1 - y (its validation and test data, which only score models, stay true)."""
        if self.kind != "label-flip" or sd.name not in self.sites:
            return sd
        flipped = (max(n_classes, 2) - 1) - sd.train.labels
        return replace(sd, train=replace(sd.train, labels=flipped.astype(sd.train.labels.dtype)))

    def tamper(self, tasks: list[TrainTask], updates: list[SiteUpdate], rnd: int) -> list[SiteUpdate]:
        """The updates as the coordinator receives them: the malicious sites' replaced by crafted
        ones (model attacks); the honest sites' unchanged."""
        if self.kind not in MODEL_ATTACKS or not any(u.site in self.sites for u in updates):
            return updates
        sent = {t.site: t.weights for t in tasks}
        deltas = {u.site: contribution(sent[u.site], u.weights) for u in updates}
        if self.kind == "little-is-enough":
            stack = [np.stack([deltas[u.site][j] for u in updates]) for j in range(len(updates[0].weights))]
            f = sum(u.site in self.sites for u in updates)
            z = little_is_enough_z(len(updates), f)
            crafted = [s.mean(axis=0) - z * s.std(axis=0) for s in stack]
        out = []
        for u in updates:
            if u.site not in self.sites:
                out.append(u)
                continue
            d = deltas[u.site]
            if self.kind == "sign-flip":
                new = [-self.scale * a for a in d]
            elif self.kind == "scaling":
                new = [self.scale * a for a in d]
            elif self.kind == "gaussian":
                floats = [a for a, w in zip(d, u.weights) if is_float(w)]
                rms = math.sqrt(sum(float(np.sum(a * a)) for a in floats) / max(1, sum(a.size for a in floats)))
                rng = np.random.default_rng(derive_seed(self.seed, "attack", rnd, u.site))
                new = [rng.normal(0.0, self.scale * rms, size=a.shape) for a in d]
            else:
                new = crafted
            # integer entries (counters) keep what the site trained
            new = [n if is_float(w) else a for n, a, w in zip(new, d, u.weights)]
            out.append(replace(u, weights=_apply(sent[u.site], new)))
        return out


def adversary_for(attack: AttackConfig, names: list[str], seed: int) -> Adversary | None:
    """The config's `attack` over the run's site `names` (None when there is none)."""
    if attack.kind == "none":
        return None
    return Adversary(attack.kind, malicious_sites(attack.sites, names), attack.scale, seed)


def malicious_sites(spec: int | list[str], names: list[str]) -> tuple[str, ...]:
    """`attack.sites` resolved against the run's site names: a count takes the last ones."""
    if isinstance(spec, int):
        return tuple(names[len(names) - spec:]) if spec else ()
    return tuple(spec)


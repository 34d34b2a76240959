"""The registered attacks. Membership attacks (ATTACKS, run by default): each says what its
attacker sees and assumes, and turns the target's and the shadows' outputs into one score per
candidate (higher: more likely a member).
The statistics are in privmed.audit.mia, imported when an attack scores (it loads scipy and
scikit-learn, which `privmed --help`, built from this registry, does not need). Attacks on the
sites' updates (UPDATE_ATTACKS: gradient inversion, gradient canaries), input canaries (which
train the run again) and attribute inference (tabular data only), run when named."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from privmed import catalog
from privmed.catalog import FINAL_MODEL, SHADOW_ASSUMPTION  # noqa: F401  (the attacks' words, in the catalog)

FEW_SHADOWS = 64  # below this many shadows LiRA fits one variance for all patients (Carlini et al.)


@dataclass(frozen=True)
class AttackData:
    """What the attacks score from: the target's and the shadows' logits on the candidates (N)
    then the population sample (P), the labels, and which candidates each shadow trained on."""

    target_logits: np.ndarray  # (N + P, K)
    labels: np.ndarray  # (N + P,)
    n_candidates: int
    shadow_logits: np.ndarray | None = None  # (S, N + P, K)
    shadow_in: np.ndarray | None = None  # (S, N)


@dataclass(frozen=True)
class Attack:
    name: str
    title: str
    sees: str
    assumes: str
    needs_shadows: bool
    score: Callable[[AttackData], np.ndarray]
    needs_population: bool = False


def _loss(d: AttackData) -> np.ndarray:
    from privmed.audit import mia

    n = d.n_candidates
    return mia.loss_attack(d.target_logits[:n], d.labels[:n])


def _lira(online: bool) -> Callable[[AttackData], np.ndarray]:
    def score(d: AttackData) -> np.ndarray:
        from privmed.audit import mia

        n = d.n_candidates
        phi = mia.true_class_confidence(d.target_logits[:n], d.labels[:n])
        shadow_phi = mia.true_class_confidence(d.shadow_logits[:, :n], d.labels[:n])  # (S, N)
        return mia.lira(phi, shadow_phi, d.shadow_in, online=online,
                        fixed_variance=len(shadow_phi) < FEW_SHADOWS)

    return score


def _rmia(d: AttackData) -> np.ndarray:
    from privmed.audit import mia

    n, total = d.n_candidates, len(d.labels)
    target = mia.true_class_prob(d.target_logits, d.labels)
    refs = mia.true_class_prob(d.shadow_logits, d.labels)  # (S, N + P)
    # the population sample was never in a shadow run
    ref_in = np.concatenate([d.shadow_in, np.zeros((len(refs), total - n), dtype=bool)], axis=1)
    return mia.rmia(target, refs, ref_in, population_idx=np.arange(n, total))[:n]


_lira_online = _lira(online=True)
_lira_offline = _lira(online=False)

# The membership attacks the catalog lists (privmed.catalog.AUDIT_ATTACKS with a `score`), by name.
ATTACKS: dict[str, Attack] = {
    a.name: Attack(a.name, a.title, a.sees, a.assumes, a.needs_shadows, catalog.load(a.score), a.needs_population)
    for a in catalog.AUDIT_ATTACKS if a.membership
}


@dataclass(frozen=True)
class UpdateAttack:
    """An attack on the model updates the sites release during a run rather than on the final
    model (privmed.audit.inversion_audit); run only when named."""

    name: str
    title: str
    sees: str


# The catalog's other attacks, run only when named: on the sites' updates (gradient inversion,
# gradient canaries), input canaries (on the final model, but they train the run again) and
# attribute inference (on the final model, tabular only).
UPDATE_ATTACKS: dict[str, UpdateAttack] = {
    a.name: UpdateAttack(a.name, a.title, a.sees) for a in catalog.AUDIT_ATTACKS if not a.membership
}


def describe_attacks() -> str:
    """One line per attack, for `privmed audit --help`."""
    lines = [f"  {a.name:<15} {a.title}" for a in ATTACKS.values()]
    lines += [f"  {a.name:<15} {a.title} (only when named)" for a in UPDATE_ATTACKS.values()]
    return "\n".join(lines)

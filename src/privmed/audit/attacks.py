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

FINAL_MODEL = "the final shared model, as a black box: its outputs (class probabilities) on inputs of its choice"
SHADOW_ASSUMPTION = (
    "knows the training recipe (the run's config) and holds patients of the same distribution, "
    "on which it trains shadow runs of the federation"
)
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


ATTACKS: dict[str, Attack] = {
    a.name: a
    for a in (
        Attack("loss", "Loss threshold (Yeom et al. 2018)", FINAL_MODEL,
               "knows each patient's label; scores by the model's loss on the patient", False, _loss),
        Attack("lira-online", "LiRA, online (Carlini et al. 2022)", FINAL_MODEL,
               SHADOW_ASSUMPTION + "; each patient asked about is in half of the shadow runs",
               True, _lira(online=True)),
        Attack("lira-offline", "LiRA, offline (Carlini et al. 2022)", FINAL_MODEL,
               SHADOW_ASSUMPTION + "; uses only the shadow runs without the patient", True, _lira(online=False)),
        Attack("rmia", "RMIA (Zarifzadeh et al. 2024)", FINAL_MODEL,
               SHADOW_ASSUMPTION + " (its reference models), and a population sample of patients "
               "that no model trained on", True, _rmia, needs_population=True),
    )
}


@dataclass(frozen=True)
class UpdateAttack:
    """An attack on the model updates the sites release during a run rather than on the final
    model (privmed.audit.inversion_audit); run only when named."""

    name: str
    title: str
    sees: str


UPDATE_ATTACKS: dict[str, UpdateAttack] = {
    "inversion": UpdateAttack(
        "inversion", "Gradient inversion (Geiping et al. 2020): images rebuilt from a site's update",
        "the coordinator: one site's update (plain or DP-SGD), or under secure aggregation only the "
        "sum of all sites'",
    ),
    "canaries": UpdateAttack(
        "canaries", "Gradient canaries (white box): a lower bound on epsilon from one run's updates (Steinke et al. 2023)",
        "the coordinator: one site's update every round (white box)",
    ),
    "input-canaries": UpdateAttack(  # on the final model, but it trains the run again: run when named
        "input-canaries", "Input canaries (black box): a lower bound on epsilon from one run's final model (Steinke et al. 2023)",
        "the final shared model only, its outputs on mislabelled images (black box)",
    ),
    "attribute": UpdateAttack(  # on the final model, but tabular only: run when named
        "attribute", "Attribute inference on a tabular model (Fredrikson et al. 2014)",
        "the final shared model, as a black box",
    ),
}


def describe_attacks() -> str:
    """One line per attack, for `privmed audit --help`."""
    lines = [f"  {a.name:<15} {a.title}" for a in ATTACKS.values()]
    lines += [f"  {a.name:<15} {a.title} (only when named)" for a in UPDATE_ATTACKS.values()]
    return "\n".join(lines)

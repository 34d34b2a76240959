"""Partitioning items into sites: pure functions of labels, patient ids and a random generator.

The unit that is assigned to a site is the patient (all of a patient's items go to one site, and to
one side of every split), so a patient's privacy is never split across hospitals.
"""

from __future__ import annotations

import numpy as np


def patient_units(patient: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group items by patient.

    Returns (unit_of_item (N,), unit_label (U,), unit_size (U,)); a unit's label is that of its first
    item. Units are numbered in order of first appearance, so the result does not depend on ids' sort.
    """
    _, first, inverse = np.unique(patient, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # unique ids sorted -> by first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    unit_of_item = rank[inverse]
    unit_label = labels[np.sort(first)]
    unit_size = np.bincount(unit_of_item, minlength=len(order))
    return unit_of_item, unit_label, unit_size


def units_to_items(unit_of_item: np.ndarray, unit_sets: list[np.ndarray]) -> list[np.ndarray]:
    """Item indices (sorted) of each set of units."""
    out = []
    for units in unit_sets:
        mask = np.isin(unit_of_item, units)
        out.append(np.flatnonzero(mask))
    return out


def split_iid(n_units: int, n_sites: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Units shuffled and dealt into `n_sites` near-equal parts."""
    return [np.sort(p) for p in np.array_split(rng.permutation(n_units), n_sites)]


def dirichlet_label_proportions(
    n_classes: int, n_sites: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """(n_classes, n_sites): for each class, the share of its units each site gets ~ Dir(alpha).

    Small alpha -> strong label skew (Hsu et al. 2019). Drawn once and applied to every split (train,
    validation) so that a site's validation data looks like its training data.
    """
    return rng.dirichlet(np.full(n_sites, alpha), size=n_classes)


def split_by_label_proportions(
    unit_label: np.ndarray, proportions: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """Deal each class's units to sites in the given shares (rows of `proportions` sum to 1)."""
    n_classes, n_sites = proportions.shape
    parts: list[list[np.ndarray]] = [[] for _ in range(n_sites)]
    for k in range(n_classes):
        units = rng.permutation(np.flatnonzero(unit_label == k))
        cuts = np.round(np.cumsum(proportions[k])[:-1] * len(units)).astype(int)
        for s, chunk in enumerate(np.split(units, cuts)):
            parts[s].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.array([], dtype=np.int64) for p in parts]


def quantity_proportions(n_sites: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """(n_sites,) site size shares ~ Dir(alpha): small alpha -> very unequal site sizes."""
    return rng.dirichlet(np.full(n_sites, alpha))


def split_by_quantity(
    n_units: int, shares: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """Units shuffled and cut into parts of the given shares."""
    cuts = np.round(np.cumsum(shares)[:-1] * n_units).astype(int)
    return [np.sort(p) for p in np.split(rng.permutation(n_units), cuts)]

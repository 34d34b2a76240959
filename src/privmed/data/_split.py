"""A seeded, label-stratified test hold-out that never splits a patient (the privacy unit)."""

from __future__ import annotations

import numpy as np

from privmed.data.base import ImageSet
from privmed.errors import DataError

_HOLDOUT_STREAM = 0x7E57  # seeds the test hold-out apart from any other draw from the same seed


def holdout_by_patient(
    labels: np.ndarray,
    patients: np.ndarray,
    fraction: float,
    rng: np.random.Generator,
    field: str = "data.test_fraction",
) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx), sorted int64 arrays that partition range(N).

    Patients are stratified by their most frequent label; within each label, shuffled patients go to
    the test side until its image count is closest to `fraction` of that label's images. One
    patient's images all land on one side. Raises DataError, naming the config `field` that set
    `fraction`, when either side would be empty.
    """
    labels = np.asarray(labels)
    uniq, inverse = np.unique(np.asarray(patients).astype(str), return_inverse=True)
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    # (patients, classes) image counts: a patient's stratum is its most frequent label.
    counts = np.zeros((len(uniq), max(n_classes, 1)), dtype=np.int64)
    np.add.at(counts, (inverse, labels), 1)
    stratum = counts.argmax(axis=1)
    sizes = counts.sum(axis=1)

    in_test = np.zeros(len(uniq), dtype=bool)
    for c in range(n_classes):
        members = np.flatnonzero(stratum == c)
        if len(members) < 2:
            continue
        members = members[rng.permutation(len(members))]
        cum = np.cumsum(sizes[members])[:-1]  # never take the last patient: train keeps one
        target = fraction * sizes[members].sum()
        k = int(np.argmin(np.abs(np.concatenate([[0], cum]) - target)))
        in_test[members[:k]] = True

    test_mask = in_test[inverse]
    train_idx, test_idx = np.flatnonzero(~test_mask), np.flatnonzero(test_mask)
    if len(test_idx) == 0 or len(train_idx) == 0:
        raise DataError(
            f"{field}: {fraction} of {len(labels)} images ({len(uniq)} patients) leaves "
            "an empty side of the split; add images (at least 2 patients per class) or raise it"
        )
    return train_idx.astype(np.int64), test_idx.astype(np.int64)


def check_patients_disjoint(train: np.ndarray | None, test: np.ndarray | None, where: str) -> None:
    """DataError when one patient has items on both sides of a given train/test split."""
    if train is None or test is None:
        return
    both = np.intersect1d(np.asarray(train).astype(str), np.asarray(test).astype(str))
    if len(both):
        raise DataError(
            f"{where}: patient '{both[0]}' has images in both train and test ({len(both)} such "
            "patients); a patient's images must all be on one side"
        )


def train_test(
    full: ImageSet, is_test: np.ndarray | None, test_fraction: float, seed: int, where: str
) -> tuple[ImageSet, ImageSet]:
    """(train, test): the split the source gives (`is_test`, (N,) bool), checked so that no patient
    is on both sides; or, without one, a seeded hold-out of `test_fraction` by patient."""
    if is_test is not None:
        train, test = full.subset(np.flatnonzero(~is_test)), full.subset(np.flatnonzero(is_test))
        check_patients_disjoint(train.patient, test.patient, where)
        return train, test
    rng = np.random.default_rng([seed, _HOLDOUT_STREAM])
    tr, te = holdout_by_patient(full.labels, full.patient_ids(), test_fraction, rng)
    return full.subset(tr), full.subset(te)

"""Sites' counts added up key by key, as the coordinator pools them."""

from __future__ import annotations

import numpy as np

from privmed.tasks.counts.schema import Counts


def merge_counts(parts: list[Counts]) -> Counts:
    """Key-wise sums of `parts` (new arrays; the parts are left alone). Empty parts ({}: a site with
    no data) are skipped; {} when none is left. ValueError naming the key when the parts' keys or
    shapes differ."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    first = parts[0]
    for i, part in enumerate(parts[1:], start=1):
        if set(part) != set(first):
            diff = sorted(set(part) ^ set(first))
            raise ValueError(f"merge_counts: part {i} differs from part 0 in key(s) {', '.join(diff)}")
        for key in first:
            if np.shape(part[key]) != np.shape(first[key]):
                raise ValueError(f"merge_counts: '{key}' has shape {np.shape(part[key])} in part {i}, "
                                 f"{np.shape(first[key])} in part 0")
    # np.asarray: a sum of 0-d arrays is a numpy scalar, and counts are arrays.
    return {key: np.asarray(np.sum([np.asarray(p[key]) for p in parts], axis=0)) for key in first}

"""A site's contribution to a secure sum (SecAgg+), in any runner: what of its trained update
enters the sum, with what weight. The platform only transports it (privmed.federation.flower
quantises, masks and shares it).

    arrays, weight, clipped = secure_contribution(ins, update, noised=policy.central)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from privmed.federation.instructions import Instruction
from privmed.federation.strategies import SiteUpdate, Weights, contribution

log = logging.getLogger("privmed.site")


@dataclass(frozen=True)
class SecureContribution:
    """A site's reply under secure aggregation: `update` (its public metrics and counts, the
    weights left out), `arrays` (its change, clipped: what enters the sum, in the model's state
    order), `weight` (its weight in the sum: its training items, or 1) and `seed` (the 63-bit seed
    of SecAgg+'s stochastic rounding)."""

    update: SiteUpdate
    arrays: Weights
    weight: int
    seed: int


def secure_contribution(ins: Instruction, update: SiteUpdate, noised: bool) -> tuple[Weights, int, int]:
    """(the change from `ins`'s weights to `update`'s, clipped to `ins.clip`; its weight in the
    sum; how many of its entries SecAgg+ will clip to its range once scaled by the weight's share).
    `noised`: the site already clipped its change and added its noise (central mode), so the change
    is not clipped again (that would only shrink the noise)."""
    arrays = contribution(ins.task.weights, update.weights, None if noised else ins.clip)
    weight = update.n_samples if ins.weighting == "samples" else 1
    # SecAgg+ scales the contribution by its weight share and clips each entry to the range
    # before quantising: count the entries that clip (a count, no values)
    share = weight / ins.max_weight
    clipped = int(sum(int((np.abs(a * share) > ins.clipping_range).sum()) for a in arrays))
    return arrays, weight, clipped


def reported_clipping(ins: Instruction, update: SiteUpdate, clipped: int, private: bool) -> SiteUpdate:
    """`update` as it leaves the site with the count of clipped entries: in its metrics
    ('secagg_clipped') without privacy; under privacy the count depends on the training patients,
    so it stays at the site, in its log."""
    if not private:
        return replace(update, metrics={**update.metrics, "secagg_clipped": clipped})
    if clipped:
        log.warning("round %s: %d update entries outside the SecAgg+ clipping range were "
                    "clipped", ins.rnd, clipped)
    return update

"""The Gaussian mechanism a site's scoring releases go through: noisy counts of its validation and
test patients, and the noise multiplier a number of such releases needs.

    blocks = [Block("score_hist", 1.0, 0.9), Block("rel", 3 ** 0.5, 0.05), Block("loss_sum", 8.0, 0.05)]
    noisy = gaussian_release(exact, blocks, noise_multiplier, rng)   # at the site, rng from its key
    sigma = scoring_noise(epsilon, delta, releases=200)               # calibration
    Release(sigma, 1.0, 1)                                             # one scoring release, ledger

The unit is one patient of the scored split, under add/remove-one-patient neighbouring. The caller
(privmed.tasks.counts) computes the exact counts so that one patient moves each block `key` by a
vector of L2 norm at most `bound` (clipping and per-patient weighting, `patient_weights`, make that
true). The mechanism adds N(0, (noise_multiplier * bound / sqrt(share))^2) to every entry of block
`key`: equivalently, it scales block `key` by sqrt(share) / bound, which gives the whole released vector
an L2 sensitivity of sqrt(sum of shares) = 1, and adds N(0, noise_multiplier^2) to every entry. So
one release is the Gaussian mechanism with that noise multiplier at sensitivity 1: the accountants'
Release(noise_multiplier, 1.0, 1) (every patient of the split is in it, no subsampling), and
releases on the same split compose as Release(noise_multiplier, 1.0, releases).

Floating point (Mironov 2012; Jin et al. 2022): the noise is numpy's float64 Gaussian, and each
noisy entry is rounded to a multiple of a power of two at most 1/1024 of its noise's standard
deviation, so the low-order bits of the float sum, which can reveal the exact count under textbook
floating-point noise, are not released. The sampler itself is not an exact one (a discrete Gaussian
would be): what remains is the float64 sampler's deviation from the ideal Gaussian, below that grid.

Pure: numpy only (calibration imports the accountants when called); no files, no rounds. Noise comes
only from the numpy Generator passed in; the number of draws depends on the blocks' shapes alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

Counts = dict[str, np.ndarray]

GRID_FRACTION = 1.0 / 1024  # the release grid, at most this fraction of the noise's std
SHARE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Block:
    """One released count array: `key` in the counts, `bound` the largest L2 norm (in the count's
    own units) by which adding or removing one patient can move it, and `share` the part of the
    squared sensitivity spent on it (0 < share <= 1; a release's shares sum to 1)."""

    key: str
    bound: float
    share: float

    def __post_init__(self) -> None:
        if not (isinstance(self.bound, (int, float)) and 0.0 < self.bound < math.inf):
            raise ValueError(f"Block '{self.key}': bound must be a finite number > 0, got {self.bound!r}")
        if not (isinstance(self.share, (int, float)) and 0.0 < self.share <= 1.0):
            raise ValueError(f"Block '{self.key}': share must be in (0, 1], got {self.share!r}")
        object.__setattr__(self, "bound", float(self.bound))
        object.__setattr__(self, "share", float(self.share))

    def noise_std(self, noise_multiplier: float) -> float:
        """The standard deviation of the noise on each entry, in the count's units."""
        return noise_multiplier * self.bound / math.sqrt(self.share)


def check_blocks(blocks: Sequence[Block]) -> None:
    """ValueError unless the blocks name distinct keys and their shares sum to 1."""
    keys = [b.key for b in blocks]
    if not blocks or len(set(keys)) != len(keys):
        raise ValueError(f"blocks: need at least one, each key once, got {keys}")
    total = sum(b.share for b in blocks)
    if abs(total - 1.0) > SHARE_TOLERANCE:
        raise ValueError(f"blocks: shares must sum to 1 (the sensitivity is split among them), got {total!r}")


def sensitivity(blocks: Sequence[Block]) -> float:
    """The L2 sensitivity of the released vector after each block is scaled by sqrt(share) / bound:
    sqrt(sum of shares), 1 for valid blocks. What the noise multiplier multiplies."""
    return math.sqrt(sum(b.share for b in blocks))


def patient_weights(patient: np.ndarray | None, n: int) -> np.ndarray:
    """(n,) float64 weight of each item: 1/k for an item of a patient with k items in the set (so
    every patient weighs 1 in total); 1 each when `patient` is None (each item its own patient)."""
    if patient is None:
        return np.ones(n)
    _, inverse, k = np.unique(np.asarray(patient), return_inverse=True, return_counts=True)
    return 1.0 / k[inverse.reshape(-1)]


def gaussian_release(counts: Counts, blocks: Sequence[Block], noise_multiplier: float,
                     rng: np.random.Generator) -> Counts:
    """The noisy counts: for each block, float64 `counts[key]` + N(0, block.noise_std^2) per entry,
    rounded to the release grid (`release_grid`). `counts` must hold exactly the blocks' keys, every
    value finite. noise_multiplier 0 returns the exact counts as float64, drawing nothing (a site's
    policy refuses it; tests use it). Draws one standard normal per entry, block by block in the
    order given, whatever the values."""
    check_blocks(blocks)
    if not (isinstance(noise_multiplier, (int, float)) and 0.0 <= noise_multiplier < math.inf):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if set(counts) != {b.key for b in blocks}:
        raise ValueError(f"gaussian_release: counts hold {sorted(counts)}, blocks {sorted(b.key for b in blocks)}")
    out: Counts = {}
    for block in blocks:
        exact = np.asarray(counts[block.key], dtype=np.float64)
        if not np.all(np.isfinite(exact)):
            # the caller clips every per-patient quantity; a non-finite count is its bug, and
            # the message names no value
            raise ValueError(f"gaussian_release: counts '{block.key}' are not all finite")
        if noise_multiplier == 0.0:
            out[block.key] = exact.copy()
            continue
        std = block.noise_std(noise_multiplier)
        grid = release_grid(std)
        noisy = exact + std * rng.standard_normal(exact.shape)
        out[block.key] = np.asarray(np.round(noisy / grid) * grid)
    return out


def release_grid(std: float) -> float:
    """The spacing released values are rounded to: the largest power of two <= std * GRID_FRACTION."""
    return 2.0 ** math.floor(math.log2(std * GRID_FRACTION))


# ------------------------------------------------------------------------------------ calibration


def scoring_release(noise_multiplier: float, releases: int = 1):
    """`releases` scoring releases at `noise_multiplier` on one split, as the accountants' Release:
    the Gaussian mechanism at sensitivity 1 on every patient of the split (sample rate 1)."""
    from privmed.privacy.accountants import Release

    return Release(noise_multiplier, 1.0, releases)


def scoring_epsilon(noise_multiplier: float, releases: int, delta: float, accountant: str = "pld") -> float:
    """Epsilon per patient of one split after `releases` scoring releases at `noise_multiplier`."""
    from privmed.privacy.accountants import epsilon_spent

    return epsilon_spent([scoring_release(noise_multiplier, releases)], delta, accountant)


def scoring_noise(epsilon: float, delta: float, releases: int, accountant: str = "pld") -> float:
    """The smallest noise multiplier (to 1% relative) whose `releases` scoring releases on one split
    cost at most `epsilon` at `delta` per patient of that split, by `accountant` (never more:
    privmed.privacy.calibration.noise_for_epsilon at sample rate 1). ConfigError naming
    privacy.epsilon / privacy.delta for a target out of range."""
    from privmed.privacy.calibration import noise_for_epsilon

    if not isinstance(releases, int) or isinstance(releases, bool) or releases < 1:
        raise ValueError(f"releases must be an integer >= 1, got {releases!r}")
    return noise_for_epsilon(epsilon, delta, 1.0, releases, accountant)

"""What a coordinator asks of a site, in any runner: train from these weights in this round of this
run (and, under secure aggregation, how to shape the contribution). Platform-free; the Flower
runner carries it in Flower's records (privmed.federation.flower.messages).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from privmed.federation.strategies import TrainTask


@dataclass(frozen=True)
class Instruction:
    """A TrainTask and how to run and return it."""

    task: TrainTask
    rnd: int
    run: str = ""  # the run's id: a site never releases the same (run, round) twice differently
    steps: int | None = None  # fine-tuning: this many batches instead of the configured ones
    purpose: str = "train"
    secure: bool = False  # reply with the contribution to a secure sum, not the weights
    weighting: str = "samples"  # secure: weigh the contribution by n_samples, or 1 ('uniform')
    clip: float | None = None  # secure: clip the contribution to this L2 norm
    max_weight: float = 1.0  # secure: SecAgg+'s max_weight (the site checks its quantisation range)
    clipping_range: float = 8.0  # secure: SecAgg+'s clipping range

    def digest(self) -> str:
        """SHA-256 of everything that determines the site's reply: two instructions with the same
        digest get the same reply; a site that released one refuses any other for that round."""
        h = hashlib.sha256()
        t = self.task
        fields = (
            self.run, self.rnd, self.purpose, self.steps, self.secure, self.weighting, self.clip,
            self.max_weight, self.clipping_range, t.site, t.model_key, float(t.prox_mu),
            t.correction is not None,
        )
        h.update(repr(fields).encode())
        for a in list(t.weights) + list(t.correction or []):
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()

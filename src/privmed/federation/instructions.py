"""What a coordinator asks of a site, in any runner: train from these weights in this round of this
run (and, under secure aggregation, how to shape the contribution), or score these weights on the
site's own patients (ScoreRequest; the site answers Scores). Platform-free; the Flower
runner carries it in Flower's records (privmed.federation.flower.messages).

Every reply a site computes from its patients is bound to a digest of everything that shaped it:
the instruction (weights, round, run, purpose, ...) and the run's setup (config, noise, sampling,
clipping, learning rate, label shares). The site's DP randomness for that reply derives from the
digest, and its ledger keeps the digest: a (run, round) is released once, and only a retry of the
very same request (same digest) gets the same reply again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from privmed.federation.strategies import TrainTask, Weights

SPLITS = ("val", "test")

# per split: (metrics, counts) of one model on one site's patients
Scores = dict[str, tuple[dict, dict]]


def _hash_arrays(h: "hashlib._Hash", arrays) -> None:  # noqa: ANN001
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())


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
        """SHA-256 of everything in the instruction that determines the site's reply (the run's
        setup is bound in by `release_digest`)."""
        h = hashlib.sha256()
        t = self.task
        fields = (
            self.run, self.rnd, self.purpose, self.steps, self.secure, self.weighting, self.clip,
            self.max_weight, self.clipping_range, t.site, t.model_key, float(t.prox_mu),
            t.correction is not None,
        )
        h.update(repr(fields).encode())
        _hash_arrays(h, list(t.weights) + list(t.correction or []))
        return h.hexdigest()


@dataclass(frozen=True)
class ScoreRequest:
    """Score `weights` (the model `model_key`) on site `site`'s own patients of `splits`."""

    site: str
    model_key: str
    weights: Weights
    splits: tuple[str, ...] = SPLITS


def release_digest(ins: Instruction, setup_digest: str) -> str:
    """The digest a training reply is bound to: the instruction's and the run setup's together."""
    return hashlib.sha256(f"train|{ins.digest()}|{setup_digest}".encode()).hexdigest()


def scoring_digest(run: str, rnd: int, split: str, model_key: str, weights, setup_digest: str) -> str:  # noqa: ANN001
    """The digest a scoring reply (one split) is bound to: the model's weights, which split, the
    round and run, and the run's setup."""
    h = hashlib.sha256()
    h.update(repr(("score", run, int(rnd), split, model_key, setup_digest)).encode())
    _hash_arrays(h, weights)
    return h.hexdigest()


def described(ins: Instruction) -> str:
    """An instruction in a refusal: "round 3 of run R", or "'finetune' for round 3 of run R"."""
    where = f"round {ins.rnd} of run {ins.run or '?'}"
    return where if ins.purpose == "train" else f"'{ins.purpose}' for {where}"

"""training.lr_schedule: the sites' learning rate per round, checked against the formula and on
the step a site takes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_config

from privmed.config import validate_config
from privmed.federation.experiment import prepare_experiment
from privmed.federation.site import get_weights, round_lr
from privmed.federation.strategies import TrainTask


def _training(schedule: str, lr: float = 0.1):
    return validate_config(tiny_config(training__lr=lr, training__lr_schedule=schedule)).training


def test_constant_keeps_the_rate_in_every_round():
    t = _training("constant")
    assert [round_lr(t, r, 10) for r in (1, 5, 10, 11)] == [0.1] * 4


def test_cosine_starts_at_lr_falls_every_round_and_holds_past_the_end():
    t = _training("cosine")
    rates = [round_lr(t, r, 10) for r in range(1, 11)]
    assert rates[0] == pytest.approx(0.1)
    assert rates[4] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 4 / 10)))
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert rates[-1] > 0
    assert round_lr(t, 12, 10) == rates[-1]  # a resumed run given more rounds


def test_a_bad_schedule_is_refused_by_name():
    with pytest.raises(Exception, match="lr_schedule"):
        _training("linear")


def test_a_site_steps_by_the_rounds_rate(one_thread):
    """One plain SGD step (no momentum, no augmentation) on the same batch moves the weights by
    -lr(round) x gradient: round 4 of 6 moves them by exactly its cosine factor of round 1's move."""
    cfg = validate_config(tiny_config(
        training__lr_schedule="cosine", training__optimizer="sgd", training__momentum=0.0,
        training__lr=0.1, training__augment=False, federation__rounds=6, federation__local_steps=1,
    ))
    exp = prepare_experiment(cfg)
    site = next(iter(exp.trainers.values()))
    start = get_weights(site.model)

    def move(rnd: int) -> np.ndarray:
        up = site.train(TrainTask(site.name, start), rnd, generator=torch.Generator().manual_seed(3))
        return np.concatenate([(a - b).ravel() for a, b in zip(up.weights, start)])

    first, fourth = move(1), move(4)
    factor = 0.5 * (1 + math.cos(math.pi * 3 / 6))
    assert np.abs(first).max() > 0
    np.testing.assert_allclose(fourth, factor * first, rtol=1e-4, atol=1e-7)


def test_a_tasks_training_defaults_fill_only_what_the_config_leaves_out():
    """The reconstruction defaults name an optimizer and its learning rate: both apply to a silent
    config (the default optimizer, filled in first, must not hold the default rate back), and a
    config naming its own optimizer keeps the generic rate."""
    silent = validate_config({"task": "reconstruction"}).training
    assert (silent.optimizer, silent.lr, silent.lr_schedule, silent.batch_size) == ("adam", 2e-3, "cosine", 4)
    assert silent.eval_batch_size == 16
    named = validate_config({"task": "reconstruction", "training": {"optimizer": "sgd"}}).training
    assert (named.optimizer, named.lr) == ("sgd", 0.01)
    assert validate_config({"task": "segmentation"}).training.lr == 0.05

"""training.device: cpu by default, a GPU where asked and present, refused where it cannot serve."""

from __future__ import annotations

import pytest
import torch

import privmed
from privmed.config import TrainingConfig, validate_config
from privmed.errors import ConfigError
from privmed.federation.site import resolve_device

TINY = {"data": {"samples_per_site": 40}, "federation": {"rounds": 1}}


def test_cpu_is_the_default_and_auto_falls_back_to_it():
    assert validate_config({}).training.device == "cpu"
    assert resolve_device(TrainingConfig()) == torch.device("cpu")
    auto = resolve_device(TrainingConfig(device="auto"))
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    # DP-SGD's noise comes from a CPU generator: auto keeps a private site on the CPU
    assert resolve_device(TrainingConfig(device="auto"), private=True) == torch.device("cpu")


def test_dp_sgd_on_cuda_is_refused_at_config_time():
    with pytest.raises(ConfigError, match="training.device: 'cuda' with privacy.mode 'dp-sgd'"):
        validate_config({"training": {"device": "cuda"}, "privacy": {"mode": "dp-sgd", "epsilon": 8}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line():
    with pytest.raises(ConfigError, match="torch sees no GPU"):
        privmed.run({**TINY, "training": {"device": "cuda"}}, report=False)


def test_auto_gives_the_cpu_result_on_a_machine_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("with a GPU, auto trains there: results differ in the last bits")
    a = privmed.run({**TINY, "training": {"device": "auto"}}, report=False).summary["test"]
    b = privmed.run(TINY, report=False).summary["test"]
    assert a == b

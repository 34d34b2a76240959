"""Red team: what a hospital keeps to itself, and weights that are not a model.

- The state directory (key, ledger, the last release that secure aggregation is meant to hide) is
  owner-only: 0700, its files 0600.
- One `privmed join` per state directory: two would overwrite each other's ledger.
- A state that holds a key but has lost its ledger (deleted, or unreadable) refuses to go on, naming
  the file: a fresh ledger would forget the hospital's history and budget.
- Weights that are not finite, or not the run's model, are refused before any patient is touched.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from hospital_endpoint import DEPLOY, honest_setup, hospital, initial_weights, score, set_up, train

from privmed.federation.client import SiteStateError, lock_state
from privmed.federation.flower.site_service import SiteEndpoint
from privmed.federation.site import Site
from privmed.privacy.site_ledger import SiteRefused


@pytest.fixture
def trained(tmp_path):
    """hospital-a after round 1 of run-1: its endpoint, its state directory, the weights sent."""
    h = hospital(tmp_path / "state")
    setup = honest_setup(h)
    endpoint = SiteEndpoint(h)
    set_up(endpoint, setup)
    w0 = initial_weights(h, setup)
    train(endpoint, w0, 1)
    return endpoint, tmp_path / "state", w0


def _join(state, *extra: str) -> subprocess.CompletedProcess:
    """`privmed join` of hospital-a on `state`, towards a port nobody listens on."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "privmed", "join", str(DEPLOY / "hospital-a.yaml"), "--server", "127.0.0.1:9",
         "--insecure", "--state", str(state), *extra],
        capture_output=True, text=True, env=env, timeout=300,
    )


def test_the_state_is_owner_only(trained):
    _, state, _ = trained
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    files = {f.name: stat.S_IMODE(f.stat().st_mode) for f in state.iterdir()}
    assert {"secret.key", "site_ledger.json", "last_release.pt"} <= set(files)
    assert all(mode == 0o600 for mode in files.values()), files


def test_one_join_per_state_directory(tmp_path):
    state = tmp_path / "state"
    held = lock_state(state)
    try:
        with pytest.raises(SiteStateError, match=rf"another privmed join \(pid {os.getpid()}\) is using this state"):
            lock_state(state)
        done = _join(state)  # a second hospital process on the same state: refused at once
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith(f"privmed: error: {state}: another privmed join")
    finally:
        held.close()


@pytest.mark.parametrize("damage", ["deleted", "unreadable"])
def test_a_lost_ledger_stops_the_hospital(trained, damage):
    _, state, _ = trained
    ledger = state / "site_ledger.json"
    if damage == "deleted":
        ledger.unlink()
    else:
        ledger.write_text('{"site": "hospital-a", "releases": [')
    with pytest.raises(SiteStateError, match=str(ledger)):
        hospital(state)
    done = _join(state)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert str(ledger) in done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("crafted", ["nan", "inf", "huge-dtype", "shape", "count"])
def test_weights_that_are_not_the_model_are_refused_before_any_patient(trained, monkeypatch, crafted):
    endpoint, _, w0 = trained

    def touched(*args, **kwargs):
        raise AssertionError("a patient was touched")

    monkeypatch.setattr(Site, "train", touched)
    monkeypatch.setattr(Site, "predict", touched)
    w = [x.copy() for x in w0]
    if crafted == "nan":
        w[0].flat[0] = np.nan
    elif crafted == "inf":
        w[-1].flat[-1] = np.inf
    elif crafted == "huge-dtype":
        w[0] = w[0].astype(np.float64)
    elif crafted == "shape":
        w[0] = w[0].reshape(-1)
    else:
        w = w[:-1]
    with pytest.raises(SiteRefused, match="refused the request: weights"):
        train(endpoint, w, 2)
    with pytest.raises(SiteRefused, match="refused the request: weights"):
        score(endpoint, w, 2, "val")

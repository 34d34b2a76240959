"""Kill a run at some moment, resume it, and get what an uninterrupted run gets."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_config
from privmed.federation.runner import DIE_AFTER_ROUND, DIE_IN_ROUND

TIMING = {"seconds", "train_seconds", "finished"}  # wall-clock: differs between any two runs


def _cfg_file(tmp_path: Path) -> Path:
    cfg = tiny_config(federation__rounds=4)  # tiny's 120 images a site: the crash hooks need no long rounds
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return f


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "privmed", *args], capture_output=True, text=True, **kw)


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _final(out: Path):
    summary = json.loads((out / "summary.json").read_text())
    model = torch.load(out / "model.pt", weights_only=True)["state_dicts"]["global"]
    return summary, model


def _crash(cfg: Path, out: Path, hook: str, rnd: int) -> None:
    """Run `cfg` into `out` until the runner's test-only crash point `hook` (privmed.federation.runner)
    at round `rnd` kills it with SIGKILL: at that exact moment, not after a guessed sleep."""
    env = {**os.environ, hook: str(rnd)}
    r = subprocess.run([sys.executable, "-m", "privmed", "run", str(cfg), "--out", str(out), "--quiet"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr  # killed by the hook, not finished or failed


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    cfg = _cfg_file(tmp)
    out = tmp / "run"
    r = _run(["run", str(cfg), "--out", str(out), "--quiet"])
    assert r.returncode == 0, r.stderr
    return cfg, out


@pytest.mark.parametrize("when", ["after-round-1", "after-round-3", "mid-round-2"])
def test_kill_and_resume_equals_uninterrupted(tmp_path, reference, when):
    cfg, ref_out = reference
    out = tmp_path / "run"
    if when == "mid-round-2":
        # Round 1 is checkpointed; killed in round 2, once its sites have trained, before it is
        # scored or checkpointed.
        _crash(cfg, out, DIE_IN_ROUND, 2)
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["round-0001.pt"]
    else:
        _crash(cfg, out, DIE_AFTER_ROUND, int(when[-1]))
        assert (out / "checkpoints" / f"round-000{when[-1]}.pt").exists()
    assert not (out / "summary.json").exists(), "the run finished before it was killed"

    r = _run(["run", str(cfg), "--out", str(out), "--resume", "--quiet"])
    assert r.returncode == 0, r.stderr
    assert _rows(out) == _rows(ref_out)
    (s_ref, m_ref), (s, m) = _final(ref_out), _final(out)
    for k in m_ref:
        assert torch.equal(m_ref[k], m[k]), k
    for key in ("test", "val", "sites", "best_round", "sample_gradient_steps", "rounds_completed"):
        assert s[key] == s_ref[key], key
    assert not list(out.rglob("*.tmp"))


def test_resume_refuses_another_config(tmp_path, reference):
    cfg, ref_out = reference
    out = tmp_path / "run"
    assert _run(["run", str(cfg), "--out", str(out), "--quiet", "--set", "federation.rounds=1"]).returncode == 0
    r = _run(["run", str(cfg), "--out", str(out), "--resume", "--set", "training.lr=0.1"])
    assert r.returncode == 2
    assert "training.lr" in r.stderr and "Traceback" not in r.stderr


def test_resume_can_extend_rounds(tmp_path, reference):
    cfg, ref_out = reference
    out = tmp_path / "run"
    assert _run(["run", str(cfg), "--out", str(out), "--quiet", "--set", "federation.rounds=2"]).returncode == 0
    r = _run(["run", str(cfg), "--out", str(out), "--quiet", "--resume"])
    assert r.returncode == 0, r.stderr
    assert _rows(out) == _rows(ref_out)

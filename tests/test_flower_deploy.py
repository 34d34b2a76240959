"""The Flower runner across real processes on loopback, as the README tells a coordinator and its
hospitals to run it: TLS and node authentication on, `privmed serve`, `privmed join` per hospital,
`privmed run --runner flower`. Every process a test starts is stopped by its id (and its process
group) at the end.

Slow by nature (Flower starts a process for every message): a few minutes in all.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import copy_keys, tiny_config

import privmed
from privmed.config import validate_config
from privmed.federation.flower.deploy import free_port, stop_process

pytestmark = pytest.mark.slow


def _privmed(*args: str, log: Path | None = None, **kw) -> subprocess.Popen:
    out = open(log, "ab") if log else subprocess.PIPE  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "privmed", *args], stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, **kw)


def _wait_for(path: Path, text: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{proc.args} ended ({proc.returncode}):\n{path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"'{text}' not in {path} after {timeout} s:\n{path.read_text(errors='replace')[-3000:]}")


class Federation:
    """A coordinator and hospitals on loopback, each in its own process group."""

    def __init__(self, root: Path, sites: list[str]):
        self.root, self.sites = root, sites
        self.procs: dict[str, subprocess.Popen] = {}
        self.address = f"127.0.0.1:{free_port()}"
        subprocess.run([sys.executable, "-m", "privmed", "certs", str(root / "certs")], check=True,
                       capture_output=True)
        for s in sites:
            subprocess.run([sys.executable, "-m", "privmed", "keys", str(root / "keys"), "--name", s],
                           check=True, capture_output=True)

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def serve(self) -> None:
        self.procs["coordinator"] = p = _privmed(
            "serve", "--certs", str(self.root / "certs"), "--keys", str(self.root / "keys"),
            "--address", self.address, "--home", str(self.root / "home"), "--dashboard", "127.0.0.1:0",
            log=self.log("coordinator"),
        )
        _wait_for(self.log("coordinator"), "coordinator listening", 60, p)

    def dashboard(self) -> dict:
        """What the coordinator's live dashboard shows now (its state.json)."""
        import urllib.request

        url = re.findall(r"^dashboard: (\S+)$", self.log("coordinator").read_text(errors="replace"), re.M)[-1]
        with urllib.request.urlopen(url + "state.json", timeout=10) as r:
            return json.load(r)

    def join(self, config: Path, site: str) -> None:
        """A rehearsal hospital: site `site` of the run config `config`."""
        self.procs[site] = _privmed(
            "join", str(config), "--site", site, "--server", self.address,
            "--certs", str(self.root / "certs"), "--key", str(self.root / "keys" / site),
            "--home", str(self.root / f"home-{site}"), log=self.log(site),
        )

    def join_own(self, site_config: Path, site: str) -> None:
        """A hospital with its own site config (its own folder), its state in ROOT/sites/SITE."""
        self.procs[site] = _privmed(
            "join", str(site_config), "--server", self.address,
            "--certs", str(self.root / "certs"), "--key", str(self.root / "keys" / site),
            "--home", str(self.root / f"home-{site}"), "--state", str(self.root / "sites" / site),
            log=self.log(site),
        )

    def run(self, config: Path, out: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "privmed", "run", str(config), "--runner", "flower", "--server",
             self.address, "--certs", str(self.root / "certs"), "--home", str(self.root / "home"),
             "--out", str(out), "--quiet", *extra],
            capture_output=True, text=True, timeout=timeout,
        )

    def stop(self, name: str) -> None:
        stop_process(self.procs.pop(name), grace=5)

    def kill(self, name: str) -> None:
        """A hospital that dies: SIGKILL to its whole process group (privmed join, its SuperNode)."""
        p = self.procs.pop(name)
        from privmed.federation.flower.deploy import descendants

        for pid in [p.pid] + descendants(p.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()

    def close(self) -> None:
        """Stop every process at once: each gets its grace in parallel, not one after another."""
        import threading

        stops = [threading.Thread(target=stop_process, args=(self.procs.pop(n), 5)) for n in list(self.procs)]
        for t in stops:
            t.start()
        for t in stops:
            t.join()


@pytest.fixture
def federation(tmp_path):
    feds = []

    def make(sites):
        fed = Federation(tmp_path, sites)
        feds.append(fed)
        return fed

    yield make
    for fed in feds:
        fed.close()


def _config(tmp_path: Path, name: str, **over) -> Path:
    cfg = tiny_config(**{"data__samples_per_site": 60, "federation__secure_aggregation": True, **over})
    cfg["name"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_coordinator_and_three_hospitals_with_secagg_then_a_restart_resumes(federation, tmp_path):
    sites = ["site-1", "site-2", "site-3"]
    config = _config(tmp_path, "flower")
    fed = federation(sites)
    fed.serve()
    for s in sites:
        fed.join(config, s)
    out = tmp_path / "run"
    res = fed.run(config, out)
    assert res.returncode == 0, res.stdout + res.stderr
    # the run directory, as the in-process runner writes it
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "test_counts.npz", "model.pt",
              "report.html", "checkpoints/round-0002.pt"):
        assert (out / f).is_file(), f
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["secure_aggregation"]["protocol"].startswith("SecAgg+")
    assert summary["rounds_completed"] == 2
    # `serve` wrote which node each site's key is; the ServerApp believed a node only for its site
    assert sorted(json.loads((tmp_path / "home" / "nodes.json").read_text())) == sites
    # the coordinator's dashboard showed the run its ServerApp ran
    board = fed.dashboard()
    assert board["status"] == "finished" and board["runner"] == "flower" and len(board["rounds"]) == 2
    assert [(h["name"], h["registered"], h["online"], h["last_round"]) for h in board["hospitals"]] == [
        (s, True, True, 2) for s in sites]

    # parity: the same config and seed in one process gives the same result. SecAgg+ rounds with
    # seeded stochastic rounding and its masks cancel exactly, so the tolerance is float noise.
    local = privmed.run(validate_config(yaml.safe_load(config.read_text())), report=False)
    for key, value in local.summary["test"].items():
        assert summary["test"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert "report" in res.stdout and "AUC" in res.stdout

    # the coordinator restarts; the hospitals reconnect; the run resumes from its run directory
    fed.stop("coordinator")
    fed.serve()
    longer = _config(tmp_path, "flower", federation__rounds=3)
    res = fed.run(longer, out, "--resume")
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    local3 = privmed.run(validate_config(yaml.safe_load(longer.read_text())), report=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test"]["auc"] == pytest.approx(local3.summary["test"]["auc"], rel=1e-6)


def test_a_hospital_killed_mid_round_out_of_five(federation, tmp_path):
    sites = [f"site-{i}" for i in range(1, 6)]
    config = _config(
        tmp_path, "kill", sites__count=5, data__samples_per_site=40, federation__rounds=2,
        federation__min_sites=4, federation__round_timeout=30.0,
    )
    fed = federation(sites)
    fed.serve()
    for s in sites:
        fed.join(config, s)
    out = tmp_path / "run"
    runner = subprocess.Popen(
        [sys.executable, "-m", "privmed", "run", str(config), "--runner", "flower", "--server",
         fed.address, "--certs", str(tmp_path / "certs"), "--home", str(tmp_path / "home"),
         "--out", str(out), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        _wait_for(out / "metrics.jsonl", '"round": 1', 600, runner)
        fed.kill("site-4")  # round 2 has just started
        stdout, _ = runner.communicate(timeout=600)
    finally:
        stop_process(runner, grace=5)
    assert runner.returncode == 0, stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert "dropped" not in rows[0]
    assert rows[1]["dropped"] == ["site-4"]
    assert sorted(rows[1]["train_loss"]) == ["site-1", "site-2", "site-3", "site-5"]
    assert np.isfinite(json.loads((out / "summary.json").read_text())["test"]["auc"])


def test_hospitals_refuse_what_their_own_budget_and_ledger_do_not_allow(federation, tmp_path):
    """Hospitals whose own configs allow 3 DP rounds (fixed noise) and train only under DP-SGD,
    against coordinators that ask for (c) training without DP, (b) a released round again with
    other weights (a tampered checkpoint) and (a) a run past the budget (a second run, refused
    before its first release): each is refused by the hospital, over Flower, with its reason in the coordinator's output; and each
    hospital's own ledger, kept in its --state, counts every release of every run once."""
    dp = dict(privacy__mode="dp-sgd", privacy__noise_multiplier=1.0, privacy__delta=1e-3,
              privacy__accountant="rdp", training__optimizer="sgd", training__lr=0.5, training__momentum=0.0,
              federation__local_steps=1, training__batch_size=16, federation__secure_aggregation=False)
    sites = ["site-1", "site-2", "site-3"]
    hospital = _config(tmp_path, "hospital", federation__rounds=3, **dp)
    fed = federation(sites)
    fed.serve()
    for s in sites:
        fed.join(hospital, s)

    # (c) a coordinator without privacy: hospitals whose own configs train only under DP-SGD
    # refuse it (fine-tuning under DP, the other purpose, is refused in process and through the
    # relay: tests/test_site_guarantee.py)
    lax = _config(tmp_path, "lax", federation__rounds=1, **{**dp, "privacy__mode": "none"})
    res = fed.run(lax, tmp_path / "lax")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "refused round 1 of run" in res.stderr and "takes part only under DP it runs itself" in res.stderr
    assert "takes part only under DP it runs itself" in fed.log("site-1").read_text()  # the hospital's own log

    # a proper run of 2 rounds, then (b): its round 1 checkpoint tampered with and round 2 asked again
    good = _config(tmp_path, "good", federation__rounds=2, **dp)
    out = tmp_path / "good"
    res = fed.run(good, out)
    assert res.returncode == 0, res.stdout + res.stderr
    ledger = json.loads((out / "privacy_ledger.json").read_text())
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    (out / "checkpoints" / "round-0002.pt").unlink()
    (out / "summary.json").unlink()
    ckpt_path = out / "checkpoints" / "round-0001.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["models"]["global"] = [w + 0.01 for w in ckpt["models"]["global"]]
    torch.save(ckpt, ckpt_path)
    res = fed.run(good, out, "--resume")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "refused round 2 of run" in res.stderr and "already released that round for other weights" in res.stderr

    # (a) the hospitals' budget is 3 rounds and the good run spent 2: a new run of 2 rounds, under
    # SecAgg+, is refused before its first release, with what the hospital can still afford (Flower's
    # SecAgg+ workflow drops a failed site without its reason: the coordinator used to say only
    # "too few sites answered")
    secure = _config(tmp_path, "again", federation__rounds=2, **{**dp, "federation__secure_aggregation": True})
    res = fed.run(secure, tmp_path / "again")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "too few sites answered" not in res.stderr
    assert "refused round 1 of run" in res.stderr and "the whole run it was set up for, 2 rounds" in res.stderr
    assert "it can afford 1 such round" in res.stderr

    for s in sites:
        own = json.loads((tmp_path / "sites" / s / "site_ledger.json").read_text())
        assert len(own["releases"]) == 2 and own["epsilon"] <= own["budget_epsilon"]  # the good run's 2
        # the good run's releases, as the coordinator's ledger counts them
        mine = [(r["round"], r["noise_multiplier"], r["sample_rate"], r["steps"])
                for r in own["releases"] if r["run"] == run_id]
        theirs = [(r["round"], r["noise_multiplier"], r["sample_rate"], r["steps"])
                  for r in ledger["sites"][s]["releases"]]
        assert mine == theirs


def test_three_hospitals_each_with_only_its_own_folder_and_a_coordinator_with_none(federation, tmp_path):
    """The deployment the README shows: each hospital joins with its own site config (its own folder
    of images, its own split and budget); the coordinator's config names no data, and it plans and
    scores from what the hospitals report. TLS, node authentication, SecAgg+ and DP-SGD on. Parity:
    the same hospitals simulated in one process from their own configs, with the same keys."""
    from hospital_folders import HOSPITALS, coordinator_config, site_config, write_folders

    from privmed.config import load_site_config
    from privmed.tasks.counts import load_counts

    folders = write_folders(tmp_path / "data")
    own = {h: site_config(tmp_path, h, folders[h]) for h in HOSPITALS}
    coordinator = coordinator_config(tmp_path, "deploy")
    assert yaml.safe_load(coordinator.read_text())["data"] == {"source": "sites"}
    fed = federation(list(HOSPITALS))
    fed.serve()
    for h in HOSPITALS:
        fed.join_own(own[h], h)
    out = tmp_path / "run"
    res = fed.run(coordinator, out)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads((out / "summary.json").read_text())
    # per-site and mean-over-sites test scores, the pooled one merged from the sites' counts
    assert set(summary["sites"]) == set(HOSPITALS)
    assert all(summary["sites"][h]["test"] for h in HOSPITALS)
    # under DP the sites' scores are noisy counts: n is near the test images' number, not equal
    n_test = sum(summary["sites"][h]["n_test"] for h in HOSPITALS)
    assert abs(summary["test"]["n"] - n_test) < 0.5 * n_test
    assert summary["test_mean_over_sites"] and "each site's own test patients" in summary["evaluation"]["test"]
    assert summary["data"]["source"] == "sites" and summary["data"]["class_names"] == ["lesion", "no lesion"]
    assert not (out / "predictions.npz").exists() and load_counts(out / "test_counts.npz")["global"]
    assert (out / "report.html").is_file() and summary["privacy"]["mode"] == "dp-sgd"
    # nothing of where a hospital keeps its data reached the coordinator's run directory
    for f in out.rglob("*"):
        if f.is_file() and "private" not in f.parts:
            assert str(tmp_path / "data").encode() not in f.read_bytes(), f
    # each hospital's own ledger, in its own state, agrees with the coordinator's
    ledger = json.loads((out / "privacy_ledger.json").read_text())
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    for h in HOSPITALS:
        mine = json.loads((tmp_path / "sites" / h / "site_ledger.json").read_text())
        assert mine["budget_epsilon"] == 8.0
        assert [(r["round"], r["noise_multiplier"], r["sample_rate"], r["steps"])
                for r in mine["releases"] if r["run"] == run_id] == [
            (r["round"], r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in ledger["sites"][h]["releases"]]

    # parity: the hospitals simulated in one process from their own configs, with their keys and
    # the run's id. SecAgg+'s seeded rounding and cancelling masks: the tolerance is float noise.

    local = privmed.run(validate_config(yaml.safe_load(coordinator.read_text())),
                        copy_keys(out, tmp_path / "local", tmp_path / "sites"), resume=True, report=False,
                        hospitals=[load_site_config(own[h]) for h in HOSPITALS])
    # both as written to summary.json: a site whose noisy test counts leave one class empty has no
    # AUC, which the file holds as null (NaN in memory); the keys are fresh each run, so this happens
    local_summary = json.loads((tmp_path / "local" / "summary.json").read_text())
    for key, value in local_summary["test"].items():
        assert summary["test"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    for h in HOSPITALS:
        mine, theirs = summary["sites"][h]["test"]["auc"], local_summary["sites"][h]["test"]["auc"]
        assert (mine is None and theirs is None) or mine == pytest.approx(theirs, rel=1e-6), (h, mine, theirs)

"""The live dashboard: what LiveState keeps of a run (only what the coordinator holds, every
epsilon the ledger's rounded up), the HTTP server (loopback by default, the page self-contained),
`--dashboard` on the command line, the coordinator's file-backed view, and the page itself in
headless Chromium while a run of three hospitals goes from one round to the next."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config

import privmed
from privmed.cli import main
from privmed.dashboard import (
    DEFAULT, Dashboard, DashboardError, coordinator_dashboard, file_snapshot, is_loopback, live_file,
    parse_address, waiting_snapshot,
)
from privmed.federation.live import LiveState
from privmed.privacy.figures import format_epsilon
from privmed.privacy.ledger import BudgetExceeded, PrivacyLedger

SITES = ["hospital-a", "hospital-b", "hospital-c"]
HOSPITAL_KEYS = {"name", "online", "trains", "state", "last_round", "n_train", "n_patients", "patient_ids",
                 "epsilon", "spent", "dropped", "refused"}
ROUND_KEYS = {"round", "seconds", "val", "test", "train_loss", "dropped", "attempts"}


def _dp_config(rounds: int = 2) -> dict:
    return tiny_config(
        data__samples_per_site=60, sites__names=SITES, federation__rounds=rounds,
        privacy={"mode": "dp-sgd", "epsilon": 8.0, "delta": 1e-5, "accountant": "pld"},
        training={"batch_size": 32, "lr": 2.0},
    )


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, "", ""


# ---------------------------------------------------------------- LiveState


def test_a_run_tells_live_state_each_round_and_the_ledger_backs_every_epsilon(tmp_path, one_thread):
    snapshots = []
    live = LiveState(sink=snapshots.append)
    privmed.run(_dp_config(rounds=2), tmp_path / "run", live=live, report=False)
    s = live.snapshot()
    assert s["status"] == "finished" and s["round"] == 2 and s["error"] is None
    assert [h["name"] for h in s["hospitals"]] == SITES
    assert all(set(h) == HOSPITAL_KEYS for h in s["hospitals"])  # nothing but these: no patient data
    assert [r["round"] for r in s["rounds"]] == [1, 2] and all(set(r) == ROUND_KEYS for r in s["rounds"])
    assert s["run"]["metric_label"] == "AUC" and s["run"]["synthetic"] is True
    assert s["privacy"]["unit"] == "patient" and s["privacy"]["budget"] == "8"
    ledger = PrivacyLedger.load(tmp_path / "run" / "privacy_ledger.json")
    for h in s["hospitals"]:
        exact = ledger.epsilon(h["name"])
        assert h["epsilon"] == format_epsilon(exact) and float(h["epsilon"]) >= exact  # rounded up
        assert h["last_round"] == 2 and h["online"] and h["state"] == "idle"
        assert 0 < h["spent"] <= 1 and h["spent"] >= exact / 8
    # the ledger is charged before a round's training: the page never shows less than it counts
    training = [x for x in snapshots if x["stage"].startswith("round 2: training")]
    assert training and all(float(h["epsilon"]) >= ledger.epsilon(h["name"]) for h in training[0]["hospitals"])
    stages = [x["stage"] for x in snapshots]
    assert any(st.startswith("round 1: scoring") for st in stages) and stages[-1] == "finished"
    keys = set(re.findall(r'"(\w+)":', json.dumps(snapshots)))
    assert not keys & {"weights", "images", "labels", "predictions", "patient", "target"}


def test_a_resumed_run_shows_the_rounds_before_it(tmp_path, one_thread):
    privmed.run(tiny_config(federation__rounds=1), tmp_path / "run", report=False)
    live = LiveState()
    privmed.run(tiny_config(federation__rounds=2), tmp_path / "run", resume=True, report=False, live=live)
    s = live.snapshot()
    assert [r["round"] for r in s["rounds"]] == [1, 2] and s["status"] == "finished"
    assert all(h["last_round"] == 2 and h["epsilon"] is None for h in s["hospitals"]) and s["privacy"] is None


def test_dropped_sites_refusals_and_a_refused_round_are_kept():
    live = LiveState()
    live.connecting(SITES, "x")
    assert live.snapshot()["status"] == "connecting" and not any(h["online"] for h in live.snapshot()["hospitals"])
    live.stage(1, "round 1: training", SITES, training=True)
    assert [h["state"] for h in live.snapshot()["hospitals"]] == ["training"] * 3
    live.stage_done(1, ["hospital-a", "hospital-c"], ["hospital-b"], trained=True)
    live.refused(1, "site", "site 'hospital-c' refused round 2 of run r: past its budget")
    live.ended(BudgetExceeded("round 2 refused (delta 1e-05, prv accountant): site 'hospital-a' ..."))
    s = live.snapshot()
    b = {h["name"]: h for h in s["hospitals"]}
    assert b["hospital-b"]["online"] is False and b["hospital-b"]["state"] == "dropped" and b["hospital-b"]["dropped"] == 1
    assert b["hospital-a"]["last_round"] == 1 and b["hospital-b"]["last_round"] is None
    assert b["hospital-c"]["refused"] == 1 and b["hospital-a"]["refused"] == 0
    assert s["dropped"] == [{"round": 1, "site": "hospital-b"}]
    assert [(r["round"], r["by"]) for r in s["refused"]] == [(1, "site"), (2, "coordinator")]
    assert s["status"] == "failed" and s["error"].startswith("BudgetExceeded: round 2 refused")
    assert live.over


# ---------------------------------------------------------------- the server


def test_the_server_is_loopback_by_default_and_serves_the_page_and_state():
    host, port = parse_address(DEFAULT)
    assert is_loopback(host) and port == 0
    live = LiveState()
    live.connecting(SITES, "x</script><script>alert(1)")
    server = Dashboard(live.snapshot_json).start()
    try:
        assert server.server.server_address[0] == "127.0.0.1" and server.url.startswith("http://127.0.0.1:")
        status, kind, body = _get(server.url + "state.json")
        assert status == 200 and kind == "application/json" and json.loads(body) == live.snapshot()
        status, kind, html = _get(server.url)
        assert status == 200 and kind.startswith("text/html")
        assert "/*STATE*/" not in html and "hospital-b" in html  # the page carries the state of the moment
        assert "x</script>" not in html  # a name cannot close the script that carries it
        # offline: no script, style, font or image from anywhere else
        assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', html) and "@import" not in html
        assert _get(server.url + "etc/passwd")[0] == 404
    finally:
        server.stop()


@pytest.mark.parametrize("text, expected", [("8050", ("127.0.0.1", 8050)), (":0", ("127.0.0.1", 0)),
                                            ("0.0.0.0:8050", ("0.0.0.0", 8050)), ("[::1]:9", ("::1", 9))])
def test_addresses(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["cfg.yaml", "host:port", "127.0.0.1:70000", "localhost:-1"])
def test_bad_addresses(text):
    with pytest.raises(DashboardError, match="is not HOST:PORT"):
        parse_address(text)


def test_bad_or_taken_dashboard_address_is_one_line_and_exit_2(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(federation__rounds=1)))
    taken = Dashboard(lambda: "{}", "127.0.0.1:0")
    try:
        for address, words in [("nonsense:x", "is not HOST:PORT"), (f"127.0.0.1:{taken.port}", "cannot listen on")]:
            out = tmp_path / "out"
            assert main(["run", str(cfg), "--out", str(out), "--quiet", "--dashboard", address]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and words in err[0] and not out.exists()
    finally:
        taken.stop()
    r = main(["run", str(cfg), "--runner", "flower", "--dashboard"])
    assert r == 2 and "privmed serve --dashboard" in capsys.readouterr().err


def test_run_dashboard_prints_its_url_and_ends_with_the_run(tmp_path, capsys, one_thread):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(federation__rounds=1)))
    before = {t.name for t in threading.enumerate()}
    assert main(["run", str(cfg), "--out", str(tmp_path / "out"), "--quiet", "--dashboard"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^dashboard: http://127\.0\.0\.1:\d+/$", out, re.M)
    assert "privmed-dashboard" not in {t.name for t in threading.enumerate()} - before


# ---------------------------------------------------------------- the coordinator (privmed serve)


def test_the_coordinator_dashboard_reads_what_its_server_app_writes(tmp_path, monkeypatch):
    from privmed.flower_server import live_state

    home = tmp_path / "home"
    monkeypatch.setenv("FLWR_HOME", str(home))
    cfg = privmed.config.validate_config(tiny_config(sites__names=SITES))
    assert live_state(cfg) is None  # no dashboard: the ServerApp writes nothing
    registered = {"hospital-a": 11, "hospital-d": 14}
    with coordinator_dashboard("127.0.0.1:0", home, lambda: registered) as board:
        before = json.loads(_get(board.url + "state.json")[2])
        assert before["status"] == "waiting" and [h["name"] for h in before["hospitals"]] == sorted(registered)
        live = live_state(cfg)
        assert live is not None and live_file(home).is_file()
        s = json.loads(_get(board.url + "state.json")[2])
        assert s["status"] == "connecting" and s["runner"] == "flower" and s["node_auth"] is True
        reg = {h["name"]: h["registered"] for h in s["hospitals"]}
        assert reg == {"hospital-a": True, "hospital-b": False, "hospital-c": False, "hospital-d": True}
    assert live_file(home) is None  # the marker goes with the dashboard
    empty = LiveState(runner="flower").snapshot()
    assert waiting_snapshot() == {**empty, "updated": None}
    s = json.loads(file_snapshot(home / "live" / "state.json", lambda: None)())
    assert s["node_auth"] is False and all(h["registered"] is None for h in s["hospitals"])


# ---------------------------------------------------------------- the page, in headless Chromium


def _chromium() -> str | None:
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def dump_dom(browser: str, url: str, profile: Path, timeout: float = 60) -> str:
    """The page's DOM after its scripts ran (and polled at least once: --virtual-time-budget)."""
    proc = subprocess.Popen(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         f"--user-data-dir={profile}", "--virtual-time-budget=2500", "--dump-dom", url],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:  # chromium's helpers share its process group
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return out


class PausedLive(LiveState):
    """Holds the run after each round until the test has looked at the page."""

    def __init__(self):
        super().__init__()
        self.done = {r: threading.Event() for r in (1, 2, 3)}
        self.go = {r: threading.Event() for r in (1, 2, 3)}

    def round_done(self, row: dict) -> None:
        super().round_done(row)
        self.done[row["round"]].set()
        self.go[row["round"]].wait(120)


def test_the_page_shows_three_hospitals_and_follows_the_rounds_in_chromium(tmp_path, one_thread):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium (or chromium-browser, google-chrome) on PATH: the page is not checked in a browser")
    live = PausedLive()
    server = Dashboard(live.snapshot_json, "127.0.0.1:0").start()
    failed = []

    def run() -> None:
        try:
            privmed.run(_dp_config(rounds=3), None, live=live)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            failed.append(e)
            for r in (1, 2, 3):
                live.done[r].set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        seen = {}
        for rnd in (1, 2):
            assert live.done[rnd].wait(120) and not failed, failed
            dom = dump_dom(browser, server.url, tmp_path / "profile")
            rows = re.findall(r'<tr data-site="([^"]+)"', dom)
            assert rows == SITES, dom[-2000:]
            seen[rnd] = re.search(r'id="round">([^<]*)<', dom).group(1)
            assert int(re.search(r'data-polls="(\d+)"', dom).group(1)) >= 1  # its poll of state.json worked
            eps = live.snapshot()["hospitals"][0]["epsilon"]
            assert f"{eps} of 8" in dom and "per patient" in dom
            live.go[rnd].set()
        assert seen == {1: "1 of 3", 2: "2 of 3"}
        live.go[3].set()
        thread.join(120)
        assert not failed and live.snapshot()["status"] == "finished"
    finally:
        for r in (1, 2, 3):
            live.go[r].set()
        server.stop()

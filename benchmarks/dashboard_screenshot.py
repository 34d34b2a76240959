"""A screenshot of the live dashboard during a run: `privmed demo --dp` (three simulated hospitals
on SYNTHETIC phantom images, DP-SGD at each) with its dashboard, photographed by headless
Chromium while round --at trains, then run to its end.

    .venv/bin/python benchmarks/dashboard_screenshot.py [--at 16] [--out benchmarks/results/dashboard.png]

The run waits at the start of round --at's training until the picture is taken (the page then
shows that round in progress), so the picture does not depend on the machine's speed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from importlib.resources import files
from pathlib import Path

import privmed
from privmed.config import read_yaml, validate_config
from privmed.dashboard import Dashboard
from privmed.federation.live import LiveState


class PauseAt(LiveState):
    """Holds the run when round `at` starts training, until `go` is set."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.reached, self.go = at, threading.Event(), threading.Event()

    def stage(self, rnd: int, what: str, sites=(), training: bool = False) -> None:  # noqa: ANN001
        super().stage(rnd, what, sites, training)
        if training and rnd == self.at and not self.go.is_set():
            self.reached.set()
            self.go.wait(600)


def screenshot(url: str, out: Path, size: str = "1280,1000") -> None:
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        sys.exit("no chromium on PATH")
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={size}",
             "--virtual-time-budget=2500", f"--screenshot={out.resolve()}", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            proc.wait(120)
        finally:  # chromium's helpers share its process group
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--at", type=int, default=16, help="the round in progress in the picture (default 16 of 40)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dashboard.png")
    args = ap.parse_args()
    cfg = validate_config(read_yaml(Path(str(files("privmed") / "configs" / "demo-dp.yaml"))), source="demo-dp")
    live = PauseAt(args.at)
    server = Dashboard(live.snapshot_json, "127.0.0.1:0").start()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            privmed.run(cfg, None, live=live)
        except BaseException as e:  # noqa: BLE001 - reported below
            failed.append(e)
            live.reached.set()

    t0 = time.perf_counter()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        live.reached.wait(1200)
        if failed:
            raise failed[0]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        screenshot(server.url, args.out)
        s = live.snapshot()
        spent = ", ".join(f"{h['name']} {h['epsilon']}" for h in s["hospitals"])
        print(f"{args.out}: round {s['round']} of {s['run']['rounds']}, stage '{s['stage']}'; epsilon "
              f"per patient (ledger, rounded up): {spent}, of {s['privacy']['budget']}")
        live.go.set()
        thread.join()
        if failed:
            raise failed[0]
        print(f"the run finished ({live.snapshot()['status']}) in {time.perf_counter() - t0:.0f} s")
    finally:
        live.go.set()
        server.stop()


if __name__ == "__main__":
    main()

"""The coordinator's live dashboard: one self-contained page (no scripts or fonts from elsewhere)
and the JSON it polls, served over HTTP from a daemon thread. An edge of privmed, like the CLI.

    server = Dashboard(live.snapshot_json, "127.0.0.1:0").start()
    print(server.url)                 # http://127.0.0.1:PORT/
    ...
    server.stop()

GET /            the page (it carries the snapshot of the moment it was asked for, then polls)
GET /state.json  the snapshot: what the coordinator holds (privmed.federation.live)

Loopback by default. There is no authentication: a non-loopback address shows the run's sites,
scores and privacy spend to whoever can reach it (`warning` says so).
"""

from __future__ import annotations

import ipaddress
import json
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from privmed.errors import PrivmedError

if TYPE_CHECKING:
    from privmed.federation.live import LiveState

DEFAULT = "127.0.0.1:0"  # loopback, any free port (the URL is printed)
PAGE = "dashboard.html"
STATE_MARK = "/*STATE*/null"  # where the page's first snapshot goes
POLL_MS = 1000
LINGER = 1.5  # seconds an in-process run's dashboard stays up after the run, for the page's last poll
# `privmed serve --dashboard`: the run happens in Flower's ServerApp process, below the SuperLink;
# while FLWR_HOME/live/serving exists it writes its snapshot to FLWR_HOME/live/state.json
LIVE_DIR, LIVE_ON, LIVE_FILE = "live", "serving", "state.json"


class DashboardError(PrivmedError):
    pass


def parse_address(text: str) -> tuple[str, int]:
    """(host, port) of 'HOST:PORT', ':PORT' (loopback) or 'PORT'; port 0: any free port."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise DashboardError(
            f"--dashboard: '{text}' is not HOST:PORT (e.g. 127.0.0.1:8050; port 0 picks a free one); "
            "put --dashboard after CONFIG, or give it an address"
        )
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warning(host: str) -> str | None:
    """What to tell the user when the dashboard is reachable from other machines."""
    if is_loopback(host):
        return None
    return (f"privmed: WARNING: the dashboard listens on {host}, not loopback, without authentication: "
            "anyone who can reach it sees the run's sites, scores and privacy spend (no patient data)")


def page(snapshot_json: str) -> bytes:
    """The page, carrying `snapshot_json` so that it shows the run at once, even before its first poll."""
    html = (files("privmed") / PAGE).read_text(encoding="utf-8")
    safe = snapshot_json.replace("</", "<\\/")  # inside a <script>: no "</script>" may end it early
    return html.replace(STATE_MARK, safe).replace("/*POLL_MS*/1000", str(POLL_MS)).encode("utf-8")


class Dashboard:
    """An HTTP server for the page and `snapshot` (a function returning the snapshot as JSON text)."""

    def __init__(self, snapshot: Callable[[], str], address: str = DEFAULT):
        self.snapshot = snapshot
        self.host, port = parse_address(address)
        try:
            self.server = _Server((self.host, port), _handler(snapshot))
        except OSError as e:  # taken, or not an address of this machine
            raise DashboardError(f"--dashboard: cannot listen on {address}: {e.strerror or e}") from None
        self.port = self.server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> Dashboard:
        self._thread = threading.Thread(target=self.server.serve_forever, name="privmed-dashboard", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join(5)
        self.server.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]):
        import socket

        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler)


def _handler(snapshot: Callable[[], str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "privmed-dashboard"

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):
                self._send(page(snapshot()), "text/html; charset=utf-8")
            elif path == "/state.json":
                self._send(snapshot().encode("utf-8"), "application/json")
            else:
                self.send_error(404)

        def _send(self, body: bytes, kind: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            # the page needs nothing from anywhere but here
            self.send_header("Content-Security-Policy",
                             "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002, ANN002
            pass  # a page polled every second would fill the terminal

    return Handler


@contextmanager
def live_dashboard(address: str, linger: float = LINGER) -> Iterator[LiveState]:
    """A LiveState for a run in this process, served at `address` while the block runs (its URL
    printed), and `linger` seconds after, so that an open page sees how the run ended."""
    from privmed.federation.live import LiveState

    live = LiveState()
    server = _open(live.snapshot_json, address)
    live.preparing()
    print(f"dashboard: {server.url}", flush=True)
    try:
        yield live
    except BaseException as e:
        if not live.over:  # it failed before the round loop began: say so on the page
            live.ended(e)
        raise
    finally:
        time.sleep(linger)
        server.stop()


@contextmanager
def coordinator_dashboard(address: str, home: Path, registered: Callable[[], dict[str, int] | None]) -> Iterator[Dashboard]:
    """The dashboard of `privmed serve`: what the ServerApp of the run in progress writes under
    FLWR_HOME (`home`), with the hospitals `registered()` names (None: node authentication off)."""
    live = Path(home) / LIVE_DIR
    server = _open(file_snapshot(live / LIVE_FILE, registered), address)
    live.mkdir(parents=True, exist_ok=True)
    (live / LIVE_FILE).unlink(missing_ok=True)  # a run of an earlier coordinator
    (live / LIVE_ON).touch()
    try:
        yield server
    finally:
        (live / LIVE_ON).unlink(missing_ok=True)
        server.stop()


def _open(snapshot: Callable[[], str], address: str) -> Dashboard:
    server = Dashboard(snapshot, address)
    note = warning(server.host)
    if note:
        print(note, file=sys.stderr)
    return server.start()


def live_file(home: Path) -> Path | None:
    """Where the ServerApp writes its snapshot, while `privmed serve --dashboard` shows it; else None."""
    live = Path(home) / LIVE_DIR
    return live / LIVE_FILE if (live / LIVE_ON).is_file() else None


def file_snapshot(path: Path, registered: Callable[[], dict[str, int] | None]) -> Callable[[], str]:
    """The snapshot the coordinator's ServerApp wrote to `path`, with the hospitals whose keys
    `privmed serve` registered. Before any run: the registered hospitals, waiting."""

    def read() -> str:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # no run yet (the file is written atomically: never half)
            data = waiting_snapshot()
        return json.dumps(with_registered(data, registered()))

    return read


def waiting_snapshot() -> dict:
    """privmed.federation.live's snapshot before any run, made here without importing it (the
    coordinator's process has no torch to load for its dashboard)."""
    return {
        "schema": 1, "updated": None, "runner": "flower", "status": "waiting", "run": None, "round": 0,
        "stage": "waiting for a run", "privacy": None, "hospitals": [], "rounds": [], "dropped": [],
        "refused": [], "error": None,
    }


def with_registered(data: dict, registered: dict[str, int] | None) -> dict:
    """`data` with each hospital marked registered or not; a registered hospital that is not in
    the run is listed too."""
    data = {**data, "node_auth": registered is not None}
    names = set(registered or ())
    hospitals = [{**h, "registered": h["name"] in names if registered is not None else None}
                 for h in data.get("hospitals", [])]
    known = {h["name"] for h in hospitals}
    for name in sorted(names - known):
        hospitals.append({"name": name, "registered": True, "online": None, "trains": None, "state": "not in this run",
                          "last_round": None, "n_train": None, "n_patients": None, "patient_ids": None,
                          "epsilon": None, "spent": None, "dropped": 0, "refused": 0})
    data["hospitals"] = hospitals
    return data

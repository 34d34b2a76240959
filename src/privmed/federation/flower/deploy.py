"""The processes of a Flower deployment, started the way the README tells a coordinator and a
hospital to start them:

    privmed serve --certs DIR [--keys KEYDIR]     a SuperLink (TLS, node authentication)
    privmed join CONFIG --site NAME --server HOST:PORT --certs DIR --key FILE   a SuperNode
    privmed run CONFIG --runner flower --server HOST:PORT --certs DIR           a run on them

Flower's state lives in a directory privmed controls (FLWR_HOME, default ~/.privmed/flower, or
--home); telemetry, update checks and Flower's runtime installation of app dependencies are off;
the Flower app that `privmed run` submits is written under FLWR_HOME, never into the project.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from privmed import io
from privmed.errors import PrivmedError
from privmed.federation.flower.credentials import CA_CERT, SERVER_CERT, SERVER_KEY, check_certs

DEFAULT_HOME = Path("~/.privmed/flower")
NODES_FILE = "nodes.json"  # in FLWR_HOME: {site: node id} of the keys `privmed serve` registered
# in a Flower run's directory: what the coordinator has asked of the hospitals, in words (the
# submitting `privmed run`'s progress bar shows it)
STAGE_FILE = ".stage"
# Flower's own waits, shortened where Flower lets privmed (see `flower_env`, `supernode_command`
# and warm_clientapp); PRIVMED_FLOWER_STOCK=1 starts Flower's processes as Flower ships them
STOCK_ENV = "PRIVMED_FLOWER_STOCK"
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_POLL = 0.1  # s between a SuperExec's looks for a task to start (Flower: 1 s, at least 0.01)
INSECURE_WARNING = (
    "privmed: WARNING: --insecure: no TLS and no node authentication. Anyone on the network can "
    "read the models and join as a hospital. For tests on one machine only."
)

APP_PYPROJECT = """\
# Written by privmed: the Flower app `privmed run --runner flower` submits. Its code is the
# installed privmed package; this file only names the components.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "privmed-flower-app"
version = "1.0.0"
description = "privmed's ServerApp and ClientApp"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "privmed"

[tool.flwr.app.components]
serverapp = "privmed.flower_server:app"
clientapp = "privmed.federation.flower.site_app:app"

[tool.flwr.app.config]
privmed-config = ""
run-dir = ""
resume = "false"
"""


class DeployError(PrivmedError):
    pass


def home_dir(home: Path | None) -> Path:
    return Path(home or os.environ.get("PRIVMED_FLOWER_HOME") or DEFAULT_HOME).expanduser().resolve()


def stock() -> bool:
    """Whether Flower's processes are to run as Flower ships them (PRIVMED_FLOWER_STOCK=1)."""
    return os.environ.get(STOCK_ENV, "") not in ("", "0")


def flower_env(home: Path, bin_first: Path | None = None, supernode: bool = False) -> dict[str, str]:
    """The environment of every Flower process privmed starts; `bin_first`: a directory searched
    before this environment's executables (warm_clientapp's `flwr-clientapp`); `supernode`: a
    SuperNode's, whose SuperExec then looks for a ClientApp to start every SUPEREXEC_POLL seconds
    (the SuperLink's starts one ServerApp per run: it keeps Flower's 1 s and its CPU)."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)  # flower-superexec, flwr-clientapp: from this env
    if bin_first is not None:
        bin_dir = f"{bin_first}{os.pathsep}{bin_dir}"
    if supernode and not stock():
        env.setdefault(SUPEREXEC_POLL_ENV, str(SUPEREXEC_POLL))
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    return env


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def parse_address(address: str, what: str = "--address") -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeployError(f"{what}: '{address}' is not HOST:PORT (e.g. 127.0.0.1:9092)")
    return host.strip("[]"), int(port)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise DeployError(f"the process ({' '.join(proc.args[:1])}) ended with code {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise DeployError(f"nothing listens on {host}:{port} after {timeout:g} s")


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """End `proc`, its process group and every process below it (Flower's SuperExec, which the
    SuperLink starts in a session of its own, and the app processes): SIGTERM, then SIGKILL after
    `grace` seconds."""
    below = descendants(proc.pid)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    for pid in [proc.pid] + below:  # whatever is left, in the group or below it
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


# ------------------------------------------------------------------------ coordinator


def superlink_command(certs: Path | None, address: str, insecure: bool) -> list[str]:
    host, port = parse_address(address)
    cmd = [_bin("flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if insecure:
        return cmd + ["--insecure"]
    files = check_certs(certs, server=True)
    return cmd + [
        "--ssl-ca-certfile", str(files[CA_CERT]), "--ssl-certfile", str(files[SERVER_CERT]),
        "--ssl-keyfile", str(files[SERVER_KEY]), "--enable-supernode-auth",
    ]


@contextmanager
def control(address: str, certs: Path | None, insecure: bool) -> Iterator:
    """A client of the Control API of the SuperLink at `address`; a failed connection, TLS
    check or request ends as one DeployError line."""
    import httpx
    from flwr.supercore.control import ControlHttpClient

    root = None if insecure else check_certs(certs, server=False)[CA_CERT].read_bytes()
    client = ControlHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=root, interceptors=[]
    )
    try:
        yield client
    except httpx.HTTPStatusError as e:
        text = " ".join(e.response.text.split())[:200]
        raise DeployError(f"the coordinator at {address} refused the request: {e.response.status_code} {text}") from None
    except httpx.HTTPError as e:
        hint = (" (does the certificate from `privmed certs --name` cover this host?)"
                if "CERTIFICATE" in str(e) else " (is `privmed serve` running there?)")
        raise DeployError(f"cannot reach the coordinator at {address}: {e}{hint}") from None
    finally:
        client.close()


def local_address(address: str) -> str:
    """Where a process on the coordinator's machine reaches a SuperLink listening on `address`:
    loopback when it listens on every interface."""
    host, port = parse_address(address)
    if host in ("0.0.0.0", ""):
        return f"127.0.0.1:{port}"
    if host == "::":
        return f"[::1]:{port}"
    return address


def register_keys(client, keys: list[Path]) -> dict[str, int]:  # noqa: ANN001
    """Register each hospital's public key (node authentication); its name is the file's stem."""
    from cryptography.hazmat.primitives import serialization
    from flwr.proto.control_pb2 import RegisterNodeRequest
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    out = {}
    for pub in keys:
        try:
            key = serialization.load_ssh_public_key(pub.read_bytes())
        except (ValueError, OSError) as e:
            raise DeployError(f"--keys: {pub} is not an OpenSSH public key ({e}); make it with `privmed keys`") from None
        res = client.RegisterNode(RegisterNodeRequest(public_key=public_key_to_bytes(key), name=pub.stem))
        out[pub.stem] = res.node_id
    return out


def public_keys(keys: Path | None) -> list[Path]:
    if keys is None:
        return []
    keys = Path(keys)
    found = sorted(keys.glob("*.pub")) if keys.is_dir() else [keys]
    if not found or not all(p.is_file() for p in found):
        raise DeployError(f"--keys: no public key (*.pub) at {keys}")
    return found


@dataclass
class Coordinator:
    proc: subprocess.Popen
    address: str
    registered: dict[str, int]


def start_coordinator(
    certs: Path | None, address: str, home: Path, keys: list[Path], insecure: bool,
    log: Path | None = None, timeout: float = 60.0,
) -> Coordinator:
    """Start a SuperLink in its own process group and register the hospitals' keys."""
    cmd = superlink_command(certs, address, insecure)
    home.mkdir(parents=True, exist_ok=True)
    out = open(log, "ab") if log else None  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(cmd, env=flower_env(home), cwd=home, start_new_session=True,
                            stdout=out, stderr=subprocess.STDOUT if out else None)
    try:
        local = local_address(address)
        wait_for_port(*parse_address(local), timeout, proc)
        registered = {}
        if keys:
            with control(local, certs, insecure) as client:
                registered = register_keys(client, keys)
        # the ServerApp, started below this SuperLink with the same FLWR_HOME, binds each site's
        # name to its key's node (empty: node authentication is off, no binding)
        io.write_text(home / NODES_FILE, json.dumps(registered, sort_keys=True))
    except BaseException:
        stop_process(proc)
        raise
    return Coordinator(proc, address, registered)


# ------------------------------------------------------------------------ hospital


def supernode_command(
    server: str, certs: Path | None, key: Path | None, node_config: dict[str, str],
    runtime_port: int, insecure: bool,
) -> list[str]:
    parse_address(server, "--server")
    pairs = " ".join(f'{k}="{v}"' for k, v in node_config.items())
    # Flower's SuperNode, its waits shortened (flower_patch; stock: Flower's own command)
    node = [_bin("flower-supernode")] if stock() else [sys.executable, "-m", "privmed.federation.flower.flower_patch"]
    cmd = [*node, "--superlink", server, "--node-config", pairs,
           "--host", "127.0.0.1", "--port", str(runtime_port)]
    if insecure:
        return cmd + ["--insecure"]
    if key is None or not Path(key).is_file():
        raise DeployError(f"--key: {key} is not a file; make the hospital's key pair with `privmed keys DIR --name SITE`")
    return cmd + ["--root-certificates", str(check_certs(certs, server=False)[CA_CERT]),
                  "--auth-supernode-private-key", str(Path(key).resolve())]


def start_warm_clientapps(home: Path, name: str) -> tuple[subprocess.Popen, Path] | None:
    """Start the warm ClientApp server of a hospital (warm_clientapp) and write the `flwr-clientapp`
    that reaches it: (the server, the directory to put first on the SuperNode's PATH); None when
    Flower's processes run stock."""
    from privmed.federation.flower.warm_clientapp import launcher_script

    if stock():
        return None
    sock = home / "sockets" / f"clientapp-{name}-{os.getpid()}.sock"
    if len(str(sock)) > 100:  # an AF_UNIX path holds at most 107 bytes
        import tempfile

        sock = Path(tempfile.mkdtemp(prefix="privmed-")) / f"clientapp-{os.getpid()}.sock"
    bin_dir = home / "bin" / str(os.getpid())
    script = bin_dir / "flwr-clientapp"
    io.write_text(script, launcher_script(sys.executable, sock, _bin("flwr-clientapp")))
    script.chmod(0o700)
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "privmed.federation.flower.warm_clientapp", str(sock), str(os.getpid())],
        env=flower_env(home), cwd=home, start_new_session=True,
    )
    return proc, bin_dir


def start_hospital(
    site: str, socket_path: Path, server: str, certs: Path | None, key: Path | None, home: Path,
    insecure: bool, log: Path | None = None, bin_first: Path | None = None,
) -> subprocess.Popen:
    """Start the SuperNode of `site`, whose ClientApps relay to the site's process at `socket_path`;
    `bin_first`: where its SuperExec looks first for `flwr-clientapp` (start_warm_clientapps)."""
    for ch in '" ':
        if ch in str(socket_path) or ch in site:
            raise DeployError(f"--site / --home: '{site}' / '{socket_path}' may hold no spaces or quotes")
    cmd = supernode_command(
        server, certs, key, {"privmed-socket": str(Path(socket_path).resolve()), "privmed-site": site},
        free_port(), insecure,
    )
    home.mkdir(parents=True, exist_ok=True)
    out = open(log, "ab") if log else None  # noqa: SIM115
    return subprocess.Popen(cmd, env=flower_env(home, bin_first, supernode=True), cwd=home, start_new_session=True,
                            stdout=out, stderr=subprocess.STDOUT if out else None)


# ------------------------------------------------------------------------ runs


def write_app(home: Path) -> Path:
    app = home / "app"
    io.write_text(app / "pyproject.toml", APP_PYPROJECT)
    return app


def submit_run(
    server: str, certs: Path | None, insecure: bool, home: Path, config_file: Path, run_dir: Path,
    resume: bool,
) -> int:
    """Start a run of privmed's Flower app on the SuperLink at `server`; returns its run id."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    fab_bytes = build_fab_from_disk(write_app(home))
    fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
    overrides = {
        "privmed-config": str(Path(config_file).resolve()),
        "run-dir": str(Path(run_dir).resolve()),
        "resume": "true" if resume else "false",
    }
    with control(server, certs, insecure) as client:
        res = client.StartRun(StartRunRequest(
            fab=fab_to_proto(fab), override_config=user_config_to_proto(overrides), federation=""
        ))
    return int(res.run_id)


def wait_run(
    server: str, certs: Path | None, insecure: bool, run_id: int, timeout: float | None = None,
    tick: Callable[[], None] | None = None,
) -> tuple[str, str]:
    """Poll the run until it finishes: (sub_status, details); sub_status is 'completed' when it
    ended well."""
    from flwr.proto.control_pb2 import ListRunsRequest

    end = None if timeout is None else time.monotonic() + timeout
    with control(server, certs, insecure) as client:
        while end is None or time.monotonic() < end:
            run = client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict[run_id]
            if run.status.status == "finished":
                return run.status.sub_status, run.status.details
            if tick is not None:
                tick()
            time.sleep(1.0)
    raise DeployError(f"run {run_id} did not finish within {timeout:g} s")

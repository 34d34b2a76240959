"""`privmed certs | keys | serve | join` and `privmed run --runner flower` (see the README)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from privmed.cli.common import dashboard_arg, flower_args
from privmed.errors import PrivmedError

if TYPE_CHECKING:
    from privmed.config import RunConfig

REJOIN_SECONDS = 3.0


def add_parser(sub) -> None:  # noqa: ANN001
    certs = sub.add_parser(
        "certs", help="make a certificate authority and the coordinator's TLS certificate",
        description="Write DIR/ca.crt, ca.key, server.crt and server.key. The coordinator keeps "
        "them all; every hospital gets a copy of ca.crt only.",
    )
    certs.add_argument("dir", type=Path, metavar="DIR")
    certs.add_argument(
        "--name", dest="names", action="append", metavar="HOST",
        help="a host name or IP address the hospitals reach the coordinator at (repeatable; "
        "localhost, 127.0.0.1 and ::1 are always covered)",
    )
    keys = sub.add_parser(
        "keys", help="make a hospital's node-authentication key pair",
        description="Write DIR/NAME (private: stays at the hospital) and DIR/NAME.pub (goes to the "
        "coordinator, who passes its folder to `privmed serve --keys`).",
    )
    keys.add_argument("dir", type=Path, metavar="DIR")
    keys.add_argument("--name", required=True, help="the site's name, as in the config")
    serve = sub.add_parser(
        "serve", help="start the coordinator (a Flower SuperLink) with TLS and node authentication",
        description="Start a Flower SuperLink that hospitals join with `privmed join` and runs are "
        "submitted to with `privmed run --runner flower`. Runs until interrupted (Ctrl-C).",
    )
    serve.add_argument("--certs", type=Path, help="the directory `privmed certs` wrote")
    serve.add_argument("--keys", type=Path, help="the hospitals' public keys (*.pub files, or one file)")
    serve.add_argument("--address", default="0.0.0.0:9092", help="HOST:PORT to listen on (default 0.0.0.0:9092)")
    serve.add_argument("--home", type=Path, help="Flower's state directory (default ~/.privmed/flower)")
    serve.add_argument("--insecure", action="store_true", help="no TLS, no node authentication: local tests only")
    dashboard_arg(serve, "the coordinator: the hospitals registered and online and the run in progress")
    join = sub.add_parser(
        "join", help="start one hospital (a Flower SuperNode) that trains on its own data",
        description="Connect this hospital to the coordinator at --server and train and score there "
        "when a run asks. SITE_CONFIG names the hospital, its own data (a folder or table of its "
        "patients only), its split and its privacy budget; the coordinator learns its counts and "
        "its data's shape, nothing else. With --site, CONFIG is instead a run config whose data "
        "every party holds (a rehearsal on public data) and this hospital is its site NAME. Runs "
        "until interrupted (Ctrl-C).",
    )
    join.add_argument("config", type=Path, metavar="SITE_CONFIG")
    join.add_argument("--site", help="rehearsal: CONFIG is a run config, and this hospital is its site NAME")
    join.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    join.add_argument("--key", type=Path, help="this hospital's private key (from `privmed keys`)")
    join.add_argument(
        "--state", type=Path,
        help="this hospital's own state: its secret key for DP noise and its privacy ledger, kept "
        "across runs and restarts (default: ~/.privmed/sites/SITE); never share it",
    )
    flower_args(join, server=True)


def run(args: argparse.Namespace) -> int:
    return {"certs": certs, "keys": keys, "serve": serve, "join": join}[args.command](args)



def _stop_on_sigterm() -> None:
    """SIGTERM ends `serve` and `join` as Ctrl-C does: the Flower processes they started go too."""

    def handler(signum, frame):  # noqa: ANN001, ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _warn_insecure(args) -> None:  # noqa: ANN001
    if getattr(args, "insecure", False):
        from privmed.federation.flower.deploy import INSECURE_WARNING

        print(INSECURE_WARNING, file=sys.stderr)


def _need(args, *names: str) -> None:  # noqa: ANN001
    for n in names:
        if getattr(args, n) is None and not (n in ("certs", "key") and args.insecure):
            raise PrivmedError(f"privmed {args.command}: --{n} is required")


def certs(args) -> int:  # noqa: ANN001
    from privmed.federation.flower.credentials import make_certificates

    files = make_certificates(args.dir, args.names)
    print("\n".join(str(f) for f in files))
    print(f"give {files[0]} to every hospital; keep the keys here")
    return 0


def keys(args) -> int:  # noqa: ANN001
    from privmed.federation.flower.credentials import make_node_keys

    private, public = make_node_keys(args.dir, args.name)
    print(f"{private}  (stays at the hospital: privmed join ... --key {private})")
    print(f"{public}  (goes to the coordinator: privmed serve --keys DIR)")
    return 0


def serve(args) -> int:  # noqa: ANN001
    from contextlib import ExitStack

    from privmed.federation.flower import deploy

    _need(args, "certs")
    _warn_insecure(args)
    home = deploy.home_dir(args.home)
    registered: dict[str, int] = {}
    with ExitStack() as stack:
        board = None
        if args.dashboard is not None:  # a bad or taken address ends here, before the SuperLink starts
            from privmed.dashboard import coordinator_dashboard

            board = stack.enter_context(coordinator_dashboard(
                args.dashboard, home, lambda: None if args.insecure else registered))
        _stop_on_sigterm()
        coord = deploy.start_coordinator(args.certs, args.address, home, deploy.public_keys(args.keys), args.insecure)
        registered.update(coord.registered)
        names = "none (node authentication is off)" if args.insecure else (", ".join(coord.registered) or "none")
        print(f"coordinator listening on {args.address} (Flower SuperLink, pid {coord.proc.pid}); "
              f"hospitals registered: {names}", flush=True)
        if board is not None:
            print(f"dashboard: {board.url}", flush=True)
        try:
            return coord.proc.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            deploy.stop_process(coord.proc)


def _resolved_config(cfg: RunConfig, home: Path, kind: str) -> Path:
    """Write the config (overrides applied) where Flower's processes read it: the keys it sets,
    so that the coordinator's plan still chooses the defaults that follow the hospitals' data
    (privmed.federation.sizing) where it is silent, as an in-process run does."""
    import yaml

    from privmed import io

    # the name always: a config file without one is named after the file it is read from
    sets = {"name": cfg.name, **cfg.model_dump(mode="json", exclude_unset=True)}
    text = yaml.safe_dump(sets, sort_keys=False)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = home / "configs" / f"{kind}-{cfg.name or 'run'}-{digest}.yaml"
    io.write_text(path, text)
    return path


def join(args) -> int:  # noqa: ANN001
    """The hospital's process holds its site (data, model) for as long as it runs; the SuperNode's
    short-lived ClientApp processes relay each message to it."""
    _need(args, "server", "certs", "key")
    # what it does while it loads (imports, the hospital's data, Flower's processes): tens of seconds
    print(f"privmed join: loading {args.config} and the hospital's data ...", flush=True)
    from privmed.config import SitesConfig, load_config, load_site_config
    from privmed.data import preload

    own = None if args.site else load_site_config(args.config, args.overrides)
    if own is not None:  # the data first, before the heavy imports: a data error comes at once
        preload(own.data, SitesConfig(count=1), own.seed)  # as load_own_site loads it
    from privmed.federation.client import lock_state
    from privmed.federation.flower import deploy
    from privmed.federation.flower.site_service import SiteEndpoint, serve_site
    from privmed.federation.hospital import Hospital

    _warn_insecure(args)
    home = deploy.home_dir(args.home)
    # bad config or data: a clear error before anything starts
    if args.site:  # a rehearsal: one site of a run config's shared (public) source
        cfg = load_config(args.config, args.overrides)
        name = args.site
        state = Path(args.state) if args.state else home.parent / "sites" / name
        lock = lock_state(state)  # noqa: F841 - held until the process ends
        hospital = Hospital.rehearsal(cfg, name, state)
    else:
        name = own.site
        state = Path(args.state or own.state or home.parent / "sites" / name).expanduser()
        lock = lock_state(state)  # noqa: F841 - held until the process ends
        hospital = Hospital.from_config(own, state)
    sock = home / "sockets" / f"{name}-{os.getpid()}.sock"
    if len(str(sock)) > 100:  # an AF_UNIX path holds at most 107 bytes: a private temporary folder
        sock = Path(tempfile.mkdtemp(prefix="privmed-")) / f"{os.getpid()}.sock"
    _stop_on_sigterm()
    serve_site(SiteEndpoint(hospital), sock)
    proc = None
    p = hospital.profile
    print(f"hospital '{name}': data loaded; starting Flower's client processes ...", flush=True)
    warm = deploy.start_warm_clientapps(home, name)  # Flower's ClientApps, forked with Flower imported
    try:
        while True:  # Flower's SuperNode ends when it loses the coordinator: start it again
            proc = deploy.start_hospital(name, sock, args.server, args.certs, args.key, home, args.insecure,
                                         bin_first=warm[1] if warm else None)
            print(f"hospital '{name}' ({p.n_train} training, {p.n_val} validation, {p.n_test} test items; "
                  f"its key and privacy ledger in {state}) joining {args.server} (Flower SuperNode, "
                  f"pid {proc.pid})", flush=True)
            code = proc.wait()
            print(f"the SuperNode ended (exit code {code}); joining again in {REJOIN_SECONDS:g} s "
                  "(Ctrl-C to stop)", flush=True)
            time.sleep(REJOIN_SECONDS)
    except KeyboardInterrupt:
        return 0
    finally:
        if proc is not None:
            deploy.stop_process(proc)
        if warm is not None:
            deploy.stop_process(warm[0])
            shutil.rmtree(warm[1], ignore_errors=True)
        sock.unlink(missing_ok=True)


def _read_stage(path: Path) -> str:
    """The coordinator's last stage, in words ("" when it has written none)."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def submit(cfg: RunConfig, out: Path, args) -> dict:  # noqa: ANN001
    """`privmed run --runner flower`: submit the run to the coordinator at --server, follow it, and
    return its summary."""
    import yaml
    from tqdm import tqdm

    from privmed.federation.flower import deploy
    from privmed.federation.rundir import RunDir

    _need(args, "server", "certs")
    _warn_insecure(args)
    resume = args.resume and (out / "config.yaml").exists()
    # the config was validated when loaded; the coordinator plans from what the sites report
    RunDir.check_resume(out, cfg) if resume else RunDir.check_new(out)
    home = deploy.home_dir(args.home)
    path = _resolved_config(cfg, home, "run")
    run_id = deploy.submit_run(args.server, args.certs, args.insecure, home, path, out, resume)
    bar = tqdm(total=cfg.federation.rounds, desc=f"{cfg.name or 'run'} [flower run {run_id}]",
               unit="round", disable=args.quiet, dynamic_ncols=True)

    planned: list[bool] = [True] if resume else []  # a resumed run's config.yaml is the old one

    def tick() -> None:
        metrics, saved = out / "metrics.jsonl", out / "config.yaml"
        done = metrics.read_text().count("\n") if metrics.is_file() else 0
        if not saved.is_file():
            bar.set_postfix_str("planning: waiting for the hospitals to describe their data", refresh=False)
        else:
            if not planned:  # the plan may have chosen the rounds from the sites' counts
                try:
                    bar.total = int(yaml.safe_load(saved.read_text())["federation"]["rounds"])
                    planned.append(True)
                except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
                    pass  # read again at the next tick
            if done < bar.total:
                stage = _read_stage(out / deploy.STAGE_FILE)
                if not stage.startswith(f"round {done + 1}:"):  # none yet, or the last round's
                    stage = f"round {done + 1}: the hospitals train and score"
                bar.set_postfix_str(stage, refresh=False)
        bar.update(max(0, done - bar.n))
        bar.refresh()

    try:
        status, details = deploy.wait_run(args.server, args.certs, args.insecure, run_id, tick=tick)
    finally:
        bar.close()
    if status != "completed":
        raise PrivmedError(
            f"flower run {run_id} {status}: {details or 'no details'}; the coordinator's log says "
            f"why, and completed rounds are in {out} (continue with --resume)"
        )
    summary = out / "summary.json"
    if not summary.is_file():
        raise PrivmedError(f"flower run {run_id} completed but wrote no {summary}")
    return json.loads(summary.read_text())

"""Flower's ClientApp processes, started warm: a server that has Flower's `flwr-clientapp` code
(and privmed's relay) imported once, and forks a copy of itself for each ClientApp the SuperNode's
SuperExec starts.

Flower 1.41 starts a new `flwr-clientapp` process for every message, and most of such a process's
life is Python importing Flower (about 1.5 s of CPU on a 2-core machine; at 10 hospitals on one
machine, seconds per message). `privmed join` runs this server next to its SuperNode and puts a
`flwr-clientapp` of its own first on the SuperNode's PATH (`launcher_script`): a few lines of Python
without imports beyond the standard library that hand their arguments and standard streams to this
server over a Unix socket (owner-only) and exit. The forked child then runs Flower's own
`flwr_clientapp()` with those arguments: the same code, the same Runtime API, the same process per
message, minus the imports. When the server is not running, the launcher runs Flower's own
`flwr-clientapp` instead.

    python -m privmed.federation.flower.warm_clientapp SOCKET PARENT_PID

The server stays single-threaded (a fork copies only the calling thread), starts nothing at import
time, and ends when its parent (`privmed join`) does.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path

READY = b"ok"
MAX_REQUEST = 1 << 16


def launcher_script(python: str, socket_path: Path, real: str) -> str:
    """The `flwr-clientapp` the SuperExec finds first on its PATH: ask the server at
    `socket_path` to start the ClientApp; run Flower's own (`real`) if it cannot."""
    launcher = Path(__file__).with_name("clientapp_launcher.py")
    q = [_sh_quote(x) for x in (python, str(launcher), str(socket_path), real)]
    return ("#!/bin/sh\n# Written by privmed join: Flower's ClientApp, forked from privmed's warm server "
            f"(privmed.federation.flower.warm_clientapp)\nexec {q[0]} -I -S {q[1]} {q[2]} {q[3]} \"$@\"\n")


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def serve(path: Path, parent: int) -> None:
    """Fork a ClientApp for each request on the Unix socket `path` until `parent` exits."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    from privmed.federation.flower.site_app import listen_owner_only  # the ClientApp's module, imported once
    from privmed.federation.flower.flower_patch import patch_object_pulls

    patch_object_pulls()  # the ClientApp pulls its message's content from the SuperNode

    server = listen_owner_only(path, 64)
    server.settimeout(1.0)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    while os.getppid() == parent:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        with conn:
            try:
                conn.settimeout(5.0)
                data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, 3)
                request = json.loads(data)
            except (OSError, ValueError):
                continue
            if len(fds) != 3:
                for fd in fds:
                    os.close(fd)
                continue
            pid = os.fork()
            if pid == 0:
                server.close()
                conn.close()
                _child(flwr_clientapp, request, fds)  # never returns
            for fd in fds:
                os.close(fd)
            try:
                conn.sendall(READY)
            except OSError:
                pass
    server.close()
    path.unlink(missing_ok=True)


def _child(entry, request: dict, fds: list[int]) -> None:  # noqa: ANN001
    """Become the ClientApp: the launcher's standard streams, arguments and working directory."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
            os.close(fd)
        os.chdir(request["cwd"])
        sys.argv = [request["argv0"], *request["args"]]
        entry()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - as an uncaught exception would end Flower's process
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]))

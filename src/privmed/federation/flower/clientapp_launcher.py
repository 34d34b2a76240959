"""`flwr-clientapp` as the SuperExec of a `privmed join` SuperNode finds it: hand the arguments and
the standard streams to privmed's warm ClientApp server (privmed.federation.flower.warm_clientapp),
which forks Flower's ClientApp with them; when the server cannot be reached, run Flower's own
`flwr-clientapp`. Run as `python -I -S clientapp_launcher.py SOCKET REAL_FLWR_CLIENTAPP ARGS...`:
standard library only, so that it starts in milliseconds.
"""

import json
import os
import socket
import sys


def main() -> None:
    sock_path, real, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    request = json.dumps({"argv0": real, "args": args, "cwd": os.getcwd()}).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10.0)
            s.connect(sock_path)
            socket.send_fds(s, [request], [0, 1, 2])
            if s.recv(2) == b"ok":
                return
    except OSError:
        pass
    os.execv(real, [real, *args])


if __name__ == "__main__":
    main()

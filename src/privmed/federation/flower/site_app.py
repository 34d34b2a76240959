"""The site's side in Flower: a ClientApp whose handlers hand each training instruction to the
site's `SiteEndpoint` (privmed.federation.flower.site_service).

In a deployment a SuperNode starts a new ClientApp process for every message (Flower 1.41 has no
setting that keeps one alive), so this module stays light (no torch): its `app` relays each message
over a Unix socket to the `privmed join` process, which holds the site's data and model for the
whole run. In the in-process runner (secure aggregation) the handlers call the endpoint directly.

Message types: `train` (SecAgg+; `secaggplus_mod` masks the reply), `train.plain` (the reply is
the trained weights), `evaluate` (scores and counts on the site's own validation / test patients),
`query.describe` (which site this node serves, its counts and its data's shape), `query.setup` (a
run's public settings, before the site's first instruction).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from privmed.federation.flower import trace


def listen_owner_only(path, backlog: int) -> socket.socket:  # noqa: ANN001
    """A Unix socket listening at `path` (a str or Path) that only this user can reach: its folder
    made owner-only, the socket created under umask 0o177; an old socket file there is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        server.bind(str(path))
    finally:
        os.umask(old)
    server.listen(backlog)
    return server


class Endpoint(Protocol):
    def describe(self) -> dict: ...

    def train(self, content: RecordDict) -> tuple[RecordDict, int | None]:
        """The reply's content, and the seed for SecAgg+'s stochastic rounding (None: plain)."""
        ...

    def setup(self, content: RecordDict) -> RecordDict: ...

    def evaluate(self, content: RecordDict) -> RecordDict: ...


def make_client_app(endpoint_for: Callable[[Context], Endpoint]) -> ClientApp:
    """A ClientApp whose handlers ask `endpoint_for(context)` for the site to use."""
    app = ClientApp(mods=[_trace_mod] if trace.enabled() else [])

    def train(msg: Message, context: Context) -> Message:
        content, seed = endpoint_for(context).train(msg.content)
        if seed is not None:
            # SecAgg+ rounds stochastically with numpy's global generator, in this process: seed
            # it with the site's 63-bit seed for this reply (from its secret key under privacy)
            np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
        return Message(content, reply_to=msg)

    app.train(mods=[secaggplus_mod])(train)
    app.train("plain")(train)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(endpoint_for(context).evaluate(msg.content), reply_to=msg)

    @app.query("describe")
    def describe(msg: Message, context: Context) -> Message:
        facts = endpoint_for(context).describe()
        return Message(RecordDict({"site": ConfigRecord({"site": facts["site"], "json": json.dumps(facts)})}),
                       reply_to=msg)

    @app.query("setup")
    def setup(msg: Message, context: Context) -> Message:
        return Message(endpoint_for(context).setup(msg.content), reply_to=msg)

    return app


def _trace_mod(msg: Message, context: Context, call_next: Callable) -> Message:
    """With PRIVMED_FLOWER_TRACE set: when this ClientApp process started, and when it got and
    answered the message (every message, SecAgg+'s stages that secaggplus_mod answers itself too)."""
    entered = trace.process_start_time(), time.time()
    reply = call_next(msg, context)
    trace.record("clientapp", mid=msg.metadata.message_id, type=msg.metadata.message_type,
                 node=context.node_id, started=entered[0], entered=entered[1])
    return reply


# ---------------------------------------------------------------------------- relay

OP_DESCRIBE, OP_TRAIN, OP_SETUP, OP_EVALUATE = b"d", b"t", b"s", b"v"
OK, ERR = b"o", b"e"


def send_frame(sock: socket.socket, data: bytes) -> None:
    sock.sendall(struct.pack("!Q", len(data)) + data)


def recv_frame(sock: socket.socket) -> bytes:
    head = _recv_exact(sock, 8)
    return _recv_exact(sock, struct.unpack("!Q", head)[0])


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("the site's process closed the connection")
        buf += chunk
    return bytes(buf)


def encode_content(content: RecordDict) -> bytes:
    return recorddict_to_proto(content).SerializeToString()


def decode_content(data: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


class RelayEndpoint:
    """Forwards to the `privmed join` process listening on a Unix socket."""

    def __init__(self, path: str):
        self.path = path

    def _call(self, op: bytes, payload: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(self.path)
            except OSError as e:
                raise ConnectionError(f"the site's process is not listening on {self.path}: {e}") from None
            sent = time.time()
            send_frame(s, op + payload)
            reply = recv_frame(s)
        trace.record("relay", op=op.decode(), sent=sent)
        if reply[:1] == ERR:
            raise RuntimeError(reply[1:].decode("utf-8", "replace"))
        return reply[1:]

    def describe(self) -> dict:
        return json.loads(self._call(OP_DESCRIBE, b""))

    def setup(self, content: RecordDict) -> RecordDict:
        return decode_content(self._call(OP_SETUP, encode_content(content)))

    def evaluate(self, content: RecordDict) -> RecordDict:
        return decode_content(self._call(OP_EVALUATE, encode_content(content)))

    def train(self, content: RecordDict) -> tuple[RecordDict, int | None]:
        reply = self._call(OP_TRAIN, encode_content(content))
        seed = struct.unpack("!q", reply[:8])[0]
        return decode_content(reply[8:]), (None if seed < 0 else seed)


def _relay_for(context: Context) -> RelayEndpoint:
    return RelayEndpoint(str(context.node_config["privmed-socket"]))


app = make_client_app(_relay_for)

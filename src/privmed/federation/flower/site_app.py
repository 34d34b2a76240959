"""The site's side in Flower: a ClientApp whose handlers hand each training instruction to the
site's `SiteEndpoint` (privmed.federation.flower.site_service).

In a deployment a SuperNode starts a new ClientApp process for every message (Flower 1.41 has no
setting that keeps one alive), so this module stays light (no torch): its `app` relays each message
over a Unix socket to the `privmed join` process, which holds the site's data and model for the
whole run. In the in-process runner (secure aggregation) the handlers call the endpoint directly.

Message types: `train` (SecAgg+; `secaggplus_mod` masks the reply, after `secagg_checks_mod` has
checked the request against the rest of the session), `train.plain` (the reply is the trained
weights; an instruction marked secure is refused there), `evaluate` (scores and counts on the site's own validation / test patients),
`query.describe` (which site this node serves, its counts and its data's shape), `query.setup` (a
run's public settings, before the site's first instruction).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import time
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
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

    def train_plain(msg: Message, context: Context) -> Message:
        if _marked_secure(msg.content):
            return _refuse(msg, "an instruction marked for secure aggregation came as a plain request, "
                          "whose reply the coordinator would see unmasked")
        return train(msg, context)

    app.train(mods=[secagg_checks_mod, secaggplus_mod])(train)
    app.train("plain")(train_plain)

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


def _refuse(msg: Message, why: str) -> Message:
    """An error reply (nothing of the site's in it) that says why; the site's log says it too."""
    logging.getLogger("privmed.site").warning("refused a %s request: %s", msg.metadata.message_type, why)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=f"privmed site refused: {why}"),
                   reply_to=msg)


def _marked_secure(content: RecordDict) -> bool:
    try:
        return bool(compat.recorddict_to_fitins(content, keep_input=True).config.get("secure", False))
    except (KeyError, TypeError, ValueError):
        return False  # not an instruction: the handler says so


# ---------------------------------------------------------------------------- SecAgg+ checks

SECAGG_CHECKS = "privmed.secagg_checks"  # this site's own record of its SecAgg+ session
SECAGG_MODULUS = 2**32  # SecAgg+'s mask modulus as privmed runs it (Flower's default)
ABORTED = "aborted"


class _Refused(Exception):
    pass


def secagg_checks_mod(msg: Message, context: Context, call_next: Callable) -> Message:
    """Checks each SecAgg+ request against this site's own record of the session before Flower's
    `secaggplus_mod` answers it. A request that fails is answered with an error and nothing of the
    site's, and the rest of the session is refused until the coordinator starts a new one (a new
    setup: new keys, new seeds, so nothing shared before can be asked for again).

    Every request refused is one privmed's coordinator never sends (`secagg._SecAggPlus`), and one
    that lets a coordinator that lies rebuild a site's masks:
    - setup: a threshold t that is not a strict majority of the share number (with 2t <= shares,
      t sites told "T sent its vector" and t others told "T dropped" give both of T's secrets); a
      share number below 3; a mask modulus other than 2^32 (with a modulus of 2 there is no mask);
    - share keys: more keys than the share number (shares the majority was not counted over);
    - collect masked vectors: key shares from a node twice, from a node not in the key list, or
      from fewer than t-1 others;
    - unmask: active and dropped lists that overlap (which asks for both of a node's secrets at
      once), that name this site dropped or leave it out of the active list (it sent its vector),
      that repeat a node, or that do not name exactly the nodes it masked with, and itself.
    With a majority threshold and each site answering once, no set of such requests gives both
    secrets of one site. What the checks cannot see: keys substituted by the coordinator (nothing
    authenticates a site's keys), lists that differ between sites but are each consistent, two
    sessions of the same round over different sites (see benchmarks/results/
    secagg_cheating_coordinator.md).
    """
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if msg.metadata.message_type != MessageType.TRAIN or configs is None or Key.STAGE not in configs:
        return call_next(msg, context)  # not SecAgg+: secaggplus_mod decides
    stage = configs[Key.STAGE]
    session = dict(context.state.config_records.get(SECAGG_CHECKS, {}))
    try:
        facts = _check(stage, configs, session, msg.metadata.dst_node_id)
    except _Refused as e:
        _save(context, {**session, "stage": ABORTED})
        return _refuse(msg, f"SecAgg+ {stage}: {e}")
    reply = call_next(msg, context)
    if not reply.has_error():
        _save(context, {**({} if stage == Stage.SETUP else session), **facts, "stage": stage})
    return reply


def _save(context: Context, session: dict) -> None:
    context.state.config_records[SECAGG_CHECKS] = ConfigRecord(session)


def _check(stage: str, configs: ConfigRecord, session: dict, me: int) -> dict:
    """What this request adds to the session's record; _Refused when the site must not answer it.
    Values of the wrong type are left to secaggplus_mod, which refuses them."""
    if stage == Stage.SETUP:
        return _check_setup(configs, me)
    expected = {Stage.SHARE_KEYS: Stage.SETUP, Stage.COLLECT_MASKED_VECTORS: Stage.SHARE_KEYS,
                Stage.UNMASK: Stage.COLLECT_MASKED_VECTORS}.get(stage)
    if session.get("stage") == ABORTED:
        raise _Refused("this session was aborted (a request was refused); a new setup starts another")
    if expected is None or session.get("stage") != expected:
        raise _Refused(f"the session is at '{session.get('stage', 'none')}', "
                       f"{'an unknown stage' if expected is None else f'{stage} follows {expected}'}")
    if stage == Stage.SHARE_KEYS:
        return _check_keys(configs, session)
    if stage == Stage.COLLECT_MASKED_VECTORS:
        return _check_sources(configs, session)
    return _check_unmask(configs, session)


def _check_setup(configs: ConfigRecord, me: int) -> dict:
    shares, t, modulus = (configs.get(k) for k in (Key.SHARE_NUMBER, Key.THRESHOLD, Key.MOD_RANGE))
    if not all(type(v) is int for v in (shares, t, modulus)):
        return {}
    if shares < 3:
        raise _Refused(f"share number {shares}: at least 3 are needed")
    if not 2 * t > shares:
        raise _Refused(f"threshold {t} of {shares} shares is not a strict majority (at least {shares // 2 + 1})")
    if modulus != SECAGG_MODULUS:
        raise _Refused(f"mask modulus {modulus}: privmed masks modulo 2^32 only")
    return {"me": me, "shares": shares, "threshold": t}


def _check_keys(configs: ConfigRecord, session: dict) -> dict:
    nodes = [int(k) for k in configs if k != Key.STAGE and k.isdigit()]
    if len(nodes) > session["shares"]:
        raise _Refused(f"{len(nodes)} keys for {session['shares']} shares")
    return {"keys": sorted(nodes)}


def _check_sources(configs: ConfigRecord, session: dict) -> dict:
    srcs = configs.get(Key.SOURCE_LIST)
    if not isinstance(srcs, list):
        return {}
    if len(set(srcs)) != len(srcs):
        raise _Refused("key shares from the same node twice")
    unknown = set(srcs) - set(session["keys"]) | ({session["me"]} & set(srcs))
    if unknown:
        raise _Refused(f"key shares from nodes outside this site's key list: {sorted(unknown)}")
    if len(srcs) + 1 < session["threshold"]:
        raise _Refused(f"key shares from {len(srcs)} nodes, threshold {session['threshold']}")
    return {"partners": sorted(srcs)}


def _check_unmask(configs: ConfigRecord, session: dict) -> dict:
    active, dead = configs.get(Key.ACTIVE_NODE_ID_LIST), configs.get(Key.DEAD_NODE_ID_LIST)
    if not (isinstance(active, list) and isinstance(dead, list)):
        return {}
    me, partners = session["me"], set(session["partners"])
    if set(active) & set(dead):
        raise _Refused(f"nodes named both active and dropped: {sorted(set(active) & set(dead))}")
    if me in dead or me not in active:
        raise _Refused(f"this site (node {me}) sent its masked vector, and is named dropped or not active")
    if len(set(active)) != len(active) or len(set(dead)) != len(dead):
        raise _Refused("a node named twice")
    if set(active) | set(dead) != partners | {me}:
        raise _Refused(f"the lists name {sorted(set(active) | set(dead))}; this site masked with "
                       f"{sorted(partners)}, and each of them and itself must be named once")
    return {}


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

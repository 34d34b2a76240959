"""A site's training behind Flower: `SiteEndpoint` answers the coordinator's instructions with the
site's client (`privmed.federation.client.SiteClient`, which computes every reply, its secure
contribution included: this layer only carries it); `serve_site` makes it reachable, for the whole
run, from the short-lived ClientApp processes of the site's SuperNode (over a Unix socket only the
site's user can open).
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
from pathlib import Path

from flwr.app import RecordDict

from privmed.federation.flower import messages as M
from privmed.federation.flower.site_app import (
    ERR, OK, OP_DESCRIBE, OP_EVALUATE, OP_SETUP, OP_TRAIN, decode_content, encode_content, listen_owner_only,
    recv_frame, send_frame,
)
from privmed.federation.client import SiteClient
from privmed.federation.experiment import SiteSetup
from privmed.federation.hospital import Hospital
from privmed.privacy.site_ledger import SiteRefused

log = logging.getLogger("privmed.site")


class SiteEndpoint:
    """Answers a site's messages from Flower's records: a hospital's (`Hospital`: the run's setup
    first, then its instructions through the site it built) or, in one process, a `SiteClient`'s.
    A refused instruction raises SiteRefused, whose message goes back to the coordinator."""

    def __init__(self, site: Hospital | SiteClient):
        self.site = site

    @property
    def client(self) -> SiteClient:
        return self.site.client if isinstance(self.site, Hospital) else self.site

    @property
    def name(self) -> str:
        return self.site.name

    def describe(self) -> dict:
        return self.site.describe()

    def setup(self, content: RecordDict) -> RecordDict:
        if not isinstance(self.site, Hospital):
            raise RuntimeError("a site in this process is built from the plan; it takes no setup")
        client = self.site.setup(SiteSetup.from_json(M.decode_setup(content)))
        log.info("site '%s' set up for a run (%s)", client.name, client.policy.mode)
        return RecordDict()

    def evaluate(self, content: RecordDict) -> RecordDict:
        site, key, weights, splits, rnd, run = M.decode_score_request(content)
        client = self.client
        if site != client.name:
            raise SiteRefused(f"site '{client.name}' got a scoring request for site '{site}'")
        return M.encode_score_reply(client.name, key, client.score(weights, splits, rnd, run, key))

    def train(self, content: RecordDict) -> tuple[RecordDict, int | None]:
        ins = M.decode_instruction(content)
        client = self.client
        if ins.purpose == "finetune":  # scored here; the fine-tuned model stays at the site
            return M.encode_scores(client.name, client.finetune(ins)), None
        if not ins.secure:
            update = client.train(ins)
            return M.encode_update(update, update.weights, update.n_samples), None
        reply = client.contribute(ins)  # computed by the site's client; Flower only carries it
        return M.encode_update(reply.update, reply.arrays, reply.weight, secure=True), reply.seed


def serve_site(endpoint: SiteEndpoint, path: Path) -> threading.Thread:
    """Answer relayed messages on the Unix socket `path` (created owner-only) in a daemon thread."""
    server = listen_owner_only(path, 16)

    def handle(conn: socket.socket) -> None:
        with conn:
            try:
                request = recv_frame(conn)
                op, payload = request[:1], request[1:]
                if op == OP_DESCRIBE:
                    reply = OK + json.dumps(endpoint.describe()).encode()
                elif op == OP_TRAIN:
                    content, seed = endpoint.train(decode_content(payload))
                    reply = OK + struct.pack("!q", -1 if seed is None else seed) + encode_content(content)
                elif op == OP_SETUP:
                    reply = OK + encode_content(endpoint.setup(decode_content(payload)))
                elif op == OP_EVALUATE:
                    reply = OK + encode_content(endpoint.evaluate(decode_content(payload)))
                else:
                    reply = ERR + f"unknown operation {op!r}".encode()
            except Exception as e:  # noqa: BLE001 - the error goes back to the ClientApp
                if isinstance(e, SiteRefused):  # and the hospital's own log says what it refused
                    log.warning("%s", e)
                reply = ERR + f"{type(e).__name__}: {e}".encode()
            try:
                send_frame(conn, reply)
            except OSError:
                pass

    def loop() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=loop, name=f"privmed-site-{endpoint.name}", daemon=True)
    thread.start()
    return thread

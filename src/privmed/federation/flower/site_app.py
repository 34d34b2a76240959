"""The site's side: a Flower ClientApp around one `privmed.federation.site.Site`.

The same `SiteEndpoint` answers the coordinator in a deployment (a SuperNode runs `app`, which
builds the site from the node's config: `privmed join CONFIG --site NAME`) and, under secure
aggregation, in the in-process runner (privmed.federation.flower.secagg.LocalGrid).

Message types: `train` (SecAgg+; `secaggplus_mod` masks the reply), `train.plain` (the reply is
the trained weights), `query.describe` (which site this node serves).
"""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from privmed.federation.flower import messages as M
from privmed.federation.site import Site, derive_seed
from privmed.federation.strategies import contribution


class SiteEndpoint:
    """Answers training instructions for one site."""

    def __init__(self, site: Site, seed: int):
        self.site, self.seed = site, seed

    def describe(self) -> dict:
        return {"site": self.site.name, "n_train": self.site.n_train}

    def train(self, msg: Message) -> Message:
        ins = M.decode_instruction(msg.content)
        if ins.task.site != self.site.name:
            raise ValueError(f"node serves site '{self.site.name}', got an instruction for '{ins.task.site}'")
        update = self.site.train(ins.task, ins.rnd, steps=ins.steps, purpose=ins.purpose)
        if not ins.secure:
            return Message(M.encode_update(update, update.weights, update.n_samples), reply_to=msg)
        arrays = contribution(ins.task.weights, update.weights, ins.clip)
        weight = update.n_samples if ins.weighting == "samples" else 1
        # SecAgg+ scales the contribution by its weight share and clips each entry to the range
        # before quantising; say how many entries that clipped (a count, no values).
        share = weight / ins.max_weight
        clipped = int(sum(np.count_nonzero(np.abs(a * share) > ins.clipping_range) for a in arrays))
        update.metrics["secagg_clipped"] = clipped
        # SecAgg+ rounds stochastically with numpy's global generator: seed it from (seed, round,
        # site) so that the run reproduces (the masks, drawn from os.urandom, cancel exactly).
        np.random.seed(derive_seed(self.seed, "secagg", ins.rnd, self.site.name) % 2**32)
        return Message(M.encode_update(update, arrays, weight), reply_to=msg)


def make_client_app(endpoint_for: Callable[[Context], SiteEndpoint]) -> ClientApp:
    """A ClientApp whose handlers ask `endpoint_for(context)` for the site to use."""
    app = ClientApp()

    @app.train(mods=[secaggplus_mod])
    def train_secure(msg: Message, context: Context) -> Message:
        return endpoint_for(context).train(msg)

    @app.train("plain")
    def train_plain(msg: Message, context: Context) -> Message:
        return endpoint_for(context).train(msg)

    @app.query("describe")
    def describe(msg: Message, context: Context) -> Message:
        facts = endpoint_for(context).describe()
        return Message(RecordDict({"site": ConfigRecord(facts)}), reply_to=msg)

    return app


# ---------------------------------------------------------------------------- deployment

_cache: dict[tuple, SiteEndpoint] = {}
_lock = threading.Lock()


def _endpoint_from_node(context: Context) -> SiteEndpoint:
    """The site this SuperNode serves, built once per process from its node config: `privmed join`
    sets 'privmed-config' (the path of the resolved run config it wrote) and 'privmed-site'."""
    path = str(context.node_config["privmed-config"])
    name = str(context.node_config["privmed-site"])
    with _lock:
        if (path, name) not in _cache:
            _cache[(path, name)] = build_endpoint(path, name)
        return _cache[(path, name)]


def build_endpoint(config_path: str, name: str) -> SiteEndpoint:
    from privmed.config import read_yaml, validate_config
    from privmed.federation.experiment import prepare_site

    cfg = validate_config(read_yaml(config_path), source=config_path)
    return SiteEndpoint(prepare_site(cfg, name), cfg.seed)


app = make_client_app(_endpoint_from_node)

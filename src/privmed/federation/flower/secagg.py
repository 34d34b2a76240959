"""Secure aggregation with Flower's SecAgg+ (Bell et al. 2020): `secure_stage` runs one stage of a
round through `SecAggPlusWorkflow` (the coordinator) and `secaggplus_mod` (the sites), over any Flower
Grid: the SuperLink's in a deployment, or `LocalGrid`, which delivers messages to ClientApps in this
process, so the in-process runner runs the same protocol.

What the coordinator receives from a site is its quantised contribution plus pairwise and private
masks modulo 2^32; a coordinator that follows the protocol unmasks only the sum over the sites that
took part. It is no more than that: Flower draws each mask from numpy's RandomState seeded with 32
bits (28 for a pairwise mask), so with 3 sites (2 mask partners each) such a coordinator can search
every site's masks in minutes; and a coordinator that lies can obtain any one site's update
(substituted keys, per-site dropout lists, two sums of a round). The sites refuse the lies they can
see (`site_app.secagg_checks_mod`); what remains is in benchmarks/results/
secagg_cheating_coordinator.md, and is why a hospital accounts for its own update alone. Each site
i sends q(c_i * w_i / W) where c_i is its contribution (see strategies.contribution), w_i its weight
(n_samples, or 1), W = SecAgg+'s max_weight, and q stochastic rounding to 2^bits levels on
[-r, r]; the coordinator gets sum_i w_i c_i / sum_i w_i. W is the smallest power of two >= every
w_i, so the weights w_i / W are exact and the only error is the rounding (see `quantization_bound`).
"""

from __future__ import annotations

import copy
import logging
import math
import uuid
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp.grid import Grid
from flwr.supercore.task_identity import TaskIdentity

from privmed.config import FederationConfig
from privmed.federation.flower import messages as M
from privmed.federation.strategies import SecureSum, SiteUpdate, TrainTask
from privmed.federation.stages import StageFailed
from privmed.privacy.site_ledger import SiteRefused

COORDINATOR_NODE_ID = 1  # Flower's SUPERLINK_NODE_ID


def max_weight(weights: Iterable[float]) -> float:
    """The smallest power of two >= every weight (SecAgg+'s max_weight; makes w / W exact)."""
    return float(2 ** max(0, math.ceil(math.log2(max(max(weights), 1)))))


def quantization_bound(weights: list[float], clipping_range: float, bits: int) -> float:
    """The largest error SecAgg+'s quantisation can put on any entry of the weighted mean of these
    sites' contributions (when none was clipped): each site's stochastic rounding is off by less
    than one level, 2r / 2^bits, so the sum of the n sites' weighted values is off by less than
    n levels, and the mean by that over sum_i w_i / W."""
    w = max_weight(weights)
    return len(weights) * (2 * clipping_range / 2**bits) / (sum(weights) / w)


# what each of SecAgg+'s stages does, as a progress line says it (`secure_stage`'s on_stage)
SECURE_STAGES = {
    "setup": "secure aggregation 1/4: the hospitals make their keys",
    "share_keys": "secure aggregation 2/4: the hospitals exchange key shares",
    "collect_masked_vectors": "secure aggregation 3/4: the hospitals train and send masked updates",
    "unmask": "secure aggregation 4/4: the coordinator unmasks the sum",
}


class _SecAggPlus(SecAggPlusWorkflow):
    """Flower's workflow, with one fix and one rule.

    The fix (flwr 1.41): a site that drops out before it shared its keys masked nothing and gave
    nobody shares, but the workflow still counted it among the dropped sites in the unmask stage,
    asked its neighbours for shares they never received, and failed. After the share-keys stage,
    such sites are forgotten: no longer sampled, no longer anyone's neighbour (so no pairwise mask
    with them is removed either).

    The rule: the sum is unmasked only when at least `min_sites` sites sent masked updates. A sum
    over fewer would be thrown away and the round retried, and the coordinator would hold two sums
    of the same round over two sets of sites: their difference is the update of the sites in one
    and not the other (one site's update, when a single site came back). It is this coordinator's
    own rule: the sites cannot tell a second sum from a retry, so one that lies need not keep it."""

    def __init__(self, *args, min_sites: int = 0, on_stage: Callable[[str], None] | None = None,  # noqa: ANN002
                 **kwargs) -> None:  # noqa: ANN003
        super().__init__(*args, **kwargs)
        self.min_sites = min_sites
        self.on_stage = on_stage

    def _say(self, what: str) -> None:
        if self.on_stage is not None:
            self.on_stage(what)

    def setup_stage(self, grid, context, state) -> bool:  # noqa: ANN001
        self._say(SECURE_STAGES["setup"])
        return super().setup_stage(grid, context, state)

    def unmask_stage(self, grid, context, state) -> bool:  # noqa: ANN001
        self._say(SECURE_STAGES["unmask"])
        return super().unmask_stage(grid, context, state)

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:  # noqa: ANN001
        self._say(SECURE_STAGES["collect_masked_vectors"])
        ok = super().collect_masked_vectors_stage(grid, context, state)
        if ok and len(state.active_node_ids) < self.min_sites:
            logging.getLogger("privmed.secagg").warning(
                "%d sites sent masked updates, federation.min_sites is %d: the sum is not unmasked",
                len(state.active_node_ids), self.min_sites,
            )
            return False
        return ok

    def share_keys_stage(self, grid, context, state) -> bool:  # noqa: ANN001
        self._say(SECURE_STAGES["share_keys"])
        ok = super().share_keys_stage(grid, context, state)
        active = set(state.active_node_ids)
        state.sampled_node_ids = set(active)
        for nid in list(state.nid_to_neighbours):
            if nid in active:
                state.nid_to_neighbours[nid] &= active
            else:
                del state.nid_to_neighbours[nid]
        return ok


class _RefusalWatch:
    """The grid as SecAggPlusWorkflow uses it, noting each site's refusal among the replies: the
    workflow drops a site whose reply is an error without saying why, and a refusal by a
    hospital's guard must reach the coordinator's output, as it does outside secure rounds."""

    def __init__(self, grid: Grid):
        self._grid = grid
        self.refusals: list[str] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            why = M.refusal(reply.error.reason) if reply.has_error() else None
            if why is not None:
                self.refusals.append(why)
        return replies

    def __getattr__(self, name: str):  # noqa: ANN204 - everything else, as the grid has it
        return getattr(self._grid, name)


class SecAggError(StageFailed):
    """A secure stage ended without an aggregate (too few sites answered for the threshold)."""


class _Stage(LegacyStrategy):
    """Feeds one stage's instructions to SecAggPlusWorkflow and takes back what it unmasks (the
    workflow speaks to the legacy Strategy interface: configure_fit / aggregate_fit)."""

    def __init__(self, grid: Grid, run_id: int, node_of: dict[str, int], fitins: dict[str, RecordDict]):
        self.grid, self.run_id, self.node_of, self.fitins = grid, run_id, node_of, fitins
        self.mean: list[np.ndarray] | None = None
        self.reports: list[SiteUpdate] = []

    def configure_fit(self, server_round, parameters, client_manager):
        from flwr.compat.common import recorddict_compat as compat

        return [
            (GridClientProxy(self.node_of[site], self.grid, self.run_id),
             compat.recorddict_to_fitins(content, keep_input=True))
            for site, content in self.fitins.items()
        ]

    def aggregate_fit(self, server_round, results, failures):
        # SecAgg+ hands every result the same unmasked mean; the rest of each FitRes is the clear
        # report (sample count, metrics)
        self.mean = parameters_to_ndarrays(results[0][1].parameters) if results else None
        self.reports = [M.update_from_fitres(res, with_weights=False) for _, res in results]
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def secure_stage(
    grid: Grid,
    node_of: dict[str, int],
    tasks: list[TrainTask],
    rnd: int,
    run: str,
    fed: FederationConfig,
    shares: int,
    threshold: int,
    n_samples: dict[str, int],
    weighting: str,
    clip: float | None,
    timeout: float | None = None,
    min_sites: int = 0,
    on_stage: Callable[[str], None] | None = None,
) -> SecureSum:
    """Train `tasks` (one per site) and return only the weighted mean of the sites' contributions.
    Sites that fail or time out drop out; SecAgg+ removes their masks when `threshold` shares
    survive. SecAggError when no aggregate could be formed, or when fewer than `min_sites` sites
    sent masked updates (then nothing is unmasked). `on_stage` is told as each of SecAgg+'s four
    stages begins (SECURE_STAGES' words)."""
    weights = [n_samples[t.site] if weighting == "samples" else 1 for t in tasks]
    w_max = max_weight(weights)
    fitins = {
        t.site: M.encode_instruction(M.Instruction(
            t, rnd, run=run, secure=True, weighting=weighting, clip=clip, max_weight=w_max,
            clipping_range=fed.secagg_clipping_range,
        ))
        for t in tasks
    }
    if len(tasks) < 3:
        raise SecAggError(
            f"round {rnd}: secure aggregation needs 3 sites or more, {len(tasks)} can be reached"
        )
    n_shares = share_count(shares, len(tasks))
    workflow = _SecAggPlus(
        num_shares=n_shares,
        reconstruction_threshold=min(threshold, n_shares - 1),
        max_weight=w_max,
        clipping_range=fed.secagg_clipping_range,
        quantization_range=2**fed.secagg_quantization_bits,
        timeout=timeout,
        min_sites=min_sites,
        on_stage=on_stage,
    )
    watch = _RefusalWatch(grid)
    stage = _Stage(watch, _run_id(grid), node_of, fitins)
    workflow(watch, _legacy_context(stage, rnd))
    if watch.refusals:  # a site that refused ends the run, as outside secure rounds: it would again
        raise SiteRefused(watch.refusals[0])
    if stage.mean is None:
        raise SecAggError(
            f"round {rnd}: too few sites answered to unmask the sum (SecAgg+ threshold "
            f"{workflow.reconstruction_threshold}, federation.min_sites {min_sites or 'none'})"
        )
    return SecureSum(mean=[np.asarray(a, dtype=np.float64) for a in stage.mean], reports=stage.reports)


def _legacy_context(stage: _Stage, rnd: int) -> LegacyContext:
    """The context SecAggPlusWorkflow reads: the round, and `stage` as its strategy."""
    state = RecordDict()
    state.config_records["config"] = ConfigRecord({"current_round": rnd})
    state.array_records["parameters"] = ArrayRecord([np.zeros(1)])
    return LegacyContext(
        Context(run_id=stage.run_id, node_id=COORDINATOR_NODE_ID, node_config={}, state=state, run_config={}),
        strategy=stage,
    )


def share_count(shares: int, sites: int) -> int:
    """The number of shares each of `sites` sites splits its secrets into: `shares`, at most one
    per site, and odd when below the number of sites. Flower's workflow gives each site the
    `shares` nearest nodes on a ring, which is one more when `shares` is even, but tells the sites
    the even number: they would split their secrets into fewer shares than they have neighbours
    (and refuse: site_app.secagg_checks_mod). A threshold that is a strict majority of an even
    number is one of the next odd number too."""
    n = min(shares, sites)
    return n + 1 if n < sites and n % 2 == 0 else n


def _run_id(grid: Grid) -> int:
    try:
        return grid.run.run_id
    except Exception:  # noqa: BLE001 - a LocalGrid has no Flower run
        return 0


class LocalGrid(Grid):
    """A Flower Grid whose nodes are ClientApps in this process: a message is copied (as a network
    would), handed to its node's app with that node's Context (its state persists across messages,
    as on a SuperNode), and the reply returned. `drop`: node ids that stop answering, to study
    dropouts; `seen`: when a list, every reply the coordinator received (for tests).
    `errors_as_replies`: an exception an app raises comes back as the error reply a deployment's
    coordinator gets (Flower's ClientApp runner's, around the relay's 'NAME: WORDS'), instead of
    reaching the caller."""

    def __init__(self, apps: dict[int, ClientApp], node_configs: dict[int, dict] | None = None,
                 errors_as_replies: bool = False):
        self.apps, self.errors_as_replies = apps, errors_as_replies
        self.contexts = {
            nid: Context(run_id=0, node_id=nid, node_config=(node_configs or {}).get(nid, {}),
                         state=RecordDict(), run_config={})
            for nid in apps
        }
        self.drop: set[int] = set()
        self.seen: list[Message] | None = None
        self._pending: dict[str, Message] = {}

    def set_run(self, run) -> None:  # noqa: ANN001 - no Flower run in one process
        pass

    @property
    def run(self):  # noqa: ANN201
        raise AttributeError("a LocalGrid has no Flower run")

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:  # noqa: ANN001
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return [nid for nid in self.apps if nid not in self.drop]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            msg.metadata.__dict__["_src_node_id"] = COORDINATOR_NODE_ID
            self._pending[msg.metadata.message_id] = copy.deepcopy(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        replies = []
        for mid in list(message_ids):
            msg = self._pending.pop(mid)
            nid = msg.metadata.dst_node_id
            if nid in self.drop:
                continue
            try:
                reply = copy.deepcopy(self.apps[nid](msg, self.contexts[nid]))
            except Exception as e:  # noqa: BLE001 - as Flower's runner turns it into a reply
                if not self.errors_as_replies:
                    raise
                reason = f"<class 'RuntimeError'>:<'{type(e).__name__}: {e}'>"
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
            if self.seen is not None:
                self.seen.append(reply)
            replies.append(reply)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


@contextmanager
def in_process_identity() -> Iterator[None]:
    """Flower stamps messages with the identity of the process's task; in one process there is none,
    so stand in as the coordinator, and keep Flower's per-message log lines out of the way."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 0, 0, COORDINATOR_NODE_ID
    log = logging.getLogger("flwr")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
        log.setLevel(level)

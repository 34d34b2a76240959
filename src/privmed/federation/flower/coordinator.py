"""The coordinator's side of the Flower runner: `FlowerSites` carries each stage's instructions to
the SuperNodes and their updates back, for the same round loop as the in-process runner
(privmed.federation.runner). The ServerApp that runs it is `privmed.flower_server.app`.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable

from flwr.app import Message
from flwr.serverapp.grid import Grid

from privmed.config import RunConfig
from privmed.errors import PrivmedError
from privmed.federation.experiment import Experiment
from privmed.federation.instructions import ScoreRequest, Scores
from privmed.federation.flower import messages as M
from privmed.federation.flower.messages import reason as _reason
from privmed.federation.flower.messages import refusal
from privmed.federation.flower import trace
from privmed.federation.strategies import SecureStrategy, SiteUpdate, TrainTask
from privmed.federation.transport import StageFailed, StageOutcome, required_sites, secure_round
from privmed.privacy.site_ledger import SiteRefused

log = logging.getLogger("privmed.flower")

CONNECT_TIMEOUT = 600.0  # seconds to wait for the sites to connect at the start of a run
POLL = 0.5


class PollingGrid(Grid):
    """The SuperLink's Grid, with `send_and_receive` polling for replies every `interval` seconds
    (Flower's waits 3 s between pulls, which is most of a round's time on small models)."""

    def __init__(self, grid: Grid, interval: float = 0.1):
        self.inner, self.interval = grid, interval
        self._exchange = 0  # send_and_receive calls so far (for the trace)

    def set_run(self, run) -> None:  # noqa: ANN001
        self.inner.set_run(run)

    @property
    def run(self):  # noqa: ANN201
        return self.inner.run

    def create_message(self, *args, **kwargs) -> Message:  # noqa: ANN002, ANN003
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self):  # noqa: ANN201
        return self.inner.get_node_ids()

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:  # noqa: ANN001
        messages = list(messages)
        pushed = time.time()
        waiting = set(self.push_messages(messages))
        if trace.enabled():
            self._exchange += 1
            for m in messages:
                trace.record("push", t=pushed, done=time.time(), mid=m.metadata.message_id, type=_label(m), node=m.metadata.dst_node_id,
                             group=m.metadata.group_id, exchange=self._exchange)
        end = None if timeout is None else time.monotonic() + timeout
        out: list[Message] = []
        while waiting and (end is None or time.monotonic() < end):
            got = list(self.pull_messages(waiting))
            out += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            for m in got if trace.enabled() else []:
                trace.record("pull", mid=m.metadata.reply_to_message_id, reply=m.metadata.message_id,
                             node=m.metadata.src_node_id, exchange=self._exchange)
            if waiting:
                time.sleep(self.interval)
        return out


def _label(msg: Message) -> str:
    """The message's type, and its SecAgg+ stage (setup, share_keys, collect_masked_vectors,
    unmask) for SecAgg+'s messages."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    record = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
    stage = record.get(Key.STAGE) if record is not None else None
    return f"{msg.metadata.message_type}:{stage}" if stage else msg.metadata.message_type


class FlowerSites:
    """The run's sites, each a SuperNode reached through `grid`. A node says which site it serves,
    its counts and its data's shape when asked ('query.describe'): the coordinator plans the run
    from that alone (`descriptions`), then sends every site the run's public setup
    ('query.setup') before its first instruction. A site whose node failed is looked up again
    before its next stage (without node authentication a restarted SuperNode comes back with a new
    node id), and set up again."""

    def __init__(self, cfg: RunConfig, grid: Grid, connect_timeout: float = CONNECT_TIMEOUT,
                 registered: dict[str, int] | None = None):
        """`registered`: the node id of each site's authentication key; a node that says it serves
        a site is believed only when it is that site's node (None or empty: no check)."""
        if cfg.federation.strategy == "pooled":
            raise PrivmedError("federation.strategy: 'pooled' puts all data in one place; it cannot run on Flower")
        self.cfg, self.grid = cfg, grid
        self.expected = cfg.sites.site_names()
        self.registered = registered or {}
        self.timeout = cfg.federation.round_timeout
        self.exp: Experiment | None = None
        self.node_of: dict[str, int] = {}
        self.described: dict[str, dict] = {}
        self._set_up: dict[str, int] = {}  # site -> the node it was set up on
        self._asked: set[int] = set()
        self._refused: list[str] = []
        # told what the sites are asked to do as each stage begins, in words (the `privmed run
        # --runner flower` progress bar shows it: flower_server writes it to the run directory)
        self.on_stage: Callable[[str], None] | None = None
        n = len(self.expected)
        need = min(cfg.federation.min_sites or n, n)
        self._discover(wait_for=n, at_least=need, timeout=connect_timeout)

    def descriptions(self) -> dict[str, dict]:
        """What each connected site said of itself, in the config's order of sites."""
        return {s: self.described[s] for s in self.expected if s in self.described}

    def attach(self, exp: Experiment) -> None:
        """The experiment planned from the sites' descriptions: its setup goes to every site."""
        self.exp = exp

    # ------------------------------------------------------------------ nodes
    def _discover(self, wait_for: int, at_least: int, timeout: float) -> None:
        """Ask every node not yet known which site it serves, until `wait_for` sites are known or
        `timeout` seconds pass; StageFailed if fewer than `at_least` are known then."""
        end = time.monotonic() + timeout
        while True:
            new = [n for n in self.grid.get_node_ids() if n not in self._asked and n not in self.node_of.values()]
            if new:
                msgs = [Message(M.RecordDict(), dst_node_id=n, message_type=M.DESCRIBE, group_id="describe") for n in new]
                for reply in self.grid.send_and_receive(msgs, timeout=min(60.0, max(1.0, end - time.monotonic()))):
                    node = reply.metadata.src_node_id
                    self._asked.add(node)
                    if reply.has_error():
                        log.warning("node %s did not say which site it serves: %s", node, reply.error.reason)
                        continue
                    record = reply.content.config_records["site"]
                    site = str(record["site"])
                    if site not in self.expected:
                        log.warning("node %s serves site '%s', which is not in this run; ignored", node, site)
                        continue
                    if self.registered and self.registered.get(site) != node:
                        key = self.registered.get(site)
                        why = (f"node {node} says it serves '{site}', whose key is "
                               + (f"node {key}'s" if key is not None else f"not registered (no {site}.pub)"))
                        self._refused.append(why)
                        log.warning("%s; ignored", why)
                        continue
                    described = json.loads(str(record["json"])) if "json" in record else dict(record)
                    self._check_profile(site, described)
                    self.described[site] = described
                    self.node_of[site] = node
                    log.info("site '%s' is node %s", site, node)
            if len(self.node_of) >= wait_for or time.monotonic() >= end:
                break
            time.sleep(POLL)
        if len(self.node_of) < at_least:
            missing = sorted(set(self.expected) - set(self.node_of))
            refused = f"; refused: {'; '.join(self._refused)}" if self._refused else ""
            raise StageFailed(
                f"{len(self.node_of)} of {len(self.expected)} sites connected within {timeout:g} s "
                f"(missing: {', '.join(missing)}); {at_least} needed{refused}"
            )

    def _check_profile(self, site: str, described: dict) -> None:
        """PrivmedError when a site that comes back reports other counts than those the run was
        planned with (the privacy plan's sample rates and the strategy's weights rest on them)."""
        if self.exp is None:
            return
        planned = next((p for p in self.exp.plan.trainers if p.name == site), None)
        fields = ("n_train", "n_patients", "patient_ids")
        if planned is None or not all(k in described for k in fields):
            return
        theirs = {k: described[k] for k in fields}
        ours = {k: getattr(planned, k) for k in fields}
        if theirs != ours:
            raise PrivmedError(
                f"site '{site}' reports {theirs}, but the run was planned with {ours}: the hospital's "
                "data changed during the run"
            )

    def _set_up_sites(self, sites: list[str]) -> None:
        """Send the run's setup to each of `sites` not yet set up on its current node; a site that
        fails it is forgotten (it drops out of the stage)."""
        todo = [s for s in sites if s in self.node_of and self._set_up.get(s) != self.node_of[s]]
        if not todo or self.exp is None:
            return
        msgs = [
            Message(M.encode_setup(self.exp.plan.setup_for(s).to_json()), dst_node_id=self.node_of[s],
                    message_type=M.SETUP, group_id="setup")
            for s in todo
        ]
        site_of = {self.node_of[s]: s for s in todo}
        for reply in self.grid.send_and_receive(msgs, timeout=self.timeout):
            site = site_of.get(reply.metadata.src_node_id)
            if site is None:
                continue
            if reply.has_error():
                refused = refusal(reply.error.reason)
                if refused is not None:
                    raise SiteRefused(refused)
                raise PrivmedError(f"site '{site}' could not set up the run: {_reason(reply.error.reason)}")
            self._set_up[site] = self.node_of[site]
        self._forget([s for s in todo if self._set_up.get(s) != self.node_of.get(s)])

    def _reach(self, sites: list[str]) -> None:
        """Look up sites whose node failed, and set up every one of `sites` that is reachable."""
        alive = set(self.grid.get_node_ids())  # Flower forgets a node that stopped answering
        self._forget([s for s, n in self.node_of.items() if n not in alive])
        if any(s not in self.node_of for s in sites):  # a site that dropped may be back
            self._discover(wait_for=len(self.expected), at_least=0, timeout=0)
        self._set_up_sites(sites)

    def _forget(self, sites: list[str]) -> None:
        for s in sites:
            self._set_up.pop(s, None)
            node = self.node_of.pop(s, None)
            if node is not None:
                self._asked.discard(node)

    def _say(self, what: str) -> None:
        if self.on_stage is not None:
            self.on_stage(what)

    # ------------------------------------------------------------------ training
    def train_stage(
        self, tasks: list[TrainTask], rnd: int, secure: SecureStrategy | None, run: str
    ) -> StageOutcome:
        self._reach([t.site for t in tasks])
        reachable = [t for t in tasks if t.site in self.node_of]
        dropped = [t.site for t in tasks if t.site not in self.node_of]
        if secure is not None:
            need = required_sites(self.exp, len(tasks))
            if len(reachable) < need:  # fail before any site masks or sends an update
                raise StageFailed(
                    f"round {rnd}: {len(reachable)} of {len(tasks)} sites are connected "
                    f"({', '.join(dropped)} missing); federation.min_sites is {need}"
                )
            total = secure_round(self.exp, self.grid, self.node_of, reachable, rnd, secure, run,
                                 self.timeout, planned=len(tasks),
                                 on_stage=lambda what: self._say(f"round {rnd}: {what}"))
            lost = [t.site for t in reachable if t.site not in total.sites]
            self._forget(lost)
            order = {t.site: i for i, t in enumerate(tasks)}
            reports = sorted(total.reports, key=lambda r: order[r.site])
            return StageOutcome(reports, secure=total, dropped=dropped + lost)
        self._say(f"round {rnd}: the hospitals train")
        updates = self._send(reachable, rnd, run)
        lost = [t.site for t in reachable if t.site not in updates]
        self._forget(lost)
        # in the tasks' order, so that aggregation sums in the order the in-process runner does
        return StageOutcome([updates[t.site] for t in reachable if t.site in updates], dropped=dropped + lost)

    def finetune(self, task: TrainTask, rnd: int, steps: int, run: str) -> dict:
        self._reach([task.site])
        if task.site not in self.node_of:
            raise StageFailed(f"site '{task.site}' is not connected for its fine-tuning instruction")
        ins = M.Instruction(task, rnd, run=run, steps=steps, purpose="finetune")
        msg = Message(M.encode_instruction(ins), dst_node_id=self.node_of[task.site],
                      message_type=M.TRAIN_PLAIN, group_id=f"finetune-{rnd}")
        for reply in self.grid.send_and_receive([msg], timeout=self.timeout):
            if reply.has_error():
                refused = refusal(reply.error.reason)
                if refused is not None:
                    raise SiteRefused(refused)
                raise StageFailed(f"site '{task.site}' failed its fine-tuning: {reply.error.reason}")
            site, scores = M.decode_scores(reply.content)
            if site == task.site:
                return scores
        raise StageFailed(f"site '{task.site}' did not answer its fine-tuning instruction")

    def score(self, requests: list[ScoreRequest], rnd: int, run: str) -> dict[tuple[str, str], Scores]:
        """The scores of the requests whose sites answered (a site that is gone is left out, and
        the round's row says so)."""
        self._reach(sorted({r.site for r in requests}))
        reachable = [r for r in requests if r.site in self.node_of]
        self._say(f"round {rnd}: the hospitals score the models")
        msgs = [
            Message(M.encode_score_request(r.site, r.model_key, r.weights, r.splits, rnd, run),
                    dst_node_id=self.node_of[r.site], message_type=M.EVALUATE, group_id=f"score-{rnd}")
            for r in reachable
        ]
        out: dict[tuple[str, str], Scores] = {}
        for reply in self.grid.send_and_receive(msgs, timeout=self.timeout) if msgs else []:
            if reply.has_error():
                log.warning("round %s: a site failed to score the models: %s", rnd, _reason(reply.error.reason))
                continue
            site, key, scores = M.decode_score_reply(reply.content)
            if self.node_of.get(site) != reply.metadata.src_node_id:
                log.warning("round %s: a node answered a scoring request for site '%s'; ignored", rnd, site)
                continue
            out[(site, key)] = scores
        lost = sorted({r.site for r in requests if (r.site, r.model_key) not in out})
        if lost:
            log.warning("round %s: no scores from %s", rnd, ", ".join(lost))
            self._forget([s for s in lost if s in self.node_of and not any(k[0] == s for k in out)])
        return out

    def _send(self, tasks: list[TrainTask], rnd: int, run: str) -> dict[str, SiteUpdate]:
        """Each task's update; a site that failed is left out, a site that refused ends the run
        (SiteRefused, with the site's reason: asking again would be refused again)."""
        msgs = [
            Message(
                M.encode_instruction(M.Instruction(t, rnd, run=run)),
                dst_node_id=self.node_of[t.site], message_type=M.TRAIN_PLAIN, group_id=str(rnd),
            )
            for t in tasks
        ]
        site_of = {self.node_of[t.site]: t.site for t in tasks}
        out: dict[str, SiteUpdate] = {}
        for reply in self.grid.send_and_receive(msgs, timeout=self.timeout):
            site = site_of.get(reply.metadata.src_node_id)
            if reply.has_error():
                refused = refusal(reply.error.reason)
                if refused is not None:
                    raise SiteRefused(refused)
                log.warning("round %s: site '%s' failed: %s", rnd, site, reply.error.reason)
                continue
            update = M.decode_update(reply.content)
            if update.site != site:
                log.warning("round %s: node of site '%s' answered for '%s'; ignored", rnd, site, update.site)
                continue
            out[site] = update
        return out

    def close(self) -> None:
        pass


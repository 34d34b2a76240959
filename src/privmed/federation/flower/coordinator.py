"""The coordinator's side of the Flower runner: `FlowerSites` carries each stage's instructions to
the SuperNodes and their updates back, for the same round loop as the in-process runner
(privmed.federation.runner). The ServerApp that runs it is `privmed.flower_server.app`.
"""

from __future__ import annotations

import logging
import time

from flwr.app import Message
from flwr.serverapp.grid import Grid

from privmed.errors import PrivmedError
from privmed.federation.experiment import Experiment
from privmed.federation.flower import messages as M
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
        waiting = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        out: list[Message] = []
        while waiting and (end is None or time.monotonic() < end):
            got = list(self.pull_messages(waiting))
            out += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if waiting:
                time.sleep(self.interval)
        return out


class FlowerSites:
    """The experiment's sites, each a SuperNode reached through `grid`. A node says which site it
    serves when asked ('query.describe'); a site whose node failed is looked up again before its
    next stage (without node authentication a restarted SuperNode comes back with a new node id)."""

    def __init__(self, exp: Experiment, grid: Grid, connect_timeout: float = CONNECT_TIMEOUT,
                 registered: dict[str, int] | None = None):
        """`registered`: the node id of each site's authentication key; a node that says it serves
        a site is believed only when it is that site's node (None or empty: no check)."""
        if exp.strategy.pools_data:
            raise PrivmedError("federation.strategy: 'pooled' puts all data in one place; it cannot run on Flower")
        self.exp, self.grid = exp, grid
        self.registered = registered or {}
        self.timeout = exp.config.federation.round_timeout
        self.node_of: dict[str, int] = {}
        self._asked: set[int] = set()
        self._refused: list[str] = []
        need = required_sites(exp, len(exp.trainers))
        self._discover(wait_for=len(exp.trainers), at_least=need, timeout=connect_timeout)

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
                    facts = dict(reply.content.config_records["site"])
                    site = str(facts["site"])
                    if site not in self.exp.trainers:
                        log.warning("node %s serves site '%s', which is not in this run; ignored", node, site)
                        continue
                    if self.registered and self.registered.get(site) != node:
                        key = self.registered.get(site)
                        why = (f"node {node} says it serves '{site}', whose key is "
                               + (f"node {key}'s" if key is not None else f"not registered (no {site}.pub)"))
                        self._refused.append(why)
                        log.warning("%s; ignored", why)
                        continue
                    self._check_profile(site, facts)
                    self.node_of[site] = node
                    log.info("site '%s' is node %s", site, node)
            if len(self.node_of) >= wait_for or time.monotonic() >= end:
                break
            time.sleep(POLL)
        if len(self.node_of) < at_least:
            missing = sorted(set(self.exp.trainers) - set(self.node_of))
            refused = f"; refused: {'; '.join(self._refused)}" if self._refused else ""
            raise StageFailed(
                f"{len(self.node_of)} of {len(self.exp.trainers)} sites connected within {timeout:g} s "
                f"(missing: {', '.join(missing)}); {at_least} needed{refused}"
            )

    def _check_profile(self, site: str, facts: dict) -> None:
        """PrivmedError when a site's own counts are not those the run was planned with (the
        privacy plan's sample rates and the strategy's weights rest on them)."""
        planned = next((p for p in self.exp.plan.trainers if p.name == site), None)
        fields = ("n_train", "n_patients", "patient_ids")
        if planned is None or not all(k in facts for k in fields):
            return
        theirs = {k: facts[k] for k in fields}
        ours = {k: getattr(planned, k) for k in fields}
        if theirs != ours:
            raise PrivmedError(
                f"site '{site}' reports {theirs}, but the run was planned with {ours}: the hospital's "
                "data is not what the coordinator's config describes"
            )

    def _forget(self, sites: list[str]) -> None:
        for s in sites:
            node = self.node_of.pop(s, None)
            if node is not None:
                self._asked.discard(node)

    # ------------------------------------------------------------------ training
    def train_stage(
        self, tasks: list[TrainTask], rnd: int, secure: SecureStrategy | None, run: str
    ) -> StageOutcome:
        alive = set(self.grid.get_node_ids())  # Flower forgets a node that stopped answering
        self._forget([s for s, n in self.node_of.items() if n not in alive])
        if any(t.site not in self.node_of for t in tasks):  # a site that dropped may be back
            self._discover(wait_for=len(self.exp.trainers), at_least=0, timeout=0)
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
                                 self.timeout, planned=len(tasks))
            lost = [t.site for t in reachable if t.site not in total.sites]
            self._forget(lost)
            order = {t.site: i for i, t in enumerate(tasks)}
            reports = sorted(total.reports, key=lambda r: order[r.site])
            return StageOutcome(reports, secure=total, dropped=dropped + lost)
        updates = self._send(reachable, rnd, run)
        lost = [t.site for t in reachable if t.site not in updates]
        self._forget(lost)
        # in the tasks' order, so that aggregation sums in the order the in-process runner does
        return StageOutcome([updates[t.site] for t in reachable if t.site in updates], dropped=dropped + lost)

    def finetune(self, task: TrainTask, rnd: int, steps: int, run: str) -> dict:
        if task.site not in self.node_of:
            self._discover(wait_for=len(self.exp.trainers), at_least=0, timeout=0)
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


def refusal(reason: str) -> str | None:
    """The site's reason when an error reply is a refusal by its guard, else None. The relay
    raises 'SiteRefused: REASON', which Flower's ClientApp runner reports as
    "<class 'RuntimeError'>:<'SiteRefused: REASON'>"."""
    marker = f"{SiteRefused.__name__}: "
    at = reason.find(marker)
    if at < 0:
        return None
    text = reason[at + len(marker):].strip()
    return text[:-2] if text.endswith("'>") else text

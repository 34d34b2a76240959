"""The coordinator's Flower ServerApp: it runs one privmed run (`privmed.api.run`) with its sites
reached through Flower (`privmed.federation.flower.coordinator.FlowerSites`). An edge of privmed,
like the CLI: nothing inside `privmed.federation` imports it.

`privmed run CONFIG --runner flower` submits a run of `app` to the SuperLink with the run config
keys 'privmed-config' (path of the resolved config), 'run-dir' and 'resume'; the ServerApp, started
by the SuperLink on the coordinator's machine, writes the run directory there.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context
from flwr.serverapp import ServerApp
from flwr.serverapp.grid import Grid

from privmed.federation.flower.coordinator import FlowerSites, PollingGrid

if TYPE_CHECKING:
    from privmed.federation.live import LiveState

log = logging.getLogger("privmed.flower")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from privmed.api import run
    from privmed.config import read_yaml, validate_config

    from privmed.federation.flower.deploy import stock
    from privmed.federation.flower.flower_patch import patch_object_pulls

    if not stock():  # this process pulls the sites' replies: no second-long waits for their content
        patch_object_pulls()
    rc = context.run_config
    path = str(rc["privmed-config"])
    cfg = validate_config(read_yaml(path), source=path)
    resume = str(rc.get("resume", "false")).lower() == "true"
    registered = registered_nodes()
    live = live_state(cfg)
    try:
        # the sites describe themselves first: the run is planned from their counts, not from data here
        sites = FlowerSites(cfg, PollingGrid(grid), registered=registered)
        sites.on_stage = stage_writer(Path(str(rc["run-dir"])))
        run(cfg, str(rc["run-dir"]), resume=resume, sites=sites, live=live)
    except BaseException as e:
        if live is not None and not live.over:  # it failed before the round loop began
            live.ended(e)
        raise


def stage_writer(run_dir: Path):  # noqa: ANN201 - Callable[[str], None]
    """Writes each stage's words to the run directory's STAGE_FILE (atomically; a failed write is
    only logged: progress must not stop a run)."""
    from privmed import io
    from privmed.federation.flower.deploy import STAGE_FILE

    def write(what: str) -> None:
        try:
            io.write_text(run_dir / STAGE_FILE, what + "\n")
        except OSError as e:
            log.warning("could not write the stage to %s: %s", run_dir / STAGE_FILE, e)

    return write


def live_state(cfg) -> LiveState | None:  # noqa: ANN001
    """A LiveState whose snapshots go where `privmed serve --dashboard` reads them (in FLWR_HOME);
    None when no dashboard shows this coordinator."""
    from privmed import io
    from privmed.dashboard import live_file
    from privmed.federation.live import LiveState

    home = os.environ.get("FLWR_HOME")
    path = live_file(Path(home)) if home else None
    if path is None:
        return None
    live = LiveState(sink=lambda snapshot: io.write_json(path, snapshot), runner="flower")
    live.connecting(cfg.sites.site_names(), cfg.name)
    return live


def registered_nodes() -> dict[str, int]:
    """{site: node id} of the keys the SuperLink above this ServerApp registered (`privmed serve`
    writes it in FLWR_HOME); empty when node authentication is off or no such file exists."""
    from privmed.federation.flower.deploy import NODES_FILE

    home = os.environ.get("FLWR_HOME")
    path = Path(home) / NODES_FILE if home else None
    if path is None or not path.is_file():
        log.warning("no %s in FLWR_HOME: a node's word for which site it serves is not checked", NODES_FILE)
        return {}
    return {str(k): int(v) for k, v in json.loads(path.read_text()).items()}

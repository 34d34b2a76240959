"""privmed from Python (notebooks, scripts): a config in, the summary and the trained model out.

    import privmed
    result = privmed.run({"data": {"source": "phantom"}, "federation": {"rounds": 3}})
    result.summary["test"]["auc"], result.model

Without `out`, nothing is written anywhere; with `out`, the run directory is written as by
`privmed run` (and `resume=True` continues it).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Protocol

from privmed.config import RunConfig, SiteConfig, load_config, validate_config
from privmed.federation.experiment import Experiment, prepare_experiment, remote_experiment
from privmed.federation.live import LiveState
from privmed.federation.rundir import RunDir
from privmed.federation.runner import RunResult, run_in_process
from privmed.federation.transport import Sites
from privmed.privacy.outlook import outlook_warnings


class RemoteSites(Sites, Protocol):
    """Sites on other machines (the Flower runner's): they describe themselves, and the run is
    planned from what they said (`descriptions`), then handed to them (`attach`)."""

    def descriptions(self) -> dict[str, dict]: ...

    def attach(self, exp: Experiment) -> None: ...


def run(
    config: RunConfig | dict | str | Path,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    progress: bool = False,
    report: bool = True,
    sites: RemoteSites | None = None,
    hospitals: list[SiteConfig] | None = None,
    live: LiveState | None = None,
) -> RunResult:
    """Run one experiment in this process.

    config: a RunConfig, a dict of config keys, or the path of a YAML file.
    out: run directory to write (None: write nothing). resume: continue the run in `out`.
    report: write report.html into `out` at the end.
    sites: where the sites are (default: in this process; the Flower runner's ServerApp passes
    its SuperNodes, and the run is planned from what they report of themselves).
    hospitals: simulate the sites that these hospitals' own configs describe (each loads its own
    data, as `privmed join` would), instead of partitioning the config's data source.
    live: told of every event of the run (privmed.dashboard serves it as a live page).
    """
    if isinstance(config, (str, Path)):
        cfg = load_config(config)
    else:
        cfg = validate_config(config)
    run_dir, noise = None, None
    if out is not None:
        out = Path(out)
        if resume and not (out / "config.yaml").exists():
            resume = False  # nothing to resume yet (e.g. a job restarted before its first round)
        run_dir = RunDir.check_resume(out, cfg) if resume else RunDir.check_new(out)
        if resume:
            # The noise a run started with is kept when it is resumed, even when federation.rounds
            # was raised: rounds past the budget are then refused by the ledger.
            noise = run_dir.privacy_noise()
    # all validation happens before the first file is written
    if sites is not None:
        exp = remote_experiment(cfg, sites.descriptions(), noise=noise)
        sites.attach(exp)
    else:
        exp = prepare_experiment(cfg, noise=noise, hospitals=hospitals)
    if run_dir is not None and resume and exp.config is not cfg:  # the defaults that followed the data
        RunDir.check_resume(out, exp.config)
    if progress:  # what the DP-SGD plan leaves the sites to learn with, before the first release
        for w in outlook_warnings(exp.privacy, exp.config.federation.rounds):
            print(f"warning: {w['message']}", file=sys.stderr, flush=True)
    result = run_in_process(exp, run_dir=run_dir, resume=resume, progress=progress, sites=sites,
                             live=live)
    if run_dir is not None and report:
        from privmed.report import write_report

        write_report(run_dir.path)
    return result

"""The `privmed` command. Bad input ends with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from privmed import __version__
from privmed.errors import ConfigError, PrivmedError

EXIT_BAD_INPUT = 2

DESCRIPTION = """\
privmed trains one medical-imaging model across several hospitals ("sites") without any patient
data leaving a site: each site trains on its own data, and a strategy (FedAvg, cyclic clinic-to-
clinic training, ...) combines the results. Every run writes a run directory with the config,
per-round metrics, checkpoints, a summary and an HTML report.
"""

EPILOG = """\
examples:
  privmed demo                                  3 simulated hospitals, synthetic data, ~1 minute
  privmed demo --dp                             the same with differential privacy at every hospital
  privmed demo --task segmentation              brain tissue and ventricles in phantom volumes (also: reconstruction)
  privmed run configs/pneumonia-fedavg.yaml     an experiment described by a YAML config
  privmed run cfg.yaml --set federation.rounds=5 --set sites.alpha=0.1
  privmed run cfg.yaml --out runs/x --resume    continue a run that was stopped
  privmed report runs/x                         write runs/x/report.html again
  privmed privacy plan --epsilon 8 --patients 1500 --batch-size 256 --epochs 30
  privmed privacy plan configs/pneumonia-dp.yaml  the noise each site of a config will get
  privmed privacy spent runs/x                  the run's privacy ledger as a table
  privmed tune cfg.yaml --trials 20             search the training settings on validation data
  privmed audit runs/x                          attack the run's model: what leaks (kept in runs/x/private/)
  privmed statement runs/x --site site-1        one hospital's privacy statement, one printable page
  privmed report runs/x --private               the report with the audit's results, in runs/x/private/

across machines (Flower; see the README):
  privmed certs certs/ --name coordinator.example.org     TLS for the coordinator
  privmed keys keys/ --name site-1                          a hospital's key pair
  privmed serve --certs certs/ --keys keys/                 the coordinator
  privmed join hospital-a.yaml --server HOST:9092 --certs certs/ --key keys/hospital-a
  privmed run coordinator.yaml --runner flower --server 127.0.0.1:9092 --certs certs/
  privmed run coordinator.yaml --hospital hospital-a.yaml --hospital ...   the same, simulated here
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="privmed", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"privmed {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="federated training on 3 simulated hospitals (synthetic data, no download)",
        description="Train a 'lesion present' classifier with FedAvg across 3 simulated hospitals, "
        "each with its own scanner, on SYNTHETIC phantom images. Needs no data and no network; "
        "takes about a minute on 2 CPU cores. Prints the path of the report.",
    )
    demo.add_argument("--out", type=Path, help="run directory (default: runs/demo, or runs/demo-N if taken)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.add_argument(
        "--dp", action="store_true",
        help="train with DP-SGD at every hospital: (8, 1e-5)-differential privacy per patient (~1 minute)",
    )
    demo.add_argument(
        "--task", choices=("classification", "segmentation", "reconstruction"), default="classification",
        help="classification (default): lesion or not; segmentation: brain tissue and ventricles in "
        "phantom head volumes; reconstruction: MRI slices from 4x undersampled k-space (each under "
        "2 minutes on 2 cores)",
    )
    _dashboard_arg(demo, "the run")

    run = sub.add_parser(
        "run", help="run the experiment a YAML config describes",
        description="Run the experiment described by CONFIG (YAML) and write its run directory: "
        "config.yaml, metrics.jsonl, checkpoints/, summary.json, test_counts.npz, predictions.npz "
        "(when the coordinator holds a public test set), model.pt and report.html.",
    )
    run.add_argument("config", type=Path, metavar="CONFIG", help="YAML config file")
    run.add_argument("--out", type=Path, help="run directory (default: runs/<name>)")
    run.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override a config value, e.g. --set federation.rounds=5 (repeatable; value read as YAML)",
    )
    run.add_argument(
        "--resume", action="store_true",
        help="continue the run in --out from its last completed round (same config required; "
        "federation.rounds may be raised to extend it)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    _dashboard_arg(run, "the run (in-process runner; a Flower run's is `privmed serve --dashboard`)")
    run.add_argument(
        "--hospital", dest="hospitals", action="append", default=[], type=Path, metavar="SITE_CONFIG",
        help="simulate the hospital this site config describes (its own data, split and budget, as "
        "`privmed join SITE_CONFIG` loads them) instead of partitioning data.source (repeatable: one "
        "per site)",
    )
    run.add_argument(
        "--runner", choices=("in-process", "flower"), default="in-process",
        help="in-process (default): every site in this process; flower: on the hospitals that "
        "joined the coordinator at --server (run this on the coordinator's machine)",
    )
    _flower_args(run, server=True)

    tune = sub.add_parser(
        "tune", help="search the training settings of a config (Optuna), on validation data only",
        description="Run --trials runs of CONFIG with Optuna's TPE sampler proposing the learning rate, "
        "momentum, batch size, local work and logit adjustment (trial 0: CONFIG as written), each "
        "scored by the validation AUC (C-index) of the model it selected. Writes OUT/best.yaml, "
        "OUT/tuning.html, tuning.md, tuning.json and trials.png, and runs the best settings into "
        "OUT/best. Refuses a private config: tuning spends privacy the ledger does not count.",
    )
    tune.add_argument("config", type=Path, metavar="CONFIG")
    tune.add_argument("--trials", type=int, default=20, help="number of trials (default 20)")
    tune.add_argument("--out", type=Path, help="directory to write (default: runs/<name>-tune)")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    tune.add_argument("--quiet", action="store_true", help="no per-trial lines or progress bar")

    priv = sub.add_parser(
        "privacy", help="plan a privacy budget, or show what a run has spent",
        description="Differential privacy: `plan` finds the noise that meets a budget; `spent` shows "
        "a run's privacy ledger.",
    )
    priv_sub = priv.add_subparsers(dest="privacy_command", metavar="SUBCOMMAND")
    plan = priv_sub.add_parser(
        "plan", help="the noise multiplier for a budget, and the epsilon curve over epochs",
        description="Given a budget (epsilon, delta), a site's size, the batch size and the training "
        "length, print the DP-SGD noise multiplier that meets the budget and the epsilon spent after "
        "each epoch. With CONFIG instead, plan every site of that run (loads its data).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  privmed privacy plan --epsilon 8 --patients 1570 --batch-size 256 --epochs 30\n"
        "  privmed privacy plan --noise-multiplier 1.1 --patients 1570 --batch-size 256 --steps 200\n"
        "  privmed privacy plan configs/pneumonia-dp.yaml --set privacy.epsilon=3",
    )
    plan.add_argument("config", nargs="?", type=Path, metavar="CONFIG", help="plan the sites of this run config")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                      help="override a value of CONFIG (repeatable)")
    plan.add_argument("--hospital", dest="hospitals", action="append", default=[], type=Path,
                      metavar="SITE_CONFIG", help="with CONFIG: plan for the hospitals these site configs "
                      "describe, each from its own data (repeatable)")
    plan.add_argument("--epsilon", type=float, help="the budget (give this or --noise-multiplier)")
    plan.add_argument("--noise-multiplier", type=float, help="fixed noise: report the epsilon it spends")
    plan.add_argument("--delta", type=float, default=1e-5, help="default 1e-5")
    plan.add_argument("--patients", type=int,
                      help="patients at the site (the privacy unit; images, where the data names no patients)")
    plan.add_argument("--batch-size", type=int, help="expected batch size (patients per step)")
    length = plan.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="passes over the data")
    length.add_argument("--steps", type=int, help="DP-SGD steps in all")
    plan.add_argument("--accountant", default="prv", help="prv (default), rdp or pld")
    spent = priv_sub.add_parser(
        "spent", help="a run's privacy ledger as a table",
        description="Print RUN_DIR/privacy_ledger.json as a table: per site, the epsilon spent "
        "(recomputed from the recorded releases), the budget and the releases. Given a hospital's "
        "state directory (privmed join --state, or RUN_DIR/private/sites/SITE), its own ledger: "
        "every release it made, in any run.",
    )
    spent.add_argument("run_dir", type=Path, metavar="RUN_DIR")

    certs = sub.add_parser(
        "certs", help="make a certificate authority and the coordinator's TLS certificate",
        description="Write DIR/ca.crt, ca.key, server.crt and server.key. The coordinator keeps "
        "them all; every hospital gets a copy of ca.crt only.",
    )
    certs.add_argument("dir", type=Path, metavar="DIR")
    certs.add_argument(
        "--name", dest="names", action="append", metavar="HOST",
        help="a host name or IP address the hospitals reach the coordinator at (repeatable; "
        "localhost, 127.0.0.1 and ::1 are always covered)",
    )
    keys = sub.add_parser(
        "keys", help="make a hospital's node-authentication key pair",
        description="Write DIR/NAME (private: stays at the hospital) and DIR/NAME.pub (goes to the "
        "coordinator, who passes its folder to `privmed serve --keys`).",
    )
    keys.add_argument("dir", type=Path, metavar="DIR")
    keys.add_argument("--name", required=True, help="the site's name, as in the config")
    serve = sub.add_parser(
        "serve", help="start the coordinator (a Flower SuperLink) with TLS and node authentication",
        description="Start a Flower SuperLink that hospitals join with `privmed join` and runs are "
        "submitted to with `privmed run --runner flower`. Runs until interrupted (Ctrl-C).",
    )
    serve.add_argument("--certs", type=Path, help="the directory `privmed certs` wrote")
    serve.add_argument("--keys", type=Path, help="the hospitals' public keys (*.pub files, or one file)")
    serve.add_argument("--address", default="0.0.0.0:9092", help="HOST:PORT to listen on (default 0.0.0.0:9092)")
    serve.add_argument("--home", type=Path, help="Flower's state directory (default ~/.privmed/flower)")
    serve.add_argument("--insecure", action="store_true", help="no TLS, no node authentication: local tests only")
    _dashboard_arg(serve, "the coordinator: the hospitals registered and online and the run in progress")
    join = sub.add_parser(
        "join", help="start one hospital (a Flower SuperNode) that trains on its own data",
        description="Connect this hospital to the coordinator at --server and train and score there "
        "when a run asks. SITE_CONFIG names the hospital, its own data (a folder or table of its "
        "patients only), its split and its privacy budget; the coordinator learns its counts and "
        "its data's shape, nothing else. With --site, CONFIG is instead a run config whose data "
        "every party holds (a rehearsal on public data) and this hospital is its site NAME. Runs "
        "until interrupted (Ctrl-C).",
    )
    join.add_argument("config", type=Path, metavar="SITE_CONFIG")
    join.add_argument("--site", help="rehearsal: CONFIG is a run config, and this hospital is its site NAME")
    join.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    join.add_argument("--key", type=Path, help="this hospital's private key (from `privmed keys`)")
    join.add_argument(
        "--state", type=Path,
        help="this hospital's own state: its secret key for DP noise and its privacy ledger, kept "
        "across runs and restarts (default: ~/.privmed/sites/SITE); never share it",
    )
    _flower_args(join, server=True)

    from privmed.audit.attacks import describe_attacks

    aud = sub.add_parser(
        "audit", help="attack a finished run's model: what leaks of its patients",
        description=textwrap.fill(
        "Attack the model of the run in RUN_DIR as the attacks below assume, on "
        "non-member patients (the test patients) and as many members (the sites' training patients, "
        "with the same labels), and write RUN_DIR/private/audit.json (each attack's view and assumptions, "
        "ROC-AUC and TPR at 0.1% and 1% FPR with 95% bootstrap intervals, the seeds) and "
        "RUN_DIR/private/report.html, the report with an Audit section that shows them. The attacks "
        "work with the sites' patients in hand, so their results are computed from patients outside "
        "the DP mechanism: they stay in RUN_DIR/private/ (owner only, never shared); the shareable "
        "RUN_DIR/report.html says which attacks ran and where their results are, and shows none. The "
        "shadow-based attacks train --shadows runs of the run's config (each about as long as the "
        "run itself). Gradient inversion (--attack inversion) rebuilds a site's training images "
        "from the update the coordinator sees: one site's plain update at each --batch (one local "
        "step, and a local epoch at the largest), the same under DP-SGD at each --epsilon, and "
        "the secure-aggregation sum of the sites' updates; it writes PSNR and SSIM to "
        "private/audit.json and the training images and their reconstructions to "
        "RUN_DIR/private/audit_inversion.npz. Gradient canaries (--attack "
        "canaries) train the run's config once more with --canaries canary patients at one site and "
        "give a lower bound on epsilon at 95% confidence, which a DP run's claim must not be below "
        "(white box: the coordinator scores them from the site's updates). Input canaries (--attack "
        "input-canaries) do the same black box: --canaries mislabelled images join one site, and only "
        "the final model's outputs on them are scored. "
        "Attribute inference (--attack attribute, tabular data) guesses a binary feature of each "
        "patient from the model, against the population's guess.", 88),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="attacks:\n" + describe_attacks(),
    )
    aud.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    aud.add_argument("--attack", dest="attacks", action="append", metavar="NAME",
                     help="an attack to run (repeatable; default: all the membership attacks)")
    aud.add_argument("--shadows", type=int, default=8, help="shadow runs to train (default 8)")
    aud.add_argument("--candidates", type=int, default=500,
                     help="member and non-member patients to ask about, each (default 500)")
    aud.add_argument("--budget", type=float, metavar="SECONDS",
                     help="stop training shadows after this long (at least one is trained)")
    aud.add_argument("--seed", type=int, default=0,
                     help="seeds the candidates, the shadow runs and the inversion's patients and starts")
    aud.add_argument("--batch", dest="batches", type=int, action="append", metavar="N",
                     help="inversion: patients per site in an update attacked (repeatable; default 1, 4, 8)")
    aud.add_argument("--epsilon", dest="epsilons", type=float, action="append", metavar="EPS",
                     help="inversion: attack DP-SGD updates with the noise for this epsilon (repeatable; "
                     "default: the run's epsilon under DP-SGD, else 8)")
    aud.add_argument("--trials", type=int, default=2, help="inversion: batches attacked per setting (default 2)")
    aud.add_argument("--iterations", type=int, default=1000,
                     help="inversion: the attacker's optimisation steps per start (default 1000)")
    aud.add_argument("--non-members", choices=("test", "validation"), default="test",
                     help="membership: non-members from the pooled test set, or from half of the sites' "
                     "validation patients (the training split's distribution; default test)")
    aud.add_argument("--canaries", type=int, default=1000, metavar="M",
                     help="canaries, input-canaries: canary patients added to one site (default 1000)")
    aud.add_argument("--site", metavar="NAME",
                     help="canaries, input-canaries: the site they join (default: the first)")
    aud.add_argument("--attribute", metavar="FEATURE",
                     help="attribute: the binary feature to infer (default: sex, else the first binary one)")
    aud.add_argument("--weights", choices=("initial", "final"), default="initial",
                     help="inversion: the model sent to the sites: the run's initial one, as in round 1 "
                     "(default), or its final one")

    stm = sub.add_parser(
        "statement", help="one hospital's privacy statement: a printable, one-page HTML",
        description=textwrap.fill(
            "Write a one-page privacy statement for one site (hospital) of the run in RUN_DIR, for "
            "its data-protection officer: which run and when; what left the site each round, to whom "
            "(model updates, or only their sum under secure aggregation; evaluation scores and "
            "counts; its public counts); the guarantee (epsilon, rounded up, at delta), its unit of "
            "privacy and the epsilon spent against the budget, or plainly that there is none; what "
            "it does not cover; and the audit's attacks (privmed audit), each with what its attacker "
            "assumes. Every figure is read from the run directory; a missing file is named on the "
            "page. The statement may be shared: the audit's results (computed from patients outside "
            "the DP mechanism) are not on it unless --private, which writes the page with them to "
            "RUN_DIR/private/. Prints as one A4 page; needs no scripts.", 88),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  privmed statement runs/x --site site-1                writes runs/x/statement-site-1.html\n"
        "  privmed statement runs/x --site site-1 --private      writes runs/x/private/statement-site-1.html\n"
        "  privmed statement runs/x --site hospital-a --state ~/.privmed/sites/hospital-a --out a.html",
    )
    stm.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    stm.add_argument("--site", required=True, metavar="NAME", help="the site the statement is for")
    stm.add_argument("--out", type=Path, metavar="FILE",
                     help="where to write it (default: RUN_DIR/statement-NAME.html)")
    stm.add_argument(
        "--state", type=Path, metavar="DIR",
        help="the hospital's own state directory (privmed join --state): adds its own ledger, every "
        "release it made in any run, against its own budget (default: RUN_DIR/private/sites/NAME, "
        "where a simulation keeps it, when there)",
    )
    stm.add_argument(
        "--private", action="store_true",
        help="show the audit's results too (computed from patients outside the DP mechanism; never "
        "share): writes RUN_DIR/private/statement-NAME.html (--out: a file outside the run directory "
        "or under its private/)",
    )

    rep = sub.add_parser(
        "report", help="(re)write a run directory's report.html",
        description="Write RUN_DIR/report.html (and plots/) again from the run's files. It may be "
        "shared: of an audit it says which attacks ran, not what they found.",
    )
    rep.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    rep.add_argument(
        "--private", action="store_true",
        help="the report with the audit's results and figures (computed from patients outside the DP "
        "mechanism, training images among them; never share): RUN_DIR/private/report.html and "
        "private/plots/",
    )
    return p


def _flower_args(p: argparse.ArgumentParser, server: bool) -> None:
    if server:
        p.add_argument("--server", metavar="HOST:PORT", help="the coordinator's address")
    p.add_argument("--certs", type=Path, help="directory holding ca.crt (from the coordinator)")
    p.add_argument("--home", type=Path, help="Flower's state directory (default ~/.privmed/flower)")
    p.add_argument("--insecure", action="store_true", help="no TLS, no node authentication: local tests only")


def _dashboard_arg(p: argparse.ArgumentParser, what: str) -> None:
    from privmed.dashboard import DEFAULT

    p.add_argument(
        "--dashboard", nargs="?", const=DEFAULT, metavar="HOST:PORT",
        help=f"serve a live page of {what} at HOST:PORT (default: loopback, a free port; the URL is "
        "printed): rounds, stage, scores, each hospital's epsilon against its budget. No patient data",
    )


def _demo_out(name: str, base: Path = Path("runs")) -> Path:
    out, i = base / name, 2
    while out.exists():
        out, i = base / f"{name}-{i}", i + 1
    return out


def _run(cfg_source, out: Path, resume: bool, quiet: bool, hospitals: list[Path] | None = None,
         dashboard: str | None = None) -> int:
    from privmed.api import run
    from privmed.config import load_site_config

    own = [load_site_config(h) for h in hospitals or []]
    if dashboard is None:
        result = run(cfg_source, out, resume=resume, progress=not quiet, hospitals=own or None)
        return _print_summary(result.summary, out)
    from privmed.dashboard import live_dashboard

    with live_dashboard(dashboard) as live:
        result = run(cfg_source, out, resume=resume, progress=not quiet, hospitals=own or None, live=live)
    return _print_summary(result.summary, out)


def _print_summary(s: dict, out: Path) -> int:
    test = s["test"]
    if s["data"]["synthetic"]:
        print("note: SYNTHETIC data (generated phantom images, not patient data)")
    print(
        f"{s['strategy']}: {s['rounds_completed']} rounds, test {_scores(test)}"
        f" (model of round {s['best_round'] or 'per site'}: {s['selection']})"
    )
    by_site = s.get("test_mean_over_sites") or {}
    if by_site:
        print(f"mean over sites of each site's test: {_scores(by_site)}")
    if s.get("test_finetuned_mean_over_sites"):
        print(f"after local fine-tuning, mean over sites: {_scores(s['test_finetuned_mean_over_sites'])}")
    privacy = s.get("privacy") or {}
    if privacy.get("mode") in ("dp-sgd", "central"):
        from privmed.privacy.figures import format_budget, format_epsilon, unit_note

        # Epsilon rounded up: the line must never claim less than the ledger backs.
        print(
            f"privacy: ({format_epsilon(privacy['epsilon'])}, {privacy['delta']:g})-differential privacy "
            f"per {privacy['unit']} at every site (largest epsilon spent; budget "
            f"{format_budget(privacy['budget_epsilon'])}); ledger: {(out / 'privacy_ledger.json').resolve()}"
        )
        if unit_note(privacy["unit"]):
            print(f"  unit: {unit_note(privacy['unit'])}")
        scoring = privacy.get("scoring") or {}
        if scoring:
            print(f"  validation and test {scoring.get('unit', 'patient')}s: ({format_epsilon(scoring['epsilon'])}, "
                  f"{privacy['delta']:g})-differential privacy at every site, from their noisy scores")
        if privacy.get("honest_secure_epsilon") is not None:
            print(f"  against a coordinator that follows the secure-aggregation protocol: epsilon "
                  f"{format_epsilon(privacy['honest_secure_epsilon'])}")
    else:
        print("privacy: none (privacy.mode none): the model may reveal its training patients")
    print(f"report: {(out / 'report.html').resolve()}")
    return 0


def _audit_lines(result: dict, attacks: list[str]) -> list[str]:
    """What `privmed audit` prints of its result: the strongest membership attack, and each other
    attack asked for; the inversion's line about what the run released (privmed.report.released)."""
    from privmed.audit.run import strongest
    from privmed.privacy.figures import format_epsilon

    out = []
    claimed = result["claimed"]
    best = strongest(result)
    if best is not None:
        name, r = best
        eps = ("no DP guarantee" if claimed["epsilon"] is None  # the ledger's epsilon, rounded up
               else f"the run claims epsilon {format_epsilon(claimed['epsilon'])}")
        out.append(f"strongest attack: {name}, ROC-AUC {r['roc_auc']:.3f} ({eps})")
    if "inversion" in attacks:
        out.append(_inversion_line(result["inversion"]))
    if "canaries" in attacks:
        c = result["canaries"]
        out.append(f"canaries (white box): epsilon >= {c['epsilon_lower']:.3f} at {100 * c['confidence']:.0f}% "
                   f"confidence ({c['correct']} of {c['guesses']} guesses right)")
    if "input-canaries" in attacks:
        c = result["input-canaries"]
        out.append(f"input canaries (black box): epsilon >= {c['epsilon_lower']:.3f} at "
                   f"{100 * c['confidence']:.0f}% confidence ({c['correct']} of {c['guesses']} guesses right)")
    if "attribute" in attacks:
        a = result["attribute"]["members"]
        out.append(f"attribute '{result['attribute']['attribute']}': {100 * a['attack']['accuracy']:.1f}% of "
                   f"training {result.get('unit', 'patient')}s guessed right, against "
                   f"{100 * a['baseline']['accuracy']:.1f}% from the population")
    return out


def _inversion_line(inversion: dict) -> str:
    """The inversion's result on what the run released: the DP-SGD update under DP-SGD, the secure
    sum under secure aggregation, else the plain update (audit.json's inversion.released)."""
    released = inversion.get("released") or {}
    key = released.get("setting")
    what = released.get("words", "what the run released")
    if key is None:
        return (f"inversion: the audit attacked no update of the kind this run released ({what}); "
                "the other settings are in private/audit.json")
    r = inversion["settings"][key]
    return (f"inversion of what this run released, {what}: PSNR {r['psnr']['mean']:.1f} dB "
            f"(best {r['psnr']['max']:.1f}; setting {key}; the mean image scores "
            f"{r['psnr_mean_image']:.1f} dB)")


def _scores(m: dict) -> str:
    """'AUC 0.912, accuracy 0.850', 'C-index 0.781', 'Dice ...' from a metrics dict."""
    from privmed.tasks.names import scores_text

    return scores_text(m)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return EXIT_BAD_INPUT
    if args.command == "demo":
        from importlib.resources import files

        from privmed.config import read_yaml, validate_config

        name = "demo" if args.task == "classification" else f"demo-{args.task}"
        name += "-dp" if args.dp else ""
        if not (files("privmed") / "configs" / f"{name}.yaml").is_file():
            raise PrivmedError(f"privmed demo: --dp with --task {args.task} has no demo; run "
                               f"privmed demo --task {args.task}, then add privacy to its config")
        demo_file = files("privmed") / "configs" / f"{name}.yaml"
        cfg = validate_config(read_yaml(Path(str(demo_file))), source=f"{name} config")
        return _run(cfg, args.out or _demo_out(name), resume=False, quiet=args.quiet, dashboard=args.dashboard)
    if args.command == "run":
        from privmed.config import load_config

        cfg = load_config(args.config, args.overrides)
        out = args.out or Path("runs") / cfg.name
        if args.runner != "flower" and (args.server or args.certs or args.insecure):
            raise PrivmedError("privmed run: --server, --certs and --insecure need --runner flower")
        if args.runner == "flower":
            if args.hospitals:
                raise PrivmedError("privmed run: --hospital simulates hospitals here; with --runner flower "
                                   "each hospital joins with its own site config")
            if args.dashboard is not None:
                raise PrivmedError("privmed run: --dashboard shows an in-process run; a Flower run's "
                                   "dashboard is the coordinator's (privmed serve --dashboard)")
            from privmed import flower_cli

            return _print_summary(flower_cli.run(cfg, out, args), out)
        return _run(cfg, out, resume=args.resume, quiet=args.quiet, hospitals=args.hospitals,
                    dashboard=args.dashboard)
    if args.command == "tune":
        from privmed.config import load_config
        from privmed.tune import tune

        cfg = load_config(args.config, args.overrides)
        out = args.out or Path("runs") / f"{cfg.name}-tune"
        r = tune(cfg, args.trials, out, progress=not args.quiet)
        label = "C-index" if cfg.task == "survival" else "AUC"
        first = r.trials[0]["score"]
        print(f"{len(r.trials)} trials; best: trial {r.best['trial']}, validation {label} "
              f"{r.best['score']:.4f} (the config as written: {'n/a' if first is None else f'{first:.4f}'})")
        print(f"best settings: {(out / 'best.yaml').resolve()}; their run: {(out / 'best').resolve()}")
        print(f"tuning: {(out / 'tuning.html').resolve()}")
        from privmed.tune import STATEMENT

        print(f"privacy: {STATEMENT}")
        return 0
    if args.command in ("certs", "keys", "serve", "join"):
        from privmed import flower_cli

        return getattr(flower_cli, args.command)(args)
    if args.command == "privacy":
        from privmed import privacy_cli

        if args.privacy_command == "plan":
            print(privacy_cli.plan(args))
            return 0
        if args.privacy_command == "spent":
            print(privacy_cli.spent(args.run_dir))
            return 0
        print("privmed privacy: give a subcommand: plan or spent (see privmed privacy --help)", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.command == "audit":
        from privmed.audit.inversion import InversionSettings
        from privmed.audit.run import InversionOptions, audit
        from privmed.report.private import PRIVATE_DIR, audit_file

        for name, value in (("--shadows", args.shadows), ("--candidates", args.candidates),
                            ("--trials", args.trials), ("--iterations", args.iterations),
                            ("--canaries", args.canaries)):
            if value < 1:
                raise ConfigError(f"{name}: {value}; give a positive number")
        if args.budget is not None and args.budget <= 0:
            raise ConfigError(f"--budget: {args.budget:g}; give a positive number of seconds")
        inversion = InversionOptions(
            batches=tuple(args.batches or (1, 4, 8)),
            epsilons=None if args.epsilons is None else tuple(args.epsilons),
            trials=args.trials, weights=args.weights,
            search=InversionSettings(iterations=args.iterations),
        )
        result = audit(args.run_dir, args.attacks, shadows=args.shadows, candidates=args.candidates,
                       budget_s=args.budget, seed=args.seed, progress=lambda msg: print(msg, flush=True),
                       inversion=inversion, canaries=args.canaries, site=args.site, attribute=args.attribute,
                       non_members=args.non_members)
        for line in _audit_lines(result, args.attacks or []):
            print(line)
        print(f"audit: {audit_file(args.run_dir).resolve()} (results computed from patients outside the "
              "DP mechanism: private, never share)")
        if (args.run_dir / "report.html").exists():
            print(f"report with the results: {(args.run_dir / PRIVATE_DIR / 'report.html').resolve()}")
            print(f"report that may be shared (says which attacks ran, shows no result): "
                  f"{(args.run_dir / 'report.html').resolve()}")
        return 0
    if args.command == "statement":
        from privmed.report.private import move_legacy
        from privmed.report.statement import write_statement

        for line in move_legacy(args.run_dir) if (args.run_dir / "config.yaml").is_file() else []:
            print(line)
        path = write_statement(args.run_dir, args.site, args.out, args.state, private=args.private)
        print(f"statement{' (private, never share)' if args.private else ''}: {path.resolve()}")
        return 0
    if args.command == "report":
        from privmed.report import write_report
        from privmed.report.private import move_legacy

        for line in move_legacy(args.run_dir) if (args.run_dir / "config.yaml").is_file() else []:
            print(line)
        path = write_report(args.run_dir, private=args.private)
        print(f"report{' (private, never share)' if args.private else ''}: {path.resolve()}")
        return 0
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except PrivmedError as e:
        print(f"privmed: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("privmed: interrupted; continue with `privmed run CONFIG --out DIR --resume`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

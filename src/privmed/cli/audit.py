"""`privmed audit`: attacks on a finished run's model, and the lines it prints of their results."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from privmed.errors import ConfigError

DESCRIPTION = textwrap.fill(
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
    "patient from the model, against the population's guess.", 88)


def add_parser(sub) -> None:  # noqa: ANN001
    from privmed.audit.attacks import describe_attacks

    aud = sub.add_parser(
        "audit", help="attack a finished run's model: what leaks of its patients",
        description=DESCRIPTION,
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


def run(args: argparse.Namespace) -> int:
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
    for line in audit_lines(result, args.attacks or []):
        print(line)
    print(f"audit: {audit_file(args.run_dir).resolve()} (results computed from patients outside the "
          "DP mechanism: private, never share)")
    if (args.run_dir / "report.html").exists():
        print(f"report with the results: {(args.run_dir / PRIVATE_DIR / 'report.html').resolve()}")
        print(f"report that may be shared (says which attacks ran, shows no result): "
              f"{(args.run_dir / 'report.html').resolve()}")
    return 0


def audit_lines(result: dict, attacks: list[str]) -> list[str]:
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
        out.append(inversion_line(result["inversion"]))
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


def inversion_line(inversion: dict) -> str:
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



"""`privmed privacy plan` and `privmed privacy spent`: text out, PrivmedError on bad input."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from privmed.errors import ConfigError, RunDirError
from privmed.privacy.figures import format_budget, format_epsilon, unit_note

CURVE_POINTS = 12  # epochs shown in the epsilon curve (evenly spread, always the last)
EXIT_BAD_INPUT = 2


def add_parser(sub) -> None:  # noqa: ANN001
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


def run(args: argparse.Namespace) -> int:
    if args.privacy_command == "plan":
        print(plan(args))
        return 0
    if args.privacy_command == "spent":
        print(spent(args.run_dir))
        return 0
    print("privmed privacy: give a subcommand: plan or spent (see privmed privacy --help)", file=sys.stderr)
    return EXIT_BAD_INPUT



def table(header: list[str], rows: list[list[str]]) -> str:
    """Columns aligned right (first column left), two spaces apart."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def plan(args: argparse.Namespace) -> str:
    if args.config is not None:
        flags = [f for f in ("epsilon", "noise_multiplier", "patients", "batch_size", "epochs", "steps")
                 if getattr(args, f) is not None]
        if flags:
            raise ConfigError(
                f"privacy plan: give CONFIG or --{flags[0].replace('_', '-')}, not both "
                "(change the config's values with --set)"
            )
        return plan_config(args.config, args.overrides, args.hospitals)
    return plan_site(
        epsilon=args.epsilon, noise_multiplier=args.noise_multiplier, delta=args.delta,
        patients=args.patients, batch_size=args.batch_size, epochs=args.epochs, steps=args.steps,
        accountant=args.accountant,
    )


def plan_site(
    *,
    epsilon: float | None,
    noise_multiplier: float | None,
    delta: float,
    patients: int | None,
    batch_size: int | None,
    epochs: int | None,
    steps: int | None,
    accountant: str = "prv",
) -> str:
    """The noise for one site's DP-SGD training and its epsilon after each epoch, as text."""
    from privmed.privacy.accountants import Release, check_accountant_name, epsilon_spent
    from privmed.privacy.calibration import check_delta, noise_for_epsilon
    from privmed.privacy.plan import sample_rate_and_steps

    _check_site_args(epsilon, noise_multiplier, patients, batch_size, epochs, steps)
    check_accountant_name(accountant)
    check_delta(delta, patients, "patients at the site")
    q, per_epoch = sample_rate_and_steps(patients, batch_size, 1, None)
    total = steps if steps is not None else epochs * per_epoch
    if noise_multiplier is None:
        sigma = noise_for_epsilon(epsilon, delta, q, total, accountant)
    else:
        sigma = noise_multiplier
    spent = epsilon_spent([Release(sigma, q, total)], delta, accountant)
    n_epochs = math.ceil(total / per_epoch)
    shown = sorted({1} | {max(1, round(i * n_epochs / CURVE_POINTS)) for i in range(1, CURVE_POINTS + 1)})
    rows = []
    for e in shown:
        s = min(e * per_epoch, total)
        eps = spent if s == total else epsilon_spent([Release(sigma, q, s)], delta, accountant)
        rows.append([str(e), str(s), format_epsilon(eps)])
    # Every epsilon rounded up, and a calibrated noise multiplier too: a reader who copies the noise
    # shown into a config must not get less noise than the budget needs.
    if epsilon is None:
        verdict = f"fixed: spends epsilon {format_epsilon(spent)}"
    elif spent > epsilon:
        verdict = f"fixed: spends epsilon {format_epsilon(spent)}, PAST the budget {format_budget(epsilon)}"
    else:
        verdict = (
            f"{'calibrated to' if noise_multiplier is None else 'fixed, within'} "
            f"epsilon {format_budget(epsilon)}: spends {format_epsilon(spent)}"
        )
    return "\n".join([
        f"DP-SGD plan (unit: patient, or one record where the data names no patients; delta {delta:g}; "
        f"{accountant} accountant)",
        f"  {patients} patients, expected batch {batch_size}: sample rate {q:.4g}, "
        f"{per_epoch} steps per epoch, {total} steps in all",
        f"  noise multiplier {format_epsilon(sigma, 4)} ({verdict})",
        "",
        table(["epoch", "steps", "epsilon"], rows),
    ])


def _check_site_args(epsilon: float | None, noise_multiplier: float | None, patients: int | None,
                     batch_size: int | None, epochs: int | None, steps: int | None) -> None:
    for flag, value in (("--patients", patients), ("--batch-size", batch_size)):
        if value is None:
            raise ConfigError(f"privacy plan: {flag} is required (or give a CONFIG)")
        if value < 1:
            raise ConfigError(f"privacy plan: {flag}: {value} is not allowed (an integer >= 1)")
    if epochs is None and steps is None:
        raise ConfigError("privacy plan: give --epochs or --steps (how long the site trains)")
    if (epochs if epochs is not None else steps) < 1:
        raise ConfigError(f"privacy plan: --{'epochs' if epochs is not None else 'steps'} must be >= 1")
    if epsilon is None and noise_multiplier is None:
        raise ConfigError("privacy plan: give --epsilon (the budget) or --noise-multiplier")
    if noise_multiplier is not None and not (0 < noise_multiplier < math.inf):
        raise ConfigError(f"privacy plan: --noise-multiplier: {noise_multiplier} is not allowed (> 0)")


def plan_config(path: Path, overrides: list[str], hospitals: list[Path] | None = None) -> str:
    """Every site's plan for the run a config describes (loads and partitions its data, or loads
    each hospital's own data from its site config)."""
    from privmed.config import load_config, load_site_config
    from privmed.federation.experiment import prepare_experiment

    cfg = load_config(path, overrides)
    if not cfg.private:
        raise ConfigError(
            f"{path}: privacy.mode is 'none': nothing to plan (try --set privacy.mode=dp-sgd "
            "--set privacy.epsilon=8)"
        )
    from privmed.catalog import PrivacyMode
    from privmed.privacy.outlook import outlook, step_noise

    own = [load_site_config(h) for h in hospitals or []]
    exp = prepare_experiment(cfg, hospitals=own or None)
    p = exp.privacy
    dp_sgd = p.mode == PrivacyMode.DP_SGD
    rows = [
        [site, str(s.n_patients), f"{s.release.sample_rate:.4g}", str(s.release.steps), str(s.turns),
         format_epsilon(s.release.noise_multiplier, 4), format_epsilon(s.planned_epsilon),
         *([f"{step_noise(s.release.noise_multiplier, s.release.sample_rate, s.n_patients):.3g}"] if dp_sgd else [])]
        for site, s in p.sites.items()
    ]
    expect = outlook(p, exp.config.federation.rounds)
    how = "calibrated to the budget" if p.calibrated else "fixed by privacy.noise_multiplier"
    note = unit_note(p.unit)
    finetune = [f"  {site}: fine-tuning turn of {s.finetune.steps} steps after the last round, planned with the rounds"
                for site, s in p.sites.items() if s.finetune is not None]
    scoring = []
    if p.scoring is not None:
        names = {"val": "validation", "test": "test"}
        scoring = ["", f"validation and test patients: {p.scoring.to_dict()['mechanism']}, each split within "
                       f"epsilon {format_budget(p.scoring.epsilon)} (privacy.scoring_epsilon)",
                   table(["split", "scorings per site", "noise"],
                         [[names[sp], str(n), format_epsilon(p.scoring.noise[sp], 4)] for sp, n in p.scoring.releases.items()])]
    afford = _hospitals_afford(own, p, cfg.federation.rounds) if own else []
    return "\n".join([
        f"{p.mechanism} plan for {path} (unit: {p.unit}; delta {p.delta:g}; {p.accountant} accountant; "
        f"clip {p.max_grad_norm:g}; budget epsilon {format_budget(p.budget)}; noise {how})",
        *([f"unit: {note}"] if note else []),
        "",
        table(["site", {"patient": "patients", "record": "records"}.get(p.unit, "units"), "sample rate",
               "steps/turn", "turns", "noise", "epsilon", *(["noise/step"] if dp_sgd else [])], rows),
        *finetune,
        *(["", f"{'expected' if expect.verdict == 'learned' else 'warning'}: {expect.message} "
               "(noise/step: the noise on the site's averaged clipped gradient in one step, sigma / "
               "(sample rate x patients); privmed.privacy.outlook gives the measured runs)"] if expect else []),
        *scoring,
        *afford,
    ])


def _hospitals_afford(hospitals: list, plan, rounds: int) -> list[str]:  # noqa: ANN001 - SiteConfigs, a PrivacyPlan
    """What each hospital can still afford of this run, by its own terms (budget, delta,
    accountant) and its own ledger where this machine holds its state (else as a new hospital):
    what it checks before the run's first release."""
    from privmed.federation.flower.deploy import home_dir
    from privmed.federation.guard import LedgerTerms
    from privmed.privacy.site_ledger import SITE_LEDGER_FILE, SiteLedger

    rows = []
    for h in hospitals:
        s = plan.sites.get(h.site)
        if s is None or s.release is None:
            continue
        state = Path(h.state or home_dir(None).parent / "sites" / h.site).expanduser()  # as `join` finds it
        held = (state / SITE_LEDGER_FILE).is_file()
        if held:
            ledger = SiteLedger.load(state / SITE_LEDGER_FILE)
        else:
            t = LedgerTerms.for_hospital(h.privacy, True)
            ledger = SiteLedger(h.site, t.budget_epsilon, t.delta, t.accountant, plan.unit)
        after, most = ledger.afford(s.release, rounds, [s.finetune] if s.finetune is not None else [])
        fits = "yes" if after <= ledger.budget_epsilon else ("no: " + (
            "not the fine-tuning turn" if most == rounds else f"{most} of {rounds} rounds"))
        rows.append([h.site, format_budget(ledger.budget_epsilon), f"{ledger.delta:g}", ledger.accountant,
                     format_epsilon(ledger.epsilon) + ("" if held else " (no ledger here)"),
                     format_epsilon(after), fits])
    if not rows:
        return []
    return ["", "what each hospital can still afford of this run, by its own budget and ledger (it refuses "
                "a run it cannot afford before its first release):",
            table(["hospital", "budget", "delta", "accountant", "spent", "after this run", "affordable"], rows)]


def spent(run_dir: Path) -> str:
    """The run's ledger as a table; every epsilon recomputed from the recorded releases. `run_dir`
    may also be a hospital's own state (`privmed join --state`, or RUN_DIR/private/sites/SITE):
    then its own ledger, every release it made in any run."""
    from privmed.privacy.ledger import LEDGER_FILE, PrivacyLedger
    from privmed.privacy.site_ledger import SITE_LEDGER_FILE

    path = Path(run_dir) / LEDGER_FILE
    if not Path(run_dir).is_dir():
        raise RunDirError(f"{run_dir}: not a directory")
    if (Path(run_dir) / SITE_LEDGER_FILE).is_file():
        return _site_spent(Path(run_dir))
    if not path.is_file():
        raise RunDirError(
            f"{run_dir}: no {LEDGER_FILE} (the run had privacy.mode 'none', or it is not a privmed run)"
        )
    ledger = PrivacyLedger.load(path)
    rows = []
    for site in ledger.sites:
        releases = ledger.releases(site)
        rounds = f"{releases[0][0]}-{releases[-1][0]}" if releases else "-"
        sigmas = sorted({r.noise_multiplier for _, r in releases})
        rates = sorted({r.sample_rate for _, r in releases})
        rows.append([
            site, format_epsilon(ledger.epsilon(site)), format_budget(ledger.budget_epsilon),
            str(len(releases)), rounds,
            ", ".join(f"{s:.4g}" for s in sigmas) or "-", ", ".join(f"{q:.4g}" for q in rates) or "-",
            str(sum(r.steps for _, r in releases)),
        ])
    note = unit_note(ledger.unit)
    scored = [
        [site, split, str(len(ledger.scorings(site, split))),
         ", ".join(f"{s:.4g}" for s in sorted({sc[2] for sc in ledger.scorings(site, split)})),
         format_epsilon(ledger.scoring_epsilon(site, split))]
        for site in sorted(set(ledger.sites) | set(ledger.scored_sites))
        for split in ("val", "test") if ledger.scorings(site, split)
    ]
    return "\n".join([
        f"privacy ledger of {run_dir} ({ledger.mechanism}; unit: {ledger.unit}; delta {ledger.delta:g}; "
        f"{ledger.accountant} accountant)",
        *([f"unit: {note}"] if note else []),
        "",
        "training patients:",
        table(["site", "epsilon", "budget", "releases", "rounds", "noise", "sample rate", "steps"], rows),
        *(["", "validation and test patients (each scoring: noisy counts of one split):",
           table(["site", "split", "scorings", "noise", "epsilon"], scored)] if scored else []),
    ])


def _site_spent(state: Path) -> str:
    """A hospital's own ledger as a table: one row per release, in the order made."""
    from privmed.privacy.site_ledger import SITE_LEDGER_FILE, SiteLedger

    ledger = SiteLedger.load(state / SITE_LEDGER_FILE)
    rows = [
        [r.run, str(r.round), r.purpose, f"{r.noise_multiplier:.4g}", f"{r.sample_rate:.4g}", str(r.steps)]
        for r in ledger.releases
    ]
    scored = [[s.run, str(s.round), s.split, s.model_key, f"{s.noise_multiplier:.4g}"] for s in ledger.scorings]
    note = unit_note(ledger.unit)
    return "\n".join([
        f"site '{ledger.site}', its own privacy ledger in {state} (unit: {ledger.unit}; delta "
        f"{ledger.delta:g}; {ledger.accountant} accountant; budget {format_budget(ledger.budget_epsilon)} "
        "for each group of patients)",
        *([f"unit: {note}"] if note else []),
        f"training patients: epsilon {format_epsilon(ledger.epsilon)} spent, over {len(rows)} release(s)",
        f"validation patients: epsilon {format_epsilon(ledger.scoring_epsilon('val'))}; test patients: "
        f"epsilon {format_epsilon(ledger.scoring_epsilon('test'))}, over {len(scored)} scoring(s)",
        "",
        table(["run", "round", "purpose", "noise", "sample rate", "steps"], rows),
        *(["", table(["run", "round", "split", "model", "noise"], scored)] if scored else []),
    ])

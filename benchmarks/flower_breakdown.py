"""Where a Flower round's time goes: each message's path from the coordinator to a hospital and
back, in stages, for plain and SecAgg+ rounds at 3 and 10 sites, against the in-process runner.

    .venv/bin/python benchmarks/flower_breakdown.py [--sites 3 10] [--rounds 4] [--stock]
        [--out benchmarks/results/flower_breakdown.md]

`--stock` starts Flower's processes as Flower ships them (PRIVMED_FLOWER_STOCK=1: Flower's own
polling intervals and `flwr-clientapp`), which is how privmed ran before issue 16.

Every process runs on this machine, on loopback, TLS and node authentication on (`privmed serve`,
`privmed join` per hospital, `privmed run --runner flower`), with PRIVMED_FLOWER_TRACE set: the
ServerApp writes when it pushed each message and pulled its reply, each relay ClientApp when its
process started, when Flower handed it the message, and when the hospital's process answered
(privmed.federation.flower.trace). The SuperNodes' own log lines ("Receiving ...", "Sending ...")
are timestamped as they arrive on the hospital's stdout. Stages of one message:

    SuperNode pull    coordinator began the push -> the SuperNode pulled it ("Receiving")
    SuperExec         -> the ClientApp process started (SuperExec's poll for tasks, fork/exec)
    ClientApp start   -> the ClientApp had the message (Python, imports, its task from the
                         SuperNode's Runtime API once the SuperNode pulled the content, app load)
    site              -> the ClientApp answered: the hospital's process trained or scored
                         (through the relay), or SecAgg+'s mod did its own stage
    reply             -> the SuperNode began sending the reply ("Sending": ClientApp push and
                         exit, the SuperNode's poll for replies)
    send              -> the SuperNode had sent it ("Sent successfully")
    coordinator pull  -> the coordinator had the reply (the ServerApp's poll, its pull)

A round is measured from its first training message to the next round's (so rounds 2 to N-1:
round 1 has start-up and setup, round N the final scoring); stage means are over every message of
those rounds. An exchange's wall time is its first push to its last reply; "coordinator" is the
rest of the round (aggregation, the round loop's bookkeeping, checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flower_overhead import config, credentials, in_process  # noqa: E402

from privmed.federation.flower.deploy import stop_process  # noqa: E402

STAGES = ["SuperNode pull", "SuperExec", "ClientApp start", "site", "reply", "send", "coordinator pull"]
SECAGG_STAGES = ["setup", "share_keys", "collect_masked_vectors", "unmask"]
NODE_LINE = re.compile(r"(Receiving|Sending): (\S+) message \(ID: (\w+)\)|(Received|Sent) successfully")


def timestamp_lines(stream, path: Path) -> threading.Thread:  # noqa: ANN001
    """Copy `stream` to `path`, each line prefixed by its arrival time."""

    def copy() -> None:
        with open(path, "w", encoding="utf-8") as out:
            for raw in iter(stream.readline, b""):
                out.write(f"{time.time():.4f}\t{raw.decode('utf-8', 'replace')}")
                out.flush()

    t = threading.Thread(target=copy, daemon=True)
    t.start()
    return t


def on_flower(cfg: dict, root: Path, stock: bool) -> dict:
    """Run `cfg` on a loopback deployment under `root`; the run's rows, trace and node lines."""
    root.mkdir(parents=True)
    env = {**os.environ, "PRIVMED_FLOWER_TRACE": str(root / "trace.jsonl")}
    env.pop("PRIVMED_FLOWER_STOCK", None)
    if stock:
        env["PRIVMED_FLOWER_STOCK"] = "1"
    pm, sites, address = credentials(cfg, root)
    procs, readers = [], []
    try:
        coord = subprocess.Popen(
            pm + ["serve", "--certs", str(root / "certs"), "--keys", str(root / "keys"), "--address",
                  address, "--home", str(root / "home")],
            stdout=open(root / "coordinator.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
            start_new_session=True, env=env)
        procs.append(coord)
        while "coordinator listening" not in (root / "coordinator.log").read_text():
            if coord.poll() is not None:
                raise RuntimeError((root / "coordinator.log").read_text())
            time.sleep(0.2)
        for s in sites:
            p = subprocess.Popen(
                pm + ["join", str(root / "cfg.yaml"), "--site", s, "--server", address, "--certs",
                      str(root / "certs"), "--key", str(root / "keys" / s), "--home", str(root / f"home-{s}")],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=env)
            procs.append(p)
            readers.append(timestamp_lines(p.stdout, root / f"{s}.log"))
        started = time.time()
        subprocess.run(pm + ["run", str(root / "cfg.yaml"), "--runner", "flower", "--server", address,
                             "--certs", str(root / "certs"), "--home", str(root / "home"), "--out",
                             str(root / "run"), "--quiet"], check=True, capture_output=True, env=env)
        wall = time.time() - started
    finally:
        for p in procs:
            stop_process(p, grace=5)
        for r in readers:
            r.join(timeout=5)
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    trace = [json.loads(line) for line in (root / "trace.jsonl").read_text().splitlines()]
    node = {}
    for s in sites:
        last = None  # "Received / Sent successfully" end the message the line before named
        for line in (root / f"{s}.log").read_text(errors="replace").splitlines():
            t, _, text = line.partition("\t")
            if m := NODE_LINE.search(text):
                if m.group(1):
                    last = m.group(3)
                    node[(m.group(1), last)] = float(t)
                elif last is not None:
                    node[(m.group(4), last)] = float(t)
    return {"rows": rows, "trace": trace, "node": node, "wall": wall,
            "summary": json.loads((root / "run" / "summary.json").read_text())}


def breakdown(res: dict) -> tuple[list[dict], dict]:
    """Per exchange kind (in the order of a round): the mean of each stage over its messages, the
    mean exchange wall time, and how many exchanges of that kind a round has; and per round: its
    seconds, the exchanges' wall time and the rest (the coordinator's own)."""
    push, pull, app = {}, {}, {}
    for ev in res["trace"]:
        if ev["ev"] in ("push", "pull", "clientapp"):
            {"push": push, "pull": pull, "clientapp": app}[ev["ev"]][ev["mid"]] = ev
    exchanges: dict[int, list[dict]] = defaultdict(list)
    for p in push.values():
        exchanges[p["exchange"]].append(p)
    seen: dict[str, int] = defaultdict(int)  # a SecAgg+ round's k-th 'train' exchange is stage k
    for x in sorted(exchanges):
        msgs = exchanges[x]
        if msgs[0]["type"] == "train":
            k = seen[msgs[0]["group"]]
            seen[msgs[0]["group"]] += 1
            for m in msgs:
                m["type"] = "train:" + SECAGG_STAGES[min(k, 3)]
    # a round starts with its first training message (a plain 'train.plain', or SecAgg+'s setup)
    starts = sorted(min(m["t"] for m in msgs) for msgs in exchanges.values()
                    if msgs[0]["type"] in ("train.plain", "train:setup"))
    periods = list(zip(starts[1:-1], starts[2:]))  # rounds 2 .. N-1
    stages: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    kinds: list[str] = []
    walls: dict[str, list[float]] = defaultdict(list)
    per_round_x = [0.0] * len(periods)
    per_round_n: list[dict[str, int]] = [defaultdict(int) for _ in periods]
    nd = res["node"]
    for x, msgs in sorted(exchanges.items()):
        first = min(m["t"] for m in msgs)
        rnd = next((i for i, (a, b) in enumerate(periods) if a <= first < b), None)
        done = [pull[m["mid"]]["t"] for m in msgs if m["mid"] in pull]
        if rnd is None or not done:
            continue
        kind = msgs[0]["type"]
        if kind not in kinds:
            kinds.append(kind)
        walls[kind].append(max(done) - first)
        per_round_x[rnd] += walls[kind][-1]
        per_round_n[rnd][kind] += 1
        for m in msgs:
            mid, a, back = m["mid"], app.get(m["mid"]), pull.get(m["mid"])
            reply = back["reply"] if back else None
            ts = [m["t"], nd.get(("Receiving", mid)), a and a.get("started"),
                  a and a["entered"], a and a["t"], nd.get(("Sending", reply)), nd.get(("Sent", reply)),
                  back and back["t"]]
            if None in ts:
                continue
            for stage, t0, t1 in zip(STAGES, ts, ts[1:]):
                stages[kind][stage].append(t1 - t0)
    out = []
    for kind in kinds:
        n = statistics.mean(c[kind] for c in per_round_n)
        out.append({"kind": kind, "per_round": n, "wall": statistics.mean(walls[kind]),
                    **{s: statistics.mean(stages[kind][s]) if stages[kind][s] else float("nan") for s in STAGES}})
    total = statistics.mean(b - a for a, b in periods)
    xs = statistics.mean(per_round_x)
    return out, {"round": total, "exchanges": xs, "coordinator": total - xs}


def kind_name(kind: str) -> str:
    return {"train:setup": "SecAgg+ setup", "train:share_keys": "SecAgg+ share keys",
            "train:collect_masked_vectors": "SecAgg+ train + mask", "train:unmask": "SecAgg+ unmask",
            "train.plain": "train", "evaluate": "score"}.get(kind, kind)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", type=int, nargs="+", default=[3, 10])
    ap.add_argument("--aggregation", nargs="+", default=["plain", "secagg"], choices=["plain", "secagg"])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--stock", action="store_true", help="Flower's processes as Flower ships them (before issue 16)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/flower_breakdown.md"))
    ap.add_argument("--keep", type=Path, help="keep each deployment's logs and trace in this new folder")
    args = ap.parse_args()
    label = "stock Flower settings (before)" if args.stock else "privmed's settings (after)"
    lines = [
        f"# Where a Flower round's time goes: {label}",
        "",
        f"`{' '.join(['python', *sys.argv])}`; phantom task, cnn width 8, {args.rounds} rounds, "
        "round 1 left out, one run. Loopback, TLS and node authentication on, every process on "
        f"this {os.cpu_count()}-core machine (shared with other jobs while this ran). Seconds.",
        "",
        "| sites | aggregation | in-process s/round | Flower s/round | overhead s/round | exchanges s/round | coordinator s/round |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    detail = [
        "",
        "Per message, mean seconds in each stage (see the script's docstring); `wall`: the exchange, "
        "first push to last reply; `n`: exchanges of that kind per round.",
        "",
        "| sites | aggregation | exchange | n | " + " | ".join(STAGES) + " | wall |",
        "|---:|---|---|---:|" + "---:|" * (len(STAGES) + 1),
    ]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        keep = args.keep or tmp
        for n in args.sites:
            for agg in args.aggregation:
                cfg = config(n, args.rounds, agg == "secagg")
                local, _, _ = in_process(cfg, tmp)
                res = on_flower(cfg, keep / f"flower-{n}-{agg}", args.stock)
                kinds, per_round = breakdown(res)
                (keep / f"flower-{n}-{agg}" / "breakdown.json").write_text(json.dumps(
                    {"in_process": local, "per_round": per_round, "kinds": kinds}, indent=1))
                name = "SecAgg+" if agg == "secagg" else "plain"
                lines.append(f"| {n} | {name} | {local:.2f} | {per_round['round']:.2f} | "
                             f"{per_round['round'] - local:.2f} | {per_round['exchanges']:.2f} | "
                             f"{per_round['coordinator']:.2f} |")
                for k in kinds:
                    detail.append(f"| {n} | {name} | {kind_name(k['kind'])} | {k['per_round']:g} | "
                                  + " | ".join(f"{k[s]:.2f}" for s in STAGES) + f" | {k['wall']:.2f} |")
                print(lines[-1], flush=True)
                print("\n".join(detail[-len(kinds):]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines + detail) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()

"""What a coordinator that follows SecAgg+ to the letter learns of one site's update, as Flower
1.41 runs the protocol and privmed uses it: with 3 sites, every site's update, by searching the
seeds of the masks.

    .venv/bin/python benchmarks/secagg_mask_search.py [--out benchmarks/results/secagg_mask_search.md]

Flower draws every mask with `pseudo_rand_gen(seed)`: numpy's RandomState seeded with the XOR of
the seed's 4-byte words, so a mask is one of 2^32 whatever the key. A pairwise key is the
base64 text of an HKDF output (`generate_shared_key`): every byte is ASCII, so its fold has the top
bit of each byte clear, and a pairwise mask is one of 2^28.

The coordinator here follows the protocol and only keeps what it is handed: each site i's masked
vector y_i, and in the unmask stage each active site's self-mask seed b_i (rebuilding those is
what the protocol asks of it). The sites' weights are public, so the first entry of each quantised
vector (SecAgg+'s weight factor) is known. For site T with mask partners a, b:

    y_T - PRG(b_T) = q_T + s_a PRG(k_Ta) + s_b PRG(k_Tb)   (mod 2^32, s = +1 when T's id is larger)

On the first entry this is one equation in two unknown 28-bit folds: a meet in the middle over a
table of every fold's first output (2^28 MT19937 seedings, vectorised in numpy) leaves about 2^24
pairs, the second entry (q_T lies in [0, 2^bits]) about 2^14, and the whole vector one. Then
site a's remaining partner key is a single lookup, and site b's update is what is left.

One run, on this machine, single-threaded (`nice` it on a shared machine): the timings and the
largest memory are written to the table. A 4th site gives each site 3 partners, and the search
2^56 work (2^28 x 2^28): this script does not attempt it.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
SPACE = 2**28  # the folds of a base64 key: 4 bytes, each below 128
CHUNK = 2**16  # seeds per vectorised MT19937 pass (fits in cache)


# ---------------------------------------------------------------------------- Flower's PRG, by hand

def fold(seed: bytes) -> int:
    """The 32-bit seed Flower's pseudo_rand_gen gives numpy's RandomState for `seed`."""
    out = 0
    for i in range(0, len(seed), 4):
        out ^= int.from_bytes(seed[i:i + 4], "little")
    return out


def mask_from_fold(f: int, shapes: list[tuple[int, ...]], modulus: int = 2**32) -> list[np.ndarray]:
    """pseudo_rand_gen's mask, from the fold alone."""
    gen = np.random.RandomState(f)
    return [np.array(gen.randint(0, modulus - 1), dtype=np.int64) if len(s) == 0
            else gen.randint(0, modulus - 1, s, dtype=np.int64) for s in shapes]


def fold_of_index(c: np.ndarray) -> np.ndarray:
    """The c-th fold whose 4 bytes are each below 128 (c in [0, 2^28))."""
    c = c.astype(np.uint32)
    b = [(c >> np.uint32(7 * k)) & np.uint32(0x7F) for k in range(4)]
    return b[0] | (b[1] << np.uint32(8)) | (b[2] << np.uint32(16)) | (b[3] << np.uint32(24))


def first_outputs(seeds: np.ndarray, m: int) -> list[np.ndarray]:
    """The first `m` 32-bit outputs of MT19937 seeded as numpy's RandomState(int) seeds it, for
    each of `seeds` (uint32); RandomState.randint(0, 2^32 - 1) returns these (a draw of 2^32 - 1,
    odds 2^-32, would be redrawn)."""
    mt, t = seeds.astype(np.uint32), np.empty(seeds.shape, np.uint32)
    keep = {0: mt.copy()}
    for i in range(1, 397 + m):
        np.right_shift(mt, 30, out=t)
        np.bitwise_xor(t, mt, out=t)
        np.multiply(t, np.uint32(1812433253), out=t)
        np.add(t, np.uint32(i), out=t)
        mt, t = t, mt
        if i <= m or i >= 397:
            keep[i] = mt.copy()
    out = []
    for k in range(m):
        y = (keep[k] & np.uint32(0x80000000)) | (keep[k + 1] & np.uint32(0x7FFFFFFF))
        v = keep[k + 397] ^ (y >> np.uint32(1)) ^ np.where(y & np.uint32(1), np.uint32(0x9908B0DF), np.uint32(0))
        v ^= v >> np.uint32(11)
        v ^= (v << np.uint32(7)) & np.uint32(0x9D2C5680)
        v ^= (v << np.uint32(15)) & np.uint32(0xEFC60000)
        v ^= v >> np.uint32(18)
        out.append(v)
    return out


def outputs_of_indices(idx: np.ndarray, m: int) -> list[np.ndarray]:
    parts = [first_outputs(fold_of_index(idx[i:i + CHUNK]), m) for i in range(0, len(idx), CHUNK)]
    return [np.concatenate([p[k] for p in parts]) if parts else np.zeros(0, np.uint32) for k in range(m)]


# ---------------------------------------------------------------------------- the honest round

class _Recording:
    """A site's endpoint that keeps what the site handed to SecAgg+ (for the comparison only)."""

    def __init__(self, inner):  # noqa: ANN001
        self.inner, self.sent = inner, None

    def __getattr__(self, name):  # noqa: ANN001, ANN204
        return getattr(self.inner, name)

    def train(self, content):  # noqa: ANN001, ANN201
        from flwr.common import parameters_to_ndarrays
        from flwr.compat.common import recorddict_compat as compat

        reply, seed = self.inner.train(content)
        self.sent = parameters_to_ndarrays(compat.recorddict_to_fitres(reply, True).parameters)
        return reply, seed


def honest_round() -> dict:
    """A 3-site secure round of privmed's (phantom data, privmed's workflow and ClientApp over a
    LocalGrid), its coordinator keeping what SecAgg+ hands it; and, for the comparison only, what
    each site computed."""
    import torch
    from conftest import tiny_config
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from privmed.config import validate_config
    from privmed.federation.experiment import prepare_experiment
    from privmed.federation.flower import secagg
    from privmed.federation.flower.site_app import make_client_app
    from privmed.federation.flower.site_service import SiteEndpoint
    from privmed.federation.transport import site_clients

    torch.set_num_threads(1)
    kept: dict = {}

    class Curious(secagg._SecAggPlus):
        """privmed's workflow, unchanged; it keeps each masked vector and the self-mask seeds it
        rebuilds from the shares the sites send in the unmask stage."""

        def unmask_stage(self, grid, context, state) -> bool:  # noqa: ANN001
            ok = super().unmask_stage(grid, context, state)
            shares: dict[int, list[bytes]] = {}
            for m in grid.seen:
                cfg = {} if m.has_error() else m.content.config_records.get(RECORD_KEY_CONFIGS, {})
                if Key.MASKED_PARAMETERS in cfg:
                    kept.setdefault("masked", {})[m.metadata.src_node_id] = [
                        bytes_to_ndarray(x) for x in cfg[Key.MASKED_PARAMETERS]]
                if Key.SHARE_LIST in cfg:
                    for owner, share in zip(cfg[Key.NODE_ID_LIST], cfg[Key.SHARE_LIST]):
                        shares.setdefault(owner, []).append(share)
            kept["self_seed"] = {nid: combine_shares(s) for nid, s in shares.items()}
            kept.update(max_weight=state.max_weight, top=state.quantization_range,
                        clipping_range=state.clipping_range)
            return ok

    cfg = validate_config(tiny_config(
        sites__count=3, sites__partition="quantity", sites__alpha=2.0, data__samples_per_site=40,
        federation__secure_aggregation=True, federation__rounds=1,
    ))
    exp = prepare_experiment(cfg)
    s = exp.strategy
    tasks = s.configure(s.init_state(exp.initial_weights, exp.trainer_names), exp.trainer_names)
    node_of, apps, sites = {}, {}, {}
    for i, (name, client) in enumerate(site_clients(exp, None).items()):
        node_of[name] = 2001 + i
        sites[2001 + i] = _Recording(SiteEndpoint(client))
        apps[2001 + i] = make_client_app(lambda _ctx, e=sites[2001 + i]: e)
    grid = secagg.LocalGrid(apps)
    grid.seen = []
    shares, threshold = cfg.secagg_shares_threshold
    honest, secagg._SecAggPlus = secagg._SecAggPlus, Curious
    try:
        with secagg.in_process_identity():
            secagg.secure_stage(grid, node_of, tasks, 1, "run", cfg.federation, shares, threshold,
                                n_samples={p.name: p.n_train for p in exp.plan.trainers},
                                weighting=s.secure_weighting, clip=s.secure_clip)
    finally:
        secagg._SecAggPlus = honest
    n = {node_of[p.name]: p.n_train for p in exp.plan.trainers}
    kept["weights"] = n if s.secure_weighting == "samples" else {k: 1 for k in n}
    kept["truth"] = {nid: e.sent for nid, e in sites.items()}
    return kept


# ---------------------------------------------------------------------------- the search

class Table:
    """Every fold's first MT19937 output: `first` by fold index; `values` sorted, with the fold
    index of each in `index` (all uint32, 1 GiB each)."""

    def __init__(self) -> None:
        self.first = np.empty(SPACE, np.uint32)
        for i in range(0, SPACE, CHUNK):
            self.first[i:i + CHUNK] = first_outputs(fold_of_index(np.arange(i, i + CHUNK, dtype=np.uint32)), 1)[0]
        keyed = (self.first.astype(np.uint64) << np.uint64(32)) | np.arange(SPACE, dtype=np.uint64)
        keyed.sort()
        self.values = (keyed >> np.uint64(32)).astype(np.uint32)
        keyed &= np.uint64(0xFFFFFFFF)
        self.index = keyed.astype(np.uint32)

    def lookup(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every (position in `wanted`, fold index) whose first output is wanted[position]."""
        order = np.argsort(wanted, kind="stable")
        lo = np.searchsorted(self.values, wanted[order], "left")
        hi = np.searchsorted(self.values, wanted[order], "right")
        counts = hi - lo
        pos = np.repeat(order, counts)
        within = np.arange(len(pos)) - np.repeat(np.cumsum(counts) - counts, counts)
        return pos, self.index[np.repeat(lo, counts) + within]


def signs(me: int, partners: list[int]) -> list[int]:
    """+1 where site `me` added the pair's mask (its id is the larger), -1 where it subtracted it."""
    return [1 if me > j else -1 for j in partners]


def strip(y: list[np.ndarray], folds: list[int], sgn: list[int]) -> list[np.ndarray]:
    """`y` less the pairwise masks of these folds, as the site added them."""
    out = [a.astype(np.int64) for a in y]
    for f, s in zip(folds, sgn):
        out = [(o - s * m) % 2**32 for o, m in zip(out, mask_from_fold(f, [a.shape for a in y]))]
    return out


def fits(q: list[np.ndarray], factor: int, top: int) -> bool:
    """A quantised vector: the weight factor first, then every entry in [0, top]."""
    return int(np.ravel(q[0])[0]) == factor and all(int(a.max()) <= top for a in q[1:])


def search_two(t: Table, y: list[np.ndarray], factor: int, sgn: list[int], top: int) -> list[int]:
    """The folds (fa, fb) of a site's two pairwise masks, from y = its masked vector less its self
    mask: y[0] - factor = sa P0(fa) + sb P0(fb) (mod 2^32), then the rest must fit."""
    sa, sb = sgn
    c = (int(np.ravel(y[0])[0]) - factor) % 2**32
    y1 = int(np.ravel(y[1])[0])
    for i in range(0, SPACE, 2**22):
        ia = np.arange(i, min(i + 2**22, SPACE), dtype=np.uint32)
        wanted = ((sb * (c - sa * t.first[ia].astype(np.int64))) % 2**32).astype(np.uint32)
        pos, ib = t.lookup(wanted)
        ia = ia[pos]
        # the next entry of q lies in [0, top]: one pair in 2^(32 - bits) passes
        p1a, p1b = outputs_of_indices(ia, 2)[1], outputs_of_indices(ib, 2)[1]
        ok = (y1 - sa * p1a.astype(np.int64) - sb * p1b.astype(np.int64)) % 2**32 <= top
        for fa, fb in zip(fold_of_index(ia[ok]), fold_of_index(ib[ok])):
            if fits(strip(y, [int(fa), int(fb)], sgn), factor, top):
                return [int(fa), int(fb)]
    raise RuntimeError("no pair of folds fits")


def search_one(t: Table, y: list[np.ndarray], factor: int, sgn: int, top: int) -> int:
    """The fold of a site's last pairwise mask (y: its masked vector less every other mask)."""
    wanted = np.array([(sgn * (int(np.ravel(y[0])[0]) - factor)) % 2**32], np.uint32)
    for f in fold_of_index(t.lookup(wanted)[1]):
        if fits(strip(y, [int(f)], [sgn]), factor, top):
            return int(f)
    raise RuntimeError("no fold fits")


def dequantised(q: list[np.ndarray], clipping_range: float, top: int) -> tuple[list[np.ndarray], float]:
    share = int(np.ravel(q[0])[0]) / top
    return [(a * (2 * clipping_range / top) - clipping_range) / share for a in q[1:]], 2 * clipping_range / top / share


class Clock:
    """(CPU seconds of this process, wall seconds) since the last lap."""

    def __init__(self) -> None:
        self.last = time.process_time(), time.perf_counter()

    def lap(self) -> tuple[float, float]:
        now = time.process_time(), time.perf_counter()
        out, self.last = (now[0] - self.last[0], now[1] - self.last[1]), now
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/secagg_mask_search.md")
    args = ap.parse_args()
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    clock = Clock()
    kept = honest_round()
    t_round = clock.lap()
    nodes = sorted(kept["masked"])
    top, r = kept["top"], kept["clipping_range"]
    factor = {n: round(kept["weights"][n] / kept["max_weight"] * top) for n in nodes}
    y = {}
    for n in nodes:  # each site's masked vector less its self mask, which the unmask stage rebuilt
        shapes = [a.shape for a in kept["masked"][n]]
        self_mask = pseudo_rand_gen(kept["self_seed"][n], 2**32, shapes)
        assert all(np.array_equal(m, s) for m, s in zip(self_mask, mask_from_fold(fold(kept["self_seed"][n]), shapes)))
        y[n] = [(a.astype(np.int64) - m) % 2**32 for a, m in zip(kept["masked"][n], self_mask)]

    clock.lap()
    table = Table()
    t_table = clock.lap()
    target, a, b = nodes[1], nodes[0], nodes[2]
    f_ta, f_tb = search_two(table, y[target], factor[target], signs(target, [a, b]), top)
    t_two = clock.lap()
    y_a = strip(y[a], [f_ta], signs(a, [target]))
    f_ab = search_one(table, y_a, factor[a], signs(a, [b])[0], top)
    t_one = clock.lap()
    q = {target: strip(y[target], [f_ta, f_tb], signs(target, [a, b])),
         a: strip(y_a, [f_ab], signs(a, [b])),
         b: strip(y[b], [f_tb, f_ab], signs(b, [target, a]))}
    rows = []
    for n in nodes:
        got, lvl = dequantised(q[n], r, top)
        truth = kept["truth"][n]
        err = max(float(np.max(np.abs(g - t))) for g, t in zip(got, truth)) / lvl
        size = max(float(np.max(np.abs(t))) for t in truth) / lvl
        rows.append(f"| node {n} | {sum(t.size for t in truth)} | {err:.2f} | {size:.0f} |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    text = "\n".join([
        "# A coordinator that follows SecAgg+ recovers each of 3 sites' updates",
        "",
        "`benchmarks/secagg_mask_search.py`: privmed's secure round on 3 phantom sites (Flower 1.41's",
        "SecAgg+, privmed's workflow); the coordinator keeps each masked vector and the self-mask seeds",
        "the unmask stage rebuilds, then searches the 28-bit folds of the pairwise keys that Flower's",
        "`pseudo_rand_gen` seeds numpy's RandomState with. One CPU core, numpy, this machine (shared).",
        "",
        "    PYTHONPATH=src .venv/bin/python benchmarks/secagg_mask_search.py",
        "",
        "| step | CPU seconds | wall seconds |",
        "|---|---|---|",
        f"| the secure round (3 sites train, SecAgg+) | {t_round[0]:.0f} | {t_round[1]:.0f} |",
        f"| the table: first MT19937 output of all 2^28 folds, sorted | {t_table[0]:.0f} | {t_table[1]:.0f} |",
        f"| site {target}'s two pairwise folds (meet in the middle) | {t_two[0]:.0f} | {t_two[1]:.0f} |",
        f"| site {a}'s last pairwise fold (one lookup) | {t_one[0]:.1f} | {t_one[1]:.1f} |",
        "",
        f"Largest memory: {peak:.1f} GiB.",
        "",
        "| site | entries | largest error (quantisation levels) | largest entry (levels) |",
        "|---|---|---|---|",
        *rows,
        "",
        "An error of at most 1 level is SecAgg+'s own rounding: the coordinator has each site's",
        "contribution exactly as the site quantised it. With 4 or more sites each site has 3 or more",
        "mask partners (privmed's default gives every site a share), and this search costs 2^56 or",
        "more; with `secagg_shares: 3` every site has 2 partners, whatever the number of sites.",
        "",
    ])
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

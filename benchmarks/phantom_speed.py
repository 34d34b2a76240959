"""Benchmark: how fast the synthetic phantom source generates images (what tests/test_data_phantom.py
once asserted in seconds: 3 sites x 600 images of 32 px under 1 s; the test now checks that the work
does not grow with the number of images, which cannot flake on a loaded machine).

    .venv/bin/python benchmarks/phantom_speed.py [--sizes 32 64] [--images 600 2400] [--repeats 5] [--out DIR]

Per size and number of images per site: the fastest of `--repeats` loads of 3 sites (the fastest
filters out most of a shared machine's load), after one warm-up load. Writes
benchmarks/results/phantom_speed.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from privmed.config import DataConfig, SitesConfig
from privmed.data import load_source


def _load(n: int, size: int) -> None:
    load_source(DataConfig(source="phantom", samples_per_site=n, size=size), SitesConfig(count=3), 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--images", type=int, nargs="+", default=[600, 2400])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    _load(20, args.sizes[0])  # warm up: imports and caches
    rows = []
    for size in args.sizes:
        for n in args.images:
            best = float("inf")
            for _ in range(args.repeats):
                t = time.perf_counter()
                _load(n, size)
                best = min(best, time.perf_counter() - t)
            images = 3 * (n + max(20, round(0.25 * n)))  # training and test images of 3 sites
            rows.append(f"| {size} | {n} | {images} | {best:.3f} | {images / best:,.0f} |")
            print(rows[-1], flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    text = "\n".join([
        "# Phantom generation speed",
        "",
        f"`python benchmarks/phantom_speed.py`, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, fastest of {args.repeats} loads of 3 sites.",
        "",
        "| size (px) | images per site | images generated | seconds | images / s |",
        "|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ])
    (args.out / "phantom_speed.md").write_text(text)
    print(f"wrote {args.out / 'phantom_speed.md'}")


if __name__ == "__main__":
    main()

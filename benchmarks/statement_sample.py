"""Sample: one hospital's privacy statement (`privmed statement`), as headless Chromium shows and
prints it.

    PYTHONPATH=src .venv/bin/python benchmarks/statement_sample.py [--site hospital-a] [--shadows 2]
        [--candidates 200] [--reuse-run]

The run is `privmed demo --dp` (3 simulated hospitals on SYNTHETIC phantom images, DP-SGD at
(8, 1e-5) per patient), written to runs/statement-sample/ (its private/ folder holds the sites'
secret keys: not for the repository), then attacked by every attack of `privmed audit` (--shadows
shadow runs, --candidates patients of each kind). The statement of --site is written there, and
Chromium renders it: a screenshot at A4 width (2x, 64 colours) to benchmarks/results/statement.png,
and a print to PDF whose pages are counted (the statement must fit one A4 page; exit 1 if not). The
--private statement (the audit's results too, in runs/statement-sample/private/) is printed and
counted the same way.
About 2 minutes on 2 cores; a few seconds with --reuse-run.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUN = ROOT / "runs" / "statement-sample"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
A4_PX = (794, 1123)  # 210 x 297 mm at CSS's 96 px per inch


def _run(reuse: bool, shadows: int, candidates: int) -> None:
    import privmed
    from privmed.audit.run import audit
    from privmed.config import read_yaml

    if not (reuse and (RUN / "private" / "audit.json").is_file()):
        if RUN.exists():
            shutil.rmtree(RUN)
        privmed.run(read_yaml(Path(str(files("privmed") / "configs" / "demo-dp.yaml"))), RUN, progress=True)
        audit(RUN, shadows=shadows, candidates=candidates, seed=0, progress=print)


def _chromium(browser: str, page: Path, png: Path, pdf: Path) -> int:
    """Screenshot `page` to `png` and print it to `pdf`; the PDF's page count."""
    with tempfile.TemporaryDirectory() as profile:
        common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                  f"--user-data-dir={profile}"]
        subprocess.run([*common, f"--screenshot={png}", f"--window-size={A4_PX[0]},{A4_PX[1]}",
                        "--force-device-scale-factor=2", page.as_uri()], capture_output=True, check=True, timeout=120)
        subprocess.run([*common, f"--print-to-pdf={pdf}", "--no-pdf-header-footer", page.as_uri()],
                       capture_output=True, check=True, timeout=120)
    _shrink(png)
    return len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", pdf.read_bytes()))


def _shrink(png: Path) -> None:
    """The screenshot with 64 colours (text and tables need no more): a third of the bytes."""
    from PIL import Image

    with Image.open(png) as im:
        small = im.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    small.save(png, optimize=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--site", default="hospital-a")
    p.add_argument("--shadows", type=int, default=2)
    p.add_argument("--candidates", type=int, default=200)
    p.add_argument("--reuse-run", action="store_true", help="keep runs/statement-sample if it was audited")
    args = p.parse_args()
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        print(f"no headless Chromium on PATH (looked for {', '.join(BROWSERS)})", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    start = time.perf_counter()
    _run(args.reuse_run, args.shadows, args.candidates)
    from privmed.report.statement import write_statement

    page = write_statement(RUN, args.site)
    RESULTS.mkdir(parents=True, exist_ok=True)
    png, pdf = RESULTS / "statement.png", RUN / "statement.pdf"
    pages = _chromium(browser, page, png, pdf)
    mine = write_statement(RUN, args.site, private=True)  # the results stay under private/
    own = _chromium(browser, mine, RUN / "private" / "statement.png", RUN / "private" / "statement.pdf")
    print(f"statement: {page}\nscreenshot: {png}\nprinted: {pdf}, {pages} page(s); the private "
          f"statement {mine}: {own} page(s) ({time.perf_counter() - start:.0f} s in all)")
    return 0 if pages == own == 1 else 1


if __name__ == "__main__":
    sys.exit(main())

"""What privmed writes outside RUN_DIR/private/ may be shared: it holds no patient's image and no
result computed from patients outside the DP mechanism (issue 25, item 5).

Written as someone handed the run directory would read it: after `privmed run` (DP-SGD on
phantoms), `privmed audit` (a membership attack and gradient inversion), `privmed report` and
`privmed statement`, every file outside private/ is searched for the sites' patients' images (each
array of every .npz and .pt, and the image panels of every PNG, embedded in an .html or lying in
plots/, read back pixel by pixel) and for what the audit computed (its results in any text, their
fields in any JSON). Then the pages that show those results on purpose (--private) are checked to
stay in private/, and the lines about inversion and the unit to speak of what the run released.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

import privmed
from conftest import tiny_config
from privmed.audit.membership import load_target
from privmed.cli import main

DP = {"mode": "dp-sgd", "epsilon": 8.0, "delta": 1e-3}
SIDE = 16  # the phantoms' side, in pixels
# audit.json's result fields: none may be in a JSON file outside private/
RESULT_FIELDS = {"roc_auc", "roc_fpr", "roc_tpr", "tpr_at_fpr", "psnr_mean_image", "psnr_random_starts",
                 "label_accuracy", "epsilon_lower", "population_share"}


@pytest.fixture(scope="module")
def audited(tmp_path_factory, one_thread):
    """A DP-SGD run of 3 phantom sites, audited (loss attack; inversion, one batch per setting),
    its report and a statement written by the CLI as a user would."""
    out = tmp_path_factory.mktemp("shareable") / "run"
    privmed.run(tiny_config(name="shareable", federation__rounds=1, data__samples_per_site=40, privacy=DP), out)
    assert main(["audit", str(out), "--attack", "loss", "--attack", "inversion", "--candidates", "20",
                 "--batch", "1", "--trials", "1", "--iterations", "40"]) == 0
    assert main(["report", str(out)]) == 0
    assert main(["statement", str(out), "--site", "site-1"]) == 0
    return out


@pytest.fixture(scope="module")
def patients(audited) -> np.ndarray:
    """Every image of the run's patients (training, validation, test), (N, 1, 16, 16) in [0, 1]."""
    target = load_target(audited)
    parts = [target.source.test.images]
    for sd in target.site_data:
        parts += [p.images for p in (sd.train, sd.val, sd.test) if p is not None and len(p)]
    images = np.concatenate(parts).astype(np.float64)
    assert images.shape[1:] == (1, SIDE, SIDE) and 0.0 <= images.min() and images.max() <= 1.0
    return images


def _shared_files(run: Path) -> list[Path]:
    return sorted(p for p in run.rglob("*") if p.is_file() and "private" not in p.relative_to(run).parts)


def _private_results(run: Path) -> dict:
    """The audit's results, wherever the run keeps them."""
    for path in (run / "private" / "audit.json", run / "audit.json"):
        if path.is_file():
            return json.loads(path.read_text())
    raise AssertionError(f"{run}: the audit left no audit.json")


# ------------------------------------------------------------------------- an attacker's readers


def _arrays(path: Path) -> list[np.ndarray]:
    """Every array a .npz or .pt file holds."""
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return [z[k] for k in z.files]
    found: list[np.ndarray] = []

    def walk(obj) -> None:
        if isinstance(obj, torch.Tensor):
            found.append(obj.detach().numpy())
        elif isinstance(obj, np.ndarray):
            found.append(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(torch.load(path, weights_only=True))
    return found


def _holds_an_image(array: np.ndarray, images: np.ndarray) -> bool:
    """Whether any SIDE x SIDE block of `array`, in any layout that flattens to whole images,
    equals one of `images` (to float32 precision)."""
    if array.dtype.kind not in "fiu" or array.size % SIDE**2:
        return False
    rows = array.astype(np.float64).reshape(-1, SIDE**2)
    flat = images.reshape(len(images), -1)
    d2 = (rows**2).sum(1)[:, None] + (flat**2).sum(1)[None, :] - 2 * rows @ flat.T
    return bool((d2 < 1e-6).any())


def _pngs(path: Path) -> list[bytes]:
    """Every PNG a file is or embeds (base64 data URIs in an .html)."""
    if path.suffix == ".png":
        return [path.read_bytes()]
    if path.suffix == ".html":
        text = path.read_text(encoding="utf-8")
        return [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)]
    return []


def image_panels(png: bytes) -> list[np.ndarray]:
    """The square panels of a figure read back as SIDE x SIDE grey images: each dark frame (an axes'
    spines) sampled at the centres of a SIDE x SIDE grid, which is how matplotlib draws a small image
    (each pixel a block of one colour)."""
    grey = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64).mean(axis=2) / 255.0
    frames, _ = ndimage.label(grey < 0.5, structure=np.ones((3, 3)))
    out = []
    for rows, cols in ndimage.find_objects(frames):
        h, w = rows.stop - rows.start, cols.stop - cols.start
        if min(h, w) < 2 * SIDE or abs(h - w) > 0.1 * max(h, w):
            continue
        ys = (rows.start + (np.arange(SIDE) + 0.5) * h / SIDE).astype(int)
        xs = (cols.start + (np.arange(SIDE) + 0.5) * w / SIDE).astype(int)
        out.append(grey[np.ix_(ys, xs)])
    return out


def _shows_an_image(png: bytes, images: np.ndarray) -> bool:
    grey = images[:, 0]
    return any((np.abs(grey - panel).max(axis=(1, 2)) < 0.02).any() for panel in image_panels(png))


def _result_strings(results: dict) -> list[str]:
    """The audit's results as the report and the statement print them."""
    out = []
    for r in results.get("attacks", {}).values():
        lo, hi = r["roc_auc_ci"]
        out.append(f"{r['roc_auc']:.3f} ({lo:.3f}–{hi:.3f})")
    for r in results.get("inversion", {}).get("settings", {}).values():
        if "psnr" in r:
            out += [f"{r['psnr']['mean']:.1f} ± {r['psnr']['std']:.1f}", f"PSNR {r['psnr']['mean']:.1f} dB"]
    return out


def _json_keys(obj) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | set().union(*map(_json_keys, obj.values()))
    if isinstance(obj, list):
        return set().union(*map(_json_keys, obj)) if obj else set()
    return set()


def _leaks(run: Path, images: np.ndarray) -> list[str]:
    """Each file outside private/ that holds a patient's image or an audit result, and why."""
    results = _private_results(run)
    printed = _result_strings(results)
    assert printed, "the audit computed nothing to look for"
    found = []
    for path in _shared_files(run):
        name = str(path.relative_to(run))
        if path.suffix in (".npz", ".pt") and any(_holds_an_image(a, images) for a in _arrays(path)):
            found.append(f"{name}: an array holds a patient's image")
        if any(_shows_an_image(png, images) for png in _pngs(path)):
            found.append(f"{name}: a figure shows a patient's image")
        if path.suffix in (".html", ".json", ".jsonl", ".txt", ".yaml", ".md"):
            text = path.read_text(encoding="utf-8")
            found += [f"{name}: prints the audit's result '{s}'" for s in printed if s in text]
            if path.suffix == ".json" and _json_keys(json.loads(text)) & RESULT_FIELDS:
                found.append(f"{name}: holds audit result fields {sorted(_json_keys(json.loads(text)) & RESULT_FIELDS)}")
    return found


# ------------------------------------------------------------------------- the tests


def test_the_readers_find_what_they_look_for(audited, patients):
    """The readers work: the arrays and figures the audit keeps privately do hold the patients'
    images, read back from the figure's pixels; the shareable figures of the run do not."""
    private = audited / "private"
    with np.load(private / "audit_inversion.npz") as z:
        originals = [z[k] for k in z.files if k.endswith("__originals")]
    assert originals and all(_holds_an_image(o, patients) for o in originals)
    figure = (private / "plots" / "audit_inversion.png").read_bytes()
    assert len(image_panels(figure)) >= len(originals) and _shows_an_image(figure, patients)
    assert not _shows_an_image((audited / "plots" / "learning_curves.png").read_bytes(), patients)
    assert _result_strings(_private_results(audited))


def test_nothing_outside_private_holds_a_patients_image_or_an_audit_result(audited, patients):
    assert (audited / "report.html").is_file() and (audited / "statement-site-1.html").is_file()
    assert _leaks(audited, patients) == []


def test_the_private_pages_show_the_results_and_stay_in_private(audited, patients, capsys):
    assert main(["report", str(audited), "--private"]) == 0
    assert main(["statement", str(audited), "--site", "site-1", "--private"]) == 0
    printed = capsys.readouterr().out
    report, statement = audited / "private" / "report.html", audited / "private" / "statement-site-1.html"
    assert str(report.resolve()) in printed and str(statement.resolve()) in printed
    # they show what the shareable pages leave out, and say so
    results = _private_results(audited)
    for page in (report, statement):
        text = page.read_text(encoding="utf-8")
        assert "PRIVATE, NEVER SHARE" in text
        r = results["attacks"]["loss"]
        assert f"{r['roc_auc']:.3f} ({r['roc_auc_ci'][0]:.3f}–{r['roc_auc_ci'][1]:.3f})" in text
    assert any(_shows_an_image(png, patients) for png in _pngs(report))
    for page in (audited / "report.html", audited / "statement-site-1.html"):
        text = page.read_text(encoding="utf-8")
        assert "private/audit.json" in text and "--private" in text and "PRIVATE, NEVER SHARE" not in text
    # the folder is the owner's alone, and the files that hold results too
    assert stat.S_IMODE(os.stat(audited / "private").st_mode) == 0o700
    for name in ("audit.json", "audit_inversion.npz"):
        assert stat.S_IMODE(os.stat(audited / "private" / name).st_mode) == 0o600, name
    assert _leaks(audited, patients) == []
    # a private page asked for in the shareable part of the run directory is refused
    assert main(["statement", str(audited), "--site", "site-1", "--private", "--out",
                 str(audited / "mine.html")]) == 2
    assert "outside private/" in capsys.readouterr().err and not (audited / "mine.html").exists()


def test_the_inversion_line_is_what_the_run_released(audited, capsys):
    """A DP-SGD run released DP-SGD updates: the statement's and the CLI's line is that setting's
    PSNR, not the best over settings the run never used (a plain update's)."""
    results = _private_results(audited)
    settings = results["inversion"]["settings"]
    dp = [k for k, r in settings.items() if r["view"] == "site-dp"]
    assert results["inversion"]["released"]["setting"] == dp[0] and len(dp) == 1
    released, plain = settings[dp[0]]["psnr"]["mean"], settings["site-b1-step"]["psnr"]["mean"]
    assert f"{released:.1f}" != f"{plain:.1f}"  # the test tells them apart
    assert main(["statement", str(audited), "--site", "site-1", "--private"]) == 0
    capsys.readouterr()
    text = " ".join((audited / "private" / "statement-site-1.html").read_text(encoding="utf-8").split())
    line = next(s for s in re.findall(r"<li>(.*?)</li>", text) if "Images rebuilt" in s)
    assert f"PSNR {released:.1f} dB" in line and "DP-SGD update" in line
    assert f"{plain:.1f}" not in line
    from privmed.cli.audit import inversion_line as _inversion_line

    assert f"PSNR {released:.1f} dB" in _inversion_line(results["inversion"])


def test_the_audit_speaks_of_the_runs_unit(audited):
    """audit.json's unit is the run's (summary.json's privacy.unit: patient here)."""
    results = _private_results(audited)
    summary = json.loads((audited / "summary.json").read_text())
    assert results["unit"] == summary["privacy"]["unit"] == "patient"
    assert "training patients" in results["candidates"]["drawn_from"]


def test_an_older_run_directory_is_moved_into_private(audited, patients, tmp_path, capsys):
    """What an older privmed wrote beside the shareable files (audit.json, audit_inversion.npz,
    the audit's figures) is moved into private/ by the next report, and the report says so."""
    old = tmp_path / "old"
    for rel in ("config.yaml", "summary.json", "metrics.jsonl", "run.json", "privacy_ledger.json"):
        (old / rel).parent.mkdir(parents=True, exist_ok=True)
        (old / rel).write_bytes((audited / rel).read_bytes())
    (old / "audit.json").write_bytes((audited / "private" / "audit.json").read_bytes())
    (old / "audit_inversion.npz").write_bytes((audited / "private" / "audit_inversion.npz").read_bytes())
    (old / "plots").mkdir()
    (old / "plots" / "audit_inversion.png").write_bytes((audited / "private" / "plots" / "audit_inversion.png").read_bytes())
    assert len(_leaks(old, patients)) >= 3
    assert main(["report", str(old)]) == 0
    said = capsys.readouterr().out
    for rel in ("audit.json", "audit_inversion.npz", "plots/audit_inversion.png"):
        assert f"moved {old / rel} to {old / 'private' / rel}" in said
        assert (old / "private" / rel).is_file() and not (old / rel).exists()
    assert _leaks(old, patients) == []


def test_a_run_without_patient_ids_is_audited_and_stated_per_image(tmp_path, one_thread, capsys):
    """Where the data names no patients (MedMNIST) the unit is one image: audit.json says so, and
    the pages speak of images wherever they speak of the unit, on one page as on the other."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 255, (40, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (40, 1))
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "pneumoniamnist.npz", **arrays)
    cfg = tiny_config(name="per-image", federation__rounds=1, privacy=DP)
    cfg["data"] = {"source": "medmnist", "name": "pneumoniamnist", "root": str(tmp_path / "data"), "download": False}
    cfg["sites"] = {"count": 2, "partition": "iid", "min_samples": 5}
    run = tmp_path / "run"
    privmed.run(cfg, run)
    assert main(["audit", str(run), "--attack", "loss", "--candidates", "15"]) == 0
    capsys.readouterr()
    results = _private_results(run)
    assert results["unit"] == json.loads((run / "summary.json").read_text())["privacy"]["unit"] == "record"
    assert "each image's label" in results["attacks"]["loss"]["assumes"]
    assert "training images" in results["candidates"]["drawn_from"] and "patient" not in json.dumps(results["candidates"])
    for extra in ((), ("--private",)):
        assert main(["statement", str(run), "--site", "site-1", *extra]) == 0
        page = Path(capsys.readouterr().out.strip().split(": ", 1)[1]).read_text(encoding="utf-8")
        text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())
        assert "images sampled at rate" in text and "Differential privacy per image" in text
        for wrong in ("patients sampled", "training patients", "each patient's", "canary patients",
                      "whether a patient was", "whether a image"):
            assert wrong not in text, (extra, wrong)
    assert "Asked about 15 training images" in text and "knows each image's label" in text



def _setting(view: str, psnr: float, sigma: float | None = None, site: str | None = "site-1") -> dict:
    r = {"view": view, "psnr": {"mean": psnr}}
    if sigma is not None:
        r["noise_multiplier"] = sigma
    if site is not None and view != "secure-sum":
        r["site"] = site
    return r


SETTINGS = {"settings": {
    "site-b1-step": _setting("site", 30.0), "site-b4-step": _setting("site", 25.0),
    "site-dp-eps8-b1-step": _setting("site-dp", 12.0, 0.5), "site-dp-eps8-b4-step": _setting("site-dp", 13.0, 0.5),
    "site-dp-eps1-b1-step": _setting("site-dp", 9.0, 2.0),
    "secure-sum-b1-step": _setting("secure-sum", 18.0), "secure-sum-b1-step-as-one": _setting("secure-sum", 20.0),
    "secure-sum-b8-step": {"view": "secure-sum", "skipped": "the run has 2 sites"},
}}


@pytest.mark.parametrize("mode, secure, noise, view, key", [
    # DP-SGD: the settings with the run's noise (or less), the best rebuilt of them
    ("dp-sgd", False, {"site-1": 0.5, "site-2": 0.7}, "site-dp", "site-dp-eps8-b4-step"),
    ("dp-sgd", False, {"site-1": 1.0}, "site-dp", "site-dp-eps8-b4-step"),  # less noise than the run's: a bound
    ("dp-sgd", False, {"site-1": 0.3}, "site-dp", None),  # every setting had more noise than the run
    ("dp-sgd", True, {"site-1": 0.5}, "site-dp", "site-dp-eps8-b4-step"),
    ("none", True, {}, "secure-sum", "secure-sum-b1-step-as-one"),
    ("central", True, {}, "secure-sum", "secure-sum-b1-step-as-one"),
    ("none", False, {}, "site", "site-b1-step"),
    ("central", False, {}, "site", "site-b1-step"),  # the coordinator sees the update before its noise
])
def test_the_released_setting_is_chosen_by_what_the_run_sent(mode, secure, noise, view, key):
    from privmed.report.released import released_inversion

    r = released_inversion(SETTINGS, mode, secure, noise)
    assert (r.view, r.key) == (view, key)
    if key is not None:
        assert r.setting == SETTINGS["settings"][key]
    if mode == "dp-sgd" and secure:
        assert "secure sum" in r.words


def test_an_inversion_entry_that_names_no_site_is_held_to_the_least_noisy_release():
    from privmed.report.released import released_inversion

    legacy = {"settings": {"site-dp-eps8-b1-step": _setting("site-dp", 12.0, 0.5, site=None)}}
    assert released_inversion(legacy, "dp-sgd", False, {"a": 0.5, "b": 0.4}).key is None
    assert released_inversion(legacy, "dp-sgd", False, {"a": 0.5, "b": 0.6}).key == "site-dp-eps8-b1-step"

"""`privmed statement`: one hospital's privacy statement, on tiny runs made with privmed's API on
generated phantoms (DP-SGD with an audit, central DP, secure aggregation, no privacy). Every
figure checked here is computed again from the run's files, independently of the page: the
ledger's epsilon (recomputed from its releases), the audit's numbers (on the --private page only),
the rounds' dates."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

import privmed
from privmed.audit.run import audit
from privmed.cli import main
from privmed.privacy.figures import format_budget, format_epsilon
from privmed.privacy.ledger import PrivacyLedger
from privmed.report.statement import default_name, write_statement
from privmed.report.words import fmt_bound, fmt_number, unit_words

DP = {"mode": "dp-sgd", "epsilon": 4.0, "delta": 1e-3}
CHROMIUM = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory, one_thread):
    """A DP-SGD run of 3 phantom sites, audited by every attack (2 shadow runs, 30 candidates)."""
    out = tmp_path_factory.mktemp("statement") / "dp"
    privmed.run(tiny_config(name="st-dp", privacy=DP), out)
    audit(out, shadows=2, candidates=30, seed=0)
    return out


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("statement") / "plain"
    privmed.run(tiny_config(name="st-plain"), out)
    return out


def _statement(run: Path, site: str, capsys, *extra: str) -> str:
    assert main(["statement", str(run), "--site", site, *extra]) == 0
    printed = capsys.readouterr().out.strip()
    path = Path(printed.split(": ", 1)[1])
    return path.read_text(encoding="utf-8")


def _by_id(page: str, element_id: str) -> str:
    m = re.search(rf'id="{element_id}"[^>]*>(.*?)</', page, re.S)
    assert m, f"no element with id {element_id}"
    return _text(m.group(1))


def _text(page: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_dp_statement_shows_the_ledgers_epsilon_budget_unit_and_releases(dp_run, capsys):
    page = _statement(dp_run, "site-2", capsys)
    assert (dp_run / "statement-site-2.html").is_file()
    ledger = PrivacyLedger.load(dp_run / "privacy_ledger.json")
    summary = json.loads((dp_run / "summary.json").read_text())
    eps = ledger.epsilon("site-2")
    shown = _by_id(page, "epsilon")
    assert shown == format_epsilon(eps) and float(shown) >= eps  # rounded up, never below
    assert _by_id(page, "budget") == format_budget(ledger.budget_epsilon) == "4"
    assert _by_id(page, "delta") == fmt_number(ledger.delta)
    assert _by_id(page, "unit") == unit_words(summary["privacy"]["unit"])[1]
    text = _text(page)
    # what left the site: each DP-SGD release as the ledger records it, and the rounds' dates
    (_, release), *_ = ledger.releases("site-2")
    assert f"noise of multiplier {fmt_number(release.noise_multiplier)}" in text
    assert f"sampled at rate {fmt_number(release.sample_rate)}" in text
    rows = [json.loads(line) for line in (dp_run / "metrics.jsonl").read_text().splitlines()]
    assert f"Rounds 1–{len(rows)}" in text and rows[-1]["finished"][:10] in text
    n = summary["sites"]["site-2"]
    # the unit is the patient: the page counts patients, their images beside
    patients = summary["privacy"]["plan"]["site-2"]["n_patients"]
    assert f"{patients} training patients ({n['n_train']} images)" in text
    assert "patients sampled at rate" in text
    # its validation patients scored each round and its test patients once at the end, as noisy
    # counts: the second guarantee, from the ledger's scorings, rounded up
    assert f"its {n['n_val']} validation images, as noisy counts" in text
    assert f"the scores of the final model on its {n['n_test']} test images, as noisy counts" in text
    scoring = max(ledger.scoring_epsilon("site-2", split) for split in ("val", "test"))
    assert _by_id(page, "scoring-epsilon") == format_epsilon(scoring) and scoring > 0
    # the site's own ledger (a simulation keeps it in the run directory) agrees with the run's
    assert "it agrees with the coordinator's ledger" in text
    assert "private/sites/site-2/site_ledger.json" in text
    # printable and static: one A4 page by CSS, no scripts
    assert "@page { size: A4" in page and "<script" not in page


def test_the_audit_results_are_shown_with_what_each_attacker_assumes(dp_run, capsys):
    page = _text(_statement(dp_run, "site-1", capsys, "--private"))
    assert (dp_run / "private" / "statement-site-1.html").is_file()
    result = json.loads((dp_run / "private" / "audit.json").read_text())
    assert len(result["attacks"]) == 4
    for name, r in result["attacks"].items():
        assert r["title"] in page, name
        lo, hi = r["roc_auc_ci"]
        assert f"{r['roc_auc']:.3f} ({lo:.3f}–{hi:.3f})" in page, name
        # each assumption is on the page, the part the shadow attacks share said once
        shared = re.search(r"assume the attacker (.*?)\. Attack", page).group(1)
        rest = r["assumes"].removeprefix(shared).lstrip(" ;,")
        assert rest in page and (r["assumes"] in page or r["assumes"].startswith(shared)), name
        if r["tpr_at_fpr"]["0.01"] is None:
            assert f"not measurable with {r['n_nonmembers']} non-members" in page
    assert r["sees"] in page
    assert f"ROC-AUC by {fmt_bound(result['claimed']['max_roc_auc'])}" in page
    assert f"Asked about {result['candidates']['members']} training patients" in page


def test_the_shareable_statement_names_the_attacks_and_shows_no_result(dp_run, capsys):
    page = _text(_statement(dp_run, "site-1", capsys))
    result = json.loads((dp_run / "private" / "audit.json").read_text())
    for name, r in result["attacks"].items():
        assert r["title"] in page, name
        assert f"{r['roc_auc']:.3f} (" not in page, name
    assert "Asked about" not in page and "ROC-AUC (95% CI)" not in page
    assert f"ROC-AUC by {fmt_bound(result['claimed']['max_roc_auc'])}" in page  # the epsilon's bound
    assert "Their results are not on this page" in page and "private/audit.json" in page
    assert f"privmed statement {dp_run} --site site-1 --private" in page


def test_the_page_reads_the_ledger_not_the_summary(dp_run, tmp_path, capsys):
    """A release the ledger counts beyond the completed rounds (charged before a round that never
    finished) raises the page's epsilon past summary.json's, and the site's own ledger then
    disagrees with the run's."""
    run = tmp_path / "run"
    shutil.copytree(dp_run, run)
    data = json.loads((run / "privacy_ledger.json").read_text())
    releases = data["sites"]["site-1"]["releases"]
    # one more release, at a sample rate chosen so that the epsilon rounded to nearest would read
    # below the ledger's: the page must round it up
    for rate in np.linspace(0.30, 0.40, 21):
        extra = {**releases[-1], "round": releases[-1]["round"] + 1, "sample_rate": float(rate)}
        eps = PrivacyLedger.from_dict({**data, "sites": {"site-1": {"releases": [*releases, extra]}}}).epsilon("site-1")
        if float(f"{eps:.3g}") < eps:
            break
    assert float(f"{eps:.3g}") < eps, "no release found whose epsilon rounds down to nearest"
    releases.append(extra)
    (run / "privacy_ledger.json").write_text(json.dumps(data))
    page = _statement(run, "site-1", capsys)
    assert eps == PrivacyLedger.load(run / "privacy_ledger.json").epsilon("site-1")
    before = json.loads((run / "summary.json").read_text())["privacy"]["sites"]["site-1"]
    assert eps > before
    assert _by_id(page, "epsilon") == format_epsilon(eps) != format_epsilon(before)
    assert float(_by_id(page, "epsilon")) >= eps > float(f"{eps:.3g}")
    text = _text(page)
    assert f"counts a release in round {releases[-1]['round']}" in text
    assert "it disagrees with the coordinator's ledger" in text


def test_a_record_unit_is_worded_as_the_report_words_it_with_the_group_guarantee(dp_run, tmp_path, capsys):
    """Where the data names no patients the unit is one record: the page says so in the report's
    words, and names what a patient with several records is left with."""
    run = tmp_path / "run"
    shutil.copytree(dp_run, run)
    for name, key in (("summary.json", "privacy"), ("privacy_ledger.json", None)):
        data = json.loads((run / name).read_text())
        (data[key] if key else data)["unit"] = "record"
        (run / name).write_text(json.dumps(data))
    page = _statement(run, "site-1", capsys)
    assert _by_id(page, "unit") == unit_words("record")[1]
    assert "Differential privacy per image:" in _text(page)
    assert "so k images of one patient have only k × epsilon" in _text(page)
    # one unit on the page, the run's: what was sampled, counted and asked about are images
    n = json.loads((run / "summary.json").read_text())["sites"]["site-1"]
    text = _text(_statement(run, "site-1", capsys, "--private"))
    assert "images sampled at rate" in text and f"{n['n_train']} training images" in text
    assert "Its validation and test images: epsilon ≤" in text and "per image" in text
    assert "training images of all sites" in text
    assert "patients sampled" not in text and "training patients" not in text


def test_missing_files_are_named_and_nothing_is_filled_in(dp_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(dp_run, run)
    (run / "summary.json").unlink()
    (run / "private" / "audit.json").unlink()
    page = _statement(run, "site-3", capsys)
    text = _text(page)
    assert "Missing from the run directory: summary.json" in text
    assert "no summary.json: the run stopped early or is still running" in text
    assert f"No audit was run: run privmed audit {run}" in text
    # the ledger still backs the epsilon
    assert _by_id(page, "epsilon") == format_epsilon(PrivacyLedger.load(run / "privacy_ledger.json").epsilon("site-3"))
    (run / "privacy_ledger.json").unlink()
    page = _statement(run, "site-3", capsys)
    text = _text(page)
    assert "Missing from the run directory: privacy_ledger.json" in text
    # with neither file, no epsilon is stated, and no absence of a guarantee claimed
    assert 'id="epsilon"' not in page and "Not stated: the run was configured with privacy.mode dp-sgd" in text
    assert "No formal privacy guarantee" not in text


def test_a_run_without_privacy_says_there_is_no_guarantee(plain_run, capsys):
    page = _statement(plain_run, "site-1", capsys)
    text = _text(page)
    assert 'id="epsilon"' not in page
    assert "No formal privacy guarantee." in text and "privacy.mode: none" in text
    assert "Everything: without differential privacy there is no formal guarantee" in text
    assert "its mean training loss" in text  # sent in the clear without privacy
    assert f"No audit was run: run privmed audit {plain_run}" in text


def test_central_dp_and_secure_aggregation_say_who_saw_what(tmp_path, one_thread):
    central = tmp_path / "central"
    privmed.run(tiny_config(name="st-central", privacy={"mode": "central", "epsilon": 20.0, "delta": 0.01}), central)
    page = (write_statement(central, "site-1")).read_text()
    assert _by_id(page, "unit") == unit_words("site")[1]
    ledger = PrivacyLedger.load(central / "privacy_ledger.json")
    assert _by_id(page, "epsilon") == format_epsilon(ledger.epsilon("site-1"))
    sigma = ledger.releases("site-1")[0][1].noise_multiplier
    text = _text(page)
    assert f"with Gaussian noise of multiplier {fmt_number(sigma)} added by the site itself" in text
    assert "It holds against the coordinator, even one that cheats" in text
    assert "site-1 clipped its update and added its own share of the noise before anything left it" in text
    secure = tmp_path / "secure"
    privmed.run(tiny_config(name="st-secure", data__samples_per_site=60, federation__secure_aggregation=True), secure)
    text = _text(write_statement(secure, "site-2", out=tmp_path / "s.html").read_text())
    protocol = json.loads((secure / "summary.json").read_text())["secure_aggregation"]["protocol"]
    assert (f"masked by secure aggregation ({protocol}): one that follows the protocol unmasks only the "
            "sum of the sites' updates, but one that deviates can isolate this site's") in text


def test_errors_are_one_line_exit_2_and_write_nothing(plain_run, tmp_path, capsys):
    before = sorted(p.name for p in plain_run.iterdir())
    assert main(["statement", str(plain_run), "--site", "hospital-x"]) == 2
    err = _one_line_error(capsys)
    assert "--site: unknown site 'hospital-x'" in err and "(known: site-1, site-2, site-3)" in err
    assert main(["statement", str(tmp_path / "nowhere"), "--site", "site-1"]) == 2
    assert f"{tmp_path / 'nowhere'} does not exist" in _one_line_error(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["statement", str(tmp_path / "empty"), "--site", "site-1"]) == 2
    assert "not a privmed run directory (it has no config.yaml)" in _one_line_error(capsys)
    assert main(["statement", str(plain_run), "--site", "site-1", "--out", str(tmp_path)]) == 2
    assert f"--out: {tmp_path} is a directory" in _one_line_error(capsys)
    assert main(["statement", str(plain_run), "--site", "site-1", "--state", str(tmp_path)]) == 2
    assert "--state:" in _one_line_error(capsys)
    assert sorted(p.name for p in plain_run.iterdir()) == before
    broken = tmp_path / "broken"
    shutil.copytree(plain_run, broken, ignore=shutil.ignore_patterns("statement-*"))
    (broken / "summary.json").write_text('{"name": ')
    assert main(["statement", str(broken), "--site", "site-1"]) == 2
    assert "summary.json: not valid JSON" in _one_line_error(capsys)
    assert not list(broken.glob("statement-*")) and not list(broken.glob(".*.tmp"))
    with pytest.raises(SystemExit):
        main(["statement", "--help"])
    assert "--site NAME" in capsys.readouterr().out


def test_the_default_file_name_is_safe():
    assert default_name("site-1") == "statement-site-1.html"
    assert default_name("../St Mary's") == "statement-.._St_Mary_s.html"


def _chromium() -> str:
    found = next((shutil.which(name) for name in CHROMIUM if shutil.which(name)), None)
    if found is None:
        pytest.skip(f"no headless Chromium found (looked for {', '.join(CHROMIUM)} on PATH)")
    return found


def test_the_statement_renders_in_headless_chromium_on_one_a4_page(dp_run, tmp_path):
    from PIL import Image

    browser = _chromium()
    page = write_statement(dp_run, "site-1", out=tmp_path / "statement.html")
    png, pdf = tmp_path / "statement.png", tmp_path / "statement.pdf"
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              f"--user-data-dir={tmp_path / 'profile'}"]
    for flags in ([f"--screenshot={png}", "--window-size=794,1123"],
                  [f"--print-to-pdf={pdf}", "--no-pdf-header-footer"]):
        subprocess.run([*common, *flags, page.as_uri()], capture_output=True, timeout=120, check=True)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (794, 1123)
        grey = np.asarray(im.convert("L"), dtype=np.float64)
    assert (grey < 128).mean() > 0.02 and grey.std() > 20, "the screenshot is blank"
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF")
    assert len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", data)) == 1, "the statement prints on more than one page"
    box = [float(x) for x in re.search(rb"/MediaBox\s*\[([^\]]+)\]", data).group(1).split()]
    assert box[2] == pytest.approx(595.3, abs=1) and box[3] == pytest.approx(841.9, abs=1)  # A4

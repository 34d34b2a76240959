"""The `privmed` command: help, and bad input -> one line on stderr, exit 2, nothing written."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import tiny_config


def privmed(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "privmed", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"], ["run", "--help"], ["report", "--help"]])
def test_help(args):
    r = privmed(*args)
    assert r.returncode == 0 and "usage: privmed" in r.stdout


def _write(tmp_path: Path, cfg: dict, name="cfg.yaml") -> Path:
    f = tmp_path / name
    f.write_text(yaml.safe_dump(cfg))
    return f


def _npz(path: Path, n=60, size=28, labels=None, **extra):
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.integers(0, 2, (n, 1)) if labels is None else labels(n))
    arrays.update(extra)
    np.savez(path, **arrays)


def _medmnist_cfg(root: Path) -> dict:
    cfg = tiny_config()
    cfg["data"] = {"source": "medmnist", "name": "pneumoniamnist", "root": str(root), "download": False}
    cfg["sites"] = {"count": 2, "partition": "iid", "min_samples": 5}
    return cfg


def _image_folder(root: Path, sizes=((16, 16),)):
    for c in ("normal", "pneumonia"):
        (root / c).mkdir(parents=True)
        for i in range(12):
            w, h = sizes[i % len(sizes)]
            Image.fromarray(np.full((h, w), 40 * i % 255, np.uint8)).save(root / c / f"{i}.png")


def _bad_cases(tmp_path: Path):
    """(config dict, text the one-line message must contain) per kind of bad input."""
    cases = {}
    cfg = tiny_config()
    cfg["sites"]["partiton"] = "iid"
    cases["unknown key"] = (cfg, "did you mean 'partition'")
    cases["wrong type"] = (tiny_config(federation__rounds="ten"), "federation.rounds")
    cases["out of range"] = (tiny_config(training__lr=-0.1), "training.lr")
    cases["unknown model"] = (tiny_config(model__name="resnet19"), "did you mean 'resnet18'")

    missing = tmp_path / "missing"
    missing.mkdir()
    cases["missing file"] = (_medmnist_cfg(missing), "pneumoniamnist.npz")

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "pneumoniamnist.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    cases["corrupt npz"] = (_medmnist_cfg(corrupt), "pneumoniamnist.npz")

    bad_labels = tmp_path / "labels"
    bad_labels.mkdir()
    _npz(bad_labels / "pneumoniamnist.npz", labels=lambda n: np.full((n, 1), 7))
    cases["labels out of range"] = (_medmnist_cfg(bad_labels), "label")

    good = tmp_path / "good"
    good.mkdir()
    _npz(good / "pneumoniamnist.npz")
    cfg = _medmnist_cfg(good)
    cases["site without data"] = (
        {**cfg, "sites": {"count": 40, "partition": "dirichlet", "alpha": 0.01}}, "site")

    mixed = tmp_path / "mixed"
    _image_folder(mixed, sizes=((16, 16), (20, 16)))
    cfg = tiny_config()
    cfg["data"] = {"source": "image-folder", "root": str(mixed)}
    cfg["sites"] = {"count": 2, "partition": "iid", "min_samples": 2}
    cases["mixed sizes"] = (cfg, "data.size")

    broken = tmp_path / "broken"
    _image_folder(broken)
    (broken / "normal" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    cfg = {**cfg, "data": {"source": "image-folder", "root": str(broken)}}
    cases["corrupt png"] = (cfg, "3.png")
    return cases


# Each kind of bad input through the CLI's `main` in this process (a Python start-up and the imports
# per kind would cost ~6 s each); these kinds also through a real `python -m privmed`, for its exit
# code and for a stderr that nothing but the one line reaches (a traceback, a warning).
IN_A_PROCESS = ("unknown key", "corrupt png")


def _bad_input_result(tmp_path: Path, kind: str, cfg: dict, capsys, process: bool) -> tuple[int, str, Path]:
    """(exit code, stderr, --out) of `privmed run` on `cfg`, in a subprocess or through `main`."""
    from privmed.cli import main

    name = kind.replace(" ", "-") + ("-process" if process else "")
    f, out = _write(tmp_path, cfg, f"{name}.yaml"), tmp_path / f"out-{name}"
    if process:
        r = privmed("run", f, "--out", out, "--quiet")
        return r.returncode, r.stderr, out
    capsys.readouterr()
    code = main(["run", str(f), "--out", str(out), "--quiet"])  # an exception escaping fails the test
    return code, capsys.readouterr().err, out


def test_bad_input_gives_one_line_and_exit_2(tmp_path, capsys):
    failures = []
    cases = _bad_cases(tmp_path)
    assert set(IN_A_PROCESS) <= set(cases)
    runs = [(kind, False) for kind in cases] + [(kind, True) for kind in IN_A_PROCESS]
    for kind, process in runs:
        cfg, expected = cases[kind]
        code, err, out = _bad_input_result(tmp_path, kind, cfg, capsys, process)
        lines = err.strip().splitlines()
        ok = (code == 2 and len(lines) == 1 and "Traceback" not in err
              and expected in lines[0] and not out.exists())
        if not ok:
            failures.append(f"{kind} ({'process' if process else 'main'}): rc={code} stderr={err.strip()[-400:]!r}")
    assert not failures, "\n".join(failures)


def test_a_data_error_comes_before_the_heavy_imports(tmp_path):
    """The data is loaded before torch and the models are imported: a missing folder is reported
    without them (issue 27: it took 7-15 s)."""
    f = _write(tmp_path, {"data": {"source": "image-folder", "root": str(tmp_path / "missing")}})
    probe = ("import sys; from privmed.cli import main; "
             f"code = main(['run', {str(f)!r}, '--out', {str(tmp_path / 'out')!r}]); "
             "print(code, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["2", "False"], r.stderr
    assert r.stderr.splitlines() == ["loading data ...", f"privmed: error: data.root: {tmp_path / 'missing'} "
                                     "is not a folder (expected one subfolder per class of .png/.jpg images, "
                                     "or train/ and test/ folders of class subfolders)"]


def test_join_reports_a_data_error_before_the_heavy_imports(tmp_path):
    """`privmed join` loads the hospital's data before torch and Flower are imported."""
    site = tmp_path / "site.yaml"
    site.write_text(f"site: hospital-a\ndata: {{source: image-folder, root: {tmp_path / 'missing'}}}\n")
    probe = ("import sys; from privmed.cli import main; "
             f"code = main(['join', {str(site)!r}, '--server', '127.0.0.1:1', '--insecure', "
             f"'--home', {str(tmp_path / 'home')!r}]); print(code, 'torch' in sys.modules, 'flwr' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.stdout.splitlines()[-1].split() == ["2", "False", "False"], r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"privmed: error: data.root: {tmp_path / 'missing'} is not a "
                                                 "folder (expected one subfolder per class of .png/.jpg images, "
                                                 "or train/ and test/ folders of class subfolders)")
    assert not (tmp_path / "home").exists()


def test_out_dir_holding_another_run_is_refused(tmp_path):
    f = _write(tmp_path, tiny_config(federation__rounds=1))
    out = tmp_path / "run"
    assert privmed("run", f, "--out", out, "--quiet").returncode == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    r = privmed("run", f, "--out", out, "--quiet")
    assert r.returncode == 2 and "--resume" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # untouched


def test_report_on_a_non_run_dir(tmp_path):
    r = privmed("report", tmp_path)
    assert r.returncode == 2 and str(tmp_path) in r.stderr and "Traceback" not in r.stderr


def test_run_and_report(tmp_path):
    f = _write(tmp_path, tiny_config(federation__rounds=1))
    out = tmp_path / "run"
    r = privmed("run", f, "--out", out, "--set", "seed=5")
    assert r.returncode == 0, r.stderr
    assert f"report: {(out / 'report.html').resolve()}" in r.stdout
    assert "SYNTHETIC" in r.stdout
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 5
    (out / "report.html").unlink()
    r = privmed("report", out)
    assert r.returncode == 0 and (out / "report.html").exists()


# ---------------------------------------------------------------- across machines (Flower)


def test_certs_and_keys_are_valid_for_tls_and_node_authentication(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    r = privmed("certs", tmp_path / "certs", "--name", "coord.example.org", "--name", "10.0.0.5")
    assert r.returncode == 0, r.stderr
    ca = x509.load_pem_x509_certificate((tmp_path / "certs" / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.crt").read_bytes())
    cert.verify_directly_issued_by(ca)  # signed by the CA
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # the hospitals' names, and loopback for the coordinator's own commands
    assert san.get_values_for_type(x509.DNSName) == ["coord.example.org", "localhost"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "127.0.0.1", "::1"]
    for secret in ("ca.key", "server.key"):
        assert (tmp_path / "certs" / secret).stat().st_mode & 0o077 == 0  # owner only
    again = privmed("certs", tmp_path / "certs")
    assert again.returncode == 2 and "already exist" in again.stderr

    r = privmed("keys", tmp_path / "keys", "--name", "site-1")
    assert r.returncode == 0, r.stderr
    key = serialization.load_ssh_private_key((tmp_path / "keys" / "site-1").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    pub = serialization.load_ssh_public_key((tmp_path / "keys" / "site-1.pub").read_bytes())
    assert pub.public_numbers() == key.public_key().public_numbers()
    assert (tmp_path / "keys" / "site-1").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("args, message", [
    (["serve"], "--certs is required"),
    (["serve", "--certs", "{tmp}/nowhere"], "ca.crt is missing"),
    (["serve", "--certs", "{tmp}", "--address", "localhost"], "is not HOST:PORT"),
    (["join", "{cfg}", "--site", "site-9", "--server", "127.0.0.1:1", "--certs", "{tmp}", "--key", "{tmp}/k"],
     "'site-9' is not a site of this config"),
    (["join", "{cfg}", "--site", "site-1", "--server", "127.0.0.1:1", "--key", "{tmp}/k"], "--certs is required"),
    (["run", "{cfg}", "--runner", "flower", "--certs", "{tmp}"], "--server is required"),
    (["run", "{cfg}", "--server", "127.0.0.1:1"], "--server, --certs and --insecure need --runner flower"),
    (["run", "{cfg}", "--runner", "flower", "--server", "127.0.0.1:1", "--certs", "{tmp}", "--home", "{tmp}/home"],
     "cannot reach the coordinator at 127.0.0.1:1"),
])
def test_flower_commands_refuse_bad_input(tmp_path, args, message):
    from privmed.federation.flower.credentials import make_certificates

    make_certificates(tmp_path)
    cfg = _write(tmp_path, tiny_config())
    args = [a.format(tmp=tmp_path, cfg=cfg) for a in args]
    r = privmed(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_coordinator_commands_reach_a_wildcard_superlink_over_loopback():
    from privmed.federation.flower.deploy import local_address

    assert local_address("0.0.0.0:9092") == "127.0.0.1:9092"
    assert local_address("[::]:9092") == "[::1]:9092"
    assert local_address("10.0.0.5:9092") == "10.0.0.5:9092"

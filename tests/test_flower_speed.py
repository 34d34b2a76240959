"""What makes a Flower round fast (issue 16), each checked where it can break: the waits privmed
shortens reach the processes deploy.py starts, the one patch to Flower still finds what it patches,
the warm ClientApp server forks Flower's ClientApp (and the launcher falls back to Flower's own),
and the relay ClientApp starts without torch. Every process a test starts is stopped by its id."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from privmed.federation.flower import deploy, flower_patch
from privmed.federation.flower.deploy import descendants, free_port, stop_process
from privmed.federation.flower.warm_clientapp import launcher_script


def test_the_patched_sleeps_are_still_flowers():
    """flower_patch shortens `time.sleep(3)` (after an empty pull) and `time.sleep(0.5)` (between
    looks for a reply) in flwr 1.41.0's SuperNode loop, and the backoff of content pulls: fails
    when a Flower upgrade moves them."""
    from importlib.metadata import version

    import flwr.supernode.start_client_internal as sci
    from flwr.supercore.inflatable import inflatable_utils as iu

    assert version("flwr") == flower_patch.PATCHED_FOR
    assert "time.sleep(3)" in inspect.getsource(sci.start_client_internal)
    assert "time.sleep(0.5)" in inspect.getsource(sci._push_messages)
    assert sci.time is time or isinstance(sci.time, flower_patch._Waits)
    for fn in (iu.pull_objects, iu.pull_and_inflate_object_from_tree):
        assert {"initial_backoff", "backoff_cap"} <= set(fn.__kwdefaults__)
    assert sci.pull_objects is iu.pull_objects  # the SuperNode's pulls use the patched defaults


def test_the_patch_shortens_only_flowers_fixed_waits(monkeypatch):
    import flwr.supernode.start_client_internal as sci

    slept = []
    monkeypatch.setattr(sci, "time", sci.time)  # restored after the test
    monkeypatch.setattr(time, "sleep", slept.append)
    assert flower_patch.patch_supernode_waits()
    sci.time.sleep(3)
    sci.time.sleep(0.5)
    sci.time.sleep(1.25)
    assert slept == [flower_patch.PULL_INTERVAL, flower_patch.REPLY_POLL, 1.25]
    assert sci.time.monotonic is time.monotonic


def test_content_pulls_back_off_briefly_once_patched(monkeypatch):
    """An object not yet uploaded is asked for again after PULL_BACKOFF, not Flower's 1 s: the waits
    Flower's pull loop asks for are recorded (and skipped), not timed."""
    import threading
    import types

    from flwr.supercore.inflatable import inflatable_utils as iu
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    for fn in (iu.pull_objects, iu.pull_and_inflate_object_from_tree):
        monkeypatch.setattr(fn, "__kwdefaults__", dict(fn.__kwdefaults__))  # restored after the test
    waits = []

    class Event(threading.Event):  # Flower waits on its stop event between tries
        def wait(self, timeout=None):  # noqa: ANN001, ANN202
            waits.append(timeout)
            return super().wait(0)

    monkeypatch.setattr(iu, "threading", types.SimpleNamespace(Event=Event, Lock=threading.Lock))
    monkeypatch.setattr(iu.random, "uniform", lambda a, b: 0.0)  # Flower's +-20% jitter off

    def pull(object_id: str) -> bytes:
        if len(waits) < 2:
            raise ObjectUnavailableError(object_id)
        return b"x"

    assert iu.pull_objects(["a"], pull) == {"a": b"x"}
    assert waits == [1.0, 2.0]  # Flower's own: 1 s, then twice that

    waits.clear()
    assert flower_patch.patch_object_pulls()
    assert iu.pull_objects(["a"], pull) == {"a": b"x"}
    assert waits == [flower_patch.PULL_BACKOFF, 2 * flower_patch.PULL_BACKOFF]
    assert flower_patch.PULL_BACKOFF + 2 * flower_patch.PULL_BACKOFF < 0.6
    for fn in (iu.pull_objects, iu.pull_and_inflate_object_from_tree):
        assert fn.__kwdefaults__["backoff_cap"] == flower_patch.PULL_BACKOFF_CAP


def test_the_superexec_poll_interval_is_one_flower_reads(monkeypatch):
    from flwr.supercore.superexec import run_superexec

    monkeypatch.delenv(deploy.STOCK_ENV, raising=False)
    monkeypatch.delenv(deploy.SUPEREXEC_POLL_ENV, raising=False)
    assert deploy.SUPEREXEC_POLL_ENV not in deploy.flower_env(Path("/nonexistent"))  # the SuperLink's
    env = deploy.flower_env(Path("/nonexistent"), supernode=True)
    assert run_superexec._TASK_POLL_INTERVAL_ENV == deploy.SUPEREXEC_POLL_ENV
    monkeypatch.setenv(deploy.SUPEREXEC_POLL_ENV, env[deploy.SUPEREXEC_POLL_ENV])
    assert run_superexec._get_task_poll_interval() == deploy.SUPEREXEC_POLL  # within Flower's bounds
    monkeypatch.delenv(deploy.SUPEREXEC_POLL_ENV)
    monkeypatch.setenv(deploy.STOCK_ENV, "1")
    assert deploy.SUPEREXEC_POLL_ENV not in deploy.flower_env(Path("/nonexistent"), supernode=True)


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(kv.decode().split("=", 1) for kv in raw if b"=" in kv)


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


@pytest.mark.parametrize("stock", [False, True])
def test_the_supernode_deploy_starts_gets_the_short_waits(tmp_path, monkeypatch, stock):
    """A SuperNode as `privmed join` starts it (no SuperLink needed: Flower starts the SuperExec
    before it connects): patched and with a short SuperExec poll, or stock, exactly Flower's."""
    monkeypatch.delenv(deploy.SUPEREXEC_POLL_ENV, raising=False)
    monkeypatch.setenv(deploy.STOCK_ENV, "1" if stock else "0")
    bin_first = tmp_path / "bin"
    proc = deploy.start_hospital("site-1", tmp_path / "s.sock", f"127.0.0.1:{free_port()}", None, None,
                                 tmp_path / "home", insecure=True, log=tmp_path / "node.log",
                                 bin_first=None if stock else bin_first)
    try:
        end, superexec = time.monotonic() + 60, None
        while superexec is None and time.monotonic() < end:
            assert proc.poll() is None, (tmp_path / "node.log").read_text()
            superexec = next((p for p in descendants(proc.pid) if "flower-superexec" in _cmdline(p)), None)
            time.sleep(0.2)
        assert superexec is not None, (tmp_path / "node.log").read_text()
        env = _environ(superexec)
        if stock:
            assert "flower-supernode" in _cmdline(proc.pid)
            assert deploy.SUPEREXEC_POLL_ENV not in env
        else:
            assert "privmed.federation.flower.flower_patch" in _cmdline(proc.pid)
            assert env[deploy.SUPEREXEC_POLL_ENV] == str(deploy.SUPEREXEC_POLL)
            assert env["PATH"].split(os.pathsep)[0] == str(bin_first)
    finally:
        stop_process(proc, grace=5)


def test_the_warm_server_forks_flowers_clientapp_and_the_launcher_falls_back(tmp_path):
    """With the server up, `flwr-clientapp --help` comes from Flower's entry point in a forked child
    (not from the stand-in for Flower's own, which the launcher runs when the server is down); with it down, the fallback runs."""
    sock = tmp_path / "s" / "warm.sock"
    script, fallback = tmp_path / "flwr-clientapp", tmp_path / "flowers-own"
    fallback.write_text("#!/bin/sh\necho \"Flower's own: $*\"\n")
    script.write_text(launcher_script(sys.executable, sock, str(fallback)))
    for f in (script, fallback):
        f.chmod(0o700)
    server = subprocess.Popen([sys.executable, "-m", "privmed.federation.flower.warm_clientapp", str(sock),
                               str(os.getpid())], start_new_session=True)
    try:
        end = time.monotonic() + 60
        while not sock.exists() and time.monotonic() < end:
            assert server.poll() is None
            time.sleep(0.1)
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        got = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
        assert got.returncode == 0
        assert "Run a Flower ClientApp" in got.stdout  # the forked child's, through the launcher's pipe
    finally:
        stop_process(server, grace=5)
    got = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert got.returncode == 0 and got.stdout == "Flower's own: --help\n"


def test_the_relay_clientapp_and_the_launcher_import_no_torch():
    code = ("import sys, privmed.federation.flower.site_app; "
            "print(sorted(m for m in ('torch', 'opacus', 'privmed.federation.site') if m in sys.modules))")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "[]"
    launcher = Path(deploy.__file__).with_name("clientapp_launcher.py").read_text()
    imports = {line.split()[1] for line in launcher.splitlines() if line.startswith("import ")}
    assert imports <= {"json", "os", "socket", "sys"}


def test_tracing_is_off_unless_asked(monkeypatch):
    from privmed.federation.flower import site_app, trace

    monkeypatch.delenv(trace.ENV, raising=False)
    assert not trace.enabled()
    assert site_app.make_client_app(lambda ctx: None)._mods == []
    start = trace.process_start_time()
    assert start is None or 0 <= time.time() - start < 3600 * 24 * 365


def test_a_message_carries_its_arrays_packed_and_bit_for_bit():
    """Each array is an object Flower sends in a request of its own: a model's arrays travel as
    one, and come back with their dtypes, shapes and bits."""
    import numpy as np

    from privmed.federation.flower import messages as M
    from privmed.federation.strategies import SiteUpdate, TrainTask

    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(3, 4)).astype(np.float32), np.array(7, dtype=np.int64),
              np.zeros((0, 5), np.float64), rng.random(6) > 0.5, rng.normal(size=2).astype(np.float16)]
    packed, manifest = M.pack(arrays)
    assert packed.dtype == np.uint8 and packed.size == sum(a.nbytes for a in arrays)
    for a, b in zip(arrays, M.unpack(packed, manifest)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    with pytest.raises(ValueError, match="manifest"):
        M.unpack(packed[:-1], manifest)

    weights = arrays[:2]
    rd = M.encode_instruction(M.Instruction(TrainTask("site-1", weights, correction=arrays[2:]), 3, run="r"))
    assert sum(len(r) for r in rd.array_records.values()) == 1  # one array in the message
    ins = M.decode_instruction(rd)
    assert [w.tobytes() for w in ins.task.weights] == [w.tobytes() for w in weights]
    assert [c.dtype for c in ins.task.correction] == [a.dtype for a in arrays[2:]]

    reply = M.encode_update(SiteUpdate("site-1", weights, 5, metrics={"train_loss": 0.5}), weights, 5)
    assert sum(len(r) for r in reply.array_records.values()) == 1
    update = M.decode_update(reply)
    assert [w.tobytes() for w in update.weights] == [w.tobytes() for w in weights]
    assert update.metrics == {"train_loss": 0.5}
    # a secure contribution stays array by array: SecAgg+'s mod masks each one
    secure = M.encode_update(SiteUpdate("site-1", weights, 5), arrays[:1] * 3, 5, secure=True)
    assert sum(len(r) for r in secure.array_records.values()) == 3

    counts = {"dice_sum": np.arange(3.0), "n": np.array(4)}
    site, key, scores = M.decode_score_reply(M.encode_score_reply("site-1", "global", {"val": ({"dice": 0.5}, counts)}))
    assert scores["val"][0] == {"dice": 0.5}
    assert {k: v.tolist() for k, v in scores["val"][1].items()} == {k: v.tolist() for k, v in counts.items()}
    req = M.encode_score_request("site-1", "global", weights, ("val",), 1, "r")
    assert M.decode_score_request(req)[2][0].tobytes() == weights[0].tobytes()

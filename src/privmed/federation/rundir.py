"""The run directory: config, metrics, checkpoints, summary, predictions and model.

Layout (every file written atomically):
    config.yaml                 the resolved config
    metrics.jsonl               one line per completed round (its scores, and when it finished)
    run.json                    the run's id (sites never release one round of one run twice)
    checkpoints/round-NNNN.pt   everything needed to continue after round NNNN (newest kept)
    summary.json, test_counts.npz, predictions.npz (with a public test set), model.pt, report.html,
    plots/   at the end of the run
    private/                    NEVER SHARE: what, in a simulation, stands for each hospital's own
                                state (sites/NAME: its secret key, its ledger, its last release),
                                and what audits computed from patients (audit.json, ...), owner-only
A checkpoint holds the metrics history too, so `--resume` rewrites metrics.jsonl from it: a kill
between the two writes can neither lose nor double a round. summary.json and metrics.jsonl are
written (here, and only here) and read through their typed records, privmed.federation.records.
"""

from __future__ import annotations

import io as _io
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from privmed import io
from privmed.config import RunConfig, shown
from privmed.errors import RunDirError
from privmed.federation.records import METRICS_FILE, SUMMARY_FILE, MetricsRow, Summary
from privmed.federation.sizing import left_to_data

_CKPT = re.compile(r"^round-(\d{4,})\.pt$")
PRIVATE_DIR = "private"
_NEVER_SHARE = (
    "NEVER SHARE this folder. In this simulation it stands for what each hospital keeps to itself\n"
    "(sites/NAME: its secret key, from which all of its DP noise and sampling derive; its own privacy\n"
    "ledger; its last release). With these keys anyone can replay the DP noise, and the privacy\n"
    "guarantee is void. It also holds what audits computed from patients outside the DP mechanism\n"
    "(audit.json, the inversion audit's images, the private report and statements). Everything else\n"
    "in the run directory may be shared; this folder is needed to continue the run (--resume).\n"
)


COUNTS_FILE = "test_counts.npz"  # the selected models' pooled test counts (privmed.tasks.counts)

def _to_torch(obj: Any) -> Any:
    """numpy arrays -> tensors, recursively, so checkpoints load with torch's weights_only=True."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        return {k: _to_torch(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_torch(v) for v in obj]
    return obj


def _to_numpy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: _to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_numpy(v) for v in obj]
    return obj


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    # -------------------------------------------------------------- opening
    @classmethod
    def check_new(cls, path: Path) -> "RunDir":
        """A RunDir for a new run at `path`; RunDirError if it holds a run or other files.
        Creates nothing yet."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunDirError(f"--out: {path} exists and is not a directory")
        if (path / "config.yaml").exists():
            raise RunDirError(
                f"--out: {path} holds another run; pass --resume to continue it, or choose another --out"
            )
        if path.is_dir() and any(path.iterdir()):
            raise RunDirError(f"--out: {path} is not empty and holds no privmed run; choose another --out")
        return cls(path)

    @classmethod
    def check_resume(cls, path: Path, cfg: RunConfig) -> "RunDir":
        """A RunDir to continue; RunDirError if it holds no run, or a run of another config (only
        federation.rounds may change, to extend a run)."""
        path = Path(path)
        saved_file = path / "config.yaml"
        if not saved_file.is_file():
            raise RunDirError(f"--resume: {path} holds no privmed run (no config.yaml)")
        saved = yaml.safe_load(saved_file.read_text(encoding="utf-8"))
        # keys whose defaults follow the data are compared once the run is planned (api.run)
        skip = {"federation.rounds"} | left_to_data(cfg)
        # a run writes the keys that apply (config.yaml of older runs: every key), so both are
        # compared as shown
        diff = [k for k in config_diff(shown(saved), cfg.shown()) if k not in skip]
        if diff:
            raise RunDirError(
                f"--resume: the config differs from the one {path} was started with, at {', '.join(diff)}"
            )
        return cls(path)

    def start(self, cfg: RunConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.rglob(".*.tmp"):  # left by a run killed mid-write
            stale.unlink(missing_ok=True)
        io.write_text(self.path / "config.yaml", yaml.safe_dump(cfg.shown(), sort_keys=False))

    def run_id(self) -> str:
        """The run's id (run.json), made at its first use: a resumed run keeps it."""
        path = self.path / "run.json"
        if path.is_file():
            return str(json.loads(path.read_text(encoding="utf-8"))["run_id"])
        run_id = secrets.token_hex(8)
        io.write_json(path, {"run_id": run_id})
        return run_id

    def private(self) -> Path:
        """The owner-only folder of the simulation's secrets (see the module's docstring)."""
        d = self.path / PRIVATE_DIR
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        note = d / "NEVER-SHARE.txt"
        if not note.exists():
            io.write_text(note, _NEVER_SHARE)
        return d

    # -------------------------------------------------------------- checkpoints
    def checkpoints(self) -> list[tuple[int, Path]]:
        d = self.path / "checkpoints"
        if not d.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _CKPT.match(p.name))]
        return sorted(found)

    def save_checkpoint(self, ckpt: dict, history: list[MetricsRow], keep: int) -> None:
        """Write round `ckpt['round']`'s checkpoint, then metrics.jsonl (`history`, the rows the
        checkpoint holds), then prune old rounds."""
        rnd = int(ckpt["round"])
        io.torch_save(self.path / "checkpoints" / f"round-{rnd:04d}.pt", _to_torch(ckpt))
        self.write_metrics(history)
        for r, p in self.checkpoints()[:-keep]:
            p.unlink(missing_ok=True)

    def write_metrics(self, rows: list[MetricsRow]) -> None:
        """Rewrite metrics.jsonl with `rows`, one line each (the only writer of that file)."""
        io.write_jsonl(self.path / METRICS_FILE, [row.to_json() for row in rows])

    def load_latest(self) -> dict | None:
        """The newest readable checkpoint (as numpy), or None when no round completed."""
        for rnd, p in reversed(self.checkpoints()):
            try:
                return _to_numpy(torch.load(p, weights_only=True))
            except Exception:  # noqa: BLE001 - a damaged file: fall back to the previous round
                continue
        return None

    def privacy_noise(self) -> dict[str, float] | None:
        """The noise multipliers the run was started with (from its newest checkpoint), or None when
        it has no checkpoint or no privacy."""
        state = self.load_latest()
        privacy = None if state is None else state.get("privacy")
        return None if privacy is None else dict(privacy["noise"])

    # -------------------------------------------------------------- end of run
    def finish(self, summary: Summary, predictions: dict[str, np.ndarray] | None, model: dict,
               counts: dict[str, dict] | None = None) -> None:
        """Write the end of the run: predictions.npz (only when the coordinator scored a public test
        set itself), test_counts.npz (the pooled test counts of each selected model), model.pt
        and summary.json last."""
        if predictions is not None:
            buf = _io.BytesIO()
            np.savez_compressed(buf, **predictions)
            io.write_bytes(self.path / "predictions.npz", buf.getvalue())
        if counts:
            from privmed.tasks.counts import save_counts

            save_counts(self.path / COUNTS_FILE, counts)
        io.torch_save(self.path / "model.pt", _to_torch(model))
        io.write_json(self.path / SUMMARY_FILE, summary.to_json())

"""Atomic file writes: every file a run writes goes through here.

A file is written to a temporary sibling, flushed to disk, then renamed over the target, so a reader
(or a run killed at any moment) sees either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path: Path, write: Callable[[IO[bytes]], None], private: bool = False) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if not private:  # mkstemp makes 0600 (kept for secrets); else give what open() would have
            os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Make the rename itself durable.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_bytes(path: Path, data: bytes, private: bool = False) -> None:
    """`private`: readable by the owner only, from the first byte (keys)."""
    _atomic(path, lambda f: f.write(data), private)


def write_text(path: Path, text: str, private: bool = False) -> None:
    write_bytes(path, text.encode("utf-8"), private)


def write_json(path: Path, obj: Any, private: bool = False) -> None:
    """Strict JSON (NaN and infinities written as null), so any JSON reader can load it."""
    text = json.dumps(_finite(obj), indent=2, default=_json_default, allow_nan=False)
    write_text(path, text + "\n", private)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Rewrite a whole JSON-lines file (small files only: metrics per round)."""
    lines = (json.dumps(_finite(r), default=_json_default, allow_nan=False) + "\n" for r in rows)
    write_text(path, "".join(lines))


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def torch_save(path: Path, obj: Any, private: bool = False) -> None:
    import torch

    _atomic(path, lambda f: torch.save(obj, f), private)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")

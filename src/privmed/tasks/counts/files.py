"""Counts saved to and read from one .npz per run (evaluation counts by model key)."""

from __future__ import annotations

import io
import zipfile
import zlib
from pathlib import Path

import numpy as np

from privmed.tasks.counts.schema import Counts, check_counts


def save_counts(path: Path, counts_by_key: dict[str, Counts]) -> None:
    """Write the counts of each model (key: "global", a site name, ...) to one .npz, atomically; the
    arrays are stored as "MODELKEY/NAME". A model with empty counts ({}) is not stored."""
    from privmed.io import write_bytes

    arrays = {}
    for model, counts in counts_by_key.items():
        for name, value in counts.items():
            value = np.asarray(value)
            if "/" in name or value.dtype == object:
                raise ValueError(f"save_counts: {model}/{name}: a count is a numeric array with a "
                                 "name without '/'")
            arrays[f"{model}/{name}"] = value
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # the histograms are mostly zeros
    write_bytes(Path(path), buf.getvalue())


def load_counts(path: Path) -> dict[str, Counts]:
    """The counts save_counts wrote, by model key. RunDirError naming `path` when it cannot be read
    or a model's counts are inconsistent (`check_counts`)."""
    from privmed.errors import RunDirError

    out: dict[str, Counts] = {}
    try:
        with np.load(Path(path), allow_pickle=False) as z:
            for key in z.files:
                model, sep, name = key.rpartition("/")
                if not sep or not model:
                    raise ValueError(f"array '{key}' is not named MODEL/COUNT")
                out.setdefault(model, {})[name] = z[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise RunDirError(f"{path}: cannot read evaluation counts ({e})") from None
    for model, counts in out.items():
        try:
            check_counts(counts)
        except ValueError as e:
            raise RunDirError(f"{path}: {model}: {e}") from None
    return out

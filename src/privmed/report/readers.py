"""Reading a run directory's JSON, JSON-lines and YAML files: each error a RunDirError that names
the file (and the line) and what is wrong with it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from privmed.errors import RunDirError


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise RunDirError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_yaml(path: Path) -> dict:
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(obj, dict):
        raise RunDirError(f"{path}: expected a YAML mapping, got {type(obj).__name__}")
    return obj


def read_jsonl(path: Path) -> list[dict]:
    """Rows sorted by round; a round written twice (a resumed run) keeps its last row."""
    by_round: dict[Any, dict] = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)  # accepts NaN, as Python's json writes it
        except ValueError as e:
            raise RunDirError(f"{path}:{i}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            raise RunDirError(f"{path}:{i}: expected an object with an integer 'round'")
        by_round[row["round"]] = row
    return [by_round[r] for r in sorted(by_round)]

"""Reading a run directory's other JSON files and its YAML: each error a RunDirError that names the
file and what is wrong with it. summary.json and metrics.jsonl are read by
privmed.federation.records (read_summary_json, read_metrics_json)."""

from __future__ import annotations

import json
from pathlib import Path

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

